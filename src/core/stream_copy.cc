#include "core/stream_copy.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dcpp::internal {

void StreamingCopy(void* dst, const void* src, size_t n) {
  if (n == 0) return;  // either pointer may then be null, which memcpy does not allow
#if defined(__x86_64__) && defined(__SSE2__)
  if (n >= kStreamingCopyMinBytes) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    // Up to the first 16-byte boundary of the destination (streaming stores need it aligned).
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
    std::memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    // SSE2 is in every x86-64 processor, so no dispatch; a 64-byte line per iteration. A 64 MiB
    // staging copy took 3.9 ms this way against 5.7-6.3 ms with memcpy on the development
    // machine (4 KiB and 2 MiB pages alike).
    for (const char* end = s + (n & ~size_t{63}); s != end; s += 64, d += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 48), e);
    }
    // Streaming stores are weakly ordered: fence them before the bytes are handed to another
    // thread (or process).
    _mm_sfence();
    std::memcpy(d, s, n & 63);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

}  // namespace dcpp::internal
