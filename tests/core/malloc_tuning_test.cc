// core/malloc_tuning.h: what TuneMallocForTransientBuffers leaves alone, and
// that once it has run a block of a few MiB comes from malloc's heap (no new
// mapping) while one over the threshold is still mapped on its own.
#include "core/malloc_tuning.h"

#include <malloc.h>
#include <stdlib.h>

#include <cstring>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard {
namespace {

using ::testing::HasSubstr;

// Blocks malloc has mapped on their own right now.
size_t MappedBlocks() { return mallinfo2().hblks; }

// Allocates `bytes`, touches them, and returns how many more blocks were
// mapped while it was held.
size_t NewMappingsFor(size_t bytes) {
  const size_t before = MappedBlocks();
  void* p = std::malloc(bytes);
  EXPECT_NE(p, nullptr);
  std::memset(p, 1, bytes);
  asm volatile("" : : "r"(p) : "memory");  // the block is used: not optimised away
  const size_t during = MappedBlocks();
  std::free(p);
  return during - before;
}

TEST(MallocTuningTest, LeavesTheUsersChoiceAloneAndKeepsMiBBlocksInTheHeap) {
  unsetenv("MALLOC_MMAP_THRESHOLD_");
  unsetenv("MALLOC_TRIM_THRESHOLD_");
  unsetenv("GLIBC_TUNABLES");

  setenv("SWITCHYARD_MALLOC_TUNING", "0", 1);
  EXPECT_THAT(TuneMallocForTransientBuffers(), HasSubstr("SWITCHYARD_MALLOC_TUNING=0"));
  unsetenv("SWITCHYARD_MALLOC_TUNING");
  setenv("MALLOC_TRIM_THRESHOLD_", "1000000", 1);
  EXPECT_THAT(TuneMallocForTransientBuffers(), HasSubstr("as MALLOC_TRIM_THRESHOLD_ says"));
  unsetenv("MALLOC_TRIM_THRESHOLD_");
  setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536", 1);
  EXPECT_THAT(TuneMallocForTransientBuffers(), HasSubstr("as GLIBC_TUNABLES says"));
  // A tunable of something else is no choice about malloc.
  setenv("GLIBC_TUNABLES", "glibc.cpu.x86_rep_movsb_threshold=1073741824", 1);
  EXPECT_THAT(TuneMallocForTransientBuffers(), HasSubstr("keeps blocks under 32 MiB"));
  unsetenv("GLIBC_TUNABLES");

  EXPECT_EQ(NewMappingsFor(size_t{4} << 20), 0u);
  EXPECT_EQ(NewMappingsFor(size_t{16} << 20), 0u);
  EXPECT_EQ(NewMappingsFor(size_t{64} << 20), 1u);  // over the threshold
}

}  // namespace
}  // namespace switchyard
