#include "cuda/emulator/device_emulation.h"

#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
// Fibers under AddressSanitizer: it must be told about every stack switch.
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SY_EMULATOR_ASAN 1
#endif

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace switchyard::emulator {

uint3 g_thread_idx;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;  // per fiber; kernels use little

enum class State { kReady, kAtSync, kAtWarp, kDone };

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  uint3 index;
  std::unique_ptr<char[]> stack;
  void* asan_fake_stack = nullptr;  // ASan's bookkeeping while switched out
};

// The block being run (launches are serialised by g_launch_mu).
struct BlockRun {
  bool fibers = false;  // false: threads run as plain calls, barriers are errors
  int current = 0;      // linear index of the running thread
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  std::vector<uint64_t> warp_slots;  // [threads]: shuffle values
};

std::mutex g_launch_mu;
BlockRun g_run;
std::vector<Fiber> g_fibers;  // reused across blocks and launches
#ifdef SY_EMULATOR_ASAN
const void* g_scheduler_stack = nullptr;  // learned at the first switch into a fiber
size_t g_scheduler_stack_size = 0;
#endif

// The stack switches, with AddressSanitizer's annotations where it runs.
void SwitchToFiber(Fiber& f) {
#ifdef SY_EMULATOR_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack.get(), kStackBytes);
#endif
  swapcontext(&g_run.scheduler, &f.context);
#ifdef SY_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}
// In a fiber, each time it is switched to.
void EnteredFiber([[maybe_unused]] Fiber& f) {
#ifdef SY_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
}
void SwitchToScheduler(Fiber& f) {
#ifdef SY_EMULATOR_ASAN
  __sanitizer_start_switch_fiber(&f.asan_fake_stack, g_scheduler_stack, g_scheduler_stack_size);
#endif
  swapcontext(&f.context, &g_run.scheduler);
  EnteredFiber(f);
}

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "cuda emulator: %s\n", what);
  std::abort();
}

int LinearThread() {
  return static_cast<int>(g_thread_idx.x + g_thread_idx.y * g_block_dim.x +
                          g_thread_idx.z * g_block_dim.x * g_block_dim.y);
}

uint3 Unlinear(int i, dim3 block) {
  uint3 u;
  u.x = i % block.x;
  u.y = (i / block.x) % block.y;
  u.z = i / (block.x * block.y);
  return u;
}

void Yield(State state) {
  Fiber& f = g_fibers[g_run.current];
  f.state = state;
  SwitchToScheduler(f);
}

void Trampoline() {
  EnteredFiber(g_fibers[g_run.current]);
  (*g_run.body)();
  g_fibers[g_run.current].state = State::kDone;
#ifdef SY_EMULATOR_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_scheduler_stack, g_scheduler_stack_size);  // exits
#endif
  // Returning resumes uc_link: the scheduler.
}

const char* StateName(State s) {
  switch (s) {
    case State::kReady:
      return "running";
    case State::kAtSync:
      return "__syncthreads";
    case State::kAtWarp:
      return "a warp shuffle";
    case State::kDone:
      return "exited";
  }
  return "?";
}

// Runs one block's threads as fibers until all exit. False (and a message
// on stderr) when the threads wait at barriers that can never open.
bool RunBlockAsFibers(int threads) {
  if (static_cast<int>(g_fibers.size()) < threads) g_fibers.resize(threads);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = g_fibers[i];
    if (!f.stack) f.stack = std::make_unique<char[]>(kStackBytes);
#ifdef SY_EMULATOR_ASAN
    // A fiber abandoned mid-kernel (a failed block) leaves poisoned frames.
    ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);
    f.asan_fake_stack = nullptr;
#endif
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &g_run.scheduler;
    makecontext(&f.context, Trampoline, 0);
    f.state = State::kReady;
    f.index = Unlinear(i, g_block_dim);
  }
  g_run.warp_slots.assign(threads, 0);
  while (true) {
    for (int i = 0; i < threads; ++i) {
      if (g_fibers[i].state != State::kReady) continue;
      g_run.current = i;
      g_thread_idx = g_fibers[i].index;
      SwitchToFiber(g_fibers[i]);
    }
    int done = 0, at_sync = 0;
    for (int i = 0; i < threads; ++i) {
      done += g_fibers[i].state == State::kDone;
      at_sync += g_fibers[i].state == State::kAtSync;
    }
    if (done == threads) return true;
    bool released = false;
    if (at_sync > 0 && at_sync + done == threads) {
      // Exited threads count as arrived (sm_70 and later).
      for (int i = 0; i < threads; ++i) {
        if (g_fibers[i].state == State::kAtSync) g_fibers[i].state = State::kReady;
      }
      released = true;
    } else {
      for (int w = 0; w * 32 < threads; ++w) {
        const int begin = w * 32, end = std::min(threads, begin + 32);
        bool all = end - begin == 32;  // a full-mask shuffle needs 32 lanes
        for (int i = begin; i < end; ++i) all = all && g_fibers[i].state == State::kAtWarp;
        if (!all) continue;
        for (int i = begin; i < end; ++i) g_fibers[i].state = State::kReady;
        released = true;
      }
    }
    if (!released) {
      std::string states;
      for (int i = 0; i < threads; i += 32) {
        states += " thread " + std::to_string(i) + ": " + StateName(g_fibers[i].state) + ";";
      }
      std::fprintf(stderr,
                   "cuda emulator: block (%u,%u,%u) cannot go on: its threads wait at barriers "
                   "that can never open (a full-warp shuffle that some lanes never reach).%s\n",
                   g_block_idx.x, g_block_idx.y, g_block_idx.z, states.c_str());
      return false;
    }
  }
}

}  // namespace

void SyncThreads() {
  if (!g_run.fibers) Die("__syncthreads in a kernel run without fibers (cu_to_cc.py missed it)");
  Yield(State::kAtSync);
}

uint64_t WarpShuffleXor(unsigned mask, uint64_t mine, int lane_mask) {
  if (!g_run.fibers) Die("a warp shuffle in a kernel run without fibers (cu_to_cc.py missed it)");
  if (mask != 0xffffffffu) Die("only full-warp shuffles (mask 0xffffffff) are emulated");
  const int me = LinearThread();
  g_run.warp_slots[me] = mine;
  Yield(State::kAtWarp);  // every lane has published
  const uint64_t theirs = g_run.warp_slots[(me & ~31) | ((me & 31) ^ (lane_mask & 31))];
  Yield(State::kAtWarp);  // every lane has read before any writes again
  return theirs;
}

cudaError_t CheckConfiguration(dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    return cudaErrorInvalidConfiguration;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (shared_bytes > 48 * 1024) return cudaErrorInvalidValue;  // needs cudaFuncSetAttribute
  return cudaSuccess;
}

void RunGrid(dim3 grid, dim3 block, bool barriers, const std::function<void()>& thread_body) {
  std::lock_guard<std::mutex> lock(g_launch_mu);
  g_grid_dim = grid;
  g_block_dim = block;
  g_run.fibers = barriers;
  g_run.body = &thread_body;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = {x, y, z};
        if (barriers) {
          if (!RunBlockAsFibers(threads)) {
            SetLastError(cudaErrorLaunchFailure);
            return;
          }
          continue;
        }
        for (int i = 0; i < threads; ++i) {
          g_thread_idx = Unlinear(i, block);
          thread_body();
        }
      }
    }
  }
}

}  // namespace switchyard::emulator
