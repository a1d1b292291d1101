// Helpers of the fault-tolerance suites (tests/faults/): server processes that
// can be killed, restarted and waited for, expert clusters made of real
// switchyard-expert processes, and Generation API clients that report
// progress so a test can inject a fault mid-stream.
#ifndef SWITCHYARD_TESTS_FAULTS_FAULT_UTIL_H_
#define SWITCHYARD_TESTS_FAULTS_FAULT_UTIL_H_

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "rpc/grpc_process.h"
#include "rpc/status.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace switchyard::faults {

using Clock = std::chrono::steady_clock;

inline double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Holds the gRPC runtime from before the first test to after the last, as
// the servers' mains do (rpc/grpc_process.h). Register with
// ::testing::AddGlobalTestEnvironment(new GrpcProcessEnvironment).
class GrpcProcessEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { grpc_.emplace(); }
  void TearDown() override { grpc_.reset(); }

 private:
  std::optional<rpc::GrpcProcess> grpc_;
};

// Server child processes: tests/process_util.h.
using ServerProcess = testing::ChildProcess;

inline std::string ExpertBinary() { return testing::BinaryDir() + "/switchyard-expert"; }
inline std::string GatewayBinary() { return testing::BinaryDir() + "/switchyard-gateway"; }

// argv of a switchyard-expert for the tiny model serving `experts` ("0,1").
inline std::vector<std::string> ExpertArgv(const std::string& experts, const std::string& listen,
                                           std::vector<std::string> extra = {}) {
  std::vector<std::string> argv = {ExpertBinary(), "--model", testing::TinyMixtralDir(),
                                   "--experts",    experts,   "--listen",
                                   listen};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

// Restarts a killed server with its old argv, listening on `address` (the
// same port). Retries for up to `timeout` in case the port is still held.
inline absl::Status RestartOn(ServerProcess& process, const std::vector<std::string>& old_argv,
                              const std::string& address,
                              std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  std::vector<std::string> argv = old_argv;
  for (size_t i = 0; i + 1 < argv.size(); ++i) {
    if (argv[i] == "--listen") argv[i + 1] = address;
  }
  const auto deadline = Clock::now() + timeout;
  absl::Status last;
  while (Clock::now() < deadline) {
    absl::StatusOr<std::string> got = process.Start(argv);
    if (got.ok() && *got == address) return absl::OkStatus();
    if (got.ok()) {
      process.Kill(SIGKILL);
      return absl::InternalError(absl::StrCat("restarted on ", *got, " not ", address));
    }
    last = got.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return absl::UnavailableError(
      absl::StrCat("could not restart on ", address, ": ", last.message()));
}

// The Hugging Face reference prompts of the tiny model (tests/data).
inline std::vector<std::string> ReferencePrompts() {
  const nlohmann::json reference =
      nlohmann::json::parse(testing::ReadAll(testing::TinyMixtralDir() + "/reference.json"));
  std::vector<std::string> prompts;
  for (const auto& p : reference["prompts"]) prompts.push_back(p["text"].get<std::string>());
  return prompts;
}

inline v1::GenerateRequest GreedyRequest(const std::string& text, int max_new_tokens) {
  v1::GenerateRequest r;
  r.set_text(text);
  r.mutable_stopping()->set_max_new_tokens(max_new_tokens);
  r.mutable_stopping()->set_ignore_eos(true);
  return r;
}

inline void MakeSampled(v1::GenerateRequest* r, uint64_t seed) {
  auto* s = r->mutable_sampling();
  s->set_temperature(0.8f);
  s->set_top_p(0.95f);
  s->set_top_k(40);
  s->set_seed(seed);
}

inline std::shared_ptr<grpc::Channel> Dial(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  // A fresh connection per channel, so channels do not share a subchannel.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

struct UnaryOutcome {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  double seconds = 0;
};

inline UnaryOutcome Generate(const std::shared_ptr<grpc::Channel>& channel,
                             const v1::GenerateRequest& request,
                             std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
  UnaryOutcome out;
  auto stub = v1::GenerationService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  v1::GenerateResponse response;
  const auto start = Clock::now();
  out.status = stub->Generate(&ctx, request, &response);
  out.seconds = SecondsSince(start);
  out.tokens.assign(response.token_ids().begin(), response.token_ids().end());
  out.text = response.text();
  return out;
}

struct StreamOutcome {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  v1::FinishReason finish_reason = v1::FINISH_REASON_UNSPECIFIED;
  bool has_usage = false;
  uint32_t prompt_tokens = 0;
  uint32_t completion_tokens = 0;
  int messages = 0;
  bool done = false;  // Finish returned
};

// Runs one GenerateStream to its end. `on_progress(tokens so far)` runs after
// every message (on this thread).
inline StreamOutcome Stream(const std::shared_ptr<grpc::Channel>& channel,
                            const v1::GenerateRequest& request,
                            const std::function<void(size_t)>& on_progress = nullptr,
                            std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
  StreamOutcome out;
  auto stub = v1::GenerationService::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub->GenerateStream(&ctx, request);
  v1::GenerateStreamResponse m;
  while (reader->Read(&m)) {
    ++out.messages;
    out.text += m.text_delta();
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) out.finish_reason = m.finish_reason();
    if (m.has_usage()) {
      out.has_usage = true;
      out.prompt_tokens = m.usage().prompt_tokens();
      out.completion_tokens = m.usage().completion_tokens();
    }
    if (on_progress) on_progress(out.tokens.size());
  }
  out.status = reader->Finish();
  out.done = true;
  return out;
}

// Counts events from many threads; a test thread waits for a number of them.
class Countdown {
 public:
  void Arrive() {
    std::lock_guard<std::mutex> lock(mu_);
    ++count_;
    cv_.notify_all();
  }
  // True once `n` arrived, false after `timeout`.
  bool WaitFor(int n, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return count_ >= n; });
  }
  int count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return count_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int count_ = 0;
};

