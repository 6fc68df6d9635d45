// StreamingCopy: memcpy for a destination that is written once and not read again soon (an
// async save's staging arena: the writer reads it later, long after it has left the caches).
//
// Copies of at least kStreamingCopyMinBytes use non-temporal stores, which skip reading each
// destination line into the cache before overwriting it and leave the caches to the caller's
// working set; smaller ones, and builds for other processors, use memcpy. The bytes are the same
// either way, and they are visible to other threads once the call returns (it ends with a store
// fence). Thread-safety: reentrant.
#pragma once

#include <cstddef>

namespace dcpp::internal {

// Below this, memcpy: the destination's lines may well be read again from the cache.
inline constexpr size_t kStreamingCopyMinBytes = size_t{1} << 20;

void StreamingCopy(void* dst, const void* src, size_t n);

}  // namespace dcpp::internal
