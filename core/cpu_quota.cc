#include "core/cpu_quota.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace switchyard {
namespace {

// Debian's Abseil has a string_view of its own.
absl::string_view A(std::string_view s) { return absl::string_view(s.data(), s.size()); }

int CeilCpus(int64_t quota, int64_t period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<int>((quota + period - 1) / period);
}

// The file's first line, "" if it cannot be read.
std::string ReadLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// The smaller of two limits, 0 meaning none.
int Tighter(int a, int b) { return a == 0 ? b : (b == 0 ? a : std::min(a, b)); }

// `path` ("/a/b") and each ancestor up to "/", as paths under `dir`.
std::vector<std::string> SelfAndAncestors(const std::string& dir, absl::string_view path) {
  std::vector<std::string> out;
  std::string p(absl::StripSuffix(path, "/"));
  for (;;) {
    out.push_back(dir + p);
    const size_t slash = p.rfind('/');
    if (slash == std::string::npos || p.empty()) break;
    p.resize(slash);
  }
  return out;
}

}  // namespace

int CpusFromCgroupV2Max(std::string_view cpu_max) {
  const std::vector<absl::string_view> fields =
      absl::StrSplit(absl::StripAsciiWhitespace(A(cpu_max)), ' ', absl::SkipEmpty());
  int64_t quota = 0, period = 0;
  if (fields.size() != 2 || !absl::SimpleAtoi(fields[0], &quota) ||
      !absl::SimpleAtoi(fields[1], &period)) {
    return 0;  // "max PERIOD": no limit
  }
  return CeilCpus(quota, period);
}

int CpusFromCgroupV1(std::string_view quota_us, std::string_view period_us) {
  int64_t quota = 0, period = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(A(quota_us)), &quota) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(A(period_us)), &period)) {
    return 0;
  }
  return CeilCpus(quota, period);
}

int CgroupCpuLimit(std::string_view proc_self_cgroup, const std::string& cgroup_root) {
  int limit = 0;
  for (absl::string_view line : absl::StrSplit(A(proc_self_cgroup), '\n', absl::SkipEmpty())) {
    // "ID:CONTROLLERS:PATH"; v2's line is "0::PATH".
    const std::vector<absl::string_view> f = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (f.size() != 3) continue;
    if (f[0] == "0" && f[1].empty()) {
      for (const std::string& dir : SelfAndAncestors(cgroup_root, f[2])) {
        limit = Tighter(limit, CpusFromCgroupV2Max(ReadLine(dir + "/cpu.max")));
      }
      continue;
    }
    const std::vector<absl::string_view> controllers = absl::StrSplit(f[1], ',');
    if (std::find(controllers.begin(), controllers.end(), "cpu") == controllers.end()) continue;
    // v1 mounts the cpu controller as cpu/ or cpu,cpuacct/ (often both).
    std::vector<std::string> mounts = {std::string(f[1])};
    if (f[1] != "cpu") mounts.push_back("cpu");
    for (const std::string& mount : mounts) {
      for (const std::string& dir : SelfAndAncestors(cgroup_root + "/" + mount, f[2])) {
        limit = Tighter(limit, CpusFromCgroupV1(ReadLine(dir + "/cpu.cfs_quota_us"),
                                                ReadLine(dir + "/cpu.cfs_period_us")));
      }
    }
  }
  return limit;
}

std::string FitOpenMpToCpuQuota() {
  std::ifstream in("/proc/self/cgroup");
  std::stringstream text;
  text << in.rdbuf();
  return FitOpenMpToCpuQuota(text.str(), "/sys/fs/cgroup");
}

std::string FitOpenMpToCpuQuota(std::string_view proc_self_cgroup, const std::string& cgroup_root) {
  if (std::getenv("OMP_NUM_THREADS") != nullptr) return "";
  const int limit = CgroupCpuLimit(proc_self_cgroup, cgroup_root);
  const int threads = omp_get_max_threads();
  if (limit == 0 || limit >= threads) return "";
  omp_set_num_threads(limit);
  return absl::StrCat("OpenMP threads ", limit, " (the cgroup's CPU limit; ", threads,
                      " CPUs visible)");
}

}  // namespace switchyard
