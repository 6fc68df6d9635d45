// The `.metadata` codec: PickleValue trees <-> dcpp::Metadata.
//
// Reading accepts every class path PyTorch has used for these classes (the class is matched by
// its name; the module only has to be one of the known ones) and both enum and pathlib pickle
// forms. Writing emits protocol-4 pickles that mirror what CPython's pickler produces for the
// dataclasses (cls () NEWOBJ, then BUILD with the field dict), so Python sees ordinary objects.
#include "dcpp/metadata.h"

#include <algorithm>
#include <array>
#include <map>
#include <utility>

#include "codec/decode_budget.h"
#include "codec/metadata_encoder.h"
#include "codec/metadata_reader.h"
#include "codec/pickle.h"

namespace dcpp {

std::string MetadataIndex::ToString() const {
  if (!offset) return fqn;
  return fqn + "@" + ShapeToString(*offset);
}

namespace {
uint64_t KeyHash(std::string_view s) { return std::hash<std::string_view>{}(s); }
// Positions take 32 bits: 2^32 entries would need hundreds of GB, past any decode budget.
constexpr uint64_t kPositionBits = 0xffffffffu;
}  // namespace

size_t StateDictMetadata::Probe(std::string_view fqn, uint64_t h) const {
  const size_t mask = slots_.size() - 1;
  const uint64_t tag = h >> 32;
  for (size_t i = static_cast<size_t>(h) & mask;; i = (i + 1) & mask) {
    const uint64_t slot = slots_[i];
    if (slot == 0) return i;
    if ((slot >> 32) == tag && entries_[(slot & kPositionBits) - 1].first == fqn) return i;
  }
}

void StateDictMetadata::Rehash(size_t n) {
  size_t size = 16;
  while (size < 2 * n) size *= 2;
  if (size <= slots_.size()) return;
  slots_.assign(size, 0);
  for (size_t e = 0; e < entries_.size(); ++e) {
    const uint64_t h = KeyHash(entries_[e].first);
    slots_[Probe(entries_[e].first, h)] = (h & ~kPositionBits) | (e + 1);
  }
}

StorageMetadata& StateDictMetadata::operator[](const std::string& fqn) {
  const uint64_t h = KeyHash(fqn);
  if (slots_.empty()) Rehash(1);
  size_t i = Probe(fqn, h);
  if (slots_[i] != 0) return entries_[(slots_[i] & kPositionBits) - 1].second;
  if (2 * (entries_.size() + 1) > slots_.size()) {
    Rehash(entries_.size() + 1);
    i = Probe(fqn, h);
  }
  entries_.emplace_back(fqn, BytesStorageMetadata{});
  slots_[i] = (h & ~kPositionBits) | entries_.size();
  return entries_.back().second;
}

const StorageMetadata* StateDictMetadata::Find(std::string_view fqn) const {
  if (slots_.empty()) return nullptr;
  const uint64_t slot = slots_[Probe(fqn, KeyHash(fqn))];
  return slot == 0 ? nullptr : &entries_[(slot & kPositionBits) - 1].second;
}

StorageMetadata* StateDictMetadata::Find(std::string_view fqn) {
  return const_cast<StorageMetadata*>(std::as_const(*this).Find(fqn));
}

Result<const StorageInfo*> Metadata::FindStorage(const MetadataIndex& index) const {
  auto it = storage_data.find(index);
  if (it == storage_data.end()) {
    return NotFoundError("no storage entry for \"" + index.ToString() + "\" in metadata");
  }
  return &it->second;
}

namespace {

// ---------------------------------------------------------------- parsing

using Items = PickleValue::Items;
using Kind = PickleValue::Kind;

using internal::CostShape;
using internal::CostStr;
using internal::DecodeBudget;
using internal::kCostEntry;
using internal::kCostPathPart;
using internal::kMetaModules;
using internal::kPropertiesModules;
using internal::kStorageInfoModules;

template <size_t N>
bool InModules(std::string_view module, const std::string_view (&modules)[N]) {
  return std::find(std::begin(modules), std::end(modules), module) != std::end(modules);
}

// The class global of an object node, or nullptr.
const PickleValue::Global* ClassOf(const PickleValue& v) {
  if (!v.is(Kind::kObject)) return nullptr;
  const PickleRef& c = v.object().callable;
  if (!c || !c->is(Kind::kGlobal)) return nullptr;
  return &c->global();
}

template <size_t N>
bool IsClass(const PickleValue& v, std::string_view name, const std::string_view (&modules)[N]) {
  const auto* g = ClassOf(v);
  return g && g->name == name && InModules(g->module, modules);
}

Status Bad(std::string_view what, const PickleValue& v) {
  return DataLossError("metadata: expected " + std::string(what) + ", found " + v.DebugString(2));
}

// Field dict of a dataclass object (BUILD state), possibly absent (all defaults).
const PickleValue* StateDict(const PickleValue& obj) {
  const PickleRef& s = obj.object().state;
  if (!s) return nullptr;
  if (s->is(Kind::kDict)) return s.get();
  // (dict_state, slot_state) form
  if (s->is(Kind::kTuple) && s->items().size() == 2 && s->items()[0] &&
      s->items()[0]->is(Kind::kDict)) {
    return s->items()[0].get();
  }
  return nullptr;
}

const PickleValue* Field(const PickleValue& obj, std::string_view name) {
  const PickleValue* st = StateDict(obj);
  if (!st) return nullptr;
  const PickleValue* f = st->FindStrKey(name);
  if (f && f->is(Kind::kNone)) return nullptr;
  return f;
}

// Every string and shape copied into the Metadata is charged to `budget` before it is made (a
// memo-shared value is copied once per reference); the direct decoder charges the same amounts.
Status Charge(DecodeBudget& budget, uint64_t units) {
  return budget.Take(units) ? Status::Ok() : budget.Exceeded();
}

Result<Shape> ParseSize(const PickleValue& v, DecodeBudget& budget) {
  const PickleValue* tuple = &v;
  // torch.Size((a, b)) arrives as Call(torch.Size, ((a, b),)).
  if (v.IsCallOf("torch", "Size")) {
    const PickleRef& args = v.object().args;
    if (!args || !args->is(Kind::kTuple) || args->items().size() != 1) return Bad("torch.Size", v);
    tuple = args->items()[0].get();
  }
  if (!tuple || !(tuple->is(Kind::kTuple) || tuple->is(Kind::kList))) return Bad("a size", v);
  DCPP_RETURN_IF_ERROR(Charge(budget, CostShape(tuple->items().size())));
  Shape out;
  out.reserve(tuple->items().size());
  for (const auto& x : tuple->items()) {
    DCPP_ASSIGN_OR_RETURN(int64_t i, x->GetInt());
    if (i < 0) return DataLossError("metadata: negative size or offset " + std::to_string(i));
    out.push_back(i);
  }
  return out;
}

Result<DType> ParseDType(const PickleValue& v) {
  if (!v.is(Kind::kGlobal) || v.global().module != "torch") return Bad("a torch dtype", v);
  auto d = DTypeFromName(v.global().name);
  if (!d.ok()) return DataLossError("metadata: " + std::string(d.status().message()));
  return *d;
}

Result<MemoryFormat> ParseMemFormat(const PickleValue& v) {
  // Enum(value) form.
  if (const auto* g = ClassOf(v)) {
    if ((g->name == "_MEM_FORMAT_ENCODING" || g->name == "MEM_FORMAT_ENCODING") &&
        v.object().args && v.object().args->items().size() == 1) {
      DCPP_ASSIGN_OR_RETURN(int64_t i, v.object().args->items()[0]->GetInt());
      if (i < 0 || i > 2) return DataLossError("metadata: memory format " + std::to_string(i));
      return static_cast<MemoryFormat>(i);
    }
    // getattr(Enum, "TORCH_CONTIGUOUS_FORMAT") form (CPython 3.11.2).
    if (g->module == "builtins" && g->name == "getattr" && v.object().args &&
        v.object().args->items().size() == 2) {
      DCPP_ASSIGN_OR_RETURN(std::string_view member, v.object().args->items()[1]->GetStr());
      if (member == "TORCH_CONTIGUOUS_FORMAT") return MemoryFormat::kContiguous;
      if (member == "TORCH_CHANNELS_LAST") return MemoryFormat::kChannelsLast;
      if (member == "TORCH_PRESERVE_FORMAT") return MemoryFormat::kPreserve;
      return DataLossError("metadata: memory format " + std::string(member));
    }
  }
  return Bad("a memory format enum", v);
}

Status CheckLayout(const PickleValue& v) {
  if (v.IsCallOf("torch.serialization", "_get_layout") && v.object().args &&
      v.object().args->items().size() == 1) {
    DCPP_ASSIGN_OR_RETURN(std::string_view name, v.object().args->items()[0]->GetStr());
    if (name == "torch.strided") return Status::Ok();
    return UnimplementedError("metadata: tensor layout " + std::string(name) +
                              " is not supported (only torch.strided)");
  }
  if (v.is(Kind::kGlobal) && v.global().module == "torch" && v.global().name == "strided") {
    return Status::Ok();
  }
  return Bad("a tensor layout", v);
}

Result<TensorProperties> ParseProperties(const PickleValue& v, DecodeBudget& budget) {
  if (!IsClass(v, "TensorProperties", kPropertiesModules)) return Bad("TensorProperties", v);
  TensorProperties p;
  const PickleRef& s = v.object().state;
  if (s && s->is(Kind::kTuple)) {
    const Items& t = s->items();
    if (t.size() != 5 && t.size() != 6) {
      return DataLossError("metadata: TensorProperties state has " + std::to_string(t.size()) +
                           " fields, expected 5 or 6");
    }
    DCPP_ASSIGN_OR_RETURN(p.dtype, ParseDType(*t[0]));
    DCPP_RETURN_IF_ERROR(CheckLayout(*t[1]));
    DCPP_ASSIGN_OR_RETURN(p.requires_grad, t[2]->GetBool());
    DCPP_ASSIGN_OR_RETURN(p.memory_format, ParseMemFormat(*t[3]));
    DCPP_ASSIGN_OR_RETURN(p.pin_memory, t[4]->GetBool());
    if (t.size() == 6 && !t[5]->is(Kind::kNone)) {
      DCPP_ASSIGN_OR_RETURN(p.strides, ParseSize(*t[5], budget));
    }
    return p;
  }
  // A plain field dict (no __getstate__): dtype etc. by name.
  if (const PickleValue* d = Field(v, "dtype")) {
    DCPP_ASSIGN_OR_RETURN(p.dtype, ParseDType(*d));
  }
  if (const PickleValue* r = Field(v, "requires_grad")) {
    DCPP_ASSIGN_OR_RETURN(p.requires_grad, r->GetBool());
  }
  if (const PickleValue* pm = Field(v, "pin_memory")) {
    DCPP_ASSIGN_OR_RETURN(p.pin_memory, pm->GetBool());
  }
  return p;
}

Result<TensorStorageMetadata> ParseTensorMetadata(const PickleValue& v, DecodeBudget& budget) {
  TensorStorageMetadata out;
  const PickleValue* props = Field(v, "properties");
  const PickleValue* size = Field(v, "size");
  const PickleValue* chunks = Field(v, "chunks");
  if (!props || !size || !chunks) return Bad("TensorStorageMetadata fields", v);
  DCPP_ASSIGN_OR_RETURN(out.properties, ParseProperties(*props, budget));
  DCPP_ASSIGN_OR_RETURN(out.size, ParseSize(*size, budget));
  DCPP_ASSIGN_OR_RETURN(const Items* list, chunks->GetList());
  // Reserved only as far as the budget reaches: the list may be one shared by many keys.
  out.chunks.reserve(std::min<uint64_t>(list->size(), budget.left() / internal::CostChunk(0, 0)));
  for (const auto& c : *list) {
    if (!IsClass(*c, "ChunkStorageMetadata", kMetaModules)) return Bad("ChunkStorageMetadata", *c);
    const PickleValue* off = Field(*c, "offsets");
    const PickleValue* sz = Field(*c, "sizes");
    if (!off || !sz) return Bad("ChunkStorageMetadata fields", *c);
    ChunkBox box;
    DCPP_ASSIGN_OR_RETURN(box.offsets, ParseSize(*off, budget));
    DCPP_ASSIGN_OR_RETURN(box.sizes, ParseSize(*sz, budget));
    out.chunks.push_back(std::move(box));
  }
  return out;
}

Result<MetadataIndex> ParseIndex(const PickleValue& v, DecodeBudget& budget) {
  if (!IsClass(v, "MetadataIndex", kMetaModules)) return Bad("MetadataIndex", v);
  MetadataIndex idx;
  const PickleValue* fqn = Field(v, "fqn");
  if (!fqn) return Bad("MetadataIndex.fqn", v);
  DCPP_ASSIGN_OR_RETURN(std::string_view f, fqn->GetStr());
  DCPP_RETURN_IF_ERROR(Charge(budget, kCostEntry + CostStr(f.size())));
  idx.fqn = std::string(f);
  if (const PickleValue* off = Field(v, "offset")) {
    DCPP_ASSIGN_OR_RETURN(idx.offset, ParseSize(*off, budget));
  }
  if (const PickleValue* i = Field(v, "index")) {
    DCPP_ASSIGN_OR_RETURN(idx.index, i->GetInt());
  }
  return idx;
}

Result<StorageInfo> ParseStorageInfo(const PickleValue& v, DecodeBudget& budget) {
  if (!IsClass(v, "_StorageInfo", kStorageInfoModules)) return Bad("_StorageInfo", v);
  StorageInfo info;
  const PickleValue* path = Field(v, "relative_path");
  const PickleValue* off = Field(v, "offset");
  const PickleValue* len = Field(v, "length");
  if (!path || !off || !len) return Bad("_StorageInfo fields", v);
  DCPP_ASSIGN_OR_RETURN(std::string_view p, path->GetStr());
  DCPP_RETURN_IF_ERROR(Charge(budget, CostStr(p.size())));
  info.relative_path = std::string(p);
  DCPP_ASSIGN_OR_RETURN(info.offset, off->GetInt());
  DCPP_ASSIGN_OR_RETURN(info.length, len->GetInt());
  if (info.offset < 0 || info.length < 0) {
    return DataLossError("metadata: negative offset or length for \"" + info.relative_path + "\"");
  }
  if (const PickleValue* t = Field(v, "transform_descriptors")) {
    const Items* list = nullptr;
    if (t->is(Kind::kList)) list = &t->items();
    if (t->is(Kind::kTuple)) list = &t->items();
    if (!list) return Bad("a list of transform descriptors", *t);
    for (const auto& d : *list) {
      DCPP_ASSIGN_OR_RETURN(std::string_view s, d->GetStr());
      DCPP_RETURN_IF_ERROR(Charge(budget, CostStr(s.size())));
      info.transform_descriptors.emplace_back(s);
    }
  }
  return info;
}

// checkpoint_id may be a str or a pathlib path object.
Result<std::optional<std::string>> ParseCheckpointId(const PickleValue& v, DecodeBudget& budget) {
  if (v.is(Kind::kNone)) return std::optional<std::string>();
  if (v.is(Kind::kStr)) {
    DCPP_RETURN_IF_ERROR(Charge(budget, CostStr(v.as_str().size())));
    return std::optional<std::string>(v.as_str());
  }
  if (const auto* g = ClassOf(v)) {
    if ((g->module == "pathlib" || g->module == "pathlib._local") &&
        (g->name == "PosixPath" || g->name == "PurePosixPath" || g->name == "Path") &&
        v.object().args) {
      // The parts of a path are charged one by one (a part may be one string many times).
      DCPP_RETURN_IF_ERROR(Charge(budget, CostStr(0)));
      std::string out;
      for (const auto& part : v.object().args->items()) {
        DCPP_ASSIGN_OR_RETURN(std::string_view s, part->GetStr());
        DCPP_RETURN_IF_ERROR(Charge(budget, s.size() + 1));
        if (!out.empty() && out.back() != '/') out += '/';
        out += s;
      }
      return std::optional<std::string>(out);
    }
  }
  return Bad("a checkpoint id (str or path)", v);
}

Result<StorageMeta> ParseStorageMeta(const PickleValue& v, DecodeBudget& budget) {
  if (!IsClass(v, "StorageMeta", kMetaModules)) return Bad("StorageMeta", v);
  StorageMeta m;
  if (const PickleValue* id = Field(v, "checkpoint_id")) {
    DCPP_ASSIGN_OR_RETURN(m.checkpoint_id, ParseCheckpointId(*id, budget));
  }
  for (auto [name, dst] : {std::pair{"save_id", &m.save_id}, std::pair{"load_id", &m.load_id}}) {
    if (const PickleValue* f = Field(v, name)) {
      DCPP_ASSIGN_OR_RETURN(std::string_view s, f->GetStr());
      DCPP_RETURN_IF_ERROR(Charge(budget, CostStr(s.size())));
      *dst = std::string(s);
    }
  }
  if (const PickleValue* mods = Field(v, "modules")) {
    DCPP_ASSIGN_OR_RETURN(const Items* list, mods->GetList());
    for (const auto& x : *list) {
      DCPP_ASSIGN_OR_RETURN(std::string_view s, x->GetStr());
      DCPP_RETURN_IF_ERROR(Charge(budget, CostStr(s.size())));
      m.modules.emplace_back(s);
    }
  }
  return m;
}

// planner_data of DefaultSavePlanner: {fqn: (str | int, ...)}. Anything else is dropped.
using PlannerData = std::optional<std::map<std::string, ObjectPath>>;

Result<PlannerData> ParsePlannerData(const PickleValue& v, DecodeBudget& budget) {
  if (!v.is(Kind::kDict)) return PlannerData();
  std::map<std::string, ObjectPath> out;
  for (const auto& [k, path] : v.dict_items()) {
    if (!k->is(Kind::kStr) || !(path->is(Kind::kTuple) || path->is(Kind::kList))) {
      return PlannerData();
    }
    DCPP_RETURN_IF_ERROR(Charge(budget, kCostEntry + CostStr(k->as_str().size())));
    ObjectPath p;
    for (const auto& part : path->items()) {
      if (part->is(Kind::kStr)) {
        DCPP_RETURN_IF_ERROR(Charge(budget, kCostPathPart + part->as_str().size()));
        p.emplace_back(part->as_str());
      } else if (part->is(Kind::kInt)) {
        DCPP_RETURN_IF_ERROR(Charge(budget, kCostPathPart));
        p.emplace_back(part->as_int());
      } else {
        return PlannerData();
      }
    }
    out.emplace(k->as_str(), std::move(p));
  }
  return out;
}

Result<Metadata> ParseRoot(const PickleValue& root, DecodeBudget& budget) {
  if (!IsClass(root, "Metadata", kMetaModules)) return Bad("a Metadata object", root);
  Metadata md;
  const PickleValue* sdm = Field(root, "state_dict_metadata");
  if (!sdm) return Bad("Metadata.state_dict_metadata", root);
  DCPP_ASSIGN_OR_RETURN(const PickleValue::DictItems* entries, sdm->GetDict());
  for (const auto& [k, v] : *entries) {
    DCPP_ASSIGN_OR_RETURN(std::string_view fqn, k->GetStr());
    if (md.state_dict_metadata.Find(fqn)) {
      return DataLossError("metadata: duplicate key \"" + std::string(fqn) + "\"");
    }
    if (!budget.Take(kCostEntry + CostStr(fqn.size()))) {
      return budget.Exceeded().WithContext("metadata: key \"" + std::string(fqn) + "\"");
    }
    if (IsClass(*v, "BytesStorageMetadata", kMetaModules)) {
      md.state_dict_metadata[std::string(fqn)] = BytesStorageMetadata{};
    } else if (IsClass(*v, "TensorStorageMetadata", kMetaModules)) {
      auto t = ParseTensorMetadata(*v, budget);
      if (!t.ok()) return t.status().WithContext("metadata: key \"" + std::string(fqn) + "\"");
      md.state_dict_metadata[std::string(fqn)] = std::move(*t);
    } else {
      return Bad("storage metadata for \"" + std::string(fqn) + "\"", *v);
    }
  }
  if (const PickleValue* pd = Field(root, "planner_data")) {
    auto planner = ParsePlannerData(*pd, budget);
    if (!planner.ok()) return planner.status().WithContext("metadata: planner_data");
    md.planner_data = std::move(*planner);
  }
  if (const PickleValue* sd = Field(root, "storage_data")) {
    DCPP_ASSIGN_OR_RETURN(const PickleValue::DictItems* items, sd->GetDict());
    for (const auto& [k, v] : *items) {
      auto index = ParseIndex(*k, budget);
      if (!index.ok()) return index.status().WithContext("metadata: storage_data");
      MetadataIndex& idx = *index;
      auto info = ParseStorageInfo(*v, budget);
      if (!info.ok()) {
        return info.status().WithContext("metadata: storage of \"" + idx.ToString() + "\"");
      }
      md.storage_data[idx] = std::move(*info);  // later entries win, as in Python
    }
  }
  if (const PickleValue* sm = Field(root, "storage_meta")) {
    auto meta = ParseStorageMeta(*sm, budget);
    if (!meta.ok()) return meta.status().WithContext("metadata: storage_meta");
    md.storage_meta = std::move(*meta);
  }
  if (const PickleValue* ver = Field(root, "version")) {
    DCPP_ASSIGN_OR_RETURN(std::string_view s, ver->GetStr());
    if (!budget.Take(CostStr(s.size()))) return budget.Exceeded().WithContext("metadata: version");
    md.version = std::string(s);
  }
  return md;
}

// ---------------------------------------------------------------- encoding

struct Paths {
  std::string meta;
  std::string storage_info;
  std::string properties;
};

Paths PathsFor(MetadataFlavor f) {
  if (f == MetadataFlavor::kTorch113Prototype) {
    return {"torch.distributed._shard.checkpoint.metadata",
            "torch.distributed._shard.checkpoint.filesystem",
            "torch.distributed._shard.sharded_tensor.metadata"};
  }
  return {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
          "torch.distributed._shard.sharded_tensor.metadata"};
}

// Writes the `.metadata` pickle straight from a Metadata, opcode by opcode, without building a
// PickleValue tree: the bytes are those WritePickle gives for the tree of dataclass objects
// (cls () NEWOBJ, then the field dict BUILD), so each function below mirrors one kind of node:
// Boundary() where the tree writer starts a value, a memo entry wherever it memoizes one.
// Globals keep their memo index in a slot, so a repeated class costs one BINGET and no lookup.
class Encoder {
 public:
  Encoder(MetadataFlavor flavor, int protocol)
      : flavor_(flavor), paths_(PathsFor(flavor)), e_(protocol) {
    dtype_slots_.fill(-1);
  }

