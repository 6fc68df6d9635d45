// torch.save archives. The zip container is codec/zip.h, the pickle codec dcpp/pickle.h; this
// file maps PyTorch's object encoding to dcpp::Value and back. docs/format.md ("torch.save
// archives") has the bytes.
//
// Reading, step by step:
//   1. Parse the zip directory. The archive directory is the first entry's; records are named
//      relative to it.
//   2. Read `version` (or `.data/version`) and `byteorder`, then parse data.pkl with the
//      TorchSave allow-list (nothing is executed).
//   3. Walk the pickle tree. `_rebuild_tensor_v2/_v3` and `_rebuild_parameter` calls become
//      tensor references: dtype from the storage class (v2) or the dtype argument (v3), shape,
//      strides and offset, bounds-checked against the storage's record. Everything else becomes
//      a plain Value. Shared sub-trees are charged every time they are expanded, so a small
//      hostile pickle cannot expand into a huge tree.
//   4. Materializing reads each storage record once and shares it between its tensors.
//
// Writing, step by step:
//   1. Collect the tensors in pickling order and group them by Storage; decide per group which
//      bytes become its record (see WriteTorchSave in the header).
//   2. Build data.pkl's pickle tree as PyTorch does and serialize it with protocol 2.
//   3. Stream the records: data.pkl, the 2.x markers, data/<key> straight from tensor memory,
//      version, and the serialization id.
#include "codec/torch_save.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <stdexcept>
#include <unordered_map>

#include "codec/zip.h"
#include "dcpp/chunk.h"

namespace dcpp {
namespace {

using Kind = PickleValue::Kind;

constexpr int64_t kMaxVersion = 32;
constexpr int kMaxDepth = 1000;
constexpr size_t kMaxRank = 64;
constexpr unsigned __int128 kMaxTensorBytes = static_cast<unsigned __int128>(1) << 62;

std::string NodeName(const PickleValue& v) {
  if (v.is(Kind::kGlobal)) return v.global().FullName();
  if (v.is(Kind::kObject) && v.object().callable && v.object().callable->is(Kind::kGlobal)) {
    return v.object().callable->global().FullName();
  }
  return std::string(PickleKindName(v.kind()));
}

bool IsGlobal(const PickleRef& v, std::string_view module, std::string_view name) {
  return v && v->is(Kind::kGlobal) && v->global().module == module && v->global().name == name;
}

bool IsOrderedDict(const PickleValue& v) { return v.IsCallOf("collections", "OrderedDict"); }

// Reverses the bytes of every scalar (each half of a complex element).
void SwapBytes(std::byte* p, size_t n, DType dtype) {
  const size_t unit = IsComplex(dtype) ? ElementSize(dtype) / 2 : ElementSize(dtype);
  if (unit <= 1) return;
  for (size_t i = 0; i + unit <= n; i += unit) std::reverse(p + i, p + i + unit);
}

Result<int64_t> ParseVersion(const std::string& text, const std::string& where) {
  size_t end = text.size();
  while (end > 0 && (text[end - 1] == '\n' || text[end - 1] == '\r' || text[end - 1] == ' ')) {
    --end;
  }
  if (end == 0 || end > 18) return DataLossError(where + ": malformed version record");
  int64_t v = 0;
  for (size_t i = 0; i < end; ++i) {
    if (text[i] < '0' || text[i] > '9') return DataLossError(where + ": malformed version record");
    v = v * 10 + (text[i] - '0');
  }
  if (v < 1) return DataLossError(where + ": invalid version " + std::to_string(v));
  if (v > kMaxVersion) {
    return UnimplementedError(where + ": format version " + std::to_string(v) +
                              " is newer than supported (" + std::to_string(kMaxVersion) + ")");
  }
  return v;
}

// ---- reading: a lone tensor's data.pkl without the pickle tree ----

Result<std::string> EmitLoneTensorPickle(DType dtype, const Shape& shape, const Shape& strides,
                                         int64_t storage_offset, int64_t numel);

// The values of `pkl` if it is exactly the data.pkl EmitLoneTensorPickle writes for them (as
// PyTorch writes a lone tensor): its globals, strings and integers are collected in order from
// the few opcodes that form, then the bytes are emitted again from them and compared. Any
// other pickle (or any byte of difference) is nullopt, for the general reader.
std::optional<internal::LoneTensorPickle> MatchLoneTensorPickle(std::string_view pkl) {
  if (pkl.size() < 2 || pkl.size() > 4096 || static_cast<uint8_t>(pkl[0]) != 0x80 || pkl[1] != 2) {
    return std::nullopt;
  }
  std::vector<std::pair<std::string_view, std::string_view>> globals;
  std::vector<std::string_view> strs;
  std::vector<int64_t> ints;
  size_t at = 2;
  auto take = [&](size_t n) -> const char* {
    if (pkl.size() - at < n) return nullptr;
    const char* p = pkl.data() + at;
    at += n;
    return p;
  };
  auto le = [](const char* p, size_t n) {
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = (v << 8) | static_cast<uint8_t>(p[i]);
    return v;
  };
  bool stopped = false;
  while (!stopped) {
    const char* op = take(1);
    if (!op) return std::nullopt;
    const char* p = nullptr;
    switch (static_cast<uint8_t>(*op)) {
      case 'c': {  // GLOBAL "module\nname\n"
        const size_t nl1 = pkl.find('\n', at);
        if (nl1 == std::string_view::npos) return std::nullopt;
        const size_t nl2 = pkl.find('\n', nl1 + 1);
        if (nl2 == std::string_view::npos) return std::nullopt;
        globals.emplace_back(pkl.substr(at, nl1 - at), pkl.substr(nl1 + 1, nl2 - nl1 - 1));
        at = nl2 + 1;
        break;
      }
      case 'X': {  // BINUNICODE
        if (!(p = take(4))) return std::nullopt;
        const uint64_t n = le(p, 4);
        if (!(p = take(n))) return std::nullopt;
        strs.emplace_back(p, n);
        break;
      }
      case 'K':  // BININT1
        if (!(p = take(1))) return std::nullopt;
        ints.push_back(static_cast<int64_t>(le(p, 1)));
        break;
      case 'M':  // BININT2
        if (!(p = take(2))) return std::nullopt;
        ints.push_back(static_cast<int64_t>(le(p, 2)));
        break;
      case 'J':  // BININT
        if (!(p = take(4))) return std::nullopt;
        ints.push_back(static_cast<int32_t>(static_cast<uint32_t>(le(p, 4))));
        break;
      case 0x8a: {  // LONG1: up to 8 bytes, two's complement
        if (!(p = take(1))) return std::nullopt;
        const size_t n = static_cast<uint8_t>(*p);
        if (n == 0 || n > 8 || !(p = take(n))) return std::nullopt;
        uint64_t v = le(p, n);
        if (n < 8 && (static_cast<uint8_t>(p[n - 1]) & 0x80)) v |= ~uint64_t{0} << (8 * n);
        ints.push_back(static_cast<int64_t>(v));
        break;
      }
      case 'q':  // BINPUT
        if (!take(1)) return std::nullopt;
        break;
      case 'r':  // LONG_BINPUT
        if (!take(4)) return std::nullopt;
        break;
      case '(':   // MARK
      case 't':   // TUPLE
      case 0x85:  // TUPLE1
      case 0x86:  // TUPLE2
      case 0x87:  // TUPLE3
      case ')':   // EMPTY_TUPLE
      case 'Q':   // BINPERSID
      case 0x89:  // NEWFALSE
      case 'R':   // REDUCE
        break;
      case '.':  // STOP
        stopped = true;
        break;
      default:
        return std::nullopt;
    }
  }
  if (at != pkl.size()) return std::nullopt;
  // rebuild, storage class, OrderedDict (, dtype); "storage", key, "cpu"; numel, offset, sizes,
  // strides.
  if (globals.size() < 3 || strs.size() != 3 || strs[1] != "0" || ints.size() < 2 ||
      ints.size() % 2 != 0) {
    return std::nullopt;
  }
  internal::LoneTensorPickle lone;
  lone.v3 = globals[0].second == "_rebuild_tensor_v3";
  if (lone.v3) {
    if (globals.size() != 4 || globals[3].first != "torch") return std::nullopt;
    auto d = DTypeFromName(globals[3].second);
    if (!d.ok()) return std::nullopt;
    lone.dtype = *d;
  } else {
    if (globals.size() != 3 || globals[1].first != "torch") return std::nullopt;
    auto d = DTypeFromStorageClass(globals[1].second);
    if (!d.ok()) return std::nullopt;
    lone.dtype = lone.storage_dtype = *d;
  }
  lone.numel = ints[0];
  lone.storage_offset = ints[1];
  const size_t rank = (ints.size() - 2) / 2;
  lone.shape.assign(ints.begin() + 2, ints.begin() + 2 + rank);
  lone.strides.assign(ints.begin() + 2 + rank, ints.end());
  auto again =
      EmitLoneTensorPickle(lone.dtype, lone.shape, lone.strides, lone.storage_offset, lone.numel);
  if (!again.ok() || *again != pkl) return std::nullopt;
  return lone;
}

// ---- reading: pickle tree -> tensors and values ----

class TreeReader {
 public:
  TreeReader(const TorchSaveArchive& archive, bool opaque_objects, uint64_t pickle_size)
      : archive_(archive),
        opaque_(opaque_objects),
        nodes_left_((uint64_t{1} << 20) + 64 * pickle_size),
        bytes_left_((uint64_t{64} << 20) + 64 * pickle_size) {}

