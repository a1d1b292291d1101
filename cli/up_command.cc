// `switchyard up`: runs a whole Switchyard deployment on this machine as child
// processes: one switchyard-expert per group of experts and one
// switchyard-gateway in front of them. Waits until every process is healthy
// (grpc.health.v1), writes an endpoints file, and supervises: SIGINT/SIGTERM
// stop everything gracefully (gateway first, then experts). A child that dies
// on its own is restarted on the same addresses after a backoff (see
// cli/restart_policy.h) while the others keep serving, and the endpoints file
// is rewritten with its new pid; a child that crash-loops past the limit stops
// everything with exit status 1. Everything listens on --listen-host
// (default 127.0.0.1).
//
// The gateway reads its topology from a file (--experts @FILE) with the
// endpoints file's content, rewritten atomically whenever a replica joins
// or leaves. With --autoscale an Autoscaler (cli/autoscaler.h) runs on the
// main thread every period, through this supervisor as its ReplicaFleet: a
// new replica joins the topology once healthy; a leaving one leaves the
// topology first and gets SIGTERM once the gateway's
// switchyard_gateway_expert_replicas shows it applied the change.
//
// Children run in their own process groups (so a terminal's Ctrl-C reaches
// only `up`, which then stops them in order) and get SIGTERM if `up` itself
// dies. Their stdout and stderr are forwarded, line by line and prefixed with
// the process name, to our stdout and stderr.
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cli/autoscaler.h"
#include "cli/commands.h"
#include "cli/grpc_client.h"
#include "cli/metrics_scrape.h"
#include "cli/restart_policy.h"
#include "core/flags.h"
#include "core/status_macros.h"
#include "metrics/http_exporter.h"
#include "metrics/metrics.h"
#include "nlohmann/json.hpp"
#include "rpc/grpc_process.h"

namespace switchyard::cli {
namespace {

using Clock = std::chrono::steady_clock;

constexpr auto kStopGrace = std::chrono::seconds(10);
// A draining replica is stopped at the latest this long after it left the
// topology, even when the gateway never confirmed it (gateway down).
constexpr auto kDrainTimeout = std::chrono::seconds(30);
constexpr char kListeningMarker[] = " listening on ";
// OpenMP spins (GOMP_SPINCOUNT: rounds a team's idle threads spin before
// they sleep) of the processes up starts on one host, which share its cores.
// An expert's team spins long enough to keep its own fork/join fast. With
// several expert processes, the gateway's spin barely outlasts the gaps
// between its own parallel regions: once it has sent a layer to its experts
// it waits milliseconds for them, and its spinning thread held a core that
// the expert woken second needed (2 CPUs, 8 expert processes, batch 1:
// network p50 per call ~320 -> ~220 us, ~+6% output tokens/s). With one
// expert process neither spins (kOneProcessSpinCount): the gateway and the
// expert hand each layer back and forth, each team needs every core for its
// part, and the other's team spinning out its rounds after its own part
// held one. 2 vCPUs, no spin against 20000 for both, paired rounds of
// alternating runs, output tok/s: batch 1 -1% to +14% in 9 pairs (median
// +2%), 8 streams +12% and +3%, 16 streams +2% and +5%.
constexpr int kExpertSpinCount = 20000;
constexpr int kOneProcessSpinCount = 0;
constexpr int kGatewaySpinCount = 1000;

// glibc's memcpy (2.36, Debian 12) copies blocks from a few KiB up to the
// L2 size with `rep movsb` where the CPU says it is fast (ERMS/FSRM); on
// AMD EPYC (Zen 3, 2 vCPUs) that ran at ~2 GB/s against ~30 GB/s for its
// vector loop, and every expert call copies its rows several times
// (encoding, protobuf, decoding): bench/dispatch_bench, 16 rows to 2
// experts, F32, 1.05-1.18 -> 0.48-0.57 ms per layer. This threshold keeps
// glibc on its vector loop for every size.
constexpr char kAmdCopyTunable[] = "GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=1073741824";

// Adds kAmdCopyTunable to `env` on an AMD x86 CPU unless the user set
// GLIBC_TUNABLES.
void AddCopyTunable(std::vector<std::string>* env) {
#if defined(__x86_64__)
  if (std::getenv("GLIBC_TUNABLES") == nullptr && __builtin_cpu_is("amd")) {
    env->push_back(kAmdCopyTunable);
  }
#else
  (void)env;
#endif
}

// Adds GOMP_SPINCOUNT=`spin_count` to `env` unless the user chose a wait
// policy or spin (OMP_WAIT_POLICY or GOMP_SPINCOUNT set).
void AddShortSpin(int spin_count, std::vector<std::string>* env) {
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && std::getenv("GOMP_SPINCOUNT") == nullptr) {
    env->push_back(absl::StrCat("GOMP_SPINCOUNT=", spin_count));
  }
}

void Say(const std::string& line) {
  std::fprintf(stderr, "switchyard up: %s\n", line.c_str());
  std::fflush(stderr);
}

// Forwards children's output to our stdout/stderr, a line at a time with a
// prefix, and remembers the address in each child's first "... listening on
// ADDR ..." stdout line.
//
// Thread-safety: thread-safe. One background thread reads every pipe.
class OutputPump {
 public:
  OutputPump() = default;
  OutputPump(const OutputPump&) = delete;
  OutputPump& operator=(const OutputPump&) = delete;
  ~OutputPump() { Stop(); }

  absl::Status Start() {
    if (pipe2(wake_, O_CLOEXEC) != 0) {
      return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
    }
    thread_ = std::thread([this] { Loop(); });
    return absl::OkStatus();
  }

  // Takes ownership of `fd`. Lines go to `sink` after `prefix`. With
  // `address_slot` >= 0, the first listening line's address is recorded
  // under that slot.
  void Add(int fd, std::string prefix, FILE* sink, int address_slot) {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back(Source{fd, std::move(prefix), sink, address_slot, {}});
    Wake();
  }