  Result<std::string> Encode(const Metadata& md) {
    Begin(md);
    return End(md);
  }

  // The root object up to its storage_data field: what a save knows once its global plan is
  // made. End writes the rest; together they write exactly what Root's recursion would (the
  // root's field dict is one MARK ... SETITEMS batch, as CPython writes 3-5 items).
  void Begin(const Metadata& md) {
    // Every item costs ~150 bytes; reserving avoids most regrowth of a large output.
    size_t chunks = 0;
    for (const auto& [fqn, m] : md.state_dict_metadata) {
      if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) chunks += t->chunks.size();
    }
    e_.Reserve(1024 + 80 * chunks + 200 * std::max(chunks, md.storage_data.size()));
    Slot root_slot = -1;
    e_.Boundary();
    Global(paths_.meta, "Metadata", &root_slot);
    e_.Boundary();
    e_.EmptyTuple();
    e_.NewObj();
    e_.Memoize();
    e_.Boundary();
    e_.EmptyDict();
    e_.Mark();
    Key("state_dict_metadata");
    StateDictMetadataDict(md.state_dict_metadata);
    Key("planner_data");
    PlannerData(md.planner_data);
  }

  Result<std::string> End(const Metadata& md) {
    Key("storage_data");
    StorageData(md.storage_data);
    if (flavor_ == MetadataFlavor::kTorch2 && md.storage_meta) {
      Key("storage_meta");
      StorageMetaObject(*md.storage_meta);
    }
    if (flavor_ != MetadataFlavor::kTorch113Prototype) {
      Key("version");
      OptStr(md.version);
    }
    e_.SetItems();
    e_.Build();
    return e_.Finish();
  }

