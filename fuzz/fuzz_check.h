// FUZZ_CHECK: the fuzz targets' invariant check. A failed check prints what
// failed and aborts, which libFuzzer records as a crash (with the input).
#ifndef SWITCHYARD_FUZZ_FUZZ_CHECK_H_
#define SWITCHYARD_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(cond, ...)                                                            \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                                 \
      std::fputc('\n', stderr);                                                          \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

#endif  // SWITCHYARD_FUZZ_FUZZ_CHECK_H_
