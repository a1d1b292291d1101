// switchyard-expert: serves some experts of a Mixtral-style checkpoint over
// gRPC (switchyard.v1.ExpertService, plus grpc.health.v1 and reflection).
//
//   switchyard-expert --model DIR [--listen ADDR] [--experts 0,1] [--layers B:E]
//                     [--workers N] [--max-connection-age-ms MS] [--grace-ms MS]
//                     [--tls-cert F --tls-key F [--tls-client-ca F]]
//                     [--device cpu|cuda [--precision bf16|f32] [--gpu N]]
//
// --device cuda computes on GPU N (CUDA builds): weights in device memory in
// --precision (BF16 weights with FP32 accumulate by default), batches copied
// through pinned host buffers. --device cpu (default) computes in FP32.
//
// --tls-cert/--tls-key serve over TLS; --tls-client-ca also requires every
// client (the gateway) to present a certificate signed by that CA (mutual
// TLS, enforced in the handshake, so GetShardInfo, Forward, health and
// reflection all need it). The frame socket (--frame-listen) then speaks TLS
// with the same certificate and rule.
//
// Prints one line to stdout once serving:
//   switchyard-expert listening on ADDR experts=0,1 layers=0:L
// SIGTERM/SIGINT: health NOT_SERVING, stop accepting, finish in-flight calls
// within --grace-ms, exit 0. Start-up errors: one line on stderr, exit 1.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "core/cpu_quota.h"
#include "core/flags.h"
#include "core/load_progress.h"
#include "core/malloc_tuning.h"
#include "core/status_macros.h"
#include "core/stop_signals.h"
#include "expert_service/expert_process.h"
#include "rpc/frame_socket.h"
#include "rpc/grpc_process.h"