// Many concurrent streams, sent together; `started` counts streams that
// received at least `min_tokens` tokens, `finished` those whose call ended.
class ConcurrentStreams {
 public:
  ConcurrentStreams(std::shared_ptr<grpc::Channel> channel,
                    std::vector<v1::GenerateRequest> requests, size_t min_tokens)
      : requests_(std::move(requests)),
        outcomes_(requests_.size()),
        gate_(static_cast<std::ptrdiff_t>(requests_.size())) {
    for (size_t i = 0; i < requests_.size(); ++i) {
      threads_.emplace_back([this, i, channel, min_tokens] {
        // Every stream is sent at once, so none has run far ahead (or ended)
        // while the last thread was still starting on a loaded machine.
        gate_.arrive_and_wait();
        bool counted = false;
        outcomes_[i] = Stream(channel, requests_[i], [&](size_t tokens) {
          if (!counted && tokens >= min_tokens) {
            counted = true;
            started_.Arrive();
          }
        });
        if (!counted) started_.Arrive();  // ended early: do not keep the test waiting
        finished_.Arrive();
      });
    }
  }
  ~ConcurrentStreams() { Join(); }

  // True when every stream got its first tokens (or ended) within `timeout`.
  bool WaitAllStarted(std::chrono::milliseconds timeout) {
    return started_.WaitFor(static_cast<int>(requests_.size()), timeout);
  }
  int finished() const { return finished_.count(); }
  void Join() {
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  const std::vector<StreamOutcome>& outcomes() const { return outcomes_; }
  const std::vector<v1::GenerateRequest>& requests() const { return requests_; }

 private:
  std::vector<v1::GenerateRequest> requests_;
  std::vector<StreamOutcome> outcomes_;
  std::latch gate_;  // the threads start their streams together
  Countdown started_;
  Countdown finished_;
  std::vector<std::thread> threads_;
};

// True if `message` names expert `e` ("expert 5 (layer 0) unavailable: ...").
inline bool NamesExpert(const std::string& message, int e) {
  return std::regex_search(message, std::regex("expert " + std::to_string(e) + "\\b"));
}
// The experts a message names.
inline std::vector<int> ExpertsNamed(const std::string& message) {
  std::vector<int> experts;
  const std::regex re("expert (\\d+)\\b");
  for (auto it = std::sregex_iterator(message.begin(), message.end(), re);
       it != std::sregex_iterator(); ++it) {
    experts.push_back(std::stoi((*it)[1].str()));
  }
  return experts;
}

// Lines of Prometheus text whose metric name starts with `prefix` and that
// contain `contains`, for information in test logs.
inline std::string MetricLines(const std::string& text, const std::string& prefix,
                               const std::string& contains = "") {
  std::istringstream in(text);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0 && line.find(contains) != std::string::npos) {
      out += line + "\n";
    }
  }
  return out;
}

