// CUDA pieces of staging (compiled only when CMake finds a CUDA toolkit): pinning the arena and
// copying device tensors into it.
#include <cuda_runtime.h>

#include <string>

#include "checkpoint/staging.h"

namespace dcpp::internal {
namespace {

Status CudaError(std::string_view what, cudaError_t e) {
  return UnavailableError("staging: " + std::string(what) + ": " + cudaGetErrorString(e));
}

}  // namespace

Status CudaPinHost(void* p, size_t n) {
  // The arena is already mapped and faulted in: registering it pins what is there, once.
  cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterDefault);
  return e == cudaSuccess ? Status::Ok() : CudaError("cudaHostRegister", e);
}

void CudaUnpinHost(void* p) { (void)cudaHostUnregister(p); }

Status CudaCopyToHost(void* dst, const void* src, size_t n) {
  cudaError_t e = cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost);
  return e == cudaSuccess ? Status::Ok() : CudaError("cudaMemcpy device to host", e);
}

}  // namespace dcpp::internal