  // The tensor a rebuild call describes, or nullopt if `v` is not one.
  Result<std::optional<TorchSaveTensorRef>> AsTensor(const PickleValue& v, int depth);
  // The tensor of a canonical lone-tensor data.pkl (MatchLoneTensorPickle), checked as
  // ParseRebuild checks the same call's tree.
  Result<TorchSaveTensorRef> LoneTensor(const internal::LoneTensorPickle& lone);
  // A checked tensor's values, its storage read once.
  Result<Tensor> MaterializeRef(const TorchSaveTensorRef& ref) { return Materialize(ref); }
  Result<Value> ToValue(const PickleValue& v, int depth, bool materialize);
  Status CollectLeaves(const PickleValue& v, const std::string& key, int depth,
                       std::vector<TorchSaveLeaf>& out);

 private:
  Status Visit(int depth);
  Status ChargeBytes(size_t n);
  Result<bool> ContainsTensor(const PickleValue& v, int depth);
  Result<TorchSaveTensorRef> ParseRebuild(const PickleValue& v, bool v3);
  // The checks of a rebuild call's values against the archive's records; `fn` names the call.
  Result<TorchSaveTensorRef> CheckRebuild(TorchSaveTensorRef ref, int64_t numel, bool untyped,
                                          DType storage_dtype,
                                          const std::function<std::string()>& fn);
  Result<Tensor> Materialize(const TorchSaveTensorRef& ref);
  Result<std::string> KeyString(const PickleValue& k, int depth);
  Status DataLoss(const std::string& what) const {
    return DataLossError(archive_.source().name() + ": " + archive_.prefix() +
                         "/data.pkl: " + what);
  }

