// A network partition between the gateway and an expert host, emulated with
// Linux network namespaces: two "hosts" (namespaces made by this test, each
// joined to the root namespace by a veth pair on a private /30) run one
// switchyard-expert each, holding experts 0-3 and 4-7; the gateway runs
// in-process in the root namespace. Mid-generation the link to host A is cut
// (`ip link set DEV down`; packets vanish, nothing is reset): the requests
// in flight end with UNAVAILABLE naming an expert of host A once the expert
// call deadline passes, the gateway keeps serving, and after the link is
// restored new requests succeed and equal a solo run on a healthy gateway.
// A second test gives every expert a replica on each host and cuts one host:
// its calls run into their deadline and are retried on the other host, and
// no request fails.
//
// All traffic stays between the root namespace and the namespaces this test
// creates. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); skipped otherwise.
// Namespaces, links and processes are removed in TearDown whatever happened;
// their names carry the test's pid, and leftovers of dead test processes are
// removed first.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/faults/fault_util.h"

namespace switchyard {
namespace {

using faults::Clock;
using faults::ConcurrentStreams;
using faults::ServerProcess;

constexpr int kExpertTimeoutMs = 2000;
constexpr int kStreams = 4;
constexpr int kNewTokens = 300;
constexpr char kPrefix[] = "syft";  // namespace names: syft<pid>h<host>

// Runs `command` with sh; its exit code, output (stdout and stderr) in `output`.
int Sh(const std::string& command, std::string* output = nullptr) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) text.append(buf, n);
  const int status = pclose(p);
  if (output != nullptr) *output = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string IpBinary() {
  for (const char* path : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"}) {
    if (access(path, X_OK) == 0) return path;
  }
  return "";
}

struct Host {
  std::string ns;         // network namespace
  std::string root_link;  // veth end in the root namespace
  std::string ns_link;    // veth end inside `ns`
  std::string root_ip;    // 10.211.B.(4h+1)
  std::string ns_ip;      // 10.211.B.(4h+2)
  std::string experts;    // "0,1,2,3", set by StartCluster
  std::unique_ptr<ServerProcess> process;
  std::string address;  // ns_ip:PORT
};

class NetnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ip_ = IpBinary();
    if (ip_.empty()) GTEST_SKIP() << "no `ip` command (iproute2) on this machine";
    if (geteuid() != 0) {
      GTEST_SKIP() << "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN); euid is "
                   << geteuid();
    }
    RemoveLeftovers();
    const std::string pid = std::to_string(getpid());
    const int octet = FreeOctet();
    ASSERT_GE(octet, 0) << "no free 10.211.X.0/29 subnet";
    for (int h = 0; h < 2; ++h) {
      Host host;
      host.ns = absl::StrCat(kPrefix, pid, "h", h);
      host.root_link = absl::StrCat("syr", pid, "h", h);
      host.ns_link = absl::StrCat("syn", pid, "h", h);
      host.root_ip = absl::StrCat("10.211.", octet, ".", 4 * h + 1);
      host.ns_ip = absl::StrCat("10.211.", octet, ".", 4 * h + 2);
      hosts_.push_back(std::move(host));
    }
    std::string output;
    if (Sh(absl::StrCat(ip_, " netns add ", hosts_[0].ns), &output) != 0) {
      hosts_.clear();
      GTEST_SKIP() << "`ip netns add` failed (no CAP_SYS_ADMIN?): " << output;
    }
    created_.push_back(hosts_[0].ns);
    for (size_t h = 0; h < hosts_.size(); ++h) {
      Host& host = hosts_[h];
      std::vector<std::string> commands;
      if (h > 0) commands.push_back(absl::StrCat(ip_, " netns add ", host.ns));
      commands.push_back(absl::StrCat(ip_, " link add ", host.root_link, " type veth peer name ",
                                      host.ns_link, " netns ", host.ns));
      commands.push_back(absl::StrCat(ip_, " addr add ", host.root_ip, "/30 dev ", host.root_link));
      commands.push_back(absl::StrCat(ip_, " link set ", host.root_link, " up"));
      commands.push_back(absl::StrCat(ip_, " -n ", host.ns, " link set lo up"));
      commands.push_back(
          absl::StrCat(ip_, " -n ", host.ns, " addr add ", host.ns_ip, "/30 dev ", host.ns_link));
      commands.push_back(absl::StrCat(ip_, " -n ", host.ns, " link set ", host.ns_link, " up"));
      for (const std::string& c : commands) {
        const int rc = Sh(c, &output);
        if (h > 0 && c == commands[0] && rc == 0) created_.push_back(host.ns);
        if (rc != 0 && absl::StrContains(c, " type veth ")) {
          GTEST_SKIP() << "cannot create a veth pair (no CAP_NET_ADMIN or no veth driver?): " << c
                       << ": " << output;
        }
        ASSERT_EQ(rc, 0) << c << ": " << output;
      }
      std::printf("[ host     ] %s: %s <-> %s (%s)\n", host.ns.c_str(), host.root_ip.c_str(),
                  host.ns_ip.c_str(), host.root_link.c_str());
    }
  }

  // One switchyard-expert per host serving `experts[h]` ("0,1,2,3"), and an
  // in-process gateway whose expert `e` has the replicas on the hosts that
  // hold it; plus a healthy local-experts gateway for reference results.
  void StartCluster(const std::vector<std::string>& experts) {
    for (size_t h = 0; h < hosts_.size(); ++h) {
      Host& host = hosts_[h];
      host.experts = experts[h];
      host.process = std::make_unique<ServerProcess>();
      std::vector<std::string> argv = {ip_, "netns", "exec", host.ns};
      for (const std::string& a : faults::ExpertArgv(host.experts, host.ns_ip + ":0")) {
        argv.push_back(a);
      }
      auto address = host.process->Start(argv);
      ASSERT_TRUE(address.ok()) << host.ns << ": " << address.status();
      host.address = *address;
      ASSERT_TRUE(absl::StartsWith(host.address, host.ns_ip + ":")) << host.address;
    }
    std::string spec;
    for (int e = 0; e < 8; ++e) {
      std::vector<std::string> replicas;
      for (const Host& host : hosts_) {
        for (absl::string_view held : absl::StrSplit(host.experts, ',')) {
          if (held == std::to_string(e)) replicas.push_back(host.address);
        }
      }
      spec += absl::StrCat(e, "=", absl::StrJoin(replicas, "|"), ";");
    }
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.experts = spec;
    options.expert_timeout_ms = kExpertTimeoutMs;
    auto gateway = Gateway::Start(options);
    ASSERT_TRUE(gateway.ok()) << gateway.status();
    gateway_ = *std::move(gateway);
    channel_ = faults::Dial(gateway_->address());
    options.experts = "local";
    auto local = Gateway::Start(options);
    ASSERT_TRUE(local.ok()) << local.status();
    local_ = *std::move(local);
    std::printf("[ gateway  ] %s over %s\n", gateway_->address().c_str(), spec.c_str());
  }

  void TearDown() override {
    gateway_.reset();
    local_.reset();
    for (Host& host : hosts_) {
      if (host.process != nullptr && host.process->running()) {
        const int status = host.process->Kill(SIGTERM);
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
            << host.ns << ": expert did not exit cleanly: wait status " << status;
      }
      host.process.reset();
    }
    for (Host& host : hosts_) {
      Sh(absl::StrCat(ip_, " link del ", host.root_link));  // also removes the peer
    }
    for (const std::string& ns : created_) {
      std::string output;
      EXPECT_EQ(Sh(absl::StrCat(ip_, " netns del ", ns), &output), 0) << ns << ": " << output;
    }
  }

  // Namespaces of earlier runs whose test process is gone (a crash or a
  // SIGKILL skips TearDown).
  void RemoveLeftovers() {
    std::string list;
    if (Sh(absl::StrCat(ip_, " netns list"), &list) != 0) return;
    for (absl::string_view line : absl::StrSplit(list, '\n')) {
      const std::string name(line.substr(0, line.find(' ')));
      if (!absl::StartsWith(name, kPrefix)) continue;
      const std::string digits = name.substr(strlen(kPrefix), name.find('h') - strlen(kPrefix));
      int pid = 0;
      if (!absl::SimpleAtoi(digits, &pid) || pid <= 0) continue;
      if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // its test is still running
      std::printf("[ cleanup  ] removing leftover namespace %s\n", name.c_str());
      Sh(absl::StrCat(ip_, " link del syr", name.substr(strlen(kPrefix))));
      Sh(absl::StrCat(ip_, " netns del ", name));
    }
  }

  // A third octet X such that 10.211.X.0/29 is not in use here.
  int FreeOctet() {
    std::string addresses;
    Sh(absl::StrCat(ip_, " -4 -o addr show; ", ip_, " -4 route show table all"), &addresses);
    const int start = static_cast<int>(getpid() % 250);
    for (int i = 0; i < 250; ++i) {
      const int octet = (start + i) % 250 + 1;
      if (addresses.find(absl::StrCat("10.211.", octet, ".")) == std::string::npos) return octet;
    }
    return -1;
  }

  void SetLink(const Host& host, bool up) {
    std::string output;
    const std::string command =
        absl::StrCat(ip_, " link set ", host.root_link, up ? " up" : " down");
    ASSERT_EQ(Sh(command, &output), 0) << command << ": " << output;
  }

  std::vector<int32_t> Solo(const v1::GenerateRequest& request) {
    faults::UnaryOutcome o = faults::Generate(faults::Dial(local_->address()), request);
    EXPECT_TRUE(o.status.ok()) << faults::Describe(o.status);
    return o.tokens;
  }

  // True if the message names at least one expert, all of them held by `host`.
  static bool NamesOnlyExpertsOf(const std::string& message, int host) {
    const std::vector<int> named = faults::ExpertsNamed(message);
    if (named.empty()) return false;
    for (int e : named) {
      if (e / 4 != host) return false;
    }
    return true;
  }

  std::string ip_;
  std::vector<Host> hosts_;
  std::vector<std::string> created_;  // namespaces to delete
  std::unique_ptr<Gateway> gateway_;
  std::unique_ptr<Gateway> local_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(NetnsTest, CutLinkFailsItsRequestsAndServiceResumesWhenRestored) {
  ASSERT_NO_FATAL_FAILURE(StartCluster({"0,1,2,3", "4,5,6,7"}));
  const std::vector<std::string> prompts = faults::ReferencePrompts();
  std::vector<v1::GenerateRequest> requests;
  std::vector<std::vector<int32_t>> solo;
  for (int i = 0; i < kStreams; ++i) {
    requests.push_back(faults::GreedyRequest(prompts[i % prompts.size()], kNewTokens));
    solo.push_back(Solo(requests.back()));
  }
  v1::GenerateRequest probe = faults::GreedyRequest(prompts[0], 16);
  const std::vector<int32_t> probe_solo = Solo(probe);

  // Healthy: the split cluster across namespaces gives the local tokens.
  faults::UnaryOutcome healthy = faults::Generate(channel_, probe);
  ASSERT_TRUE(healthy.status.ok()) << faults::Describe(healthy.status);
  EXPECT_EQ(healthy.tokens, probe_solo);

  const Host& cut = hosts_[0];
  {
    ConcurrentStreams streams(channel_, requests, /*min_tokens=*/3);
    ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
    const int finished_before = streams.finished();
    SetLink(cut, /*up=*/false);
    const auto cut_time = Clock::now();
    streams.Join();
    std::printf("[ cut      ] %s down with %d of %d streams done; the rest ended %.2f s later\n",
                cut.root_link.c_str(), finished_before, kStreams, faults::SecondsSince(cut_time));
    int failed = 0;
    for (int i = 0; i < kStreams; ++i) {
      const faults::StreamOutcome& o = streams.outcomes()[i];
      EXPECT_TRUE(faults::IsPrefixOfSolo(o.tokens, solo[i])) << "stream " << i;
      if (o.status.ok()) {
        EXPECT_EQ(o.tokens.size(), static_cast<size_t>(kNewTokens));
        continue;
      }
      ++failed;
      EXPECT_EQ(o.status.error_code(), grpc::StatusCode::UNAVAILABLE) << faults::Describe(o.status);
      EXPECT_TRUE(NamesOnlyExpertsOf(o.status.error_message(), 0)) << faults::Describe(o.status);
      if (failed == 1) std::printf("[ error    ] %s\n", faults::Describe(o.status).c_str());
    }
    EXPECT_GT(failed, 0) << "no request failed although host A was cut off mid-stream";
  }

  // The gateway itself is fine ...
  {
    auto stub = v1::GenerationService::NewStub(channel_);
    grpc::ClientContext ctx;
    v1::TokenizeRequest request;
    request.set_text("partition");
    v1::TokenizeResponse response;
    const grpc::Status s = stub->Tokenize(&ctx, request, &response);
    ASSERT_TRUE(s.ok()) << faults::Describe(s);
  }
  // ... and requests fail with UNAVAILABLE naming host A's expert, within
  // about the expert call deadline, while the link is down.
  faults::UnaryOutcome down = faults::Generate(channel_, probe, std::chrono::seconds(30));
  EXPECT_EQ(down.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << faults::Describe(down.status);
  EXPECT_TRUE(NamesOnlyExpertsOf(down.status.error_message(), 0)) << faults::Describe(down.status);
  EXPECT_LT(down.seconds, 2 * kExpertTimeoutMs / 1000.0 + 5.0) << "a request hung on the cut link";
  std::printf("[ down     ] request failed in %.2f s: %s\n", down.seconds,
              faults::Describe(down.status).c_str());

  SetLink(cut, /*up=*/true);
  const faults::Recovery recovery =
      faults::GenerateUntilOk(channel_, probe, 30.0, std::chrono::milliseconds(200));
  EXPECT_TRUE(recovery.unexpected.empty()) << faults::Describe(recovery.unexpected.front());
  const faults::UnaryOutcome& recovered = recovery.last;
  ASSERT_TRUE(recovered.status.ok())
      << "no recovery within 30 s of restoring the link: " << faults::Describe(recovered.status);
  std::printf("[ restored ] requests succeed again %.2f s after the link came back (%d tries)\n",
              recovery.seconds, recovery.attempts);
  EXPECT_EQ(recovered.tokens, probe_solo);

  ConcurrentStreams again(channel_, requests, /*min_tokens=*/1);
  again.Join();
  EXPECT_TRUE(faults::AllMatchSolo(again.outcomes(), solo));
  std::printf("[ metrics  ] %s",
              faults::MetricLines(metrics::Serialize(gateway_->metrics_registry()),
                                  "switchyard_gateway_expert_call_errors_total")
                  .c_str());
}

// Both hosts hold every expert, so each expert has one replica per host.
// Cutting host A's link mid-stream loses no request: calls to A run into
// their deadline (nothing resets the connection) and are retried on B.
TEST_F(NetnsTest, CutLinkToOneReplicaHostLosesNoRequest) {
  ASSERT_NO_FATAL_FAILURE(StartCluster({"0,1,2,3,4,5,6,7", "0,1,2,3,4,5,6,7"}));
  constexpr int kTokens = 64;
  const std::vector<std::string> prompts = faults::ReferencePrompts();
  std::vector<v1::GenerateRequest> requests;
  std::vector<std::vector<int32_t>> solo;
  for (int i = 0; i < kStreams; ++i) {
    requests.push_back(faults::GreedyRequest(prompts[i % prompts.size()], kTokens));
    solo.push_back(Solo(requests.back()));
  }
  ConcurrentStreams streams(channel_, requests, /*min_tokens=*/3);
  ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
  const int finished_before = streams.finished();
  SetLink(hosts_[0], /*up=*/false);
  const auto cut_time = Clock::now();
  streams.Join();
  const double after_cut = faults::SecondsSince(cut_time);
  std::printf("[ cut      ] %s down with %d of %d streams done; all ended %.2f s later\n",
              hosts_[0].root_link.c_str(), finished_before, kStreams, after_cut);
  // Calls routed to A wait for their deadline until the connection is found
  // dead (observed: ~10 s); a safety bound only.
  EXPECT_LT(after_cut, 90.0);
  EXPECT_TRUE(faults::AllMatchSolo(streams.outcomes(), solo));
  std::printf("[ metrics  ] %s",
              faults::MetricLines(metrics::Serialize(gateway_->metrics_registry()),
                                  "switchyard_gateway_expert_call_errors_total")
                  .c_str());
  SetLink(hosts_[0], /*up=*/true);
}

}  // namespace
}  // namespace switchyard
