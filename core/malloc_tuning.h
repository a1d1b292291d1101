// Process-wide malloc settings for the serving processes (gateway, expert).
//
// Each expert call allocates and frees buffers of up to a few MiB (frame
// payloads, protobuf bytes, decoded rows). glibc hands blocks over its
// mmap threshold straight to the kernel and trims its heaps when a large
// block at the top is freed, so each call's buffers came back as fresh
// pages: a page fault and a zeroed 4 KiB page each time (bench/dispatch_bench
// at 256 rows spent ~20% of its time there). TuneMallocForTransientBuffers
// keeps such blocks in the heap instead.
//
// Thread-safety: call once at the start of main, before threads start.
#ifndef SWITCHYARD_CORE_MALLOC_TUNING_H_
#define SWITCHYARD_CORE_MALLOC_TUNING_H_

#include <string>

namespace switchyard {

// Blocks below this are served from malloc's heaps (glibc's default starts
// at 128 KiB and moves up to 32 MiB as large blocks are freed).
inline constexpr int kMallocMmapThresholdBytes = 32 << 20;
// Free memory at a heap's top kept before it is returned to the kernel
// (glibc's default: twice the moving mmap threshold, from 128 KiB).
inline constexpr int kMallocTrimThresholdBytes = 256 << 20;

// Sets both thresholds (mallopt) unless SWITCHYARD_MALLOC_TUNING=0 (for A/B
// runs), or MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set, or
// GLIBC_TUNABLES names a glibc.malloc tunable (the user's choice stands).
// Returns what it did, in words (bench/dispatch_bench prints it).
std::string TuneMallocForTransientBuffers();

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_MALLOC_TUNING_H_