 private:
  using Slot = int64_t;

  void Global(std::string_view module, std::string_view name, Slot* slot) {
    e_.Boundary();
    e_.Global(module, name, slot);
  }
  void Key(std::string_view name) {
    e_.Boundary();
    e_.Str(name);
  }
  void StrValue(std::string_view s) {
    e_.Boundary();
    if (!e_.proto4() && s.size() > 0xffffffffu) {
      e_.Fail(InvalidArgumentError("str too long for protocol 2"));
      return;
    }
    e_.Str(s);
  }
  void IntValue(int64_t v) {
    e_.Boundary();
    e_.Int(v);
  }
  void OptStr(const std::optional<std::string>& s) {
    if (s) return StrValue(*s);
    e_.Boundary();
    e_.None();
  }

  // A dataclass object: cls () NEWOBJ, then, when it has fields, {name: value, ...} BUILD;
  // `field(i)` writes field i's key and value.
  template <typename F>
  void DataObject(std::string_view module, std::string_view name, Slot* slot, size_t n_fields,
                  F&& field) {
    e_.Boundary();
    Global(module, name, slot);
    e_.Boundary();
    e_.EmptyTuple();
    e_.NewObj();
    e_.Memoize();
    if (n_fields == 0) return;
    e_.Boundary();
    e_.EmptyDict();
    (void)e_.DictItems(n_fields, [&](size_t i) {
      field(i);
      return Status::Ok();
    });
    e_.Build();
  }

