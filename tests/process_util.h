// Starting real server processes from tests: fork/exec, read the one
// "... listening on ADDR ..." line they print, stop them with a signal.
#ifndef SWITCHYARD_TESTS_PROCESS_UTIL_H_
#define SWITCHYARD_TESTS_PROCESS_UTIL_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace switchyard::testing {

inline std::string BinaryDir() { return std::string(SWITCHYARD_BINARY_DIR) + "/bin"; }

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { Kill(SIGKILL); }

  // Starts argv and waits up to `timeout` for a stdout line containing
  // "listening on "; returns the address after it.
  absl::StatusOr<std::string> Start(const std::vector<std::string>& argv,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    int out[2];
    if (pipe(out) != 0) return absl::InternalError("pipe failed");
    pid_ = fork();
    if (pid_ < 0) return absl::InternalError("fork failed");
    if (pid_ == 0) {
      dup2(out[1], STDOUT_FILENO);
      close(out[0]);
      close(out[1]);
      std::vector<char*> args;
      for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      std::perror("execv");
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
        std::string rest = line.substr(at + 13);
        return rest.substr(0, rest.find(' '));
      }
      line.clear();
    }
    return absl::DeadlineExceededError(absl::StrCat(argv[0], " did not report its address"));
  }

  // Sends `sig`; for SIGKILL also reaps the process.
  void Signal(int sig) {
    if (pid_ > 0) ::kill(pid_, sig);
  }
  // Sends `sig` and waits for the exit; returns the exit status (-1 if none).
  int Kill(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    return status;
  }
  pid_t pid() const { return pid_; }
  // "VALUE" of a " key=VALUE" field of the start line ("" if absent).
  std::string Field(const std::string& key) const {
    const size_t at = line_.find(" " + key + "=");
    if (at == std::string::npos) return "";
    const std::string rest = line_.substr(at + key.size() + 2);
    return rest.substr(0, rest.find(' '));
  }

 private:
  std::string line_;
  pid_t pid_ = -1;
  int fd_ = -1;
};

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_PROCESS_UTIL_H_
