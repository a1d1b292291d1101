// Sizing the serving processes' OpenMP teams to the CPU time their cgroup
// allows (a container's `--cpus`, a Kubernetes CPU limit, a systemd
// CPUQuota). libgomp sizes its default team by the CPUs the process may run
// on (its affinity mask), not by its CPU quota: a pod limited to 4 CPUs on a
// 64-CPU node ran 64 threads, which the kernel throttles for most of each
// period, and a team's barrier waits for its slowest, throttled thread.
//
// Thread-safety: FitOpenMpToCpuQuota once at the start of main, before any
// parallel region; the parsers are pure.
#ifndef SWITCHYARD_CORE_CPU_QUOTA_H_
#define SWITCHYARD_CORE_CPU_QUOTA_H_

#include <string>
#include <string_view>

namespace switchyard {

// CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD") allows,
// rounded up; 0 for no limit or a line it cannot read.
int CpusFromCgroupV2Max(std::string_view cpu_max);
// The same from cgroup v1's cpu.cfs_quota_us (-1: no limit) and
// cpu.cfs_period_us.
int CpusFromCgroupV1(std::string_view quota_us, std::string_view period_us);

// The tightest CPU limit on this process's cgroup and its ancestors, in
// CPUs rounded up; 0 for none. `proc_self_cgroup` is /proc/self/cgroup's
// text; the cgroup files are read under `cgroup_root` (/sys/fs/cgroup: v2's
// unified tree, or v1's cpu controller under cpu/ or cpu,cpuacct/).
int CgroupCpuLimit(std::string_view proc_self_cgroup, const std::string& cgroup_root);

// Where OMP_NUM_THREADS is unset and this process's cgroup allows fewer
// CPUs than OpenMP would start threads: sets OpenMP's default team to that
// many (omp_set_num_threads). Returns what it did in words for the start-up
// line ("OpenMP threads 4, the cgroup's CPU limit"), or "" where it left
// OpenMP alone.
std::string FitOpenMpToCpuQuota();
// The same for a given /proc/self/cgroup text and cgroup root (tests).
std::string FitOpenMpToCpuQuota(std::string_view proc_self_cgroup, const std::string& cgroup_root);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_CPU_QUOTA_H_
