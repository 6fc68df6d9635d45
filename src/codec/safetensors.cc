#include "codec/safetensors.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "dcpp/chunk.h"

namespace dcpp::safetensors {

namespace {

struct DtypeRow {
  std::string_view name;
  int bits;
  std::optional<DType> torch;
};

constexpr std::array<DtypeRow, kNumDtypes> kDtypes = {{
    {"BOOL", 8, DType::kBool},
    {"F4", 4, std::nullopt},
    {"F6_E2M3", 6, std::nullopt},
    {"F6_E3M2", 6, std::nullopt},
    {"U8", 8, DType::kUInt8},
    {"I8", 8, DType::kInt8},
    {"F8_E5M2", 8, DType::kFloat8_e5m2},
    {"F8_E4M3", 8, DType::kFloat8_e4m3fn},
    {"F8_E8M0", 8, std::nullopt},
    {"F8_E4M3FNUZ", 8, DType::kFloat8_e4m3fnuz},
    {"F8_E5M2FNUZ", 8, DType::kFloat8_e5m2fnuz},
    {"I16", 16, DType::kInt16},
    {"U16", 16, DType::kUInt16},
    {"F16", 16, DType::kFloat16},
    {"BF16", 16, DType::kBFloat16},
    {"I32", 32, DType::kInt32},
    {"U32", 32, DType::kUInt32},
    {"F32", 32, DType::kFloat32},
    {"C64", 64, DType::kComplex64},
    {"F64", 64, DType::kFloat64},
    {"I64", 64, DType::kInt64},
    {"U64", 64, DType::kUInt64},
}};

std::string Quote(std::string_view s) { return "\"" + std::string(s) + "\""; }

// Element count of `shape`, or nullopt on overflow / negative dims.
std::optional<uint64_t> Numel(const Shape& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

using Json = nlohmann::json;

}  // namespace

std::string_view DtypeName(Dtype dtype) { return kDtypes[static_cast<int>(dtype)].name; }
int DtypeBits(Dtype dtype) { return kDtypes[static_cast<int>(dtype)].bits; }

Result<Dtype> DtypeFromName(std::string_view name) {
  for (int i = 0; i < kNumDtypes; ++i) {
    if (kDtypes[i].name == name) return static_cast<Dtype>(i);
  }
  return InvalidArgumentError("unknown safetensors dtype " + Quote(name));
}

std::optional<DType> ToTorchDType(Dtype dtype) { return kDtypes[static_cast<int>(dtype)].torch; }

Result<Dtype> FromTorchDType(DType dtype) {
  for (int i = 0; i < kNumDtypes; ++i) {
    if (kDtypes[i].torch == dtype) return static_cast<Dtype>(i);
  }
  return InvalidArgumentError("safetensors has no dtype for torch." +
                              std::string(DTypeName(dtype)));
}

std::optional<uint64_t> ByteLength(Dtype dtype, const Shape& shape) {
  auto n = Numel(shape);
  if (!n) return std::nullopt;
  uint64_t bits;
  if (__builtin_mul_overflow(*n, static_cast<uint64_t>(DtypeBits(dtype)), &bits)) {
    return std::nullopt;
  }
  if (bits % 8 != 0) return std::nullopt;
  return bits / 8;
}

const TensorInfo* Header::Find(std::string_view name) const {
  auto it = by_name.find(name);
  return it == by_name.end() ? nullptr : &tensors[it->second];
}

const std::string* Header::FindMetadata(std::string_view key) const {
  for (const auto& [k, v] : metadata) {
    if (k == key) return &v;
  }
  return nullptr;
}

Result<Header> ParseHeader(std::string_view json, uint64_t data_size, std::string_view what) {
  const std::string where = std::string(what) + ": safetensors header: ";
  // Duplicate keys are refused (the JSON library would silently keep the last one).
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  Json root;
  try {
    root = Json::parse(
        json.begin(), json.end(),
        [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
          if (event == Json::parse_event_t::object_start) {
            keys.emplace_back();
          } else if (event == Json::parse_event_t::object_end) {
            if (!keys.empty()) keys.pop_back();
          } else if (event == Json::parse_event_t::key && !keys.empty()) {
            const auto& k = parsed.get_ref<const std::string&>();
            if (!keys.back().insert(k).second && duplicate.empty()) duplicate = k;
          }
          return true;
        },
        /*allow_exceptions=*/true);
  } catch (const Json::exception& e) {
    return DataLossError(where + "invalid JSON: " + e.what());
  }
  if (!duplicate.empty()) return DataLossError(where + "duplicate key " + Quote(duplicate));
  if (!root.is_object()) return DataLossError(where + "not a JSON object");

  Header h;
  h.data_size = data_size;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& key = it.key();
    const Json& v = it.value();
    if (key == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object()) return DataLossError(where + "\"__metadata__\" is not an object");
      h.has_metadata = true;
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          return DataLossError(where + "\"__metadata__\" value of " + Quote(m.key()) +
                               " is not a string");
        }
        h.metadata.emplace_back(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    const std::string t = where + "tensor " + Quote(key) + ": ";
    if (!v.is_object()) return DataLossError(t + "entry is not an object");
    auto dtype_it = v.find("dtype");
    auto shape_it = v.find("shape");
    auto offsets_it = v.find("data_offsets");
    if (dtype_it == v.end() || shape_it == v.end() || offsets_it == v.end()) {
      return DataLossError(t + "needs \"dtype\", \"shape\" and \"data_offsets\"");
    }
    if (!dtype_it->is_string()) return DataLossError(t + "\"dtype\" is not a string");
    auto dtype = DtypeFromName(dtype_it->get_ref<const std::string&>());
    if (!dtype.ok()) return DataLossError(t + std::string(dtype.status().message()));
    if (!shape_it->is_array()) return DataLossError(t + "\"shape\" is not an array");
    TensorInfo info;
    info.name = key;
    info.dtype = *dtype;
    for (const Json& d : *shape_it) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
        return DataLossError(t + "shape " + shape_it->dump() + " is not a list of sizes");
      }
      info.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    }
    if (!offsets_it->is_array() || offsets_it->size() != 2 ||
        !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
      return DataLossError(t + "\"data_offsets\" " + offsets_it->dump() +
                           " is not a pair of offsets");
    }
    info.begin = (*offsets_it)[0].get<uint64_t>();
    info.end = (*offsets_it)[1].get<uint64_t>();
    if (info.end < info.begin) {
      return DataLossError(t + "data_offsets [" + std::to_string(info.begin) + ", " +
                           std::to_string(info.end) + "] end before they begin");
    }
    if (info.end > data_size) {
      return DataLossError(t + "data_offsets end at " + std::to_string(info.end) +
                           ", past the data section (" + std::to_string(data_size) + " bytes)");
    }
    auto expect = ByteLength(info.dtype, info.shape);
    if (!expect) {
      return DataLossError(t + "shape " + ShapeToString(info.shape) + " of " +
                           std::string(DtypeName(info.dtype)) +
                           " overflows or is not a whole number of bytes");
    }
    if (*expect != info.nbytes()) {
      return DataLossError(t + "shape " + ShapeToString(info.shape) + " of " +
                           std::string(DtypeName(info.dtype)) + " needs " +
                           std::to_string(*expect) + " bytes but data_offsets hold " +
                           std::to_string(info.nbytes()));
    }
    h.tensors.push_back(std::move(info));
  }
  std::sort(h.metadata.begin(), h.metadata.end());
  std::sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const TensorInfo& ti = h.tensors[i];
    if (ti.begin != pos) {
      if (ti.begin > pos) {
        return DataLossError(where + "hole of " + std::to_string(ti.begin - pos) +
                             " bytes before tensor " + Quote(ti.name) + " at offset " +
                             std::to_string(pos));
      }
      return DataLossError(where + "tensor " + Quote(ti.name) + " overlaps tensor " +
                           Quote(prev ? prev->name : "") + " at offset " +
                           std::to_string(ti.begin));
    }
    pos = ti.end;
    prev = &ti;
    h.by_name[ti.name] = i;
  }
  if (pos != data_size) {
    return DataLossError(where + "tensors cover " + std::to_string(pos) +
                         " bytes but the data section has " + std::to_string(data_size));
  }
  return h;
}