  // A tuple of n values; `item(i)` writes value i.
  template <typename F>
  void Tuple(size_t n, F&& item) {
    e_.Boundary();
    if (n == 0) return e_.EmptyTuple();
    if (n > 3) e_.Mark();
    for (size_t i = 0; i < n; ++i) item(i);
    e_.TupleEnd(n);
  }

  // torch.Size((a, b, ...)): torch.Size REDUCE on a 1-tuple holding the tuple of ints.
  void Size(const Shape& s) {
    e_.Boundary();
    Global("torch", "Size", &size_slot_);
    Tuple(1, [&](size_t) { Tuple(s.size(), [&](size_t i) { IntValue(s[i]); }); });
    e_.Reduce();
    e_.Memoize();
  }

  // callable(arg) REDUCE for a global callable and one argument.
  template <typename F>
  void Call1(std::string_view module, std::string_view name, Slot* slot, F&& arg) {
    e_.Boundary();
    Global(module, name, slot);
    Tuple(1, [&](size_t) { arg(); });
    e_.Reduce();
    e_.Memoize();
  }

  void Properties(const TensorProperties& p) {
    e_.Boundary();
    Global(paths_.properties, "TensorProperties", &properties_slot_);
    e_.Boundary();
    e_.EmptyTuple();
    e_.NewObj();
    e_.Memoize();
    // The 5-tuple __getstate__ state: dtype, layout, requires_grad, memory format, pin_memory.
    Tuple(5, [&](size_t i) {
      switch (i) {
        case 0:
          Global("torch", DTypeName(p.dtype), &dtype_slots_[static_cast<size_t>(p.dtype)]);
          break;
        case 1:
          Call1("torch.serialization", "_get_layout", &layout_slot_,
                [&] { StrValue("torch.strided"); });
          break;
        case 2:
          e_.Boundary();
          e_.Bool(p.requires_grad);
          break;
        case 3:
          Call1(paths_.properties, "MEM_FORMAT_ENCODING", &mem_format_slot_,
                [&] { IntValue(static_cast<int>(p.memory_format)); });
          break;
        default:
          e_.Boundary();
          e_.Bool(p.pin_memory);
      }
    });
    e_.Build();
  }