  const TorchSaveArchive& archive_;
  bool opaque_;
  uint64_t nodes_left_;
  uint64_t bytes_left_;
  std::unordered_map<std::string, std::shared_ptr<Storage>> storages_;
};

Status TreeReader::Visit(int depth) {
  if (depth > kMaxDepth)
    return DataLoss("object tree nested deeper than " + std::to_string(kMaxDepth));
  if (nodes_left_ == 0) return DataLoss("object tree expands to too many values");
  --nodes_left_;
  return Status::Ok();
}

Status TreeReader::ChargeBytes(size_t n) {
  if (n > bytes_left_) return DataLoss("object tree expands to too many string bytes");
  bytes_left_ -= n;
  return Status::Ok();
}

Result<TorchSaveTensorRef> TreeReader::ParseRebuild(const PickleValue& v, bool v3) {
  // Names for messages are built only when one is needed.
  auto fn = [&v] { return NodeName(v); };
  const PickleValue::Object& obj = v.object();
  if (!obj.args || !obj.args->is(Kind::kTuple))
    return DataLoss(fn() + ": arguments are not a tuple");
  const PickleValue::Items& args = obj.args->items();
  if (args.size() < (v3 ? 7u : 4u)) {
    return DataLoss(fn() + ": " + std::to_string(args.size()) + " arguments are too few");
  }
  for (const PickleRef& a : args) {
    if (!a) return DataLoss(fn() + ": null argument");
  }

  // Persistent id: ('storage', storage_type, key, location, numel).
  if (!args[0]->is(Kind::kPersistentId) || !args[0]->persistent_id() ||
      !args[0]->persistent_id()->is(Kind::kTuple)) {
    return DataLoss(fn() + ": storage argument is not a persistent id tuple");
  }
  const PickleValue::Items& pid = args[0]->persistent_id()->items();
  if (pid.size() != 5 || !pid[0] || !pid[1] || !pid[2] || !pid[4]) {
    return DataLoss(fn() + ": persistent id is not ('storage', type, key, location, numel)");
  }
  if (!(pid[0]->is(Kind::kStr) || pid[0]->is(Kind::kBytes)) || pid[0]->as_str() != "storage") {
    return DataLoss(fn() + ": persistent id of unknown kind " + pid[0]->DebugString(1));
  }
  // PyTorch pickles the untyped storage class by its module: torch.storage.UntypedStorage.
  const bool torch_storage_module = pid[1]->is(Kind::kGlobal) &&
                                    pid[1]->global().module == "torch.storage" &&
                                    pid[1]->global().name == "UntypedStorage";
  if (!pid[1]->is(Kind::kGlobal) || (pid[1]->global().module != "torch" && !torch_storage_module)) {
    return DataLoss(fn() + ": storage type " + pid[1]->DebugString(1) + " is not a torch storage");
  }
  const std::string& storage_class = pid[1]->global().name;
  const bool untyped = storage_class == "UntypedStorage";
  DType storage_dtype = DType::kUInt8;
  if (!untyped) {
    auto d = DTypeFromStorageClass(storage_class);
    if (!d.ok()) {
      return UnimplementedError(archive_.source().name() + ": storage class torch." +
                                storage_class + " is not supported");
    }
    storage_dtype = *d;
  }
  if (!(pid[2]->is(Kind::kStr) || pid[2]->is(Kind::kBytes))) {
    return DataLoss(fn() + ": storage key is a " + std::string(PickleKindName(pid[2]->kind())));
  }
  TorchSaveTensorRef ref;
  ref.storage_key = pid[2]->as_str();
  DCPP_ASSIGN_OR_RETURN(int64_t numel, pid[4]->GetInt());
  DCPP_ASSIGN_OR_RETURN(ref.storage_offset, args[1]->GetInt());

  // Shape: a tuple, or torch.Size((...)).
  const PickleValue* size_node = args[2].get();
  if (size_node->IsCallOf("torch", "Size")) {
    const auto& o = size_node->object();
    if (!o.args || !o.args->is(Kind::kTuple) || o.args->items().size() != 1 ||
        !o.args->items()[0]) {
      return DataLoss(fn() + ": malformed torch.Size");
    }
    size_node = o.args->items()[0].get();
  }
  DCPP_ASSIGN_OR_RETURN(const PickleValue::Items* size_items, size_node->GetTuple());
  DCPP_ASSIGN_OR_RETURN(const PickleValue::Items* stride_items, args[3]->GetTuple());
  if (size_items->size() != stride_items->size() || size_items->size() > kMaxRank) {
    return DataLoss(fn() + ": " + std::to_string(size_items->size()) + " sizes and " +
                    std::to_string(stride_items->size()) + " strides");
  }
  for (size_t i = 0; i < size_items->size(); ++i) {
    if (!(*size_items)[i] || !(*stride_items)[i]) return DataLoss(fn() + ": null size or stride");
    DCPP_ASSIGN_OR_RETURN(int64_t s, (*size_items)[i]->GetInt());
    DCPP_ASSIGN_OR_RETURN(int64_t st, (*stride_items)[i]->GetInt());
    ref.shape.push_back(s);
    ref.strides.push_back(st);
  }
  if (args.size() > 4) {
    if (args[4]->is(Kind::kBool)) ref.requires_grad = args[4]->as_bool();
  }
  if (v3) {
    if (!args[6]->is(Kind::kGlobal) || args[6]->global().module != "torch") {
      return DataLoss(fn() + ": dtype argument " + args[6]->DebugString(1) +
                      " is not a torch dtype");
    }
    auto d = DTypeFromName(args[6]->global().name);
    if (!d.ok()) {
      return UnimplementedError(archive_.source().name() + ": dtype torch." +
                                args[6]->global().name + " is not supported");
    }
    ref.dtype = *d;
  } else {
    if (untyped) return DataLoss(fn() + ": UntypedStorage needs a dtype (_rebuild_tensor_v3)");
    ref.dtype = storage_dtype;
  }
  return CheckRebuild(std::move(ref), numel, untyped, storage_dtype, fn);
}

Result<TorchSaveTensorRef> TreeReader::CheckRebuild(TorchSaveTensorRef ref, int64_t numel,
                                                    bool untyped, DType storage_dtype,
                                                    const std::function<std::string()>& fn) {
  // The storage's record, and the bytes the persistent id says it holds.
  auto record_name = [&] { return archive_.prefix() + "/data/" + ref.storage_key; };
  char key_buf[32];
  std::string_view record_key;
  if (ref.storage_key.size() + 5 <= sizeof(key_buf)) {
    std::memcpy(key_buf, "data/", 5);
    std::memcpy(key_buf + 5, ref.storage_key.data(), ref.storage_key.size());
    record_key = std::string_view(key_buf, ref.storage_key.size() + 5);
  }
  std::string long_key;
  if (record_key.empty()) {
    long_key = "data/" + ref.storage_key;
    record_key = long_key;
  }
  auto it = archive_.records().find(record_key);
  if (it == archive_.records().end()) {
    return DataLossError(archive_.source().name() + ": missing storage record \"" + record_name() +
                         "\"");
  }
  ref.record_offset = it->second.data_offset;
  ref.record_size = it->second.size;
  const size_t storage_elem = untyped ? 1 : ElementSize(storage_dtype);
  if (numel < 0 || static_cast<unsigned __int128>(numel) * storage_elem > ref.record_size) {
    return DataLossError(archive_.source().name() + ": storage \"" + ref.storage_key +
                         "\" declares " + std::to_string(numel) + " elements of " +
                         std::to_string(storage_elem) + " bytes but record \"" + record_name() +
                         "\" holds " + std::to_string(ref.record_size) + " bytes");
  }
  const uint64_t storage_bytes = static_cast<uint64_t>(numel) * storage_elem;

  // Geometry, overflow-safe: sizes, strides and offset non-negative; the extent fits.
  if (ref.storage_offset < 0) return DataLoss(fn() + ": negative storage offset");
  unsigned __int128 count = 1;
  unsigned __int128 last = static_cast<uint64_t>(ref.storage_offset);
  bool empty = false;
  for (size_t i = 0; i < ref.shape.size(); ++i) {
    if (ref.shape[i] < 0 || ref.strides[i] < 0) {
      return DataLoss(fn() + ": negative size or stride in " + ShapeToString(ref.shape) + " / " +
                      ShapeToString(ref.strides));
    }
    if (ref.shape[i] == 0) empty = true;
    count *= static_cast<uint64_t>(ref.shape[i]);
    if (count > kMaxTensorBytes) count = kMaxTensorBytes + 1;  // saturate
    if (ref.shape[i] > 0) {
      last +=
          static_cast<unsigned __int128>(ref.shape[i] - 1) * static_cast<uint64_t>(ref.strides[i]);
      if (last > kMaxTensorBytes) last = kMaxTensorBytes + 1;
    }
  }
  const size_t elem = ElementSize(ref.dtype);
  if (!empty) {
    if (count * elem > kMaxTensorBytes) {
      return DataLoss(fn() + ": tensor of shape " + ShapeToString(ref.shape) + " is too large");
    }
    const unsigned __int128 need = (last + 1) * elem;
    if (need > storage_bytes) {
      return DataLossError(
          archive_.source().name() + ": tensor " + std::string(DTypeName(ref.dtype)) +
          ShapeToString(ref.shape) + " strides " + ShapeToString(ref.strides) + " offset " +
          std::to_string(ref.storage_offset) + " reaches past the end of storage record \"" +
          record_name() + "\" (" + std::to_string(storage_bytes) + " bytes)");
    }
  }
  return ref;
}

Result<TorchSaveTensorRef> TreeReader::LoneTensor(const internal::LoneTensorPickle& lone) {
  TorchSaveTensorRef ref;
  ref.dtype = lone.dtype;
  ref.shape = lone.shape;
  ref.strides = lone.strides;
  ref.storage_offset = lone.storage_offset;
  ref.storage_key = "0";
  const std::string_view fn_name =
      lone.v3 ? "torch._utils._rebuild_tensor_v3" : "torch._utils._rebuild_tensor_v2";
  return CheckRebuild(std::move(ref), lone.numel, lone.v3, lone.storage_dtype,
                      [fn_name] { return std::string(fn_name); });
}

Result<std::optional<TorchSaveTensorRef>> TreeReader::AsTensor(const PickleValue& v, int depth) {
  if (!v.is(Kind::kObject) || !v.object().callable) return std::optional<TorchSaveTensorRef>();
  const PickleRef& fn = v.object().callable;
  if (IsGlobal(fn, "torch._utils", "_rebuild_tensor_v2") ||
      IsGlobal(fn, "torch._utils", "_rebuild_tensor")) {
    DCPP_ASSIGN_OR_RETURN(TorchSaveTensorRef ref, ParseRebuild(v, false));
    return std::optional<TorchSaveTensorRef>(std::move(ref));
  }
  if (IsGlobal(fn, "torch._utils", "_rebuild_tensor_v3")) {
    DCPP_ASSIGN_OR_RETURN(TorchSaveTensorRef ref, ParseRebuild(v, true));
    return std::optional<TorchSaveTensorRef>(std::move(ref));
  }
  if (IsGlobal(fn, "torch._utils", "_rebuild_parameter") ||
      IsGlobal(fn, "torch._utils", "_rebuild_parameter_with_state")) {
    DCPP_RETURN_IF_ERROR(Visit(depth + 1));
    const auto& o = v.object();
    if (!o.args || !o.args->is(Kind::kTuple) || o.args->items().size() < 2 || !o.args->items()[0]) {
      return DataLoss(NodeName(v) + ": malformed arguments");
    }
    DCPP_ASSIGN_OR_RETURN(auto inner, AsTensor(*o.args->items()[0], depth + 1));
    if (!inner) return DataLoss(NodeName(v) + ": data is not a tensor");
    const PickleRef& rg = o.args->items()[1];
    if (rg && rg->is(Kind::kBool)) inner->requires_grad = rg->as_bool();
    return inner;
  }
  return std::optional<TorchSaveTensorRef>();
}

Result<Tensor> TreeReader::Materialize(const TorchSaveTensorRef& ref) {
  std::shared_ptr<Storage>& storage = storages_[ref.storage_key];
  if (!storage) {
    auto s = Storage::AllocateUninitialized(ref.record_size);
    Status st = archive_.source().ReadAt(ref.record_offset, s->data(), ref.record_size);
    if (!st.ok())
      return st.WithContext("record \"" + archive_.prefix() + "/data/" + ref.storage_key + "\"");
    if (archive_.big_endian()) SwapBytes(s->data(), ref.record_size, ref.dtype);
    storage = std::move(s);
  }
  auto t = Tensor::FromStorage(storage, ref.dtype, ref.shape, ref.strides, ref.storage_offset);
  if (!t.ok()) return DataLoss(std::string(t.status().message()));
  return *std::move(t);
}

Result<bool> TreeReader::ContainsTensor(const PickleValue& v, int depth) {
  DCPP_RETURN_IF_ERROR(Visit(depth));
  DCPP_ASSIGN_OR_RETURN(auto t, AsTensor(v, depth));
  if (t) return true;
  auto any = [&](const PickleValue::Items& items) -> Result<bool> {
    for (const PickleRef& c : items) {
      if (!c) continue;
      DCPP_ASSIGN_OR_RETURN(bool b, ContainsTensor(*c, depth + 1));
      if (b) return true;
    }
    return false;
  };
  auto any_pair = [&](const PickleValue::DictItems& items) -> Result<bool> {
    for (const auto& [k, val] : items) {
      if (!val) continue;
      DCPP_ASSIGN_OR_RETURN(bool b, ContainsTensor(*val, depth + 1));
      if (b) return true;
    }
    return false;
  };
  switch (v.kind()) {
    case Kind::kTuple:
    case Kind::kList:
      return any(v.items());
    case Kind::kDict:
      return any_pair(v.dict_items());
    case Kind::kObject:
      if (IsOrderedDict(v)) return any_pair(v.object().dict_items);
      return false;
    default:
      return false;
  }
}

Result<std::string> TreeReader::KeyString(const PickleValue& k, int depth) {
  DCPP_ASSIGN_OR_RETURN(Value key, ToValue(k, depth, false));
  if (key.is_str()) return key.as_str();
  if (key.is_int()) return std::to_string(key.as_int());
  return key.DebugString();
}

Result<Value> TreeReader::ToValue(const PickleValue& v, int depth, bool materialize) {
  DCPP_RETURN_IF_ERROR(Visit(depth));
  auto items = [&](const PickleValue::Items& in) -> Result<Value::List> {
    Value::List out;
    out.reserve(in.size());
    for (const PickleRef& c : in) {
      if (!c) return DataLoss("null item");
      DCPP_ASSIGN_OR_RETURN(Value x, ToValue(*c, depth + 1, materialize));
      out.push_back(std::move(x));
    }
    return out;
  };
  auto pairs = [&](const PickleValue::DictItems& in) -> Result<Value::Dict> {
    Value::Dict out;
    out.reserve(in.size());
    for (const auto& [k, val] : in) {
      if (!k || !val) return DataLoss("null dict item");
      DCPP_ASSIGN_OR_RETURN(Value kv, ToValue(*k, depth + 1, materialize));
      DCPP_ASSIGN_OR_RETURN(Value vv, ToValue(*val, depth + 1, materialize));
      out.emplace_back(std::move(kv), std::move(vv));
    }
    return out;
  };
  auto opaque = [&](const std::string& type_name) -> Result<Value> {
    if (opaque_) return Value::FromOpaque(Opaque{"", type_name});
    return InvalidArgumentError(archive_.source().name() + ": data.pkl holds a " + type_name +
                                " object, which is not plain data");
  };
  switch (v.kind()) {
    case Kind::kNone:
      return Value::None();
    case Kind::kBool:
      return Value::Bool(v.as_bool());
    case Kind::kInt:
      return Value::Int(v.as_int());
    case Kind::kFloat:
      return Value::Float(v.as_float());
    case Kind::kStr:
      DCPP_RETURN_IF_ERROR(ChargeBytes(v.as_str().size()));
      return Value::Str(v.as_str());
    case Kind::kBytes:
      DCPP_RETURN_IF_ERROR(ChargeBytes(v.as_str().size()));
      return Value::Bytes(v.as_str());
    case Kind::kTuple: {
      DCPP_ASSIGN_OR_RETURN(Value::List l, items(v.items()));
      return Value::MakeTuple(std::move(l));
    }
    case Kind::kList: {
      DCPP_ASSIGN_OR_RETURN(Value::List l, items(v.items()));
      return Value::MakeList(std::move(l));
    }
    case Kind::kDict: {
      DCPP_ASSIGN_OR_RETURN(Value::Dict d, pairs(v.dict_items()));
      return Value::MakeDict(std::move(d));
    }
    case Kind::kSet:
      return opaque("builtins.set");
    case Kind::kGlobal:
      return opaque(v.global().FullName());
    case Kind::kPersistentId:
      return DataLoss("persistent id outside a tensor rebuild call");
    case Kind::kObject: {
      DCPP_ASSIGN_OR_RETURN(auto ref, AsTensor(v, depth));
      if (ref) {
        if (!materialize) return InternalError("tensor in a subtree read as plain data");
        DCPP_ASSIGN_OR_RETURN(Tensor t, Materialize(*ref));
        return Value::FromTensor(std::move(t));
      }
      if (IsOrderedDict(v)) {
        const auto& o = v.object();
        Value::Dict d;
        // OrderedDict([(k, v), ...]) as a constructor argument, then SETITEMS.
        if (o.args && o.args->is(Kind::kTuple) && !o.args->items().empty()) {
          const PickleRef& init = o.args->items()[0];
          if (!init || !(init->is(Kind::kList) || init->is(Kind::kTuple))) {
            return DataLoss("OrderedDict initializer is not a list of pairs");
          }
          for (const PickleRef& pair : init->items()) {
            if (!pair || !pair->is(Kind::kTuple) || pair->items().size() != 2 ||
                !pair->items()[0] || !pair->items()[1]) {
              return DataLoss("OrderedDict initializer is not a list of pairs");
            }
            DCPP_ASSIGN_OR_RETURN(Value kv, ToValue(*pair->items()[0], depth + 1, materialize));
            DCPP_ASSIGN_OR_RETURN(Value vv, ToValue(*pair->items()[1], depth + 1, materialize));
            d.emplace_back(std::move(kv), std::move(vv));
          }
        }
        DCPP_ASSIGN_OR_RETURN(Value::Dict rest, pairs(o.dict_items));
        for (auto& p : rest) d.push_back(std::move(p));
        return Value::MakeDict(std::move(d), /*ordered_dict=*/true);
      }
      return opaque(NodeName(v));
    }
  }
  return InternalError("unknown pickle kind");
}

Status TreeReader::CollectLeaves(const PickleValue& v, const std::string& key, int depth,
                                 std::vector<TorchSaveLeaf>& out) {
  DCPP_RETURN_IF_ERROR(Visit(depth));
  auto join = [&](const std::string& part) { return key.empty() ? part : key + "." + part; };
  DCPP_ASSIGN_OR_RETURN(auto ref, AsTensor(v, depth));
  if (ref) {
    TorchSaveLeaf leaf;
    leaf.key = key;
    leaf.is_tensor = true;
    leaf.tensor = std::move(*ref);
    out.push_back(std::move(leaf));
    return Status::Ok();
  }
  const PickleValue::DictItems* dict = nullptr;
  if (v.is(Kind::kDict)) dict = &v.dict_items();
  if (IsOrderedDict(v) && v.object().args && v.object().args->is(Kind::kTuple) &&
      v.object().args->items().empty()) {
    dict = &v.object().dict_items;
  }
  if (dict && !dict->empty()) {
    for (const auto& [k, val] : *dict) {
      if (!k || !val) return DataLoss("null dict item");
      DCPP_ASSIGN_OR_RETURN(std::string ks, KeyString(*k, depth + 1));
      DCPP_RETURN_IF_ERROR(CollectLeaves(*val, join(ks), depth + 1, out));
    }
    return Status::Ok();
  }
  DCPP_ASSIGN_OR_RETURN(bool has_tensor, ContainsTensor(v, depth));
  if (has_tensor && (v.is(Kind::kList) || v.is(Kind::kTuple))) {
    for (size_t i = 0; i < v.items().size(); ++i) {
      if (!v.items()[i]) return DataLoss("null item");
      DCPP_RETURN_IF_ERROR(CollectLeaves(*v.items()[i], join(std::to_string(i)), depth + 1, out));
    }
    return Status::Ok();
  }
  if (has_tensor) {
    return UnimplementedError(archive_.source().name() + ": tensor inside a " + NodeName(v) +
                              " at \"" + key + "\"");
  }
  TorchSaveLeaf leaf;
  leaf.key = key;
  DCPP_ASSIGN_OR_RETURN(leaf.value, ToValue(v, depth, false));
  out.push_back(std::move(leaf));
  return Status::Ok();
}

}  // namespace

bool TorchSaveTensorRef::is_contiguous() const {
  return TensorView(nullptr, dtype, shape, strides, storage_offset).is_contiguous();
}

// ---- TorchSaveArchive ----

Result<TorchSaveArchive> TorchSaveArchive::Open(const ByteSource& source) {
  const std::string name = source.name();
  // Files from before PyTorch 1.6 are a bare pickle stream (PROTO 2, then a magic number).
  if (source.size() >= 8) {
    char head[8];
    DCPP_RETURN_IF_ERROR(source.ReadAt(0, head, sizeof(head)));
    if (static_cast<unsigned char>(head[0]) == 0x80 && head[1] == 0x02) {
      return UnimplementedError(name + ": legacy (pre-1.6, non-zip) torch.save format");
    }
    if (std::memcmp(head, "PYTORCH1", 8) == 0) {
      return UnimplementedError(name + ": PYTORCH1 preview format");
    }
  }
  DCPP_ASSIGN_OR_RETURN(internal::ZipReader zip, internal::ZipReader::Open(source));
  if (zip.entries().empty()) return DataLossError(name + ": empty zip archive");
  const std::string& first = zip.entries()[0].name;
  const size_t slash = first.find('/');
  if (slash == std::string::npos || slash == 0) {
    return DataLossError(name + ": not a torch.save archive (first entry \"" + first +
                         "\" is not in a directory)");
  }
  TorchSaveArchive a;
  a.source_ = &source;
  a.prefix_ = first.substr(0, slash);
  const std::string_view dir(first.data(), slash + 1);
  std::vector<RecordMap::value_type>& recs = a.records_.sorted_;
  recs.reserve(zip.entries().size());
  for (const internal::ZipEntry& e : zip.entries()) {
    // Entries outside the archive directory are not part of the payload; PyTorch ignores them.
    if (e.name.size() <= dir.size() || std::string_view(e.name).substr(0, dir.size()) != dir) {
      continue;
    }
    recs.emplace_back(e.name.substr(dir.size()), Record{e.data_offset, e.size, e.crc32});
  }
  // Zip names are unique, so are the names below the prefix.
  std::vector<uint32_t> index(recs.size());
  for (uint32_t i = 0; i < index.size(); ++i) index[i] = i;
  std::sort(index.begin(), index.end(),
            [&](uint32_t x, uint32_t y) { return recs[x].first < recs[y].first; });
  std::vector<RecordMap::value_type> sorted;
  sorted.reserve(recs.size());
  a.records_.order_.resize(recs.size());
  for (uint32_t i = 0; i < index.size(); ++i) {
    a.records_.order_[index[i]] = i;
    sorted.push_back(std::move(recs[index[i]]));
  }
  recs = std::move(sorted);
  const auto pkl_record = a.records_.find("data.pkl");
  if (pkl_record == a.records_.end()) {
    return DataLossError(name + ": no \"" + std::string(dir) + "data.pkl\" record");
  }
  const char* version_name = a.records_.count("version")         ? "version"
                             : a.records_.count(".data/version") ? ".data/version"
                                                                 : nullptr;
  if (!version_name) return DataLossError(name + ": no \"" + std::string(dir) + "version\" record");
  {
    const Record& r = a.records_.find(version_name)->second;
    if (r.size > 64) {
      return DataLossError(name + ": " + std::string(dir) + version_name + " is too long");
    }
    char text[64];
    if (Status s = source.ReadAt(r.data_offset, text, r.size); !s.ok()) {
      return s.WithContext("record \"" + a.prefix_ + "/" + version_name + "\"");
    }
    DCPP_ASSIGN_OR_RETURN(a.version_, ParseVersion(std::string(text, r.size),
                                                   name + ": " + std::string(dir) + version_name));
  }
  if (auto it = a.records_.find("byteorder"); it != a.records_.end()) {
    if (it->second.size > 16) {
      return DataLossError(name + ": " + std::string(dir) + "byteorder is too long");
    }
    char text[16];
    if (Status s = source.ReadAt(it->second.data_offset, text, it->second.size); !s.ok()) {
      return s.WithContext("record \"" + a.prefix_ + "/byteorder\"");
    }
    const std::string_view order(text, it->second.size);
    if (order == "big") {
      a.big_endian_ = true;
    } else if (order != "little") {
      return DataLossError(name + ": " + std::string(dir) + "byteorder is \"" + std::string(order) +
                           "\" (expected \"little\" or \"big\")");
    }
  }
  // data.pkl in place when the archive is in memory.
  std::string pkl_copy;
  std::string_view pkl;
  const Record& pr = pkl_record->second;
  if (const std::byte* p = source.Peek(pr.data_offset, pr.size)) {
    pkl = std::string_view(reinterpret_cast<const char*>(p), pr.size);
  } else {
    DCPP_ASSIGN_OR_RETURN(pkl_copy, a.ReadRecord("data.pkl"));
    pkl = pkl_copy;
  }
  static const PickleAllowList* const kAllow = new PickleAllowList(PickleAllowList::TorchSave());
  PickleReadOptions options;
  options.allow = kAllow;
  // A lone tensor's canonical pickle (every DCP tensor item) is read without the tree.
  if (auto lone = MatchLoneTensorPickle(pkl)) {
    a.lone_ = std::move(*lone);
    return a;
  }
  auto root = ReadPickle(pkl, options);
  if (!root.ok()) return root.status().WithContext(name + ": " + std::string(dir) + "data.pkl");
  a.root_ = *std::move(root);
  return a;
}

Result<std::string> TorchSaveArchive::ReadRecord(const std::string& name) const {
  auto it = records_.find(name);
  if (it == records_.end()) {
    return NotFoundError(source_->name() + ": no record \"" + prefix_ + "/" + name + "\"");
  }
  std::string out(it->second.size, '\0');
  Status s = source_->ReadAt(it->second.data_offset, out.data(), out.size());
  if (!s.ok()) return s.WithContext("record \"" + prefix_ + "/" + name + "\"");
  return out;
}

TorchSaveArchive::RecordMap::const_iterator TorchSaveArchive::RecordMap::find(
    std::string_view name) const {
  auto it = std::lower_bound(sorted_.begin(), sorted_.end(), name,
                             [](const value_type& v, std::string_view n) { return v.first < n; });
  return it != sorted_.end() && it->first == name ? it : sorted_.end();
}

const TorchSaveArchive::Record& TorchSaveArchive::RecordMap::at(std::string_view name) const {
  auto it = find(name);
  if (it == end()) throw std::out_of_range("no torch.save record \"" + std::string(name) + "\"");
  return it->second;
}

std::vector<std::string> TorchSaveArchive::RecordNames() const {
  std::vector<std::string> names;
  names.reserve(records_.size());
  for (uint32_t i : records_.order_) names.push_back(records_.sorted_[i].first);
  return names;
}

Status TorchSaveArchive::VerifyChecksums() const {
  for (uint32_t i : records_.order_) {
    const auto& [name, r] = records_.sorted_[i];
    DCPP_RETURN_IF_ERROR(
        internal::VerifyZipCrc(*source_, prefix_ + "/" + name, r.data_offset, r.size, r.crc32));
  }
  return Status::Ok();
}

Result<TorchSaveTensorRef> TorchSaveArchive::RootTensor() const {
  TreeReader reader(*this, false, records_.at("data.pkl").size);
  if (lone_) return reader.LoneTensor(*lone_);
  DCPP_ASSIGN_OR_RETURN(auto ref, reader.AsTensor(*root_, 0));
  if (!ref) {
    return InvalidArgumentError(source_->name() + ": the saved object is a " + NodeName(*root_) +
                                ", not a tensor");
  }
  return *std::move(ref);
}

Result<Value> TorchSaveArchive::ReadValue(bool opaque_objects) const {
  TreeReader reader(*this, opaque_objects, records_.at("data.pkl").size);
  if (lone_) {
    DCPP_ASSIGN_OR_RETURN(TorchSaveTensorRef ref, reader.LoneTensor(*lone_));
    DCPP_ASSIGN_OR_RETURN(Tensor t, reader.MaterializeRef(ref));
    return Value::FromTensor(std::move(t));
  }
  return reader.ToValue(*root_, 0, true);
}

Result<std::vector<TorchSaveLeaf>> TorchSaveArchive::Leaves(bool opaque_objects) const {
  TreeReader reader(*this, opaque_objects, records_.at("data.pkl").size);
  std::vector<TorchSaveLeaf> out;
  if (lone_) {
    TorchSaveLeaf leaf;
    leaf.is_tensor = true;
    DCPP_ASSIGN_OR_RETURN(leaf.tensor, reader.LoneTensor(*lone_));
    out.push_back(std::move(leaf));
    return out;
  }
  DCPP_RETURN_IF_ERROR(reader.CollectLeaves(*root_, "", 0, out));
  return out;
}

Status TorchSaveArchive::ReadTensorInto(const TorchSaveTensorRef& ref, const Shape& src_offsets,
                                        const TensorView& dst, const Shape& dst_offsets,
                                        const Shape& sizes) const {
  const size_t rank = ref.shape.size();
  if (src_offsets.size() != rank || sizes.size() != rank || ref.strides.size() != rank) {
    return InvalidArgumentError("reading a box of rank " + std::to_string(sizes.size()) +
                                " from a tensor of shape " + ShapeToString(ref.shape));
  }
  for (size_t i = 0; i < rank; ++i) {
    if (src_offsets[i] < 0 || sizes[i] < 0 || src_offsets[i] > ref.shape[i] ||
        sizes[i] > ref.shape[i] - src_offsets[i]) {
      return InvalidArgumentError("box offsets " + ShapeToString(src_offsets) + " sizes " +
                                  ShapeToString(sizes) + " is outside tensor of shape " +
                                  ShapeToString(ref.shape));
    }
  }
  if (dst.dtype() != ref.dtype) {
    return InvalidArgumentError("reading " + std::string(DTypeName(ref.dtype)) + " into " +
                                std::string(DTypeName(dst.dtype())));
  }
  if (!dst.device().is_cpu()) {
    return InvalidArgumentError("destination on " + dst.device().ToString() + " (CPU only)");
  }
  DCPP_ASSIGN_OR_RETURN(TensorView dview, dst.Narrow(dst_offsets, sizes));
  if (NumElements(sizes) == 0) return Status::Ok();
  const size_t elem = ElementSize(ref.dtype);
  // Element range of the storage the box touches (strides are non-negative).
  int64_t first = ref.storage_offset;
  int64_t last = ref.storage_offset;
  for (size_t i = 0; i < rank; ++i) {
    first += src_offsets[i] * ref.strides[i];
    last += (src_offsets[i] + sizes[i] - 1) * ref.strides[i];
  }
  const uint64_t lo = static_cast<uint64_t>(first) * elem;
  const uint64_t n = static_cast<uint64_t>(last - first + 1) * elem;
  if (lo > ref.record_size || n > ref.record_size - lo) {
    return DataLossError(source_->name() + ": tensor box reaches past storage record \"" + prefix_ +
                         "/data/" + ref.storage_key + "\"");
  }
  auto what = [&] { return "reading record \"" + prefix_ + "/data/" + ref.storage_key + "\""; };
  const TensorView sview(nullptr, ref.dtype, sizes, ref.strides, 0);
  if (sview.is_contiguous() && dview.is_contiguous()) {
    // Both sides are one run of bytes: read straight into the destination.
    Status s = source_->ReadAt(ref.record_offset + lo, dview.data(), n);
    if (!s.ok()) return s.WithContext(what());
    if (big_endian_) SwapBytes(dview.data(), n, ref.dtype);
    return Status::Ok();
  }
  if (const std::byte* mapped = source_->Peek(ref.record_offset + lo, n); mapped && !big_endian_) {
    // Memory-backed source: copy the box out of it directly.
    const TensorView src(const_cast<std::byte*>(mapped), ref.dtype, sizes, ref.strides, 0);
    return CopyRegion(dst, dst_offsets, src, Shape(rank, 0), sizes);
  }
  // A strided box: read it in pieces whose covering byte range is dense enough (at most twice
  // the bytes needed, or small) and bounded (kMaxPiece), splitting the box in halves along its
  // outermost non-trivial dimension until it is. This bounds both the read amplification of a
  // narrow column slice and the memory of the temporary buffer.
  constexpr uint64_t kSmallRead = 256 << 10;
  constexpr uint64_t kMaxPiece = 16 << 20;
  std::shared_ptr<Storage> buffer;
  std::function<Status(const Shape&, const Shape&)> read_box = [&](const Shape& off,
                                                                   const Shape& size) -> Status {
    int64_t a = 0, b = 0;
    for (size_t i = 0; i < rank; ++i) {
      a += off[i] * ref.strides[i];
      b += (off[i] + size[i] - 1) * ref.strides[i];
    }
    const uint64_t piece = static_cast<uint64_t>(b - a + 1) * elem;
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
    const uint64_t at = static_cast<uint64_t>(ref.storage_offset + a) * elem;
    Status s = source_->ReadAt(ref.record_offset + at, buffer->data(), piece);
    if (!s.ok()) return s.WithContext(what());
    if (big_endian_) SwapBytes(buffer->data(), piece, ref.dtype);
    const TensorView src(buffer->data(), ref.dtype, size, ref.strides, 0);
    Shape dst_at(rank);
    for (size_t i = 0; i < rank; ++i) dst_at[i] = dst_offsets[i] + off[i] - src_offsets[i];
    return CopyRegion(dst, dst_at, src, Shape(rank, 0), size);
  };
  return read_box(src_offsets, sizes);
}

// ---- writing ----

namespace {

struct StorageGroup {
  std::shared_ptr<Storage> storage;  // the bytes to write (may be a compacted copy)
  DType dtype = DType::kFloat32;
  uint64_t nbytes = 0;
  std::string key;
  size_t first_tensor = 0;  // index of its first tensor in pickling order
};

struct PlannedTensor {
  Tensor tensor;  // as written: original or compacted
  size_t group = 0;
};

Status CollectTensors(const Value& v, const std::string& path, int depth,
                      std::vector<const Tensor*>& out) {
  if (depth > kMaxDepth) return InvalidArgumentError("value nested deeper than 1000 at " + path);
  auto at = [&](const std::string& part) { return path.empty() ? part : path + "." + part; };
  switch (v.kind()) {
    case Value::Kind::kTensor:
      out.push_back(&v.tensor());
      return Status::Ok();
    case Value::Kind::kShardedTensor:
      return InvalidArgumentError("torch.save cannot hold the sharded tensor at \"" + path + "\"");
    case Value::Kind::kOpaque:
      return InvalidArgumentError("torch.save cannot re-encode the opaque " + v.opaque().type_name +
                                  " object at \"" + path + "\"");
    case Value::Kind::kList:
    case Value::Kind::kTuple:
      for (size_t i = 0; i < v.items().size(); ++i) {
        DCPP_RETURN_IF_ERROR(CollectTensors(v.items()[i], at(std::to_string(i)), depth + 1, out));
      }
      return Status::Ok();
    case Value::Kind::kDict:
      for (const auto& [k, val] : v.dict()) {
        const std::string ks = k.is_str() ? k.as_str() : k.DebugString();
        DCPP_RETURN_IF_ERROR(CollectTensors(k, at(ks), depth + 1, out));
        DCPP_RETURN_IF_ERROR(CollectTensors(val, at(ks), depth + 1, out));
      }
      return Status::Ok();
    default:
      return Status::Ok();
  }
}

// Whether a tensor alone in its storage can be written as is: it starts at 0 and covers the
// storage exactly (contiguous, or a dense permutation such as w.t()).
bool CoversStorageExactly(const Tensor& t) {
  const uint64_t storage_bytes = t.storage()->nbytes();
  return t.storage_offset() == 0 && t.nbytes() == storage_bytes &&
         static_cast<uint64_t>(t.view().StorageElementsNeeded()) * t.view().element_size() ==
             storage_bytes;
}

class PickleBuilder {
 public:
  PickleBuilder(const std::vector<PlannedTensor>& tensors, const std::vector<StorageGroup>& groups)
      : tensors_(tensors), groups_(groups) {}