Result<Header> ReadHeader(const ByteSource& source, uint64_t max_header_size) {
  const std::string what = source.name();
  if (source.size() < 8) {
    return DataLossError(what + ": " + std::to_string(source.size()) +
                         " bytes is too short for a safetensors file");
  }
  unsigned char len[8];
  DCPP_RETURN_IF_ERROR(source.ReadAt(0, len, 8));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  if (n > max_header_size) {
    return DataLossError(what + ": safetensors header of " + std::to_string(n) +
                         " bytes exceeds the limit of " + std::to_string(max_header_size));
  }
  if (n > source.size() - 8) {
    return DataLossError(what + ": safetensors header of " + std::to_string(n) +
                         " bytes is longer than the file (" + std::to_string(source.size()) +
                         " bytes)");
  }
  std::string json(n, '\0');
  DCPP_RETURN_IF_ERROR(source.ReadAt(8, json.data(), n));
  DCPP_ASSIGN_OR_RETURN(Header h, ParseHeader(json, source.size() - 8 - n, what));
  h.header_size = n;
  return h;
}

Result<Header> LayoutHeader(std::vector<TensorSpec> specs,
                            std::vector<std::pair<std::string, std::string>> metadata,
                            bool sort_like_crate) {
  if (sort_like_crate) {
    std::stable_sort(specs.begin(), specs.end(), [](const TensorSpec& a, const TensorSpec& b) {
      const int ba = DtypeBits(a.dtype), bb = DtypeBits(b.dtype);
      if (ba != bb) return ba > bb;
      return a.name < b.name;
    });
  }
  Header h;
  h.has_metadata = !metadata.empty();
  h.metadata = std::move(metadata);
  std::sort(h.metadata.begin(), h.metadata.end());
  uint64_t pos = 0;
  for (auto& s : specs) {
    if (s.name == "__metadata__") {
      return InvalidArgumentError("a tensor cannot be named \"__metadata__\"");
    }
    auto n = ByteLength(s.dtype, s.shape);
    if (!n) {
      return InvalidArgumentError("tensor " + Quote(s.name) + ": shape " + ShapeToString(s.shape) +
                                  " of " + std::string(DtypeName(s.dtype)) +
                                  " is not a whole byte length");
    }
    TensorInfo info{std::move(s.name), s.dtype, std::move(s.shape), pos, pos + *n};
    if (!h.by_name.emplace(info.name, h.tensors.size()).second) {
      return InvalidArgumentError("duplicate tensor name " + Quote(info.name));
    }
    pos += *n;
    h.tensors.push_back(std::move(info));
  }
  h.data_size = pos;
  return h;
}