  void Tensor(const TensorStorageMetadata& t) {
    DataObject(paths_.meta, "TensorStorageMetadata", &tensor_slot_, 3, [&](size_t i) {
      switch (i) {
        case 0:
          Key("properties");
          return Properties(t.properties);
        case 1:
          Key("size");
          return Size(t.size);
        default:
          Key("chunks");
          e_.Boundary();
          e_.EmptyList();
          (void)e_.ListItems(t.chunks.size(), [&](size_t c) {
            const ChunkBox& box = t.chunks[c];
            DataObject(paths_.meta, "ChunkStorageMetadata", &chunk_slot_, 2, [&](size_t f) {
              Key(f == 0 ? "offsets" : "sizes");
              Size(f == 0 ? box.offsets : box.sizes);
            });
            return Status::Ok();
          });
      }
    });
  }

  void Index(const MetadataIndex& idx) {
    DataObject(paths_.meta, "MetadataIndex", &index_slot_, idx.offset ? 3 : 2, [&](size_t i) {
      switch (i) {
        case 0:
          Key("fqn");
          return StrValue(idx.fqn);
        case 1:
          Key("index");
          if (idx.index) return IntValue(*idx.index);
          e_.Boundary();
          return e_.None();
        default:
          Key("offset");
          Size(*idx.offset);
      }
    });
  }

