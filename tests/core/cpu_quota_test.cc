// core/cpu_quota.h: CPU limits read from cgroup v2 and v1 files (rounded
// up; none where there is none), the tightest of a cgroup and its
// ancestors, a container's view (its own cgroup at the mount's root), and
// OpenMP's team cut to the limit unless OMP_NUM_THREADS is set.
#include "core/cpu_quota.h"

#include <omp.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard {
namespace {

using ::testing::HasSubstr;

// A scratch cgroup tree: Write("a/b/cpu.max", "...") makes the folders.
class FakeCgroups {
 public:
  FakeCgroups()
      : root_(std::filesystem::temp_directory_path() /
              ("switchyard-cpu-quota-test-" + std::to_string(getpid()))) {
    std::filesystem::remove_all(root_);
  }
  ~FakeCgroups() { std::filesystem::remove_all(root_); }
  void Write(const std::string& path, const std::string& text) {
    const std::filesystem::path file = root_ / path;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream(file) << text << "\n";
  }
  std::string root() const { return root_.string(); }

 private:
  const std::filesystem::path root_;
};

TEST(CpuQuotaTest, ParsesBothVersionsRoundingUp) {
  EXPECT_EQ(CpusFromCgroupV2Max("400000 100000\n"), 4);
  EXPECT_EQ(CpusFromCgroupV2Max("150000 100000"), 2);  // 1.5 CPUs: 2 threads
  EXPECT_EQ(CpusFromCgroupV2Max("50000 100000"), 1);
  EXPECT_EQ(CpusFromCgroupV2Max("max 100000"), 0);
  EXPECT_EQ(CpusFromCgroupV2Max(""), 0);
  EXPECT_EQ(CpusFromCgroupV2Max("12 x"), 0);
  EXPECT_EQ(CpusFromCgroupV1("-1", "100000"), 0);
  EXPECT_EQ(CpusFromCgroupV1("250000\n", "100000\n"), 3);
  EXPECT_EQ(CpusFromCgroupV1("", "100000"), 0);
}

TEST(CpuQuotaTest, TakesTheTightestOfTheCgroupAndItsAncestors) {
  FakeCgroups v2;
  v2.Write("cpu.max", "max 100000");
  v2.Write("kubepods/cpu.max", "200000 100000");
  v2.Write("kubepods/pod1/cpu.max", "600000 100000");
  EXPECT_EQ(CgroupCpuLimit("0::/kubepods/pod1\n", v2.root()), 2);
  v2.Write("kubepods/cpu.max", "max 100000");
  EXPECT_EQ(CgroupCpuLimit("0::/kubepods/pod1\n", v2.root()), 6);
  EXPECT_EQ(CgroupCpuLimit("0::/\n", v2.root()), 0);
  // A container sees its own cgroup at the root, whatever path it is named by.
  FakeCgroups container;
  container.Write("cpu.max", "300000 100000");
  EXPECT_EQ(CgroupCpuLimit("0::/kubepods/pod2/abc\n", container.root()), 3);

  FakeCgroups v1;
  v1.Write("cpu,cpuacct/docker/x/cpu.cfs_quota_us", "150000");
  v1.Write("cpu,cpuacct/docker/x/cpu.cfs_period_us", "100000");
  EXPECT_EQ(CgroupCpuLimit("5:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n", v1.root()), 2);
  EXPECT_EQ(CgroupCpuLimit("5:memory:/docker/x\n", v1.root()), 0);  // no cpu controller
  EXPECT_EQ(CgroupCpuLimit("", v1.root()), 0);
}

TEST(CpuQuotaTest, CutsOpenMpsTeamToTheLimitUnlessOmpNumThreadsIsSet) {
  const int visible = omp_get_max_threads();
  if (visible < 2) GTEST_SKIP() << "needs 2 or more CPUs to cut to 1";
  FakeCgroups cgroups;
  cgroups.Write("cpu.max", "100000 100000");
  setenv("OMP_NUM_THREADS", "2", 1);
  EXPECT_EQ(FitOpenMpToCpuQuota("0::/\n", cgroups.root()), "");
  EXPECT_EQ(omp_get_max_threads(), visible);
  unsetenv("OMP_NUM_THREADS");
  EXPECT_THAT(FitOpenMpToCpuQuota("0::/\n", cgroups.root()),
              HasSubstr("OpenMP threads 1 (the cgroup's CPU limit;"));
  EXPECT_EQ(omp_get_max_threads(), 1);
  int team = 0;
#pragma omp parallel
  {
#pragma omp single
    team = omp_get_num_threads();
  }
  EXPECT_EQ(team, 1);
  omp_set_num_threads(visible);
  // A limit at or above the team: left alone.
  cgroups.Write("cpu.max", "max 100000");
  EXPECT_EQ(FitOpenMpToCpuQuota("0::/\n", cgroups.root()), "");
  EXPECT_EQ(omp_get_max_threads(), visible);
}

}  // namespace
}  // namespace switchyard