  PickleRef Build(const Value& v) {
    switch (v.kind()) {
      case Value::Kind::kNone:
        return PickleValue::None();
      case Value::Kind::kBool:
        return PickleValue::Bool(v.as_bool());
      case Value::Kind::kInt:
        return PickleValue::Int(v.as_int());
      case Value::Kind::kFloat:
        return PickleValue::Float(v.as_float());
      case Value::Kind::kStr:
        return PickleValue::Str(v.as_str());
      case Value::Kind::kBytes:
        return PickleValue::Bytes(v.as_bytes());
      case Value::Kind::kList:
      case Value::Kind::kTuple: {
        PickleValue::Items items;
        items.reserve(v.items().size());
        for (const Value& x : v.items()) items.push_back(Build(x));
        return v.is_list() ? PickleValue::List(std::move(items))
                           : PickleValue::Tuple(std::move(items));
      }
      case Value::Kind::kDict: {
        PickleValue::DictItems items;
        items.reserve(v.dict().size());
        for (const auto& [k, val] : v.dict()) {
          PickleRef kp = Build(k);
          items.emplace_back(std::move(kp), Build(val));
        }
        if (!v.is_ordered_dict()) return PickleValue::Dict(std::move(items));
        PickleRef od = EmptyOrderedDict();
        od->object().dict_items = std::move(items);
        return od;
      }
      case Value::Kind::kTensor:
        return BuildTensor(tensors_[next_++]);
      default:
        return PickleValue::None();  // rejected by CollectTensors before building
    }
  }