  // The address reported under `slot`, or "" while none was.
  std::string Address(int slot) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = addresses_.find(slot);
    return it == addresses_.end() ? "" : it->second;
  }
  // The metrics address reported under `slot`, or "" if none.
  std::string MetricsAddress(int slot) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = metrics_.find(slot);
    return it == metrics_.end() ? "" : it->second;
  }

  // Forwards what is still buffered (for up to half a second), closes every
  // pipe and joins the thread.
  void Stop() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      Wake();
    }
    thread_.join();
    close(wake_[0]);
    close(wake_[1]);
  }

 private:
  struct Source {
    int fd;
    std::string prefix;
    FILE* sink;
    int address_slot;
    std::string partial;
  };

  void Wake() {
    const char byte = 0;
    [[maybe_unused]] ssize_t n = write(wake_[1], &byte, 1);
  }

  void Emit(Source& source, const std::string& line) {
    // The line is out before its address is known to the main thread, so
    // whoever sees "ready on" finds every listening line in the log.
    std::string out = absl::StrCat(source.prefix, line, "\n");
    std::fwrite(out.data(), 1, out.size(), source.sink);
    std::fflush(source.sink);
    if (source.address_slot >= 0) {
      auto at = line.find(kListeningMarker);
      std::lock_guard<std::mutex> lock(mu_);
      if (at != std::string::npos && addresses_.count(source.address_slot) == 0) {
        std::string rest = line.substr(at + std::strlen(kListeningMarker));
        addresses_[source.address_slot] = rest.substr(0, rest.find_first_of(" \t\r"));
        // "... metrics=HOST:PORT" ("none" when the process serves no metrics).
        if (auto m = rest.find(" metrics="); m != std::string::npos) {
          std::string metrics = rest.substr(m + 9);
          metrics = metrics.substr(0, metrics.find_first_of(" \t\r"));
          if (metrics != "none") metrics_[source.address_slot] = metrics;
        }
        // Which processes are ready, as they become ready.
        std::fprintf(stderr, "switchyard up: %sready at %s (%zu ready)\n", source.prefix.c_str(),
                     addresses_[source.address_slot].c_str(), addresses_.size());
      }
    }
  }

  // Reads once from `source`; false at end of file.
  bool ReadSome(Source& source) {
    char buf[4096];
    ssize_t n = read(source.fd, buf, sizeof(buf));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
    if (n <= 0) {
      if (!source.partial.empty()) Emit(source, source.partial);
      source.partial.clear();
      close(source.fd);
      return false;
    }
    source.partial.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; (nl = source.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
      Emit(source, source.partial.substr(start, nl - start));
    }
    source.partial.erase(0, start);
    if (source.partial.size() > (64 << 10)) {  // A very long line: forward it in pieces.
      Emit(source, source.partial);
      source.partial.clear();
    }
    return true;
  }

  void Loop() {
    std::vector<Source> sources;
    std::optional<Clock::time_point> stop_deadline;
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (Source& s : pending_) sources.push_back(std::move(s));
        pending_.clear();
        if (stop_ && !stop_deadline) stop_deadline = Clock::now() + std::chrono::milliseconds(500);
      }
      if (stop_deadline && (sources.empty() || Clock::now() >= *stop_deadline)) break;
      std::vector<pollfd> fds;
      fds.push_back({wake_[0], POLLIN, 0});
      for (const Source& s : sources) fds.push_back({s.fd, POLLIN, 0});
      int ready = poll(fds.data(), fds.size(), stop_deadline ? 50 : -1);
      if (ready < 0 && errno != EINTR) break;
      if (ready <= 0) continue;
      if (fds[0].revents != 0) {
        char drain[64];
        [[maybe_unused]] ssize_t n = read(wake_[0], drain, sizeof(drain));
      }
      std::vector<Source> open;
      for (size_t i = 0; i < sources.size(); ++i) {
        const bool readable = fds[i + 1].revents != 0;
        if (!readable || ReadSome(sources[i])) open.push_back(std::move(sources[i]));
      }
      sources = std::move(open);
    }
    for (Source& s : sources) {
      if (!s.partial.empty()) Emit(s, s.partial);
      close(s.fd);
    }
  }

  mutable std::mutex mu_;
  std::vector<Source> pending_;
  std::map<int, std::string> addresses_;
  std::map<int, std::string> metrics_;  // guarded by mu_
  bool stop_ = false;
  int wake_[2] = {-1, -1};
  std::thread thread_;
};

struct UpOptions {
  std::string model_dir;
  int port = 0;
  std::string endpoints_file;
  int experts_per_process = 1;
  std::string bin_dir;
  // Where every process listens (gRPC and metrics). Default loopback only.
  std::string listen_host = "127.0.0.1";
  int start_timeout_s = 300;
  // Restarts of one child allowed within a minute before `up` gives up.
  int max_restarts = 5;
  // Extra flags for every switchyard-expert / the switchyard-gateway.
  std::vector<std::string> expert_args;
  std::vector<std::string> gateway_args;
  // --expert-workers: every expert's --workers. Default 2 (the expert's own).
  int expert_workers = 2;
  // --autoscale: run the autoscaler (cli/autoscaler.h) every
  // autoscale_period_ms (default 15000, the HPA's sync period).
  bool autoscale = false;
  AutoscalerOptions autoscaler;
  int autoscale_period_ms = 15000;
  // --metrics-port: where `up` serves its own /metrics (the autoscaler's);
  // -1 (default): nowhere.
  int metrics_port = -1;
  // With --device cuda: the GPUs experts go on (--gpus); empty = GPU 0.
  std::vector<int> gpus;
  std::string device = "cpu";  // --device: where every process computes
};

// CPUs this process may run on (its affinity mask, which containers and
// taskset narrow), else the hardware's count; at least 1.
int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

absl::StatusOr<std::string> SelfDir() {
  std::error_code ec;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot read /proc/self/exe: ", ec.message()));
  return self.parent_path().string();
}

