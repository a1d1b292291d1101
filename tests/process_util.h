// Starting real server processes from tests: fork/exec, read the one
// "... listening on ADDR ..." line they print, stop them with a signal.
#ifndef SWITCHYARD_TESTS_PROCESS_UTIL_H_
#define SWITCHYARD_TESTS_PROCESS_UTIL_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace switchyard::testing {

inline std::string BinaryDir() { return std::string(SWITCHYARD_BINARY_DIR) + "/bin"; }

// A server child process: fork/exec, the "... listening on ADDR ..." line it
// prints, signals, and waiting for its exit with a bound. The child dies with
// the test process (PR_SET_PDEATHSIG), so a crashed test leaves no servers.
class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { Kill(SIGKILL); }

  // Starts argv (argv[0] an absolute path) and waits up to `timeout` for its
  // listening line; returns the address in it.
  absl::StatusOr<std::string> Start(const std::vector<std::string>& argv,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    if (pid_ > 0) return absl::FailedPreconditionError("already started");
    argv_ = argv;
    line_.clear();
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
    // Built before fork: the child of a multi-threaded process may only make
    // async-signal-safe calls until exec.
    std::vector<char*> args;
    for (const std::string& a : argv_) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) return absl::InternalError("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(out[1], STDOUT_FILENO);
      execv(args[0], args.data());
      static const char kFailed[] = "execv failed\n";
      (void)!write(STDERR_FILENO, kFailed, sizeof(kFailed) - 1);
      _exit(127);
    }
    close(out[1]);
    fd_ = out[0];
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      char c;
      const ssize_t n = read(fd_, &c, 1);
      if (n <= 0) break;  // the child exited
      if (c != '\n') {
        line.push_back(c);
        continue;
      }
      const size_t at = line.find("listening on ");
      if (at != std::string::npos) {
        line_ = line;
        const std::string rest = line.substr(at + 13);
        return rest.substr(0, rest.find(' '));
      }
      line.clear();
    }
    const int status = Kill(SIGKILL);
    return absl::UnavailableError(
        absl::StrCat(argv[0], " did not report its address (wait status ", status, ")"));
  }

  void Signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }

  // Waits up to `timeout` for the process to exit; its wait status, or
  // nullopt if it is still running (or was never started).
  std::optional<int> WaitExit(std::chrono::milliseconds timeout) {
    if (pid_ <= 0) return std::nullopt;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        Reaped();
        return status;
      }
      if (r < 0) {
        Reaped();
        return std::nullopt;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // Sends `sig` and waits for the exit; the wait status (-1 if not running).
  int Kill(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int status = 0;
    const pid_t r = waitpid(pid_, &status, 0);
    Reaped();
    return r < 0 ? -1 : status;
  }

  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  const std::vector<std::string>& argv() const { return argv_; }
  // "VALUE" of a " key=VALUE" field of the listening line ("" if absent).
  std::string Field(const std::string& key) const {
    const size_t at = line_.find(" " + key + "=");
    if (at == std::string::npos) return "";
    const std::string rest = line_.substr(at + key.size() + 2);
    return rest.substr(0, rest.find(' '));
  }

 private:
  void Reaped() {
    pid_ = -1;
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  std::vector<std::string> argv_;
  std::string line_;
  pid_t pid_ = -1;
  int fd_ = -1;
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_PROCESS_UTIL_H_