 private:
  PickleRef EmptyOrderedDict() {
    return PickleValue::Call(PickleValue::MakeGlobal("collections", "OrderedDict"),
                             PickleValue::Tuple());
  }

  // A storage's key is one Python str object, so its later uses are BINGETs too.
  PickleRef KeyNode(size_t group) {
    if (key_nodes_.size() <= group) key_nodes_.resize(groups_.size());
    if (!key_nodes_[group]) key_nodes_[group] = PickleValue::Str(groups_[group].key);
    return key_nodes_[group];
  }

  PickleRef BuildTensor(const PlannedTensor& p) {
    const StorageGroup& g = groups_[p.group];
    const Tensor& t = p.tensor;
    const std::string_view storage_class = StorageClassName(g.dtype);
    const bool v3 = storage_class.empty();
    PickleRef pid = PickleValue::PersistentId(PickleValue::Tuple({
        storage_str_,
        // As PyTorch pickles it (the class's own module); torch.load(weights_only=True) allows
        // only that name for the untyped storage.
        v3 ? PickleValue::MakeGlobal("torch.storage", "UntypedStorage")
           : PickleValue::MakeGlobal("torch", std::string(storage_class)),
        KeyNode(p.group),
        cpu_str_,
        PickleValue::Int(static_cast<int64_t>(v3 ? g.nbytes : g.nbytes / ElementSize(g.dtype))),
    }));
    PickleValue::Items size, stride;
    for (int64_t s : t.shape()) size.push_back(PickleValue::Int(s));
    for (int64_t s : t.strides()) stride.push_back(PickleValue::Int(s));
    PickleValue::Items args = {pid,
                               PickleValue::Int(t.storage_offset()),
                               PickleValue::Tuple(std::move(size)),
                               PickleValue::Tuple(std::move(stride)),
                               PickleValue::Bool(false),
                               EmptyOrderedDict()};
    if (v3) args.push_back(PickleValue::MakeGlobal("torch", std::string(DTypeName(t.dtype()))));
    return PickleValue::Call(
        PickleValue::MakeGlobal("torch._utils", v3 ? "_rebuild_tensor_v3" : "_rebuild_tensor_v2"),
        PickleValue::Tuple(std::move(args)));
  }