std::string EncodeHeader(Header& header) {
  // ordered_json keeps "__metadata__" first and tensors in data order, as the crate writes.
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (header.has_metadata) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : header.metadata) m[k] = v;
    j["__metadata__"] = std::move(m);
  }
  for (const auto& t : header.tensors) {
    nlohmann::ordered_json e = nlohmann::ordered_json::object();
    e["dtype"] = std::string(DtypeName(t.dtype));
    e["shape"] = t.shape;
    e["data_offsets"] = {t.begin, t.end};
    j[t.name] = std::move(e);
  }
  std::string body = j.dump();
  body.append((8 - body.size() % 8) % 8, ' ');
  header.header_size = body.size();
  std::string out(8, '\0');
  uint64_t n = body.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += body;
  return out;
}

Status ForEachContiguousBox(const Shape& shape, size_t elem, uint64_t max_bytes,
                            const std::function<Status(const Shape&, const Shape&)>& fn) {
  const size_t rank = shape.size();
  if (NumElements(shape) == 0) return Status::Ok();
  if (rank == 0) return fn({}, {});
  // Find the outermost dim k whose trailing block (dims k+1.. whole) fits; boxes then span a
  // run of dim k with dims < k fixed.
  std::vector<uint64_t> inner(rank + 1, elem);  // bytes of one index step at dim k
  for (size_t d = rank; d-- > 0;) inner[d] = inner[d + 1] * static_cast<uint64_t>(shape[d]);
  size_t k = 0;
  while (k + 1 < rank && inner[k + 1] > max_bytes) ++k;
  const int64_t step =
      std::max<int64_t>(1, static_cast<int64_t>(max_bytes / std::max<uint64_t>(inner[k + 1], 1)));
  Shape idx(rank, 0), sizes(shape);
  for (size_t d = 0; d < k; ++d) sizes[d] = 1;
  while (true) {
    for (int64_t a = 0; a < shape[k]; a += step) {
      idx[k] = a;
      sizes[k] = std::min<int64_t>(step, shape[k] - a);
      DCPP_RETURN_IF_ERROR(fn(idx, sizes));
    }
    idx[k] = 0;
    // Advance the fixed outer index (dims < k), row-major.
    size_t d = k;
    while (d > 0) {
      --d;
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
      if (d == 0) return Status::Ok();
    }
    if (k == 0) return Status::Ok();
  }
}

Status WriteTensorData(ByteSink& sink, const TensorView& view) {
  if (!view.device().is_cpu()) {
    return UnimplementedError("tensors on " + view.device().ToString() + " cannot be written");
  }
  if (view.is_contiguous()) return sink.Write(view.data(), view.nbytes());
  constexpr uint64_t kPiece = 8 << 20;
  std::shared_ptr<Storage> buffer;
  return ForEachContiguousBox(
      view.shape(), view.element_size(), kPiece, [&](const Shape& off, const Shape& size) {
        const size_t n = static_cast<size_t>(NumElements(size)) * view.element_size();
        if (!buffer || buffer->nbytes() < n) buffer = Storage::AllocateUninitialized(n);
        TensorView dst(buffer->data(), view.dtype(), size);
        DCPP_RETURN_IF_ERROR(CopyRegion(dst, Shape(size.size(), 0), view, off, size));
        return sink.Write(buffer->data(), n);
      });
}

