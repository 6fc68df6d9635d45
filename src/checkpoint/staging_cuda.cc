// CUDA pieces of staging (compiled only when CMake finds a CUDA toolkit): pinning the arena and
// copying device tensors into it. The CUDA runtime is loaded on first use (dlopen), so neither
// dcpp nor its consumers link against it and a machine without CUDA runs everything else.
#include <cuda_runtime_api.h>  // signatures only
#include <dlfcn.h>

#include <string>

#include "checkpoint/staging.h"

namespace dcpp::internal {
namespace {

struct Runtime {
  decltype(&cudaHostRegister) host_register = nullptr;
  decltype(&cudaHostUnregister) host_unregister = nullptr;
  decltype(&cudaMemcpy) memcpy = nullptr;
  decltype(&cudaGetErrorString) error_string = nullptr;
  std::string missing;  // why the runtime is unusable, or empty
};

const Runtime& Cudart() {
  static const Runtime r = [] {
    Runtime out;
    void* lib = dlopen("libcudart.so", RTLD_NOW | RTLD_LOCAL);
#ifdef DCPP_CUDART_PATH
    if (lib == nullptr) lib = dlopen(DCPP_CUDART_PATH, RTLD_NOW | RTLD_LOCAL);
#endif
    if (lib == nullptr) {
      out.missing = std::string("cannot load the CUDA runtime: ") + dlerror();
      return out;
    }
    out.host_register =
        reinterpret_cast<decltype(&cudaHostRegister)>(dlsym(lib, "cudaHostRegister"));
    out.host_unregister =
        reinterpret_cast<decltype(&cudaHostUnregister)>(dlsym(lib, "cudaHostUnregister"));
    out.memcpy = reinterpret_cast<decltype(&cudaMemcpy)>(dlsym(lib, "cudaMemcpy"));
    out.error_string =
        reinterpret_cast<decltype(&cudaGetErrorString)>(dlsym(lib, "cudaGetErrorString"));
    if (!out.host_register || !out.host_unregister || !out.memcpy || !out.error_string) {
      out.missing = "the CUDA runtime lacks cudaHostRegister/cudaMemcpy";
    }
    return out;
  }();
  return r;
}

Status CudaError(std::string_view what, cudaError_t e) {
  return UnavailableError("staging: " + std::string(what) + ": " + Cudart().error_string(e));
}

}  // namespace

Status CudaPinHost(void* p, size_t n) {
  const Runtime& rt = Cudart();
  if (!rt.missing.empty()) return UnavailableError("staging: " + rt.missing);
  // The arena is already mapped and faulted in: registering it pins what is there, once.
  cudaError_t e = rt.host_register(p, n, cudaHostRegisterDefault);
  return e == cudaSuccess ? Status::Ok() : CudaError("cudaHostRegister", e);
}

void CudaUnpinHost(void* p) {
  if (Cudart().missing.empty()) (void)Cudart().host_unregister(p);
}

Status CudaCopyToHost(void* dst, const void* src, size_t n) {
  const Runtime& rt = Cudart();
  if (!rt.missing.empty()) return UnavailableError("staging: " + rt.missing);
  cudaError_t e = rt.memcpy(dst, src, n, cudaMemcpyDeviceToHost);
  return e == cudaSuccess ? Status::Ok() : CudaError("cudaMemcpy device to host", e);
}

}  // namespace dcpp::internal