absl::StatusOr<UpOptions> ParseUpOptions(const std::vector<std::string>& args) {
  const std::vector<std::string> gateway_passthrough = {
      "kv-cache-tokens", "kv-cache-memory",      "kv-cache-dtype", "max-queue",
      "max-step-tokens", "max-new-tokens-limit", "micro-batches"};
  std::set<std::string> value_flags = {"model",
                                       "port",
                                       "endpoints-file",
                                       "experts-per-process",
                                       "bin-dir",
                                       "listen-host",
                                       "start-timeout-s",
                                       "expert-workers",
                                       "expert-arg",
                                       "gateway-arg",
                                       "device",
                                       "precision",
                                       "max-restarts",
                                       "http-port",
                                       "min-replicas",
                                       "max-replicas",
                                       "target-busy",
                                       "scale-down-delay-s",
                                       "autoscale-period-ms",
                                       "metrics-port",
                                       "gpus"};
  value_flags.insert(gateway_passthrough.begin(), gateway_passthrough.end());
  SY_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, value_flags, {"autoscale"}));
  UpOptions o;
  SY_ASSIGN_OR_RETURN(o.model_dir, f.Required("model"));
  SY_RETURN_IF_ERROR(f.Required("port").status());
  SY_ASSIGN_OR_RETURN(int64_t port, f.Int("port", 0));
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("--port must be in [0, 65535], got ", port));
  }
  o.port = static_cast<int>(port);
  o.endpoints_file = f.GetOr("endpoints-file", "");
  SY_ASSIGN_OR_RETURN(int64_t per, f.Int("experts-per-process", 1));
  if (per < 1 || per > 1 << 20) {
    return absl::InvalidArgumentError("--experts-per-process must be >= 1");
  }
  o.experts_per_process = static_cast<int>(per);
  if (auto dir = f.Get("bin-dir")) {
    o.bin_dir = *dir;
  } else {
    SY_ASSIGN_OR_RETURN(o.bin_dir, SelfDir());
  }
  o.listen_host = f.GetOr("listen-host", o.listen_host);
  if (o.listen_host.empty()) return absl::InvalidArgumentError("--listen-host is empty");
  SY_ASSIGN_OR_RETURN(int64_t timeout, f.Int("start-timeout-s", o.start_timeout_s));
  if (timeout < 1 || timeout > 24 * 3600) {
    return absl::InvalidArgumentError("--start-timeout-s must be in [1, 86400]");
  }
  o.start_timeout_s = static_cast<int>(timeout);
  SY_ASSIGN_OR_RETURN(int64_t max_restarts, f.Int("max-restarts", o.max_restarts));
  if (max_restarts < 0 || max_restarts > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-restarts must be in [0, 1000], got ", max_restarts));
  }
  o.max_restarts = static_cast<int>(max_restarts);
  SY_ASSIGN_OR_RETURN(int64_t expert_workers, f.IntInRange("expert-workers", 2, 1, 256));
  o.expert_workers = static_cast<int>(expert_workers);
  if (f.Has("expert-workers")) o.expert_args = {"--workers", absl::StrCat(expert_workers)};
  for (const std::string& a : f.GetAll("expert-arg")) o.expert_args.push_back(a);
  for (const std::string& name : gateway_passthrough) {
    if (auto v = f.Get(name)) {
      o.gateway_args.push_back("--" + name);
      o.gateway_args.push_back(*v);
    }
  }
  // Where every process computes: passed to the gateway and each expert.
  if (auto device = f.Get("device"); device && *device != "cpu" && *device != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--device ", *device, ": expected cpu or cuda"));
  }
  o.device = f.GetOr("device", "cpu");
  for (const char* name : {"device", "precision"}) {
    if (auto v = f.Get(name)) {
      for (auto* args : {&o.expert_args, &o.gateway_args}) {
        args->push_back(absl::StrCat("--", name));
        args->push_back(*v);
      }
    }
  }
  if (f.Has("http-port")) {
    SY_ASSIGN_OR_RETURN(int64_t http_port, f.Int("http-port", 0));
    if (http_port < 0 || http_port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("--http-port must be in [0, 65535], got ", http_port));
    }
    o.gateway_args.push_back("--http-listen");
    o.gateway_args.push_back(absl::StrCat(o.listen_host, ":", http_port));
  }
  for (const std::string& a : f.GetAll("gateway-arg")) o.gateway_args.push_back(a);

  o.autoscale = f.Has("autoscale") && f.GetOr("autoscale", "true") != "false";
  for (const char* name : {"min-replicas", "max-replicas", "target-busy", "scale-down-delay-s",
                           "autoscale-period-ms"}) {
    if (f.Has(name) && !o.autoscale) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " needs --autoscale"));
    }
  }
  SY_ASSIGN_OR_RETURN(int64_t min_replicas, f.IntInRange("min-replicas", 1, 1, 1024));
  o.autoscaler.min_replicas = static_cast<int>(min_replicas);
  SY_ASSIGN_OR_RETURN(int64_t max_replicas,
                      f.IntInRange("max-replicas", std::max<int64_t>(min_replicas, 4), 1, 1024));
  if (max_replicas < min_replicas) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max-replicas (", max_replicas, ") is below --min-replicas (", min_replicas, ")"));
  }
  o.autoscaler.max_replicas = static_cast<int>(max_replicas);
  SY_ASSIGN_OR_RETURN(o.autoscaler.target_busy, f.Double("target-busy", 0.7));
  if (!(o.autoscaler.target_busy > 0) || o.autoscaler.target_busy > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--target-busy must be in (0, 1024], got ", o.autoscaler.target_busy));
  }
  // --target-busy is per worker thread, as the manifests' busy threshold
  // (TARGET_BUSY x --workers, k8s/generate-experts.py): a replica with W
  // workers is scaled towards W x target busy seconds per second.
  o.autoscaler.target_busy *= o.expert_workers;
  SY_ASSIGN_OR_RETURN(int64_t delay, f.IntInRange("scale-down-delay-s", 300, 0, 86400));
  o.autoscaler.scale_down_delay_s = static_cast<int>(delay);
  SY_ASSIGN_OR_RETURN(int64_t period, f.IntInRange("autoscale-period-ms", 15000, 100, 3600000));
  o.autoscale_period_ms = static_cast<int>(period);
  if (o.autoscale && o.experts_per_process != 1) {
    return absl::InvalidArgumentError(
        "--autoscale scales each expert on its own: it needs --experts-per-process 1");
  }
  if (f.Has("metrics-port")) {
    SY_ASSIGN_OR_RETURN(int64_t metrics_port, f.IntInRange("metrics-port", 0, 0, 65535));
    o.metrics_port = static_cast<int>(metrics_port);
  }
  if (auto gpus = f.Get("gpus")) {
    if (f.GetOr("device", "cpu") != "cuda") {
      return absl::InvalidArgumentError("--gpus needs --device cuda");
    }
    for (absl::string_view item : absl::StrSplit(*gpus, ',')) {
      int gpu = -1;
      if (!absl::SimpleAtoi(item, &gpu) || gpu < 0 || gpu > 1023) {
        return absl::InvalidArgumentError(
            absl::StrCat("--gpus ", *gpus, ": '", item, "' is not a GPU index"));
      }
      o.gpus.push_back(gpu);
    }
    o.autoscaler.gpus = o.gpus;
  }
  return o;
}

absl::StatusOr<int> NumExperts(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  nlohmann::json config = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a JSON object"));
  }
  auto it = config.find("num_local_experts");
  if (it == config.end() || !it->is_number_integer() || it->get<int64_t>() < 1 ||
      it->get<int64_t>() > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": num_local_experts is missing or not a positive integer"));
  }
  return static_cast<int>(it->get<int64_t>());
}

// "0", "0-3" or "0,2" for messages.
std::string ExpertsLabel(const std::vector<int>& experts) {
  if (experts.size() == 1) return std::to_string(experts[0]);
  if (experts.back() - experts.front() + 1 == static_cast<int>(experts.size())) {
    return absl::StrCat(experts.front(), "-", experts.back());
  }
  return absl::StrJoin(experts, ",");
}

// Where to dial a server that reported `address`: wildcard hosts on loopback.
std::string DialAddress(const std::string& address) {
  for (const char* any : {"0.0.0.0:", "[::]:"}) {
    if (address.rfind(any, 0) == 0) {
      return absl::StrCat("127.0.0.1:", address.substr(std::strlen(any)));
    }
  }
  return address;
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrCat("was killed by signal ", WTERMSIG(status), " (",
                        strsignal(WTERMSIG(status)), ")");
  }
  return "stopped";
}

// "HOST:PORT" -> "HOST" (everything before the last ':').
std::string HostOf(const std::string& address) { return address.substr(0, address.rfind(':')); }
// "HOST:PORT" -> "PORT".
std::string PortOf(const std::string& address) { return address.substr(address.rfind(':') + 1); }

// One child process.
struct Child {
  // Where a child is in its life after `up` became ready.
  enum class Phase {
    kServing,   // running (or died, not yet reaped)
    kBackoff,   // died; restarts at restart_at
    kStarting,  // restarted; waiting for its address and health
  };