Status ReadBoxInto(const ByteSource& source, uint64_t at, DType dtype, const Shape& shape,
                   const Shape& src_offsets, const TensorView& dst, const Shape& dst_offsets,
                   const Shape& sizes) {
  const size_t rank = shape.size();
  if (src_offsets.size() != rank || sizes.size() != rank) {
    return InvalidArgumentError("reading a box of rank " + std::to_string(sizes.size()) +
                                " from a tensor of shape " + ShapeToString(shape));
  }
  for (size_t i = 0; i < rank; ++i) {
    if (src_offsets[i] < 0 || sizes[i] < 0 || src_offsets[i] > shape[i] ||
        sizes[i] > shape[i] - src_offsets[i]) {
      return InvalidArgumentError("box offsets " + ShapeToString(src_offsets) + " sizes " +
                                  ShapeToString(sizes) + " is outside tensor of shape " +
                                  ShapeToString(shape));
    }
  }
  if (dst.dtype() != dtype) {
    return InvalidArgumentError("reading " + std::string(DTypeName(dtype)) + " into " +
                                std::string(DTypeName(dst.dtype())));
  }
  if (!dst.device().is_cpu()) {
    return InvalidArgumentError("destination on " + dst.device().ToString() + " (CPU only)");
  }
  DCPP_ASSIGN_OR_RETURN(TensorView dview, dst.Narrow(dst_offsets, sizes));
  if (NumElements(sizes) == 0) return Status::Ok();
  const size_t elem = ElementSize(dtype);
  const Shape strides = ContiguousStrides(shape);
  const uint64_t total = static_cast<uint64_t>(NumElements(shape)) * elem;
  if (at > source.size() || total > source.size() - at) {
    return DataLossError(source.name() + ": tensor bytes [" + std::to_string(at) + ", +" +
                         std::to_string(total) + ") reach past the end");
  }
  auto span = [&](const Shape& off, const Shape& size, int64_t* first) {
    int64_t a = 0, b = 0;
    for (size_t i = 0; i < rank; ++i) {
      a += off[i] * strides[i];
      b += (off[i] + size[i] - 1) * strides[i];
    }
    *first = a;
    return static_cast<uint64_t>(b - a + 1) * elem;
  };
  int64_t first = 0;
  const uint64_t n = span(src_offsets, sizes, &first);
  const TensorView sview(nullptr, dtype, sizes, strides, 0);
  if (sview.is_contiguous() && dview.is_contiguous()) {
    return source.ReadAt(at + static_cast<uint64_t>(first) * elem, dview.data(), n);
  }
  if (const std::byte* mapped = source.Peek(at + static_cast<uint64_t>(first) * elem, n)) {
    const TensorView src(const_cast<std::byte*>(mapped), dtype, sizes, strides, 0);
    return CopyRegion(dst, dst_offsets, src, Shape(rank, 0), sizes);
  }
  // Pieces whose covering byte range is dense enough and bounded: split in halves along the
  // outermost non-trivial dim until they are (bounds read amplification and buffer memory).
  constexpr uint64_t kSmallRead = 256 << 10;
  constexpr uint64_t kMaxPiece = 8 << 20;
  std::shared_ptr<Storage> buffer;
  std::function<Status(const Shape&, const Shape&)> read_box = [&](const Shape& off,
                                                                   const Shape& size) -> Status {
    int64_t a = 0;
    const uint64_t piece = span(off, size, &a);
    const uint64_t needed = static_cast<uint64_t>(NumElements(size)) * elem;
    const bool dense_enough = piece <= std::max<uint64_t>(2 * needed, kSmallRead);
    if (!(dense_enough && piece <= kMaxPiece)) {
      size_t d = 0;
      while (d < rank && size[d] == 1) ++d;
      if (d < rank) {
        Shape first_size = size, second_off = off, second_size = size;
        first_size[d] = size[d] / 2;
        second_off[d] = off[d] + first_size[d];
        second_size[d] = size[d] - first_size[d];
        DCPP_RETURN_IF_ERROR(read_box(off, first_size));
        return read_box(second_off, second_size);
      }
    }
    if (!buffer || buffer->nbytes() < piece) buffer = Storage::AllocateUninitialized(piece);
    DCPP_RETURN_IF_ERROR(
        source.ReadAt(at + static_cast<uint64_t>(a) * elem, buffer->data(), piece));
    const TensorView src(buffer->data(), dtype, size, strides, 0);
    Shape dst_at(rank);
    for (size_t i = 0; i < rank; ++i) dst_at[i] = dst_offsets[i] + off[i] - src_offsets[i];
    return CopyRegion(dst, dst_at, src, Shape(rank, 0), size);
  };
  return read_box(src_offsets, sizes);
}

std::string PythonJsonString(std::string_view utf8) {
  return Json(std::string(utf8)).dump(-1, ' ', /*ensure_ascii=*/true);
}

}  // namespace dcpp::safetensors