  void Info(const StorageInfo& s) {
    const size_t n = s.transform_descriptors.empty() ? 3 : 4;
    DataObject(paths_.storage_info, "_StorageInfo", &info_slot_, n, [&](size_t i) {
      switch (i) {
        case 0:
          Key("relative_path");
          return StrValue(s.relative_path);
        case 1:
          Key("offset");
          return IntValue(s.offset);
        case 2:
          Key("length");
          return IntValue(s.length);
        default:
          Key("transform_descriptors");
          StrList(s.transform_descriptors);
      }
    });
  }

  void StrList(const std::vector<std::string>& items) {
    e_.Boundary();
    e_.EmptyList();
    (void)e_.ListItems(items.size(), [&](size_t i) {
      StrValue(items[i]);
      return Status::Ok();
    });
  }

  void StateDictMetadataDict(const StateDictMetadata& sdm) {
    e_.Boundary();
    e_.EmptyDict();
    auto it = sdm.begin();
    (void)e_.DictItems(sdm.size(), [&](size_t) {
      const auto& [fqn, m] = *it++;
      StrValue(fqn);
      if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
        Tensor(*t);
      } else {
        DataObject(paths_.meta, "BytesStorageMetadata", &bytes_slot_, 0, [](size_t) {});
      }
      return Status::Ok();
    });
  }