  std::string name;  // "expert 0-1", "gateway"
  std::string role;  // "expert" | "gateway"
  std::vector<int> experts;
  // How it was started (argv[0] first) and its extra environment; a restart
  // reuses them with --listen/--metrics-listen pinned to the first addresses.
  std::vector<std::string> argv;
  std::vector<std::string> env;
  pid_t pid = -1;
  bool running = false;
  Phase phase = Phase::kServing;
  Clock::time_point restart_at;  // in kBackoff
  Clock::time_point started_at;  // in kStarting
  RestartTracker restarts;
  int wait_status = 0;
  std::string address;  // as reported on its stdout
  std::string metrics;  // its /metrics address, as reported ("" if none)
  std::shared_ptr<grpc::Channel> channel;
  bool healthy = false;
  // Experts: which replica this is (unique, never reused), its GPU (-1:
  // none given), and where it is in the topology: not yet in it (a new
  // replica while starting), in it, or draining (taken out; terminated once
  // the gateway stopped using it, then forgotten).
  int replica_id = 0;
  int gpu = -1;
  bool in_topology = false;
  bool draining = false;
  bool terminating = false;  // SIGTERM sent while draining
  Clock::time_point drain_since;
  Clock::time_point terminate_since;
};

// Starts, watches and stops the children. Owned and used by the main thread
// only (signals are taken synchronously with sigtimedwait).
class Supervisor : public ReplicaFleet {
 public:
  explicit Supervisor(UpOptions options) : options_(std::move(options)) {}

  // ReplicaFleet, for the autoscaler (same thread).
  std::vector<ReplicaView> Replicas() const override;
  absl::StatusOr<int> StartReplica(int expert, int gpu) override;
  absl::Status DrainReplica(int id) override;

  // Runs until stopped; the process exit code.
  int Run();

 private:
  enum class Wake { kDone, kStopSignal, kChildExited, kTimeout };

  // Starts argv with this process's environment plus `extra_env`
  // ("NAME=VALUE", overriding).
  absl::Status Spawn(Child& child, const std::vector<std::string>& argv,
                     const std::vector<std::string>& extra_env = {});
  // Reaps exited children; those that exited while not being stopped.
  std::vector<Child*> Reap();
  // After startup: restarts children that die, until a stop signal (exit 0)
  // or a crash loop (exit 1).
  int Serve();
  // A child died while serving: schedules its restart; false to give up.
  bool ScheduleRestart(Child& child);
  // Starts a dead child again on its old addresses.
  absl::Status Respawn(Child& child);
  // A restarted child: notes its address and health; when it is serving,
  // rewrites the endpoints file.
  void CheckRestarted(Child& child);
  // Waits, handling signals and child exits, until `done()` holds or `deadline`.
  Wake WaitUntil(const std::function<bool()>& done, Clock::time_point deadline);
  // Reports why a wait ended early and stops everything; an exit code.
  int Abort(Wake wake, const std::string& waiting_for);
  void StopAll();
  void StopGroup(const std::vector<Child*>& group);
  bool AllHealthy(const std::vector<Child*>& group);
  absl::Status WriteEndpoints();
  // A switchyard-expert command line for one replica of `experts`.
  std::vector<std::string> ExpertArgv(const std::vector<int>& experts, int gpu) const;
  // A new replica (not yet in the topology): once healthy, adds it.
  void CheckJoining(Child& child);
  // Draining replicas: terminate the ones the gateway no longer uses, kill
  // the ones that outstay the grace, forget the ones that exited.
  void AdvanceDrains();
  // The replicas of `expert` the gateway routes to now, from its /metrics;
  // -1 when unknown.
  int GatewayReplicas(int expert);

  UpOptions options_;
  OutputPump pump_;
  std::vector<std::unique_ptr<Child>> experts_;
  std::unique_ptr<Child> gateway_;
  sigset_t signals_;
  int stop_signal_ = 0;
  bool stopping_ = false;
  bool endpoints_written_ = false;
  bool topology_written_ = false;
  // Everything was healthy once: the endpoints file may be written.
  bool ready_ = false;
  // The gateway's --experts @FILE (a temporary file).
  std::string topology_file_;
  int next_replica_id_ = 0;
  Clock::time_point next_drain_check_;
  int num_experts_ = 0;
  // OpenMP threads of each expert process: this host's usable CPUs shared
  // by the expert processes started at first (at least 1).
  int expert_threads_ = 1;
  // Their GOMP_SPINCOUNT (kExpertSpinCount, or kOneProcessSpinCount).
  int expert_spin_count_ = kExpertSpinCount;

  // The environment of an expert process: its share of the cores as
  // OMP_NUM_THREADS unless the user set it, so the experts together never
  // run more threads than there are CPUs (2 CPUs, 8 experts: 1 thread each;
  // split cluster 34 -> 40 output tokens/s against OpenMP's default of all
  // CPUs each), and a many-core host keeps its cores busy at batch 1.
  // Also a short OpenMP spin (AddShortSpin) unless the user chose a wait
  // policy or spin: libgomp's default spins ~300k rounds after each layer,
  // on the cores the gateway needs right then for the next layer's
  // attention (2 CPUs, one expert process, frames, batch 1: 31.8 -> 38.6
  // output tokens/s; 20000 keeps the expert's own fork/join fast). And on
  // AMD CPUs glibc's vector memcpy (AddCopyTunable).
  std::vector<std::string> ExpertEnv() const {
    std::vector<std::string> env;
    if (std::getenv("OMP_NUM_THREADS") == nullptr) {
      env.push_back(absl::StrCat("OMP_NUM_THREADS=", expert_threads_));
    }
    AddShortSpin(expert_spin_count_, &env);
    AddCopyTunable(&env);
    return env;
  }
  std::string expert_bin_;
  RestartPolicy restart_policy_;
  // `up`'s own metrics (the autoscaler's) and their endpoint.
  metrics::Registry registry_;
  std::unique_ptr<metrics::HttpExporter> exporter_;
  std::unique_ptr<Autoscaler> autoscaler_;
};

absl::Status Supervisor::Spawn(Child& child, const std::vector<std::string>& argv,
                               const std::vector<std::string>& extra_env) {
  if (access(argv[0].c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("no executable ", argv[0], " (", std::strerror(errno),
                                            "); build it or pass --bin-dir"));
  }
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  // The environment, built before fork (the child may only make
  // async-signal-safe calls until exec).
  std::vector<char*> cenv;
  for (const std::string& e : extra_env) cenv.push_back(const_cast<char*>(e.c_str()));
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string_view entry(*e);
    const std::string_view name = entry.substr(0, entry.find('=') + 1);  // "NAME="
    bool overridden = false;
    for (const std::string& x : extra_env)
      overridden |= std::string_view(x).substr(0, name.size()) == name;
    if (!overridden) cenv.push_back(*e);
  }
  cenv.push_back(nullptr);
  const std::string exec_failed = absl::StrCat("switchyard up: cannot execute ", argv[0], "\n");

  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  if (pipe2(err, O_CLOEXEC) != 0) {
    close(out[0]);
    close(out[1]);
    return absl::InternalError("pipe failed");
  }
  const int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid == 0) {
    // Child: async-signal-safe calls only until exec.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    dup2(out[1], STDOUT_FILENO);
    dup2(err[1], STDERR_FILENO);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGPIPE, SIG_DFL);
    execve(cargv[0], cargv.data(), cenv.data());
    [[maybe_unused]] ssize_t n = write(STDERR_FILENO, exec_failed.data(), exec_failed.size());
    _exit(127);
  }
  const int fork_errno = errno;
  if (devnull >= 0) close(devnull);
  close(out[1]);
  close(err[1]);
  if (pid < 0) {
    close(out[0]);
    close(err[0]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(fork_errno)));
  }
  setpgid(pid, pid);  // Also here, so it holds before we ever signal the group.
  child.argv = argv;
  child.env = extra_env;
  child.pid = pid;
  child.running = true;
  const std::string prefix = absl::StrCat("[", child.name, "] ");
  pump_.Add(out[0], prefix, stdout, pid);
  pump_.Add(err[0], prefix, stderr, -1);
  return absl::OkStatus();
}