inline std::string CodeName(grpc::StatusCode code) { return rpc::GrpcCodeName(code); }

inline std::string Describe(const grpc::Status& s) {
  return absl::StrCat(CodeName(s.error_code()), ": ", s.error_message());
}

// Every stream succeeded and streamed exactly its solo run's tokens.
inline ::testing::AssertionResult AllMatchSolo(const std::vector<StreamOutcome>& outcomes,
                                               const std::vector<std::vector<int32_t>>& solo) {
  for (size_t i = 0; i < outcomes.size(); ++i) {
    const StreamOutcome& o = outcomes[i];
    if (!o.status.ok()) {
      return ::testing::AssertionFailure() << "stream " << i << ": " << Describe(o.status);
    }
    if (o.tokens != solo[i]) {
      return ::testing::AssertionFailure()
             << "stream " << i << " streamed " << ::testing::PrintToString(o.tokens)
             << ", its solo run " << ::testing::PrintToString(solo[i]);
    }
  }
  return ::testing::AssertionSuccess();
}

// What a stream cut short by a fault delivered is the start of its solo run.
inline ::testing::AssertionResult IsPrefixOfSolo(const std::vector<int32_t>& tokens,
                                                 const std::vector<int32_t>& solo) {
  if (tokens.size() > solo.size() || !std::equal(tokens.begin(), tokens.end(), solo.begin())) {
    return ::testing::AssertionFailure()
           << ::testing::PrintToString(tokens) << " is not a prefix of the solo run "
           << ::testing::PrintToString(solo);
  }
  return ::testing::AssertionSuccess();
}

// Repeats `request` (each try with a `per_try` deadline, `pause` between
// tries) until it succeeds or `budget` has passed since the call. The
// failures on the way are what an outage looks like to a client.
struct Recovery {
  UnaryOutcome last;  // the last try: ok once recovered
  int attempts = 0;
  double seconds = 0;                    // from the call to the last try's end
  std::vector<grpc::Status> unexpected;  // failures other than UNAVAILABLE / DEADLINE_EXCEEDED
};
inline Recovery GenerateUntilOk(const std::shared_ptr<grpc::Channel>& channel,
                                const v1::GenerateRequest& request, double budget_seconds,
                                std::chrono::milliseconds pause,
                                std::chrono::milliseconds per_try = std::chrono::seconds(10)) {
  Recovery r;
  const auto start = Clock::now();
  while (SecondsSince(start) < budget_seconds) {
    ++r.attempts;
    r.last = Generate(channel, request, per_try);
    if (r.last.status.ok()) break;
    const grpc::StatusCode code = r.last.status.error_code();
    if (code != grpc::StatusCode::UNAVAILABLE && code != grpc::StatusCode::DEADLINE_EXCEEDED) {
      r.unexpected.push_back(r.last.status);
    }
    std::this_thread::sleep_for(pause);
  }
  r.seconds = SecondsSince(start);
  return r;
}

}  // namespace switchyard::faults

#endif  // SWITCHYARD_TESTS_FAULTS_FAULT_UTIL_H_
