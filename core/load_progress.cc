#include "core/load_progress.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace switchyard {

std::string HumanBytes(uint64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes) / 1024;
  int u = 0;
  while (v >= 1024 && u < 3) {
    v /= 1024;
    ++u;
  }
  return absl::StrFormat("%.1f %s", v, units[u]);
}

LoadProgressMeter::LoadProgressMeter(std::string label, bool terminal, Clock::duration interval)
    : label_(std::move(label)), terminal_(terminal), interval_(interval), start_(Clock::now()) {}

std::string LoadProgressMeter::Line(const LoadProgress& p, Clock::time_point now) const {
  const double seconds = std::chrono::duration<double>(now - start_).count();
  const double rate = seconds > 0 ? static_cast<double>(p.bytes_done) / seconds : 0.0;
  const double fraction =
      p.bytes_total == 0 ? 1.0 : static_cast<double>(p.bytes_done) / p.bytes_total;
  std::string bar;
  if (terminal_) {
    const int width = 30, filled = static_cast<int>(fraction * width);
    bar = absl::StrCat(" [", std::string(filled, '#'), std::string(width - filled, '.'), "]");
  }
  return absl::StrFormat("%s%s %3.0f%% %s / %s, %s/s, %.1f s", label_, bar, 100 * fraction,
                         HumanBytes(p.bytes_done), HumanBytes(p.bytes_total),
                         HumanBytes(static_cast<uint64_t>(rate)), seconds);
}

std::string LoadProgressMeter::Update(const LoadProgress& p, Clock::time_point now) {
  if (p.finished) {
    std::string out = absl::StrCat(terminal_ && drew_ ? "\r" : "", Line(p, now), " done");
    // Clear what a longer bar left on the line.
    if (terminal_ && drew_) out += "\033[K";
    return out + "\n";
  }
  const int tenth =
      p.bytes_total == 0
          ? 10
          : static_cast<int>(10 * p.bytes_done / std::max<uint64_t>(1, p.bytes_total));
  if (terminal_) {
    // Redraw at most ten times a second.
    if (drew_ && now - last_ < std::chrono::milliseconds(100)) return "";
    last_ = now;
    drew_ = true;
    return absl::StrCat("\r", Line(p, now), "\033[K");
  }
  if (now - last_ < interval_ && tenth <= last_tenth_) return "";
  last_ = now;
  last_tenth_ = tenth;
  return Line(p, now) + "\n";
}

}  // namespace switchyard
