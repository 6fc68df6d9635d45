// Chunk geometry: axis-aligned boxes in a tensor's global index space, and strided copies.
//
// A ChunkBox is the (offsets, sizes) pair DCP stores for every saved chunk
// (ChunkStorageMetadata). Resharding is box intersection: a requested chunk is filled from every
// stored chunk it overlaps, each overlap copied between two strided views.
//
// Invariant: offsets.size() == sizes.size(); sizes are non-negative. A 0-d tensor is the box with
// no dimensions, which overlaps every other 0-d box.
// Thread-safety: pure functions. CopyRegion touches only the bytes it is given.
#pragma once

#include <optional>
#include <string>

#include "dcpp/status.h"
#include "dcpp/tensor.h"

namespace dcpp {

struct ChunkBox {
  Shape offsets;
  Shape sizes;

  int64_t numel() const { return NumElements(sizes); }
  int dim() const { return static_cast<int>(sizes.size()); }
  std::string ToString() const;  // "offsets [0, 4] sizes [2, 4]"
  friend bool operator==(const ChunkBox&, const ChunkBox&) = default;
};

// The box covering a whole tensor of `shape`.
ChunkBox WholeBox(const Shape& shape);

// The common part of two boxes of equal rank, or nullopt if they do not overlap (an empty
// intersection along any dimension counts as no overlap, except for 0-d boxes).
std::optional<ChunkBox> Intersect(const ChunkBox& a, const ChunkBox& b);

// Whether `inner` lies inside `outer`.
bool Contains(const ChunkBox& outer, const ChunkBox& inner);

// Copies the box of extent `sizes` starting at `src_offsets` (in src's own index space) to
// `dst_offsets` in dst. dtypes must match; bounds are checked (InvalidArgument). Innermost
// contiguous runs are copied with memcpy. Views must not overlap in memory.
Status CopyRegion(const TensorView& dst, const Shape& dst_offsets, const TensorView& src,
                  const Shape& src_offsets, const Shape& sizes);

// Copies all of src into dst (same dtype and shape).
Status CopyTensor(const TensorView& dst, const TensorView& src);

}  // namespace dcpp
