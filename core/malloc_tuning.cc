#include "core/malloc_tuning.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace switchyard {

std::string TuneMallocForTransientBuffers() {
  const char* off = std::getenv("SWITCHYARD_MALLOC_TUNING");
  if (off != nullptr && std::strcmp(off, "0") == 0) {
    return "malloc defaults (SWITCHYARD_MALLOC_TUNING=0)";
  }
  for (const char* user : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}) {
    if (std::getenv(user) != nullptr) return absl::StrCat("malloc as ", user, " says");
  }
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) {
    return "malloc as GLIBC_TUNABLES says";
  }
  const bool ok = mallopt(M_MMAP_THRESHOLD, kMallocMmapThresholdBytes) == 1 &&
                  mallopt(M_TRIM_THRESHOLD, kMallocTrimThresholdBytes) == 1;
  if (!ok) return "malloc defaults (mallopt refused)";
  return absl::StrCat("malloc keeps blocks under ", kMallocMmapThresholdBytes >> 20,
                      " MiB in its heaps");
}

}  // namespace switchyard
