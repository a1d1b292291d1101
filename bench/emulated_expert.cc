// switchyard-emulated-expert: an expert service whose compute happens
// "elsewhere": it serves the Expert API for some experts of a checkpoint,
// exactly as switchyard-expert does (same handshake, weight fingerprints,
// streams, frame socket, health and reflection), but each Forward call sleeps --compute-us
// and returns zeros instead of computing the FFN. It stands in for an expert
// on another host or GPU in benchmarks of the gateway on a machine too small
// to hold both (scripts/bench-netem.sh EMULATED_COMPUTE_US): the sleep takes
// no CPU from the gateway. Generated tokens are meaningless (the MoE blocks
// add nothing); only timing is measured.
//
//   switchyard-emulated-expert --model DIR --listen ADDR [--experts 0,1]
//                              [--compute-us US] [--workers N]
//                              [--frame-listen HOST:PORT|unix:PATH|off]
//
// Default --compute-us 100: an H100 reading one Mixtral 8x7B expert's BF16
// weights (3 x 4096 x 14336 x 2 bytes, 352 MB) at ~3.35 TB/s takes ~105 us,
// what a decode batch's expert call costs there.
//
// Prints one line to stdout once serving:
//   switchyard-emulated-expert listening on ADDR experts=0,1 compute-us=N
// SIGTERM/SIGINT: stop (calls in flight get 2 s), exit 0. Bad flags: exit 2;
// start-up errors: one line on stderr, exit 1.
#include <signal.h>
#include <sys/prctl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/flags.h"
#include "core/stop_signals.h"
#include "rpc/grpc_process.h"
#include "tests/in_process_expert.h"

namespace switchyard {
namespace {

constexpr char kName[] = "switchyard-emulated-expert";

const CommandSpec& Spec() {
  static const auto* spec = new CommandSpec{
      kName,
      "switchyard-emulated-expert --model DIR --listen ADDR [--experts 0,1,...] [FLAGS]",
      {
          {"model", true, "required", "model directory (config.json, weights)"},
          {"listen", true, "required", "the Expert API address (port 0 picks one)"},
          {"experts", true, "0", "the experts to serve, comma-separated"},
          {"compute-us", true, "100", "sleep per Forward call instead of computing (0..10000000)"},
          {"workers", true, "8", "threads taking Forward calls (1..256)"},
          {"frame-listen", true, "HOST:0",
           "the frame socket (as switchyard-expert's): HOST:PORT, unix:PATH or off"},
      },
      ""};
  return *spec;
}

// Sleeps compute_us per call and writes zeros: compute done elsewhere.
class SleepingExpertBackend final : public ExpertBackend {
 public:
  SleepingExpertBackend(int hidden, int64_t compute_us)
      : hidden_(hidden), compute_us_(compute_us) {}
  absl::Status RunLayer(int, absl::Span<const ExpertBatch> batches) override {
    if (compute_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(compute_us_));
    for (const ExpertBatch& b : batches) {
      std::memset(b.output, 0, sizeof(float) * static_cast<size_t>(hidden_) * b.tokens);
    }
    return absl::OkStatus();
  }
  std::string Describe() const override {
    return absl::StrCat("emulated (sleep ", compute_us_, " us, zeros)");
  }

 private:
  const int hidden_;
  const int64_t compute_us_;
};

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "%s: %s\n", kName, message.c_str());
  return code;
}

int Run(int argc, char** argv) {
  const sigset_t signals = BlockStopSignals();
  // Sleeps end on time rather than up to 50 us late (the default slack).
  prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

  const std::vector<std::string> args(argv + 1, argv + argc);
  Flags flags;
  if (std::optional<int> code =
          HandleCommandLine(kName, HelpText(Spec()), Spec().flags, args, &flags)) {
    return *code;
  }
  auto model = flags.Required("model");
  auto listen = flags.Required("listen");
  auto compute_us = flags.IntInRange("compute-us", 100, 0, 10000000);
  auto workers = flags.IntInRange("workers", 8, 1, 256);
  for (const absl::Status& s :
       {model.status(), listen.status(), compute_us.status(), workers.status()}) {
    if (!s.ok()) return Fail(absl::StrCat(s.message(), "\nsee ", kName, " --help"), 2);
  }
  const std::string experts_flag = flags.GetOr("experts", "0");
  std::vector<int> experts;
  for (absl::string_view item : absl::StrSplit(experts_flag, ',')) {
    int e = -1;
    if (!absl::SimpleAtoi(item, &e) || e < 0) {
      return Fail(absl::StrCat("--experts ", experts_flag, ": '", item, "' is not an expert index"),
                  2);
    }
    experts.push_back(e);
  }
  const rpc::GrpcProcess grpc_process;  // after the signal mask, which gRPC's threads inherit

  testing::InProcessExpert shard;
  // Loads the real experts only for the handshake's description (weight
  // fingerprints); the compute below never reads them.
  auto description = shard.LoadCheckpointExperts(*model, experts);
  if (!description.ok()) return Fail(std::string(description.status().message()), 1);
  shard.AddCompute(
      std::make_unique<SleepingExpertBackend>(shard.store->config().hidden_size, *compute_us));
  ExpertServerOptions options;
  options.workers = static_cast<int>(*workers);
  if (absl::Status s =
          shard.Serve(shard.store->config(), *std::move(description), std::move(options), *listen);
      !s.ok()) {
    return Fail(std::string(s.message()), 1);
  }
  const std::string frame_listen = flags.GetOr("frame-listen", DefaultFrameListen(*listen));
  if (frame_listen != "off") {
    if (absl::Status s = shard.ServeFrames(frame_listen); !s.ok()) {
      return Fail(absl::StrCat("--frame-listen: ", s.message()), 1);
    }
  }
  std::printf("%s listening on %s experts=%s compute-us=%lld\n", kName, shard.address().c_str(),
              experts_flag.c_str(), static_cast<long long>(*compute_us));
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  shard.Stop(std::chrono::milliseconds(2000));
  return 0;
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) { return switchyard::Run(argc, argv); }
