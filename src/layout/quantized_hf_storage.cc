// QuantizedHuggingFaceStorageReader: fp8 (float8_e4m3fn) weights with block scales
// (DeepSeek-V3's "weight_scale_inv", one float per block_size x block_size block), dequantized
// while loading.
//
// Steps of a read:
//   1. ReadMetadata: the plain HF metadata, with every X.weight that has an X.weight_scale_inv
//      reported as target_dtype (its scale tensor stays visible, as in PyTorch).
//   2. ReadData: read items of quantized weights are done here, the rest by the plain reader.
//      For each item: the scale tensor is read once (small) and kept as float32; the fp8 box is
//      read in strips of at most one block row (and ~4 MiB), each strip dequantized into the
//      destination by DequantizeFp8Rows: a 256-entry table lookup and one float32 multiply per
//      element, over contiguous runs that share a scale (no per-block temporaries).
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>

#include "codec/safetensors.h"
#include "core/thread_pool.h"
#include "dcpp/chunk.h"
#include "dcpp/hf_storage.h"
#include "dcpp/storage.h"

namespace dcpp {

namespace {

constexpr std::string_view kScaleSuffix = ".weight_scale_inv";

// float8_e4m3fn -> float32 for every byte: sign, 4-bit exponent (bias 7), 3-bit mantissa;
// exponent 0 is subnormal; S.1111.111 is NaN (no infinities).
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float x;
      if (e == 15 && m == 7) {
        x = std::numeric_limits<float>::quiet_NaN();
      } else if (e == 0) {
        x = std::ldexp(static_cast<float>(m), -9);
      } else {
        x = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
      }
      v[b] = (b & 0x80) ? -x : x;
    }
  }
};
const Fp8Table& Table() {
  static const Fp8Table t;
  return t;
}

// float32 -> bfloat16, round to nearest even (as torch's .to(torch.bfloat16)).
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace

void DequantizeFp8Rows(const uint8_t* src, int64_t src_stride, int64_t rows, int64_t cols,
                       const float* scales, int64_t first_col, int64_t block, DType dst_dtype,
                       void* dst, int64_t dst_stride) {
  const float* lut = Table().v;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* in = src + r * src_stride;
    int64_t j = 0;
    while (j < cols) {
      const int64_t g = first_col + j;
      const int64_t end = std::min(cols, j + (block - g % block));  // same scale until here
      const float s = scales[g / block];
      if (dst_dtype == DType::kFloat32) {
        float* out = static_cast<float*>(dst) + r * dst_stride;
        for (int64_t k = j; k < end; ++k) out[k] = lut[in[k]] * s;
      } else {
        uint16_t* out = static_cast<uint16_t*>(dst) + r * dst_stride;
        for (int64_t k = j; k < end; ++k) out[k] = ToBf16(lut[in[k]] * s);
      }
      j = end;
    }
  }
}

Result<std::unique_ptr<QuantizedHuggingFaceStorageReader>> QuantizedHuggingFaceStorageReader::Open(
    const std::string& path, QuantizedReaderOptions options) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, OpenStore(path));
  auto r = std::make_unique<QuantizedHuggingFaceStorageReader>(store.get(), path, options);
  r->owned_store_ = std::move(store);
  return r;
}

QuantizedHuggingFaceStorageReader::QuantizedHuggingFaceStorageReader(Store* store,
                                                                     std::string checkpoint_id,
                                                                     QuantizedReaderOptions options)
    : HuggingFaceStorageReader(store, std::move(checkpoint_id), {options.thread_count}),
      qoptions_(options) {}

QuantizedHuggingFaceStorageReader::~QuantizedHuggingFaceStorageReader() = default;

Result<Metadata> QuantizedHuggingFaceStorageReader::ReadMetadata(int rank) {
  if (qoptions_.target_dtype != DType::kFloat32 && qoptions_.target_dtype != DType::kBFloat16) {
    return InvalidArgumentError("dequantizing to " +
                                std::string(DTypeName(qoptions_.target_dtype)) +
                                " (float32 or bfloat16 only)");
  }
  if (qoptions_.block_size < 1) return InvalidArgumentError("block_size must be positive");
  DCPP_ASSIGN_OR_RETURN(Metadata md, HuggingFaceStorageReader::ReadMetadata(rank));
  scale_of_.clear();
  const int64_t b = qoptions_.block_size;
  for (auto& [fqn, m] : md.state_dict_metadata) {
    if (fqn.size() <= kScaleSuffix.size() ||
        fqn.compare(fqn.size() - kScaleSuffix.size(), kScaleSuffix.size(), kScaleSuffix) != 0) {
      continue;
    }
    const std::string weight = fqn.substr(0, fqn.size() - kScaleSuffix.size()) + ".weight";
    auto* w = md.state_dict_metadata.Find(weight);
    auto* wt = w ? std::get_if<TensorStorageMetadata>(w) : nullptr;
    const auto& st = std::get<TensorStorageMetadata>(m);
    if (!wt || wt->properties.dtype != DType::kFloat8_e4m3fn) continue;
    const std::string what = "\"" + checkpoint_id() + "\": quantized \"" + weight + "\"";
    if (wt->size.size() != 2 || wt->chunks.size() != 1 || st.size.size() != 2 ||
        st.chunks.size() != 1) {
      return UnimplementedError(what + ": only whole 2-D weights with a whole 2-D scale tensor");
    }
    if (st.size[0] < (wt->size[0] + b - 1) / b || st.size[1] < (wt->size[1] + b - 1) / b) {
      return DataLossError(what + " of shape " + ShapeToString(wt->size) + " needs " +
                           std::to_string((wt->size[0] + b - 1) / b) + " x " +
                           std::to_string((wt->size[1] + b - 1) / b) + " scales, \"" + fqn +
                           "\" has " + ShapeToString(st.size));
    }
    if (st.properties.dtype != DType::kFloat32 && st.properties.dtype != DType::kBFloat16) {
      return UnimplementedError(what + ": scales of " +
                                std::string(DTypeName(st.properties.dtype)));
    }
    wt->properties.dtype = qoptions_.target_dtype;
    scale_of_[weight] = fqn;
  }
  return md;
}

