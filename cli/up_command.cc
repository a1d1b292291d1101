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
// Children run in their own process groups (so a terminal's Ctrl-C reaches
// only `up`, which then stops them in order) and get SIGTERM if `up` itself
// dies. Their stdout and stderr are forwarded, line by line and prefixed with
// the process name, to our stdout and stderr.
#include <fcntl.h>
#include <poll.h>
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
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "cli/grpc_client.h"
#include "cli/restart_policy.h"
#include "core/flags.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace switchyard::cli {
namespace {

using Clock = std::chrono::steady_clock;

constexpr auto kStopGrace = std::chrono::seconds(10);
constexpr char kListeningMarker[] = " listening on ";

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
    std::string out = absl::StrCat(source.prefix, line, "\n");
    std::fwrite(out.data(), 1, out.size(), source.sink);
    std::fflush(source.sink);
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
};

absl::StatusOr<std::string> SelfDir() {
  std::error_code ec;
  std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot read /proc/self/exe: ", ec.message()));
  return self.parent_path().string();
}

absl::StatusOr<UpOptions> ParseUpOptions(const std::vector<std::string>& args) {
  const std::vector<std::string> gateway_passthrough = {
      "kv-cache-tokens", "max-queue", "max-step-tokens", "max-new-tokens-limit", "micro-batches"};
  std::set<std::string> value_flags = {
      "model",        "port",        "endpoints-file",  "experts-per-process",
      "bin-dir",      "listen-host", "start-timeout-s", "expert-workers",
      "expert-arg",   "gateway-arg", "device",          "precision",
      "max-restarts", "http-port"};
  value_flags.insert(gateway_passthrough.begin(), gateway_passthrough.end());
  SY_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, value_flags, {}));
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
  if (auto workers = f.Get("expert-workers")) o.expert_args = {"--workers", *workers};
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
};

// Starts, watches and stops the children. Owned and used by the main thread
// only (signals are taken synchronously with sigtimedwait).
class Supervisor {
 public:
  explicit Supervisor(UpOptions options) : options_(std::move(options)) {}

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

  UpOptions options_;
  OutputPump pump_;
  std::vector<std::unique_ptr<Child>> experts_;
  std::unique_ptr<Child> gateway_;
  sigset_t signals_;
  int stop_signal_ = 0;
  bool stopping_ = false;
  bool endpoints_written_ = false;
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
      if (!stopping_) {
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
  if (endpoints_written_) {
    std::error_code ec;
    std::filesystem::remove(options_.endpoints_file, ec);
  }
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

absl::Status Supervisor::WriteEndpoints() {
  if (options_.endpoints_file.empty()) return absl::OkStatus();
  nlohmann::ordered_json processes = nlohmann::ordered_json::array();
  for (auto& e : experts_) {
    processes.push_back({{"role", "expert"},
                         {"experts", e->experts},
                         {"grpc", e->address},
                         {"metrics", e->metrics.empty() ? nlohmann::ordered_json(nullptr)
                                                        : nlohmann::ordered_json(e->metrics)},
                         {"pid", e->pid}});
  }
  const std::string port = gateway_->address.substr(gateway_->address.rfind(':') + 1);
  processes.push_back(
      {{"role", "gateway"},
       {"experts", nlohmann::ordered_json::array()},
       {"grpc", absl::StrCat(options_.listen_host, ":", port)},
       {"metrics", gateway_->metrics.empty() ? nlohmann::ordered_json(nullptr)
                                             : nlohmann::ordered_json(gateway_->metrics)},
       {"pid", gateway_->pid}});
  const nlohmann::ordered_json doc = {{"processes", std::move(processes)}};
  const std::string tmp = absl::StrCat(options_.endpoints_file, ".tmp.", getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << doc.dump(2) << "\n";
    out.close();
    if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, options_.endpoints_file, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    return absl::UnavailableError(
        absl::StrCat("cannot write ", options_.endpoints_file, ": ", ec.message()));
  }
  endpoints_written_ = true;
  return absl::OkStatus();
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
  if (absl::Status s = pump_.Start(); !s.ok()) {
    Say(StatusLine(s));
    return 1;
  }

  const auto bin = std::filesystem::path(options_.bin_dir);
  const std::string expert_bin = (bin / "switchyard-expert").string();
  const std::string gateway_bin = (bin / "switchyard-gateway").string();
  const auto deadline = Clock::now() + std::chrono::seconds(options_.start_timeout_s);

  RestartPolicy restart_policy;
  restart_policy.max_restarts = options_.max_restarts;

  // Experts, all started at once.
  for (int first = 0; first < *num_experts; first += options_.experts_per_process) {
    auto child = std::make_unique<Child>();
    child->role = "expert";
    child->restarts = RestartTracker(restart_policy);
    for (int e = first; e < std::min(*num_experts, first + options_.experts_per_process); ++e) {
      child->experts.push_back(e);
    }
    child->name = absl::StrCat("expert ", ExpertsLabel(child->experts));
    std::vector<std::string> argv = {expert_bin,
                                     "--model",
                                     options_.model_dir,
                                     "--listen",
                                     absl::StrCat(options_.listen_host, ":0"),
                                     "--experts",
                                     absl::StrJoin(child->experts, ","),
                                     "--metrics-listen",
                                     absl::StrCat(options_.listen_host, ":0")};
    argv.insert(argv.end(), options_.expert_args.begin(), options_.expert_args.end());
    // The experts share this host's cores: one OpenMP thread each unless the
    // user chose (2 cores, split cluster: 34 -> 40 output tokens/s).
    std::vector<std::string> env;
    if (std::getenv("OMP_NUM_THREADS") == nullptr) env.push_back("OMP_NUM_THREADS=1");
    absl::Status s = Spawn(*child, argv, env);
    experts_.push_back(std::move(child));
    if (!s.ok()) {
      Say(StatusLine(s));
      StopAll();
      return 1;
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

  // The gateway, routed to them.
  std::vector<std::string> spec;
  for (auto& e : experts_) {
    for (int expert : e->experts) spec.push_back(absl::StrCat(expert, "=", e->address));
  }
  gateway_ = std::make_unique<Child>();
  gateway_->role = "gateway";
  gateway_->restarts = RestartTracker(restart_policy);
  gateway_->name = "gateway";
  std::vector<std::string> argv = {gateway_bin,
                                   "--model",
                                   options_.model_dir,
                                   "--listen",
                                   absl::StrCat(options_.listen_host, ":", options_.port),
                                   "--experts",
                                   absl::StrJoin(spec, ";"),
                                   "--metrics-listen",
                                   absl::StrCat(options_.listen_host, ":0")};
  argv.insert(argv.end(), options_.gateway_args.begin(), options_.gateway_args.end());
  if (absl::Status s = Spawn(*gateway_, argv); !s.ok()) {
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

  if (absl::Status s = WriteEndpoints(); !s.ok()) {
    Say(StatusLine(s));
    StopAll();
    return 1;
  }
  const std::string port = gateway_->address.substr(gateway_->address.rfind(':') + 1);
  std::printf("switchyard up: ready on %s (gateway pid %d, %zu expert processes)\n", port.c_str(),
              static_cast<int>(gateway_->pid), experts_.size());
  std::fflush(stdout);

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
  std::vector<Child*> children;
  for (auto& e : experts_) children.push_back(e.get());
  children.push_back(gateway_.get());
  while (true) {
    for (Child* c : Reap()) {
      if (!ScheduleRestart(*c)) {
        Say("stopping everything");
        StopAll();
        return 1;
      }
    }
    for (Child* c : children) {
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
        CheckRestarted(*c);
      }
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
