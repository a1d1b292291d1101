// Helpers shared by the test suites.
#ifndef SWITCHYARD_TESTS_TEST_UTIL_H_
#define SWITCHYARD_TESTS_TEST_UTIL_H_

#include <stdlib.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/types/span.h"
#include "gtest/gtest.h"

namespace switchyard::testing {

inline std::string DataDir() { return SWITCHYARD_TEST_DATA_DIR; }
inline std::string TinyMixtralDir() { return DataDir() + "/tiny-mixtral"; }

// A new empty folder under the test temp dir, removed when the program exits.
inline std::string MakeTempDir() {
  struct TempDirs {
    ~TempDirs() {
      for (const std::string& d : dirs) {
        std::error_code ec;
        std::filesystem::remove_all(d, ec);
      }
    }
    std::vector<std::string> dirs;
  };
  static TempDirs made;
  std::string tmpl = ::testing::TempDir() + "/switchyard_test.XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp failed";
    return ::testing::TempDir();
  }
  made.dirs.push_back(tmpl);
  return tmpl;
}

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

inline bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Asserts |a - b| <= abs + rel * |b| elementwise; prints the max difference.
inline ::testing::AssertionResult AllClose(absl::Span<const float> actual,
                                           absl::Span<const float> expected, double abs, double rel,
                                           const std::string& what) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << what << ": size " << actual.size() << " != " << expected.size();
  }
  double max_diff = 0.0;
  size_t worst = 0;
  size_t bad = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    // Equal values match, infinities included (inf - inf and 0 * inf are NaN).
    if (actual[i] == expected[i]) continue;
    const double d = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    if (!(d <= abs + rel * std::fabs(expected[i]))) ++bad;
    if (!(d <= max_diff)) {
      max_diff = d;
      worst = i;
    }
  }
  std::printf("[ allclose ] %s: max |diff| = %.3g at %zu (n=%zu, tol %.1g + %.1g|ref|)\n",
              what.c_str(), max_diff, worst, actual.size(), abs, rel);
  if (bad > 0) {
    return ::testing::AssertionFailure()
           << what << ": " << bad << " of " << actual.size() << " out of tolerance; worst at "
           << worst << ": " << actual[worst] << " vs " << expected[worst];
  }
  return ::testing::AssertionSuccess();
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_TEST_UTIL_H_