std::vector<Child*> Supervisor::Reap() {
  std::vector<Child*> unexpected;
  auto reap = [&](Child& c) {
    if (!c.running) return;
    int status = 0;
    pid_t r = waitpid(c.pid, &status, WNOHANG);
    if (r == c.pid || (r < 0 && errno == ECHILD)) {
      c.running = false;
      c.wait_status = status;
      if (!stopping_ && !c.draining) {
        unexpected.push_back(&c);
        Say(absl::StrCat(c.name, " (pid ", c.pid, ") ", DescribeWaitStatus(status)));
      }
    }
  };
  if (gateway_) reap(*gateway_);
  for (auto& e : experts_) reap(*e);
  return unexpected;
}

Supervisor::Wake Supervisor::WaitUntil(const std::function<bool()>& done,
                                       Clock::time_point deadline) {
  while (true) {
    if (!Reap().empty()) return Wake::kChildExited;
    if (done()) return Wake::kDone;
    const auto now = Clock::now();
    if (now >= deadline) return Wake::kTimeout;
    const auto left = std::min<Clock::duration>(deadline - now, std::chrono::milliseconds(100));
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec timeout{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    const int sig = sigtimedwait(&signals_, nullptr, &timeout);
    if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
      stop_signal_ = sig;
      return Wake::kStopSignal;
    }
  }
}

void Supervisor::StopGroup(const std::vector<Child*>& group) {
  for (Child* c : group) {
    if (c->running) kill(-c->pid, SIGTERM);
  }
  auto all_exited = [&] {
    return std::none_of(group.begin(), group.end(), [](Child* c) { return c->running; });
  };
  const auto deadline = Clock::now() + kStopGrace;
  while (!all_exited()) {
    Reap();
    if (all_exited() || Clock::now() >= deadline) break;
    timespec tick{0, 50 * 1000 * 1000};
    const int sig = sigtimedwait(&signals_, nullptr, &tick);
    if (sig == SIGINT || sig == SIGTERM) {
      Say("second stop signal: killing now");
      break;
    }
  }
  for (Child* c : group) {
    if (c->running) {
      Say(absl::StrCat(c->name, " (pid ", c->pid, ") did not stop in time; killing it"));
      kill(-c->pid, SIGKILL);
      int status = 0;
      while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
      }
      c->running = false;
      c->wait_status = status;
    }
    // Anything left in its process group (it would hold our pipes open).
    if (c->pid > 0) kill(-c->pid, SIGKILL);
  }
}

void Supervisor::StopAll() {
  stopping_ = true;
  // Gateway first so it can finish requests in flight while experts still run.
  if (gateway_) StopGroup({gateway_.get()});
  std::vector<Child*> experts;
  for (auto& e : experts_) experts.push_back(e.get());
  StopGroup(experts);
  for (auto& e : experts_) e->channel.reset();
  if (gateway_) gateway_->channel.reset();
  pump_.Stop();
  std::error_code ec;
  if (endpoints_written_) std::filesystem::remove(options_.endpoints_file, ec);
  if (topology_written_) std::filesystem::remove(topology_file_, ec);
}

int Supervisor::Abort(Wake wake, const std::string& waiting_for) {
  int code = 1;
  switch (wake) {
    case Wake::kStopSignal:
      Say(absl::StrCat(stop_signal_ == SIGINT    ? "SIGINT"
                       : stop_signal_ == SIGTERM ? "SIGTERM"
                                                 : "SIGHUP",
                       " received; stopping"));
      code = 0;
      break;
    case Wake::kChildExited:
      Say(absl::StrCat("a child process died", waiting_for.empty() ? "" : " while waiting for ",
                       waiting_for, "; stopping everything"));
      break;
    case Wake::kTimeout:
      Say(absl::StrCat("timed out after ", options_.start_timeout_s, " s waiting for ", waiting_for,
                       "; stopping everything"));
      break;
    case Wake::kDone:
      break;
  }
  StopAll();
  return code;
}

bool Supervisor::AllHealthy(const std::vector<Child*>& group) {
  bool all = true;
  for (Child* c : group) {
    if (c->healthy) continue;
    if (!c->channel) c->channel = MakeChannel(DialAddress(c->address));
    auto serving = IsServing(c->channel, "", std::chrono::milliseconds(500));
    c->healthy = serving.ok() && *serving;
    all = all && c->healthy;
  }
  return all;
}

// Writes `text` to a temporary file and renames it to `path`, so that no
// reader (the gateway's topology watcher) sees half a file.
absl::Status WriteAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.close();
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    return absl::UnavailableError(absl::StrCat("cannot write ", path, ": ", ec.message()));
  }
  return absl::OkStatus();
}

absl::Status Supervisor::WriteEndpoints() {
  // One file for people, Prometheus and the gateway: "experts" is the
  // gateway's --experts @FILE topology (the replicas in service, by expert),
  // "processes" every process with its addresses and pid.
  nlohmann::ordered_json topology = nlohmann::ordered_json::object();
  for (int e = 0; e < num_experts_; ++e)
    topology[std::to_string(e)] = nlohmann::ordered_json::array();
  nlohmann::ordered_json processes = nlohmann::ordered_json::array();
  for (auto& e : experts_) {
    if (e->in_topology && !e->draining) {
      for (int expert : e->experts) topology[std::to_string(expert)].push_back(e->address);
    }
    if (e->address.empty()) continue;  // starting, address not yet known
    nlohmann::ordered_json process = {
        {"role", "expert"},
        {"experts", e->experts},
        {"grpc", e->address},
        {"metrics",
         e->metrics.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(e->metrics)},
        {"pid", e->pid}};
    if (options_.autoscale) {
      process["replica"] = e->replica_id;
      process["state"] = e->draining ? "draining" : e->in_topology ? "serving" : "starting";
    }
    if (e->gpu >= 0) process["gpu"] = e->gpu;
    processes.push_back(std::move(process));
  }
  if (gateway_ && !gateway_->address.empty()) {
    const std::string port = gateway_->address.substr(gateway_->address.rfind(':') + 1);
    processes.push_back(
        {{"role", "gateway"},
         {"experts", nlohmann::ordered_json::array()},
         {"grpc", absl::StrCat(options_.listen_host, ":", port)},
         {"metrics", gateway_->metrics.empty() ? nlohmann::ordered_json(nullptr)
                                               : nlohmann::ordered_json(gateway_->metrics)},
         {"pid", gateway_->pid}});
  }
  nlohmann::ordered_json doc = {{"experts", std::move(topology)},
                                {"processes", std::move(processes)}};
  if (exporter_) {
    doc["up"] = {{"metrics", exporter_->address()}, {"pid", static_cast<int>(getpid())}};
  }
  const std::string text = doc.dump(2) + "\n";
  SY_RETURN_IF_ERROR(WriteAtomically(topology_file_, text));
  topology_written_ = true;
  // The endpoints file appears once everything is ready (scripts wait for it).
  if (ready_ && !options_.endpoints_file.empty()) {
    SY_RETURN_IF_ERROR(WriteAtomically(options_.endpoints_file, text));
    endpoints_written_ = true;
  }
  return absl::OkStatus();
}

