#include "cuda/cublas_api.h"

#include <dlfcn.h>

#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"

namespace switchyard::cuda {
namespace {

absl::StatusOr<CublasApi> Load() {
  void* lib = nullptr;
  std::string tried;
  // Only the major version the function table's types come from (CUDA 13).
  for (const char* name : {"libcublas.so.13"}) {
    lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
    absl::StrAppend(&tried, tried.empty() ? "" : "; ", dlerror());
  }
  if (lib == nullptr) return absl::UnavailableError(absl::StrCat("cannot load cuBLAS: ", tried));
  CublasApi api{};
  std::string missing;
  auto bind = [&](auto& fn, const char* symbol) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
    if (fn == nullptr) absl::StrAppend(&missing, " ", symbol);
  };
  bind(api.create, "cublasCreate_v2");
  bind(api.destroy, "cublasDestroy_v2");
  bind(api.set_stream, "cublasSetStream_v2");
  bind(api.set_math_mode, "cublasSetMathMode");
  bind(api.set_pointer_mode, "cublasSetPointerMode_v2");
  bind(api.sgemm, "cublasSgemm_v2");
  bind(api.gemm_ex, "cublasGemmEx");
  bind(api.status_name, "cublasGetStatusName");
  bind(api.status_string, "cublasGetStatusString");
  if (!missing.empty()) {
    return absl::UnavailableError(absl::StrCat("cuBLAS lacks:", missing));
  }
  return api;  // the library stays loaded for the life of the process
}

}  // namespace

absl::StatusOr<const CublasApi*> Cublas() {
  static const absl::StatusOr<CublasApi>* loaded = new absl::StatusOr<CublasApi>(Load());
  if (!loaded->ok()) return loaded->status();
  return &loaded->value();
}

}  // namespace switchyard::cuda