Status QuantizedHuggingFaceStorageReader::ReadData(const LoadPlan& plan, LoadPlanner& planner) {
  LoadPlan plain;
  std::vector<const ReadItem*> quantized;
  for (const auto& item : plan.items) {
    if (scale_of_.count(item.storage_index.fqn)) {
      quantized.push_back(&item);
    } else {
      plain.items.push_back(item);
    }
  }
  // Scales as float32, read once per weight.
  std::mutex mu;
  std::map<std::string, std::pair<Shape, std::vector<float>>> scales;
  auto scales_of =
      [&](const std::string& weight) -> Result<const std::pair<Shape, std::vector<float>>*> {
    std::lock_guard<std::mutex> lock(mu);
    auto it = scales.find(weight);
    if (it != scales.end()) return &it->second;
    const std::string& fqn = scale_of_.at(weight);
    const Piece* piece = nullptr;
    for (const auto& [index, p] : pieces()) {
      if (index.fqn == fqn) piece = &p;
    }
    if (!piece) return NotFoundError("no stored scale tensor \"" + fqn + "\"");
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, store()->OpenRead(piece->file));
    Tensor raw = Tensor::Zeros(piece->dtype, piece->shape);
    const Shape zeros(piece->shape.size(), 0);
    DCPP_RETURN_IF_ERROR(safetensors::ReadBoxInto(*file, piece->at, piece->dtype, piece->shape,
                                                  zeros, raw.view(), zeros, piece->shape)
                             .WithContext("reading \"" + fqn + "\""));
    std::vector<float> f(static_cast<size_t>(raw.numel()));
    for (size_t i = 0; i < f.size(); ++i) {
      if (piece->dtype == DType::kFloat32) {
        f[i] = raw.data_as<float>()[i];
      } else {
        const uint32_t u = static_cast<uint32_t>(raw.data_as<uint16_t>()[i]) << 16;
        std::memcpy(&f[i], &u, 4);
      }
    }
    return &(scales[weight] = {piece->shape, std::move(f)});
  };

  auto read_one = [&](size_t q) -> Status {
    const ReadItem& item = *quantized[q];
    const std::string what =
        "reading \"" + checkpoint_id() + "\" quantized \"" + item.storage_index.fqn + "\"";
    auto it = pieces().find(item.storage_index);
    if (it == pieces().end()) return NotFoundError(what + ": no such stored chunk");
    const Piece& w = it->second;
    DCPP_ASSIGN_OR_RETURN(auto scale, scales_of(item.storage_index.fqn));
    TensorView dst;
    {
      std::lock_guard<std::mutex> lock(mu);
      DCPP_ASSIGN_OR_RETURN(dst, planner.ResolveTensor(item));
    }
    if (dst.dtype() != DType::kFloat32 && dst.dtype() != DType::kBFloat16) {
      return InvalidArgumentError(what + ": destination is " + std::string(DTypeName(dst.dtype())) +
                                  " (float32 or bfloat16 only)");
    }
    DCPP_ASSIGN_OR_RETURN(TensorView dview, dst.Narrow(item.dest_offsets, item.lengths));
    if (dview.dim() != 2 || (dview.size(1) > 1 && dview.strides()[1] != 1)) {
      return UnimplementedError(what + ": destination rows must be contiguous");
    }
    const int64_t b = qoptions_.block_size;
    const int64_t r0 = item.storage_offsets[0], c0 = item.storage_offsets[1];
    const int64_t nr = item.lengths[0], nc = item.lengths[1];
    if (nr == 0 || nc == 0) return Status::Ok();
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, store()->OpenRead(w.file));
    // Strips of rows within one block row, at most ~4 MiB of fp8.
    const int64_t max_rows = std::max<int64_t>(1, std::min<int64_t>(b, (4 << 20) / nc));
    Tensor strip = Tensor::Zeros(DType::kFloat8_e4m3fn, {max_rows, nc});
    const int64_t scale_cols = scale->first[1];
    for (int64_t r = r0; r < r0 + nr;) {
      const int64_t block_end = (r / b + 1) * b;
      const int64_t n = std::min({r0 + nr - r, block_end - r, max_rows});
      DCPP_RETURN_IF_ERROR(safetensors::ReadBoxInto(*file, w.at, DType::kFloat8_e4m3fn, w.shape,
                                                    {r, c0}, strip.view(), {0, 0}, {n, nc})
                               .WithContext(what));
      const float* row_scales = scale->second.data() + (r / b) * scale_cols;
      std::byte* out = dview.data() + (r - r0) * dview.strides()[0] * dview.element_size();
      DequantizeFp8Rows(reinterpret_cast<const uint8_t*>(strip.data()), nc, n, nc, row_scales, c0,
                        b, dst.dtype(), out, dview.strides()[0]);
      r += n;
    }
    return Status::Ok();
  };
  // Items in parallel (each opens its own file handle; planner calls are serialized).
  DCPP_RETURN_IF_ERROR(internal::FirstError(internal::ParallelFor(
      quantized.size(), static_cast<size_t>(std::max(qoptions_.thread_count, 1)), read_one)));
  return HuggingFaceStorageReader::ReadData(plain, planner);
}

}  // namespace dcpp
