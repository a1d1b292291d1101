// Turns LoadProgress reports (core/checkpoint.h) into text for a person
// watching a server start: on a terminal one bar redrawn in place, otherwise
// a line every `interval` or every 10%, and always a final line with the
// bytes, the time and the rate. Prints nothing itself: the servers write the
// text it returns to stderr.
//
// Thread-safety: not thread-safe; Checkpoint serializes its reports.
#ifndef SWITCHYARD_CORE_LOAD_PROGRESS_H_
#define SWITCHYARD_CORE_LOAD_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <string>

#include "core/checkpoint.h"

namespace switchyard {

// "1.5 GiB", "12.0 MiB", "512 B".
std::string HumanBytes(uint64_t bytes);

class LoadProgressMeter {
 public:
  using Clock = std::chrono::steady_clock;

  // `label` starts every line ("switchyard-expert: loading"); `terminal`:
  // redraw one bar with '\r' (stderr is a TTY). `interval` (default 2 s):
  // the longest gap between lines when not a terminal.
  LoadProgressMeter(std::string label, bool terminal,
                    Clock::duration interval = std::chrono::seconds(2));

  // The text to write for `p` at `now`; "" when nothing is due. A finished
  // report always gives the final line, ending in '\n'.
  std::string Update(const LoadProgress& p, Clock::time_point now = Clock::now());

 private:
  std::string Line(const LoadProgress& p, Clock::time_point now) const;

  std::string label_;
  bool terminal_;
  Clock::duration interval_;
  Clock::time_point start_;
  Clock::time_point last_{};
  int last_tenth_ = 0;
  bool drew_ = false;
};

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_LOAD_PROGRESS_H_
