// Large weight buffers in transparent huge pages.
//
// Batch-1 decode streams every weight matrix once per token; with 4 KiB
// pages that is a TLB miss every 4 KiB. Buffers of at least
// kHugePageBytes are mapped 2 MiB-aligned with mmap and marked
// madvise(MADV_HUGEPAGE), so that the kernel backs them with 2 MiB pages
// when transparent huge pages are `madvise` or `always`
// (/sys/kernel/mm/transparent_hugepage/enabled). Where madvise fails (THP
// `never`, an old kernel) the buffer simply stays in 4 KiB pages.
// SWITCHYARD_HUGEPAGES=0 (read once) skips the madvise, for A/B runs.
// Smaller buffers come from the ordinary heap.
//
// Thread-safety: the functions and the allocator are thread-safe.
#ifndef SWITCHYARD_CORE_HUGE_PAGES_H_
#define SWITCHYARD_CORE_HUGE_PAGES_H_

#include <cstddef>
#include <new>
#include <vector>

namespace switchyard {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;

// bytes >= kHugePageBytes: a 2 MiB-aligned anonymous mapping (zeroed) with
// MADV_HUGEPAGE; smaller: operator new. std::bad_alloc when out of memory.
void* AllocateMaybeHuge(size_t bytes);
// Frees what AllocateMaybeHuge(bytes) returned (the same `bytes`).
void FreeMaybeHuge(void* p, size_t bytes);
// False when SWITCHYARD_HUGEPAGES=0 turned the madvise off.
bool HugePagesWanted();

// A std::allocator that takes large blocks from AllocateMaybeHuge.
template <typename T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() noexcept = default;
  template <typename U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}  // NOLINT: allocator rebind
  T* allocate(size_t n) { return static_cast<T*>(AllocateMaybeHuge(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { FreeMaybeHuge(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
};

template <typename T>
using HugePageVector = std::vector<T, HugePageAllocator<T>>;

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_HUGE_PAGES_H_