  const std::vector<PlannedTensor>& tensors_;
  const std::vector<StorageGroup>& groups_;
  size_t next_ = 0;
  // One node each, as Python pickles one (interned) object: later uses become BINGETs, which
  // makes data.pkl byte-identical to PyTorch's for plain trees of tensors.
  const PickleRef storage_str_ = PickleValue::Str("storage");
  const PickleRef cpu_str_ = PickleValue::Str("cpu");
  std::vector<PickleRef> key_nodes_;
};

// PyTorch's serialization id: a combined hash of the record names and a combined hash of their
// CRCs, 20 decimal digits each. Readers never check it; it only has to be well-formed.
uint64_t NameHash(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

std::string SerializationId(const std::vector<uint64_t>& name_hashes,
                            const std::vector<uint32_t>& crcs) {
  auto combine = [](uint64_t seed, uint64_t h) {
    return seed ^ (h + 0x9e3779b97f4a7c15ull + (seed << 6) + (seed >> 2));
  };
  uint64_t name_hash = 0;
  for (uint64_t h : name_hashes) name_hash = combine(name_hash, h);
  uint64_t crc_hash = 0;
  for (uint32_t c : crcs) crc_hash = combine(crc_hash, c);
  char buf[48];
  std::snprintf(buf, sizeof(buf), "%020llu%020llu", static_cast<unsigned long long>(name_hash),
                static_cast<unsigned long long>(crc_hash));
  return buf;
}

// data.pkl of a lone tensor covering its storage "0" exactly, emitted without building the
// pickle tree: the opcodes WritePickle writes for PickleBuilder's tree of it, in the same order
// (PROTO 2; every str, tuple and REDUCE result memoized; globals by value). torch_save_test
// compares the two for many dtypes and shapes.
Result<std::string> EmitLoneTensorPickle(DType dtype, const Shape& shape, const Shape& strides,
                                         int64_t storage_offset, int64_t numel) {
  constexpr uint8_t kBinPersId = 'Q';
  const std::string_view storage_class = StorageClassName(dtype);
  const bool v3 = storage_class.empty();
  PickleEmitter e(2);
  e.Reserve(256);
  auto ints = [&](const Shape& values) {
    if (values.empty()) return e.EmptyTuple();  // CPython does not memoize ()
    if (values.size() > 3) e.Mark();
    for (int64_t v : values) e.Int(v);
    e.TupleEnd(values.size());
  };
  // Each global appears once here, so none needs the emitter's lookup table (a fresh emitter
  // per tensor item filled it with three names and their allocations).
  e.GlobalOnce("torch._utils", v3 ? "_rebuild_tensor_v3" : "_rebuild_tensor_v2");
  e.Mark();  // the arguments: 6 or 7 items
  e.Mark();  // the persistent id: ('storage', class, key, location, numel)
  e.Str("storage");
  if (v3) {
    e.GlobalOnce("torch.storage", "UntypedStorage");
  } else {
    e.GlobalOnce("torch", storage_class);
  }
  e.Str("0");
  e.Str("cpu");
  e.Int(numel);
  e.TupleEnd(5);
  e.Op(kBinPersId);
  e.Int(storage_offset);
  ints(shape);
  ints(strides);
  e.Bool(false);
  e.GlobalOnce("collections", "OrderedDict");  // OrderedDict(): the backward hooks
  e.EmptyTuple();
  e.Reduce();
  e.Memoize();
  if (v3) e.GlobalOnce("torch", DTypeName(dtype));
  e.TupleEnd(v3 ? 7 : 6);
  e.Reduce();
  e.Memoize();
  return e.Finish();
}

// Steps 1 and 2 of WriteTorchSave: the tensors' storage groups, the tensors as written, and
// data.pkl. A lone tensor that covers its storage exactly (every DCP tensor item) takes a
// direct path unless `via_tree`.
Status PlanRecords(const Value& value, const TorchSaveWriteOptions& options, bool via_tree,
                   std::vector<PlannedTensor>& planned, std::vector<StorageGroup>& groups,
                   std::string& pkl) {
  if (!via_tree && !options.materialize && value.is_tensor() && value.tensor().defined() &&
      value.tensor().storage()->device().is_cpu() && CoversStorageExactly(value.tensor())) {
    const Tensor& t = value.tensor();
    StorageGroup g;
    g.storage = t.storage();
    g.dtype = t.dtype();
    g.nbytes = t.storage()->nbytes();
    g.key = "0";
    groups.push_back(std::move(g));
    planned.push_back({t, 0});
    const uint64_t nbytes = groups[0].nbytes;
    const bool v3 = StorageClassName(t.dtype()).empty();
    DCPP_ASSIGN_OR_RETURN(
        pkl,
        EmitLoneTensorPickle(t.dtype(), t.shape(), t.strides(), t.storage_offset(),
                             static_cast<int64_t>(v3 ? nbytes : nbytes / ElementSize(t.dtype()))));
    return Status::Ok();
  }
  // 1. Tensors in pickling order, grouped by storage.
  std::vector<const Tensor*> found;
  DCPP_RETURN_IF_ERROR(CollectTensors(value, "", 0, found));
  std::unordered_map<const Storage*, std::vector<size_t>> users;
  std::vector<const Storage*> order;
  for (size_t i = 0; i < found.size(); ++i) {
    const Tensor& t = *found[i];
    if (!t.defined()) return InvalidArgumentError("undefined tensor in the value to save");
    if (!t.storage()->device().is_cpu()) {
      return InvalidArgumentError("torch.save of a tensor on " + t.storage()->device().ToString() +
                                  " (CPU memory only)");
    }
    auto [it, inserted] = users.try_emplace(t.storage().get());
    if (inserted) order.push_back(t.storage().get());
    it->second.push_back(i);
  }
  planned.resize(found.size());
  groups.reserve(order.size());
  for (const Storage* s : order) {
    const std::vector<size_t>& idx = users[s];
    StorageGroup g;
    g.key = std::to_string(groups.size());
    g.first_tensor = idx[0];
    const Tensor& first = *found[idx[0]];
    g.dtype = first.dtype();
    if (options.materialize && (idx.size() != 1 || !CoversStorageExactly(first))) {
      return InvalidArgumentError(
          "streaming torch.save needs tensors that own their storage alone and cover it exactly");
    }
    if (idx.size() == 1) {
      Tensor t = CoversStorageExactly(first) ? first : first.Clone();
      g.storage = t.storage();
      g.nbytes = t.storage()->nbytes();
      planned[idx[0]] = {std::move(t), groups.size()};
    } else {
      for (size_t i : idx) {
        if (found[i]->dtype() != g.dtype) {
          return InvalidArgumentError(
              "torch.save of tensors viewing one storage as " + std::string(DTypeName(g.dtype)) +
              " and " + std::string(DTypeName(found[i]->dtype())) + " (PyTorch refuses this too)");
        }
        planned[i] = {*found[i], groups.size()};
      }
      g.storage = first.storage();
      const size_t elem = ElementSize(g.dtype);
      g.nbytes = first.storage()->nbytes() / elem * elem;  // whole elements of the storage
    }
    groups.push_back(std::move(g));
  }

  // 2. data.pkl.
  PickleBuilder builder(planned, groups);
  PickleRef root = builder.Build(value);
  PickleWriteOptions pickle_options;
  pickle_options.protocol = 2;
  DCPP_ASSIGN_OR_RETURN(pkl, WritePickle(*root, pickle_options));
  return Status::Ok();
}

}  // namespace

Status WriteTorchSave(const Value& value, ByteSink& sink, const TorchSaveWriteOptions& options) {
  if (options.archive_name.empty() || options.archive_name.find('/') != std::string::npos) {
    return InvalidArgumentError("torch.save archive name \"" + options.archive_name +
                                "\" must be non-empty and without '/'");
  }
  std::vector<PlannedTensor> planned;
  std::vector<StorageGroup> groups;
  std::string pkl;
  DCPP_RETURN_IF_ERROR(PlanRecords(value, options, /*via_tree=*/false, planned, groups, pkl));

  // 3. Records.
  internal::ZipWriterOptions zip_options;
  zip_options.compute_crc32 = options.compute_crc32;
  internal::ZipWriter zip(sink, zip_options);
  const std::string dir = options.archive_name + "/";
  std::vector<uint64_t> name_hashes;  // for the serialization id
  name_hashes.reserve(8);
  std::string full = dir;
  auto add = [&](std::string_view name, const void* data, size_t n) {
    full.resize(dir.size());
    full.append(name);
    name_hashes.push_back(NameHash(full));
    return zip.AddRecord(full, data, n);
  };
  auto add_str = [&](const std::string& name, std::string_view s) {
    return add(name, s.data(), s.size());
  };
  DCPP_RETURN_IF_ERROR(add_str("data.pkl", pkl));
  if (options.modern_records) {
    DCPP_RETURN_IF_ERROR(add_str(".format_version", "1"));
    DCPP_RETURN_IF_ERROR(add_str(".storage_alignment", "64"));
    DCPP_RETURN_IF_ERROR(add_str("byteorder", "little"));
  }
  // Storage records in key order: numeric with `.format_version` 1 (PyTorch 2.x), lexicographic
  // before it ("10" before "2"), as torch 1.13 writes them.
  std::vector<const StorageGroup*> record_order;
  for (const StorageGroup& g : groups) record_order.push_back(&g);
  if (!options.modern_records) {
    std::sort(record_order.begin(), record_order.end(),
              [](const StorageGroup* a, const StorageGroup* b) { return a->key < b->key; });
  }
  for (const StorageGroup* g : record_order) {
    if (!options.materialize) {
      DCPP_RETURN_IF_ERROR(add("data/" + g->key, g->storage->data(), g->nbytes));
      continue;
    }
    const Tensor& placeholder = planned[g->first_tensor].tensor;
    DCPP_ASSIGN_OR_RETURN(Tensor real, options.materialize(placeholder));
    if (real.dtype() != placeholder.dtype() || real.shape() != placeholder.shape()) {
      return InternalError("materialized tensor " + real.view().DebugString() +
                           " does not match its placeholder " + placeholder.view().DebugString());
    }
    if (!real.is_contiguous() || !placeholder.is_contiguous()) real = real.Clone();
    DCPP_RETURN_IF_ERROR(add("data/" + g->key, real.data(), g->nbytes));
  }
  DCPP_RETURN_IF_ERROR(add_str("version", "3\n"));
  if (options.modern_records) {
    DCPP_RETURN_IF_ERROR(
        add_str(".data/serialization_id", SerializationId(name_hashes, zip.crcs())));
  }
  return zip.Finish();
}

namespace internal {

Result<std::string> TorchSavePickle(const Value& value, bool via_tree) {
  std::vector<PlannedTensor> planned;
  std::vector<StorageGroup> groups;
  std::string pkl;
  DCPP_RETURN_IF_ERROR(PlanRecords(value, {}, via_tree, planned, groups, pkl));
  return pkl;
}

}  // namespace internal

Result<std::string> EncodeTorchSave(const Value& value, const TorchSaveWriteOptions& options) {
  StringSink sink;
  DCPP_RETURN_IF_ERROR(WriteTorchSave(value, sink, options));
  return sink.Release();
}

}  // namespace dcpp