namespace switchyard {
namespace {

const CommandSpec& Spec() {
  static const auto* spec = new CommandSpec{
      "switchyard-expert",
      "switchyard-expert --model DIR [--listen ADDR] [--experts 0,1,...] [FLAGS]",
      {
          {"model", true, "required", "model directory (config.json, weights)"},
          {"listen", true, "0.0.0.0:50061", "the Expert API address (port 0 picks one)"},
          {"experts", true, "0", "the experts to serve, comma-separated"},
          {"layers", true, "all", "the layers to serve, B:E"},
          {"workers", true, "2", "threads computing Forward calls (1..256)"},
          {"max-connection-age-ms", true, "0: never",
           "close client connections after this age, so they rebalance"},
          {"grace-ms", true, "5000", "on SIGTERM, time for calls in flight (0..86400000)"},
          {"metrics-listen", true, "none", "serve Prometheus /metrics on HOST:PORT (port 0 picks)"},
          {"tls-cert", true, "plaintext", "serve over TLS with this certificate (PEM)"},
          {"tls-key", true, "", "the private key of --tls-cert (PEM)"},
          {"tls-client-ca", true, "",
           "with TLS, accept only clients whose certificate this CA signed"},
          {"device", true, "cpu", "where the experts compute: cpu or cuda"},
          {"precision", true, "bf16", "cuda weights precision: bf16 or f32"},
          {"gpu", true, "0", "the CUDA device index"},
          {"frame-listen", true, "HOST:0",
           "the frame socket, the gateway's fast data path: HOST:PORT, unix:PATH, or off "
           "(TLS like the gRPC port when --tls-cert is given)"},
          {"frame-spin-us", true, "0",
           "poll each frame connection this many us for the next request before sleeping: "
           "saves a wake-up per call where the shard has a core to spare (0..100000)"},
          {"frame-version", true, "2",
           "the newest frame version offered to gateways: 2 (rows after the message) or 1 "
           "(rows inside it, as before version 2; to compare)"},
          {"max-forward-rows", true, "16384",
           "rows per Forward call, at most 65536; at least the gateway's --max-step-tokens and "
           "--max-running"},
      },
      ""};
  return *spec;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "switchyard-expert: %s\n", std::string(status.message()).c_str());
  return 1;
}

// The flags as ExpertProcessOptions; INVALID_ARGUMENT names a bad flag.
absl::StatusOr<ExpertProcessOptions> OptionsFromFlags(const Flags& flags) {
  ExpertProcessOptions o;
  SY_ASSIGN_OR_RETURN(o.model_dir, flags.Required("model"));
  o.listen = flags.GetOr("listen", o.listen);
  o.experts = flags.GetOr("experts", o.experts);
  o.layers = flags.GetOr("layers", "");
  SY_ASSIGN_OR_RETURN(int64_t workers, flags.IntInRange("workers", o.workers, 1, 256));
  o.workers = static_cast<int>(workers);
  SY_ASSIGN_OR_RETURN(int64_t max_age, flags.IntInRange("max-connection-age-ms", 0, 0,
                                                        std::numeric_limits<int32_t>::max()));
  o.max_connection_age_ms = static_cast<int>(max_age);
  o.metrics_listen = flags.GetOr("metrics-listen", "");
  for (const char* name : {"tls-cert", "tls-key", "tls-client-ca"}) {
    if (flags.Has(name) && flags.GetOr(name, "").empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a file name"));
    }
  }
  o.tls = {.cert_file = flags.GetOr("tls-cert", ""),
           .key_file = flags.GetOr("tls-key", ""),
           .ca_file = flags.GetOr("tls-client-ca", "")};
  o.device = flags.GetOr("device", o.device);
  o.precision = flags.GetOr("precision", "");
  SY_ASSIGN_OR_RETURN(int64_t gpu, flags.IntInRange("gpu", 0, 0, 1023));
  o.gpu = static_cast<int>(gpu);
  SY_ASSIGN_OR_RETURN(int64_t rows,
                      flags.IntInRange("max-forward-rows", o.max_forward_rows, 1, 65536));
  o.max_forward_rows = static_cast<int>(rows);
  if (flags.Has("frame-listen") && flags.GetOr("frame-listen", "").empty()) {
    return absl::InvalidArgumentError("--frame-listen needs HOST:PORT, unix:PATH or off");
  }
  o.frame_listen = flags.GetOr("frame-listen", "");
  SY_ASSIGN_OR_RETURN(int64_t spin,
                      flags.IntInRange("frame-spin-us", o.frame_spin_us, 0, rpc::kMaxSpinUs));
  o.frame_spin_us = static_cast<int>(spin);
  SY_ASSIGN_OR_RETURN(int64_t version,
                      flags.IntInRange("frame-version", o.frame_version, 1, rpc::kFrameVersion));
  o.frame_version = static_cast<int>(version);
  return o;
}

int Run(int argc, char** argv) {
  // Block the shutdown signals before any thread starts, so every thread
  // inherits the mask and only sigwait below receives them.
  const sigset_t signals = BlockStopSignals();

  TuneMallocForTransientBuffers();
  const std::string omp_fit = FitOpenMpToCpuQuota();
  std::vector<std::string> args(argv + 1, argv + argc);
  std::optional<Flags> flags(std::in_place);
  if (std::optional<int> code =
          HandleCommandLine(Spec().name, HelpText(Spec()), Spec().flags, args, &*flags)) {
    return *code;
  }
  absl::StatusOr<ExpertProcessOptions> options = OptionsFromFlags(*flags);
  if (!options.ok()) return Fail(options.status());
  if (!omp_fit.empty()) std::fprintf(stderr, "switchyard-expert: %s\n", omp_fit.c_str());
  // At most a day: a longer grace is a typo, and absl::Milliseconds needs a sane value.
  absl::StatusOr<int64_t> grace_ms = flags->IntInRange("grace-ms", 5000, 0, 86400000);
  if (!grace_ms.ok()) return Fail(grace_ms.status());
  // After the signal mask, which gRPC's threads inherit; outlives `process`.
  const rpc::GrpcProcess grpc_process;

  // Loading progress on stderr: a bar on a terminal, lines in a log.
  auto meter = std::make_shared<LoadProgressMeter>("switchyard-expert: loading weights",
                                                   isatty(STDERR_FILENO) != 0);
  options->load_progress = [meter](const LoadProgress& p) {
    const std::string text = meter->Update(p);
    std::fputs(text.c_str(), stderr);
  };
  absl::StatusOr<std::unique_ptr<ExpertProcess>> process = ExpertProcess::Start(*options);
  if (!process.ok()) return Fail(process.status());
  std::fprintf(stderr, "switchyard-expert: %s\n", (*process)->summary().c_str());
  const std::string metrics = (*process)->metrics_address();
  std::printf("switchyard-expert listening on %s experts=%s layers=%d:%d metrics=%s\n",
              (*process)->address().c_str(), absl::StrJoin((*process)->experts(), ",").c_str(),
              (*process)->layers().first, (*process)->layers().second,
              metrics.empty() ? "none" : metrics.c_str());
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "switchyard-expert: %s, draining (grace %lld ms)\n",
               signal_number == SIGTERM ? "SIGTERM" : "SIGINT", static_cast<long long>(*grace_ms));
  (*process)->Shutdown(absl::Milliseconds(*grace_ms));
  process->reset();
  std::fprintf(stderr, "switchyard-expert: stopped\n");
  return 0;
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) { return switchyard::Run(argc, argv); }
