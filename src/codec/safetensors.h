// The safetensors byte format (Hugging Face): codec over bytes only.
//
//   u64 little-endian N | N bytes of UTF-8 JSON header | data section
//
// The header is an object: an optional "__metadata__" object of string values, and one entry per
// tensor {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]} with offsets relative to
// the data section. Tensors are little-endian, row-major, and together tile the data section
// exactly (no holes, no overlaps). docs/format.md ("Safetensors") has the details.
//
// Untrusted headers are validated before anything is allocated from them: N is capped
// (kMaxHeaderSize, the safetensors crate's limit) and must fit the source; the JSON must be valid
// UTF-8 without duplicate keys; every dtype known; shape x dtype bits equal to the byte length,
// with overflow checks; offsets in range and tiling the data section. Failures are DataLoss
// naming the source and the tensor.
//
// Thread-safety: pure functions; a Header is a plain value.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dcpp/dtype.h"
#include "dcpp/io.h"
#include "dcpp/status.h"
#include "dcpp/tensor.h"

namespace dcpp::safetensors {

// Every dtype the safetensors format defines (crate 0.8), in its own order.
enum class Dtype : uint8_t {
  kBool,
  kF4,
  kF6_E2M3,
  kF6_E3M2,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E8M0,
  kF8_E4M3FNUZ,
  kF8_E5M2FNUZ,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kC64,
  kF64,
  kI64,
  kU64,
};
inline constexpr int kNumDtypes = 22;

std::string_view DtypeName(Dtype dtype);  // "F32"
int DtypeBits(Dtype dtype);               // 4 for F4, 6 for F6_*, else 8 x bytes
Result<Dtype> DtypeFromName(std::string_view name);
// The torch dtype of the same bits, if dcpp models it (F4, F6_* and F8_E8M0 have none).
std::optional<DType> ToTorchDType(Dtype dtype);
// InvalidArgument for torch dtypes safetensors has no code for (complex32, complex128).
Result<Dtype> FromTorchDType(DType dtype);

// The safetensors crate refuses headers larger than this.
inline constexpr uint64_t kMaxHeaderSize = 100'000'000;

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kF32;
  Shape shape;
  uint64_t begin = 0;  // relative to the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  bool has_metadata = false;
  std::vector<std::pair<std::string, std::string>> metadata;  // "__metadata__", sorted by key
  std::vector<TensorInfo> tensors;                            // ordered by data offset (then name)
  uint64_t header_size = 0;                                   // N
  uint64_t data_size = 0;
  std::map<std::string, size_t, std::less<>> by_name;  // index into tensors

  uint64_t data_start() const { return 8 + header_size; }
  const TensorInfo* Find(std::string_view name) const;
  const std::string* FindMetadata(std::string_view key) const;
};

// Parses and validates the JSON header of a file whose data section has `data_size` bytes.
// `what` names the source in errors.
Result<Header> ParseHeader(std::string_view json, uint64_t data_size, std::string_view what);
// Reads and validates the header of a whole safetensors file.
Result<Header> ReadHeader(const ByteSource& source, uint64_t max_header_size = kMaxHeaderSize);

struct TensorSpec {
  std::string name;
  Dtype dtype = Dtype::kF32;
  Shape shape;
};
// Assigns contiguous data offsets. With `sort_like_crate` tensors are laid out as the safetensors
// crate does (dtype size descending, then name), which keeps every tensor aligned to its element
// size; otherwise in the given order (as PyTorch's consolidation does). InvalidArgument for
// duplicate names, negative dims or byte lengths that are not whole.
Result<Header> LayoutHeader(std::vector<TensorSpec> specs,
                            std::vector<std::pair<std::string, std::string>> metadata,
                            bool sort_like_crate = true);
// The first data_start() bytes of the file: length prefix and compact JSON ("__metadata__" first,
// then tensors in data order), padded with spaces to a multiple of 8. Sets header.header_size.
std::string EncodeHeader(Header& header);

// Bytes of `numel` elements of `dtype`, or nullopt if not whole bytes or on overflow.
std::optional<uint64_t> ByteLength(Dtype dtype, const Shape& shape);

// Writes the elements of `view` in row-major order (dense views in one write, others through a
// bounded buffer).
Status WriteTensorData(ByteSink& sink, const TensorView& view);

// Reads the box [src_offsets, +sizes) of a row-major tensor of `shape` and `dtype` whose bytes
// start at absolute offset `at` in `source` into `dst` at `dst_offsets`. Reads only the needed
// byte ranges, in bounded pieces.
Status ReadBoxInto(const ByteSource& source, uint64_t at, DType dtype, const Shape& shape,
                   const Shape& src_offsets, const TensorView& dst, const Shape& dst_offsets,
                   const Shape& sizes);

// Splits a row-major tensor of `shape` (element size `elem`) into boxes that are each one
// contiguous byte run of at most max(max_bytes, one element) bytes, in memory order; calls
// fn(offsets, sizes) for each, stopping at the first error.
Status ForEachContiguousBox(const Shape& shape, size_t elem, uint64_t max_bytes,
                            const std::function<Status(const Shape&, const Shape&)>& fn);

// json.dumps-style (Python's default separators, ASCII-escaped) string for a JSON value, for
// metadata that PyTorch writes with json.dumps.
std::string PythonJsonString(std::string_view utf8);

}  // namespace dcpp::safetensors