std::vector<std::string> Supervisor::ExpertArgv(const std::vector<int>& experts, int gpu) const {
  std::vector<std::string> argv = {expert_bin_,
                                   "--model",
                                   options_.model_dir,
                                   "--listen",
                                   absl::StrCat(options_.listen_host, ":0"),
                                   "--experts",
                                   absl::StrJoin(experts, ","),
                                   "--metrics-listen",
                                   absl::StrCat(options_.listen_host, ":0")};
  argv.insert(argv.end(), options_.expert_args.begin(), options_.expert_args.end());
  if (gpu >= 0) {
    argv.push_back("--gpu");
    argv.push_back(std::to_string(gpu));
  }
  return argv;
}

std::vector<ReplicaView> Supervisor::Replicas() const {
  std::vector<ReplicaView> out;
  for (const auto& c : experts_) {
    if (c->experts.empty()) continue;
    ReplicaView r;
    r.id = c->replica_id;
    r.expert = c->experts[0];
    r.state = c->draining      ? ReplicaView::State::STATE_DRAINING
              : c->in_topology ? ReplicaView::State::STATE_SERVING
                               : ReplicaView::State::STATE_STARTING;
    r.metrics_address = c->metrics.empty() ? "" : DialAddress(c->metrics);
    r.gpu = c->gpu;
    out.push_back(r);
  }
  return out;
}

absl::StatusOr<int> Supervisor::StartReplica(int expert, int gpu) {
  auto child = std::make_unique<Child>();
  child->role = "expert";
  child->restarts = RestartTracker(restart_policy_);
  child->experts = {expert};
  child->replica_id = next_replica_id_++;
  child->gpu = gpu;
  child->name = absl::StrCat("expert ", expert, " replica ", child->replica_id);
  SY_RETURN_IF_ERROR(Spawn(*child, ExpertArgv(child->experts, gpu), ExpertEnv()));
  child->phase = Child::Phase::kStarting;
  child->started_at = Clock::now();
  Say(absl::StrCat("starting ", child->name, gpu >= 0 ? absl::StrCat(" on GPU ", gpu) : "",
                   " (pid ", child->pid, ")"));
  const int id = child->replica_id;
  experts_.push_back(std::move(child));
  return id;
}

absl::Status Supervisor::DrainReplica(int id) {
  for (auto& c : experts_) {
    if (c->replica_id != id || c->draining) continue;
    c->draining = true;
    c->drain_since = Clock::now();
    if (c->in_topology) {
      SY_RETURN_IF_ERROR(WriteEndpoints());
      Say(absl::StrCat("draining ", c->name, " at ", c->address,
                       ": out of the topology; it stops once the gateway no longer uses it"));
    } else {
      Say(absl::StrCat("stopping ", c->name, ": still starting, no longer needed"));
    }
    return absl::OkStatus();
  }
  return absl::NotFoundError(absl::StrCat("no replica ", id, " to drain"));
}

void Supervisor::CheckJoining(Child& child) {
  if (!child.running || child.draining) return;
  if (child.address.empty()) {
    child.address = pump_.Address(child.pid);
    child.metrics = pump_.MetricsAddress(child.pid);
  }
  if (child.address.empty() || !AllHealthy({&child})) {
    if (Clock::now() - child.started_at > std::chrono::seconds(options_.start_timeout_s)) {
      Say(absl::StrCat(child.name, " (pid ", child.pid, ") did not become healthy within ",
                       options_.start_timeout_s, " s; killing it"));
      kill(-child.pid, SIGKILL);  // Reaped as a crash on the next round.
    }
    return;
  }
  child.channel.reset();
  child.phase = Child::Phase::kServing;
  child.in_topology = true;
  if (absl::Status s = WriteEndpoints(); !s.ok()) Say(StatusLine(s));
  const double seconds = std::chrono::duration<double>(Clock::now() - child.started_at).count();
  Say(absl::StrFormat("%s (pid %d) healthy at %s after %.1f s; added to the topology", child.name,
                      static_cast<int>(child.pid), child.address, seconds));
}

int Supervisor::GatewayReplicas(int expert) {
  if (!gateway_ || gateway_->metrics.empty()) return -1;
  absl::StatusOr<std::string> text = ScrapeMetrics(DialAddress(gateway_->metrics));
  if (!text.ok()) return -1;
  const std::string line =
      absl::StrCat("switchyard_gateway_expert_replicas{expert=\"", expert, "\"} ");
  const size_t at = text->find(line);
  if (at == std::string::npos || (at > 0 && (*text)[at - 1] != '\n')) return -1;
  return std::atoi(text->c_str() + at + line.size());
}

void Supervisor::AdvanceDrains() {
  const auto now = Clock::now();
  const bool check_gateway = now >= next_drain_check_;
  if (check_gateway) next_drain_check_ = now + std::chrono::milliseconds(250);
  std::map<int, int> gateway_counts;  // by expert, scraped at most once here
  for (auto& c : experts_) {
    if (!c->draining || !c->running) continue;
    if (c->terminating) {
      if (now - c->terminate_since > kStopGrace) {
        Say(absl::StrCat(c->name, " (pid ", c->pid, ") did not stop in time; killing it"));
        kill(-c->pid, SIGKILL);
      }
      continue;
    }
    bool done = !c->in_topology;  // never served: nothing to drain
    if (!done && now - c->drain_since > kDrainTimeout) {
      Say(absl::StrCat("the gateway did not confirm ", c->name, " left its topology within ",
                       kDrainTimeout.count(), " s; stopping it anyway"));
      done = true;
    }
    if (!done && check_gateway) {
      const int expert = c->experts[0];
      int in_service = 0;
      for (auto& o : experts_) {
        in_service += o->in_topology && !o->draining && o->experts[0] == expert;
      }
      if (!gateway_counts.count(expert)) gateway_counts[expert] = GatewayReplicas(expert);
      // The gateway applied the topology without this replica: no new calls
      // go to it, and the ones in flight finish within its SIGTERM grace.
      done = gateway_counts[expert] == in_service;
    }
    if (done) {
      kill(-c->pid, SIGTERM);
      c->terminating = true;
      c->terminate_since = now;
      const double seconds = std::chrono::duration<double>(now - c->drain_since).count();
      Say(absl::StrFormat("%s drained after %.1f s; stopping it (pid %d)", c->name, seconds,
                          static_cast<int>(c->pid)));
    }
  }
  for (auto it = experts_.begin(); it != experts_.end();) {
    if ((*it)->draining && !(*it)->running) {
      Say(absl::StrCat((*it)->name, " stopped (", DescribeWaitStatus((*it)->wait_status), ")"));
      if ((*it)->pid > 0) kill(-(*it)->pid, SIGKILL);  // anything left in its group
      it = experts_.erase(it);
      if (absl::Status s = WriteEndpoints(); !s.ok()) Say(StatusLine(s));
    } else {
      ++it;
    }
  }
}

