#include "core/stream_copy.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace dcpp::internal {
namespace {

std::vector<unsigned char> Pattern(size_t n, uint32_t seed) {
  std::vector<unsigned char> v(n);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : v) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<unsigned char>(x >> 24);
  }
  return v;
}

// Every byte lands, and none outside [dst, dst + n), for sizes on both sides of the threshold and
// of a 64-byte block, at every alignment of source and destination modulo 16.
TEST(StreamingCopyTest, CopiesExactlyAtEveryAlignmentAndSize) {
  const size_t sizes[] = {0,
                          1,
                          63,
                          kStreamingCopyMinBytes - 1,
                          kStreamingCopyMinBytes,
                          kStreamingCopyMinBytes + 1,
                          kStreamingCopyMinBytes + 63,
                          kStreamingCopyMinBytes + 64 + 15,
                          3 * kStreamingCopyMinBytes + 17};
  constexpr size_t kGuard = 64;
  uint32_t seed = 1;
  for (size_t n : sizes) {
    for (size_t src_off : {0, 1, 8, 15}) {
      for (size_t dst_off : {0, 3, 9, 16}) {
        // One byte more than copied, so no vector is empty (memcmp takes no null pointer).
        const std::vector<unsigned char> src = Pattern(n + src_off + 1, seed++);
        std::vector<unsigned char> dst(n + dst_off + 2 * kGuard, 0xA5);
        StreamingCopy(dst.data() + kGuard + dst_off, src.data() + src_off, n);
        ASSERT_EQ(std::memcmp(dst.data() + kGuard + dst_off, src.data() + src_off, n), 0)
            << "n=" << n << " src_off=" << src_off << " dst_off=" << dst_off;
        for (size_t i = 0; i < kGuard + dst_off; ++i) ASSERT_EQ(dst[i], 0xA5) << "before, n=" << n;
        for (size_t i = kGuard + dst_off + n; i < dst.size(); ++i) {
          ASSERT_EQ(dst[i], 0xA5) << "after, n=" << n;
        }
      }
    }
  }
}

}  // namespace
}  // namespace dcpp::internal
