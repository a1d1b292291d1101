#include "core/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace switchyard {
namespace {

constexpr size_t kSmallPage = 4096;

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

bool HugePagesWanted() {
  static const bool wanted = [] {
    const char* env = std::getenv("SWITCHYARD_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return wanted;
}

void* AllocateMaybeHuge(size_t bytes) {
  if (bytes < kHugePageBytes) return ::operator new(bytes);
  const size_t length = RoundUp(bytes, kSmallPage);
  // Map 2 MiB more, then unmap the ends so that the buffer starts on a
  // 2 MiB boundary (a huge page can only back an aligned 2 MiB extent).
  const size_t reserved = length + kHugePageBytes;
  void* base = mmap(nullptr, reserved, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(base);
  const uintptr_t aligned = RoundUp(start, kHugePageBytes);
  if (aligned > start) munmap(base, aligned - start);
  const uintptr_t end = start + reserved, used_end = aligned + length;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  void* p = reinterpret_cast<void*>(aligned);
  // Best effort: without THP the buffer stays in small pages.
  if (HugePagesWanted()) madvise(p, length, MADV_HUGEPAGE);
  return p;
}

void FreeMaybeHuge(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (bytes < kHugePageBytes) {
    ::operator delete(p);
    return;
  }
  munmap(p, RoundUp(bytes, kSmallPage));
}

}  // namespace switchyard