int Supervisor::Run() {
  auto num_experts = NumExperts(options_.model_dir);
  if (!num_experts.ok()) {
    Say(StatusLine(num_experts.status()));
    return 1;
  }
  // Signals are taken synchronously by the main thread; every thread started
  // from here on (the pump, gRPC's) inherits the mask.
  sigemptyset(&signals_);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) sigaddset(&signals_, sig);
  pthread_sigmask(SIG_BLOCK, &signals_, nullptr);
  // A shell's background job starts with SIGINT ignored; take it anyway (and
  // never let SIGCHLD be ignored, which would auto-reap the children).
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) signal(sig, SIG_DFL);
  signal(SIGPIPE, SIG_IGN);
  // After the mask, which gRPC's threads inherit (rpc/grpc_process.h).
  const rpc::GrpcProcess grpc_process;
  if (absl::Status s = pump_.Start(); !s.ok()) {
    Say(StatusLine(s));
    return 1;
  }

  num_experts_ = *num_experts;
  const auto bin = std::filesystem::path(options_.bin_dir);
  expert_bin_ = (bin / "switchyard-expert").string();
  const std::string gateway_bin = (bin / "switchyard-gateway").string();
  const auto deadline = Clock::now() + std::chrono::seconds(options_.start_timeout_s);

  restart_policy_.max_restarts = options_.max_restarts;

  // The gateway reads its topology (--experts @FILE) from a file with the
  // endpoints file's content, written from before the gateway starts.
  topology_file_ = (std::filesystem::temp_directory_path() /
                    absl::StrCat("switchyard-up-", getpid(), "-topology.json"))
                       .string();
  if (options_.metrics_port >= 0) {
    auto exporter = metrics::HttpExporter::Start(
        absl::StrCat(options_.listen_host, ":", options_.metrics_port), &registry_);
    if (!exporter.ok()) {
      Say(absl::StrCat("--metrics-port: ", StatusLine(exporter.status())));
      StopAll();
      return 1;
    }
    exporter_ = *std::move(exporter);
    Say(absl::StrCat("metrics on ", exporter_->address()));
  }

  // Experts, all started at once (with --autoscale, --min-replicas of each).
  const int replicas_each = options_.autoscale ? options_.autoscaler.min_replicas : 1;
  const int processes = replicas_each * ((*num_experts + options_.experts_per_process - 1) /
                                         options_.experts_per_process);
  const int cpus = UsableCpus();
  expert_threads_ = std::max(1, cpus / std::max(1, processes));
  expert_spin_count_ = processes > 1 ? kExpertSpinCount : kOneProcessSpinCount;
  // CPU experts in more processes than there are CPUs compete for them, and
  // every process adds its own wake-ups to each layer's hop (README,
  // "Split layouts on one host": 2 CPUs, batch 1, split / local 0.58 with 8
  // processes, 0.70-0.76 with one).
  if (options_.device == "cpu" && !options_.autoscale && processes > cpus &&
      options_.experts_per_process < *num_experts) {
    Say(absl::StrCat("note: ", processes, " expert processes share ", cpus,
                     " CPUs; on one CPU host --experts-per-process ", *num_experts,
                     " (one process computing every expert on all CPUs) is faster"));
  }
  int placed = 0;
  for (int first = 0; first < *num_experts; first += options_.experts_per_process) {
    for (int replica = 0; replica < replicas_each; ++replica) {
      auto child = std::make_unique<Child>();
      child->role = "expert";
      child->restarts = RestartTracker(restart_policy_);
      for (int e = first; e < std::min(*num_experts, first + options_.experts_per_process); ++e) {
        child->experts.push_back(e);
      }
      child->replica_id = next_replica_id_++;
      child->name = absl::StrCat("expert ", ExpertsLabel(child->experts));
      if (replica > 0) absl::StrAppend(&child->name, " replica ", child->replica_id);
      if (!options_.gpus.empty()) child->gpu = options_.gpus[placed++ % options_.gpus.size()];
      absl::Status s = Spawn(*child, ExpertArgv(child->experts, child->gpu), ExpertEnv());
      child->in_topology = true;
      experts_.push_back(std::move(child));
      if (!s.ok()) {
        Say(StatusLine(s));
        StopAll();
        return 1;
      }
    }
  }
  auto addresses_known = [this](const std::vector<Child*>& group) {
    bool all = true;
    for (Child* c : group) {
      if (c->address.empty()) {
        c->address = pump_.Address(c->pid);
        c->metrics = pump_.MetricsAddress(c->pid);
      }
      all = all && !c->address.empty();
    }
    return all;
  };
  std::vector<Child*> experts;
  for (auto& e : experts_) experts.push_back(e.get());
  Wake wake = WaitUntil([&] { return addresses_known(experts); }, deadline);
  if (wake != Wake::kDone) return Abort(wake, "the experts to report their addresses");
  wake = WaitUntil([&] { return AllHealthy(experts); }, deadline);
  if (wake != Wake::kDone) return Abort(wake, "the experts to become healthy");

  // The gateway, routed to them through the topology in the endpoints file.
  if (absl::Status s = WriteEndpoints(); !s.ok()) {
    Say(StatusLine(s));
    StopAll();
    return 1;
  }
  gateway_ = std::make_unique<Child>();
  gateway_->role = "gateway";
  gateway_->restarts = RestartTracker(restart_policy_);
  gateway_->name = "gateway";
  std::vector<std::string> argv = {gateway_bin,
                                   "--model",
                                   options_.model_dir,
                                   "--listen",
                                   absl::StrCat(options_.listen_host, ":", options_.port),
                                   "--experts",
                                   "@" + topology_file_,
                                   "--metrics-listen",
                                   absl::StrCat(options_.listen_host, ":0")};
  argv.insert(argv.end(), options_.gateway_args.begin(), options_.gateway_args.end());
  // The gateway shares this host's cores with the experts: OpenMP threads that
  // spin between parallel regions (libgomp's default ~300k rounds) take the
  // cores the experts need while the gateway waits for them (2 cores, batch
  // 1: 19.3 -> 25.5 output tokens/s with no spin at all). A spin that only
  // bridges the gaps between its own regions is better still
  // (kGatewaySpinCount) where several expert processes share the cores;
  // with one, none (kOneProcessSpinCount). Unless the user chose.
  std::vector<std::string> gateway_env;
  AddShortSpin(processes > 1 ? kGatewaySpinCount : kOneProcessSpinCount, &gateway_env);
  AddCopyTunable(&gateway_env);
  if (absl::Status s = Spawn(*gateway_, argv, gateway_env); !s.ok()) {
    Say(StatusLine(s));
    StopAll();
    return 1;
  }
  wake = WaitUntil([&] { return addresses_known({gateway_.get()}); }, deadline);
  if (wake != Wake::kDone) return Abort(wake, "the gateway to report its address");
  wake = WaitUntil([&] { return AllHealthy({gateway_.get()}); }, deadline);
  if (wake != Wake::kDone) return Abort(wake, "the gateway to become healthy");
  gateway_->channel.reset();
  for (auto& e : experts_) e->channel.reset();

  // Made before the endpoints file says ready: its metrics (in up's registry)
  // hold the replica counts from then on.
  if (options_.autoscale) {
    autoscaler_ = std::make_unique<Autoscaler>(
        num_experts_, options_.autoscaler, this,
        [](const std::string& address) -> absl::StatusOr<double> {
          SY_ASSIGN_OR_RETURN(std::string text, ScrapeMetrics(address));
          return MetricSum(text, "switchyard_expert_busy_seconds_total");
        },
        NvidiaSmiFreeMemory, &registry_, [](const std::string& line) { Say(line); });
  }
  ready_ = true;
  if (absl::Status s = WriteEndpoints(); !s.ok()) {
    Say(StatusLine(s));
    StopAll();
    return 1;
  }
  const std::string port = gateway_->address.substr(gateway_->address.rfind(':') + 1);
  std::printf("switchyard up: ready on %s (gateway pid %d, %zu expert processes)\n", port.c_str(),
              static_cast<int>(gateway_->pid), experts_.size());
  std::fflush(stdout);

  if (options_.autoscale) {
    const AutoscalerOptions& a = options_.autoscaler;
    Say(absl::StrFormat(
        "autoscaling: %d..%d replicas per expert, target busy %.3f per replica (%.3f of each "
        "of %d workers), scale-down delay %d s, every %d ms",
        a.min_replicas, a.max_replicas, a.target_busy, a.target_busy / options_.expert_workers,
        options_.expert_workers, a.scale_down_delay_s, options_.autoscale_period_ms));
  }

  return Serve();
}

