#include "dcpp/chunk.h"

#include <algorithm>
#include <cstring>

namespace dcpp {

std::string ChunkBox::ToString() const {
  return "offsets " + ShapeToString(offsets) + " sizes " + ShapeToString(sizes);
}

ChunkBox WholeBox(const Shape& shape) { return {Shape(shape.size(), 0), shape}; }

std::optional<ChunkBox> Intersect(const ChunkBox& a, const ChunkBox& b) {
  if (a.dim() != b.dim()) return std::nullopt;
  ChunkBox out{Shape(a.dim()), Shape(a.dim())};
  for (int d = 0; d < a.dim(); ++d) {
    int64_t lo = std::max(a.offsets[d], b.offsets[d]);
    int64_t hi = std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]);
    if (hi <= lo) return std::nullopt;
    out.offsets[d] = lo;
    out.sizes[d] = hi - lo;
  }
  return out;
}

bool Contains(const ChunkBox& outer, const ChunkBox& inner) {
  if (outer.dim() != inner.dim()) return false;
  for (int d = 0; d < outer.dim(); ++d) {
    // 128-bit sums: offsets near 2^63 in untrusted metadata must not wrap.
    using Wide = __int128;
    if (inner.offsets[d] < outer.offsets[d] ||
        Wide{inner.offsets[d]} + inner.sizes[d] > Wide{outer.offsets[d]} + outer.sizes[d]) {
      return false;
    }
  }
  return true;
}

namespace {

// Recursive strided copy. Dims [0, run_dim) are iterated; dims [run_dim, rank) form one
// contiguous run of `run_bytes` in both src and dst.
void CopyDims(std::byte* dst, const int64_t* dst_strides, const std::byte* src,
              const int64_t* src_strides, const int64_t* sizes, int dims_left, size_t run_bytes,
              size_t elem) {
  if (dims_left == 0) {
    std::memcpy(dst, src, run_bytes);
    return;
  }
  const int64_t ds = dst_strides[0] * static_cast<int64_t>(elem);
  const int64_t ss = src_strides[0] * static_cast<int64_t>(elem);
  for (int64_t i = 0; i < sizes[0]; ++i) {
    CopyDims(dst + i * ds, dst_strides + 1, src + i * ss, src_strides + 1, sizes + 1, dims_left - 1,
             run_bytes, elem);
  }
}

}  // namespace

Status CopyRegion(const TensorView& dst, const Shape& dst_offsets, const TensorView& src,
                  const Shape& src_offsets, const Shape& sizes) {
  if (dst.dtype() != src.dtype()) {
    return InvalidArgumentError(std::string("copy from ") + std::string(DTypeName(src.dtype())) +
                                " to " + std::string(DTypeName(dst.dtype())));
  }
  DCPP_ASSIGN_OR_RETURN(TensorView d, dst.Narrow(dst_offsets, sizes));
  DCPP_ASSIGN_OR_RETURN(TensorView s, src.Narrow(src_offsets, sizes));
  if (NumElements(sizes) == 0) return Status::Ok();
  const size_t elem = ElementSize(dst.dtype());
  const int rank = static_cast<int>(sizes.size());

  // Drop size-1 dims (their strides do not matter), then find the longest trailing run that is
  // contiguous in both views.
  Shape sz, dstr, sstr;
  for (int i = 0; i < rank; ++i) {
    if (sizes[i] == 1) continue;
    sz.push_back(sizes[i]);
    dstr.push_back(d.strides()[i]);
    sstr.push_back(s.strides()[i]);
  }
  int run_dim = static_cast<int>(sz.size());
  int64_t run = 1;
  while (run_dim > 0 && dstr[run_dim - 1] == run && sstr[run_dim - 1] == run) {
    run *= sz[run_dim - 1];
    --run_dim;
  }
  CopyDims(d.data(), dstr.data(), s.data(), sstr.data(), sz.data(), run_dim,
           static_cast<size_t>(run) * elem, elem);
  return Status::Ok();
}

Status CopyTensor(const TensorView& dst, const TensorView& src) {
  if (dst.shape() != src.shape()) {
    return InvalidArgumentError("copy of shape " + ShapeToString(src.shape()) + " into " +
                                ShapeToString(dst.shape()));
  }
  Shape zeros(dst.dim(), 0);
  return CopyRegion(dst, zeros, src, zeros, dst.shape());
}

}  // namespace dcpp