  void PlannerData(const std::optional<std::map<std::string, ObjectPath>>& pd) {
    e_.Boundary();
    if (!pd) return e_.None();
    e_.EmptyDict();
    auto it = pd->begin();
    (void)e_.DictItems(pd->size(), [&](size_t) {
      const auto& entry = *it++;
      const ObjectPath& path = entry.second;  // a plain name: lambdas cannot capture bindings
      StrValue(entry.first);
      Tuple(path.size(), [&](size_t i) {
        if (const auto* s = std::get_if<std::string>(&path[i])) {
          StrValue(*s);
        } else {
          IntValue(std::get<int64_t>(path[i]));
        }
      });
      return Status::Ok();
    });
  }

  void StorageData(const std::map<MetadataIndex, StorageInfo, MetadataIndexLess>& storage) {
    e_.Boundary();
    e_.EmptyDict();
    auto it = storage.begin();
    (void)e_.DictItems(storage.size(), [&](size_t) {
      const auto& [idx, info] = *it++;
      Index(idx);
      Info(info);
      return Status::Ok();
    });
  }

  void StorageMetaObject(const StorageMeta& sm) {
    Slot slot = -1;
    DataObject(paths_.meta, "StorageMeta", &slot, 4, [&](size_t i) {
      switch (i) {
        case 0:
          Key("checkpoint_id");
          return OptStr(sm.checkpoint_id);
        case 1:
          Key("save_id");
          return OptStr(sm.save_id);
        case 2:
          Key("load_id");
          e_.Boundary();
          return e_.None();
        default:
          Key("modules");
          StrList(sm.modules);
      }
    });
  }

  MetadataFlavor flavor_;
  Paths paths_;
  PickleEmitter e_;
  Slot size_slot_ = -1, properties_slot_ = -1, layout_slot_ = -1, mem_format_slot_ = -1,
       tensor_slot_ = -1, chunk_slot_ = -1, index_slot_ = -1, info_slot_ = -1, bytes_slot_ = -1;
  std::array<Slot, kNumDTypes> dtype_slots_;
};

}  // namespace

Status ValidatePlannerData(const Metadata& md, std::string_view what) {
  if (md.planner_data) {
    // Loading into an empty state dict rebuilds every list up to its largest index, filling the
    // places of elements that left no entry (empty dicts, which flattening drops) with None. The
    // entries bound the elements present; the holes are bounded in all, so a hostile index
    // cannot make the load allocate without limit, while real gaps still load.
    constexpr uint64_t kMaxListHoles = uint64_t{1} << 20;
    // Each distinct path prefix is a node, numbered as first seen, holding its children by part;
    // a node that int parts follow is a list. Work and memory are linear in the parts (keying
    // lists by their whole prefix would copy the prefix once per part: quadratic in a long path).
    struct Node {
      std::map<std::string_view, size_t> names;  // views into md.planner_data
      std::map<int64_t, size_t> items;
      int64_t largest = -1;
    };
    std::vector<Node> nodes(1);
    for (const auto& [fqn, path] : *md.planner_data) {
      // A path of names alone never reaches a list (after a list's prefix comes an index), so
      // it adds no element and no hole: only paths with an index are walked. A model's state
      // dict flattens to names alone; walking its 20 000 paths cost ~5 ms of every save's plan.
      if (std::none_of(path.begin(), path.end(),
                       [](const auto& part) { return std::holds_alternative<int64_t>(part); })) {
        continue;
      }
      size_t at = 0;
      for (const auto& part : path) {
        size_t next = nodes.size();
        if (const int64_t* i = std::get_if<int64_t>(&part)) {
          if (*i < 0) {
            return DataLossError(std::string(what) + ": planner data of \"" + fqn +
                                 "\" has list index " + std::to_string(*i));
          }
          Node& list = nodes[at];
          list.largest = std::max(list.largest, *i);
          next = list.items.try_emplace(*i, next).first->second;
        } else {
          next = nodes[at].names.try_emplace(std::get<std::string>(part), next).first->second;
        }
        if (next == nodes.size()) nodes.emplace_back();
        at = next;
      }
    }
    uint64_t holes = 0;
    for (const Node& l : nodes) {
      if (l.largest < 0) continue;
      holes += static_cast<uint64_t>(l.largest) + 1 - l.items.size();
      if (holes > kMaxListHoles) {
        return DataLossError(std::string(what) + ": planner data has lists with more than " +
                             std::to_string(kMaxListHoles) + " missing elements (list index " +
                             std::to_string(l.largest) + " with " + std::to_string(l.items.size()) +
                             " elements present)");
      }
    }
  }
  return Status::Ok();
}

Status internal::ValidatePlannedMetadata(const Metadata& md, std::string_view what) {
  // Every size is checked before anything is allocated from it: element counts and byte sizes
  // must fit in int64 and chunks must lie inside their tensor.
  for (const auto& [fqn, m] : md.state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    auto bytes = CheckedNumBytes(t->properties.dtype, t->size);
    if (!bytes.ok()) {
      return DataLossError(std::string(what) + ": \"" + fqn +
                           "\": " + std::string(bytes.status().message()));
    }
    for (const auto& c : t->chunks) {
      bool fits = c.offsets.size() == t->size.size() && c.sizes.size() == t->size.size();
      // Inside [0, size) in every dimension (the subtraction cannot overflow once
      // 0 <= sizes[d] <= size[d]), without building a whole box per chunk.
      for (size_t d = 0; fits && d < c.offsets.size(); ++d) {
        fits = c.offsets[d] >= 0 && c.sizes[d] >= 0 && c.sizes[d] <= t->size[d] &&
               c.offsets[d] <= t->size[d] - c.sizes[d];
      }
      if (!fits) {
        return DataLossError(std::string(what) + ": chunk " + c.ToString() + " of \"" + fqn +
                             "\" does not fit its size " + ShapeToString(t->size));
      }
    }
  }
  return ValidatePlannerData(md, what);
}