bool Supervisor::ScheduleRestart(Child& child) {
  const RestartDecision decision = child.restarts.OnExit(Clock::now());
  const RestartPolicy& policy = child.restarts.policy();
  const auto window_s = std::chrono::duration_cast<std::chrono::seconds>(policy.window).count();
  if (decision.give_up) {
    Say(absl::StrCat(child.name, " is crash-looping (", decision.restarts_in_window,
                     " restarts within ", window_s, " s, the limit of --max-restarts); giving up"));
    return false;
  }
  child.phase = Child::Phase::kBackoff;
  child.restart_at = Clock::now() + decision.delay;
  child.healthy = false;
  child.channel.reset();
  Say(absl::StrCat("restarting ", child.name, " in ", decision.delay.count() / 1000.0,
                   " s (restart ", decision.restarts_in_window, " of at most ", policy.max_restarts,
                   " within ", window_s, " s)"));
  return true;
}

absl::Status Supervisor::Respawn(Child& child) {
  std::vector<std::string> argv = child.argv;
  // The same addresses as before, so the gateway's channels (and whatever
  // scrapes the metrics) reconnect to the new process.
  for (const auto& [flag, address] :
       {std::pair{"--listen", child.address}, std::pair{"--metrics-listen", child.metrics}}) {
    for (size_t i = 0; i + 1 < argv.size(); ++i) {
      if (argv[i] == flag && !address.empty()) {
        argv[i + 1] = absl::StrCat(HostOf(argv[i + 1]), ":", PortOf(address));
      }
    }
  }
  const std::vector<std::string> env = child.env;  // Spawn overwrites child.env.
  SY_RETURN_IF_ERROR(Spawn(child, argv, env));
  child.phase = Child::Phase::kStarting;
  child.started_at = Clock::now();
  return absl::OkStatus();
}

void Supervisor::CheckRestarted(Child& child) {
  if (!child.running) return;  // Reaped as an exit already; handled there.
  const std::string address = pump_.Address(child.pid);
  if (address.empty() || !AllHealthy({&child})) {
    if (Clock::now() - child.started_at > std::chrono::seconds(options_.start_timeout_s)) {
      Say(absl::StrCat(child.name, " (pid ", child.pid, ") did not become healthy within ",
                       options_.start_timeout_s, " s after its restart; killing it"));
      kill(-child.pid, SIGKILL);  // Reaped as a crash on the next round.
    }
    return;
  }
  const std::string metrics = pump_.MetricsAddress(child.pid);
  if (!metrics.empty()) child.metrics = metrics;
  child.channel.reset();
  child.phase = Child::Phase::kServing;
  if (absl::Status s = WriteEndpoints(); !s.ok()) Say(StatusLine(s));
  Say(absl::StrCat(child.name, " restarted (pid ", child.pid, ") and serving on ", address));
}

int Supervisor::Serve() {
  auto next_tick = Clock::now() + std::chrono::milliseconds(options_.autoscale_period_ms);
  if (autoscaler_) autoscaler_->Tick(Clock::now());  // the first samples
  while (true) {
    std::vector<Child*> children;
    for (auto& e : experts_) children.push_back(e.get());
    children.push_back(gateway_.get());
    for (Child* c : Reap()) {
      if (!ScheduleRestart(*c)) {
        Say("stopping everything");
        StopAll();
        return 1;
      }
    }
    for (Child* c : children) {
      if (c->draining) continue;  // leaving: not restarted, not added (AdvanceDrains)
      if (c->phase == Child::Phase::kBackoff && Clock::now() >= c->restart_at) {
        if (absl::Status s = Respawn(*c); !s.ok()) {
          Say(absl::StrCat("cannot restart ", c->name, ": ", StatusLine(s)));
          if (!ScheduleRestart(*c)) {
            Say("stopping everything");
            StopAll();
            return 1;
          }
        }
      } else if (c->phase == Child::Phase::kStarting) {
        if (c->role == "expert" && !c->in_topology) {
          CheckJoining(*c);
        } else {
          CheckRestarted(*c);
        }
      }
    }
    AdvanceDrains();
    if (autoscaler_ && Clock::now() >= next_tick) {
      next_tick += std::chrono::milliseconds(options_.autoscale_period_ms);
      if (next_tick < Clock::now()) {
        next_tick = Clock::now() + std::chrono::milliseconds(options_.autoscale_period_ms);
      }
      autoscaler_->Tick(Clock::now());
    }
    timespec tick{0, 100 * 1000 * 1000};
    const int sig = sigtimedwait(&signals_, nullptr, &tick);
    if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
      stop_signal_ = sig;
      return Abort(Wake::kStopSignal, "");
    }
  }
}

}  // namespace

int RunUp(const std::vector<std::string>& args) {
  auto options = ParseUpOptions(args);
  if (!options.ok()) {
    Say(StatusLine(options.status()));
    return 1;
  }
  Supervisor supervisor(*std::move(options));
  return supervisor.Run();
}

}  // namespace switchyard::cli