Status internal::ValidateStorageData(const Metadata& md, std::string_view what) {
  // An untransformed chunk cannot hold more bytes than its stored blob, so allocations are
  // bounded by what the files hold. (Chunk sizes were checked by ValidatePlannedMetadata.)
  for (const auto& [fqn, m] : md.state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    for (const auto& c : t->chunks) {
      auto info = md.storage_data.find(MetadataIndexRef{fqn, &c.offsets});
      if (info != md.storage_data.end() && info->second.transform_descriptors.empty()) {
        const int64_t chunk_bytes = *CheckedNumBytes(t->properties.dtype, c.sizes);
        if (info->second.length < chunk_bytes || info->second.offset < 0) {
          return DataLossError(std::string(what) + ": chunk " + c.ToString() + " of \"" + fqn +
                               "\" needs " + std::to_string(chunk_bytes) +
                               " bytes but its stored blob has " +
                               std::to_string(info->second.length));
        }
      }
    }
  }
  for (const auto& [idx, info] : md.storage_data) {
    const StorageMetadata* m = md.state_dict_metadata.Find(idx.fqn);
    if (!m) {
      return DataLossError(std::string(what) + ": storage entry for unknown key \"" + idx.fqn +
                           "\"");
    }
    if (info.relative_path.empty() || info.relative_path.find('/') != std::string::npos ||
        info.relative_path == "." || info.relative_path == "..") {
      return DataLossError(std::string(what) + ": \"" + idx.ToString() + "\" points at file \"" +
                           info.relative_path + "\" outside the checkpoint directory");
    }
  }
  return Status::Ok();
}

Status ValidateMetadata(const Metadata& md, std::string_view what) {
  DCPP_RETURN_IF_ERROR(internal::ValidatePlannedMetadata(md, what));
  return internal::ValidateStorageData(md, what);
}

Result<Metadata> internal::DecodeMetadataTree(std::string_view pickle_bytes) {
  return DecodeMetadataTree(pickle_bytes, DecodeBudget::For(pickle_bytes.size()));
}

Result<Metadata> internal::DecodeMetadataTree(std::string_view pickle_bytes, uint64_t budget) {
  PickleReadOptions opts;
  static const PickleAllowList kAllow = PickleAllowList::DcpMetadata();
  opts.allow = &kAllow;
  DCPP_ASSIGN_OR_RETURN(PickleRef root, ReadPickle(pickle_bytes, opts));
  DecodeBudget b(pickle_bytes.size(), budget);
  return ParseRoot(*root, b);
}

Result<Metadata> ParseMetadata(std::string_view pickle_bytes) {
  // The direct decoder covers what the writers emit; anything it declines, malformed input
  // included, goes to the tree path, whose answer (and error message) stands.
  Result<Metadata> md = internal::DecodeMetadataDirect(pickle_bytes);
  if (!md.ok()) md = internal::DecodeMetadataTree(pickle_bytes);
  if (!md.ok()) return md.status();
  DCPP_RETURN_IF_ERROR(ValidateMetadata(*md, "metadata"));
  return md;
}

namespace {

Status CheckProtocol(const MetadataEncodeOptions& options) {
  if (options.protocol != 2 && options.protocol != 4) {
    return InvalidArgumentError("pickle protocol " + std::to_string(options.protocol) +
                                " cannot be written (2 or 4)");
  }
  return Status::Ok();
}

}  // namespace

Result<std::string> EncodeMetadata(const Metadata& metadata, const MetadataEncodeOptions& options) {
  DCPP_RETURN_IF_ERROR(CheckProtocol(options));
  return Encoder(options.flavor, options.protocol).Encode(metadata);
}

namespace internal {

struct MetadataEncoder::Impl {
  Impl(const MetadataEncodeOptions& o) : encoder(o.flavor, o.protocol) {}
  Encoder encoder;
};

MetadataEncoder::MetadataEncoder(const MetadataEncodeOptions& options)
    : status_(CheckProtocol(options)) {
  if (status_.ok()) impl_ = std::make_unique<Impl>(options);
}

MetadataEncoder::~MetadataEncoder() = default;

void MetadataEncoder::Begin(const Metadata& md) {
  if (!impl_ || begun_) return;
  begun_ = true;
  impl_->encoder.Begin(md);
}

Result<std::string> MetadataEncoder::Finish(const Metadata& md) {
  DCPP_RETURN_IF_ERROR(status_);
  if (!begun_) Begin(md);
  status_ = FailedPreconditionError("metadata encoder finished twice");
  return impl_->encoder.End(md);
}

}  // namespace internal

}  // namespace dcpp
