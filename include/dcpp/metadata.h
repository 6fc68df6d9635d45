// Metadata: the global description of a committed DCP checkpoint (the `.metadata` file).
//
// The model mirrors PyTorch's `torch.distributed.checkpoint.metadata` classes: for every
// fully-qualified name either a TensorStorageMetadata (dtype and other properties, global size,
// the saved chunks) or a BytesStorageMetadata; `storage_data` maps each saved item
// (MetadataIndex: fqn + chunk offsets) to where its bytes are (StorageInfo: file, offset,
// length); `planner_data` maps each fqn to its path in the nested state dict.
//
// The codec reads every variant PyTorch has written (pickle protocols 2-5; 5- or 6-field
// TensorProperties; both enum pickles; both pathlib forms; the 1.13 prototype class paths) and
// writes what PyTorch >= 2.0 reads (see MetadataEncodeOptions). docs/format.md has the details.
// ParseMetadata decodes what the writers emit straight into a Metadata, without a pickle tree,
// and reads anything else through the general pickle reader (same results, same errors).
//
// Invariants after ParseMetadata: every tensor chunk is inside its tensor's size, ranks match,
// and storage_data keys name existing entries. Thread-safety: plain values.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "dcpp/chunk.h"
#include "dcpp/dtype.h"
#include "dcpp/state_dict.h"
#include "dcpp/status.h"

namespace dcpp {

enum class MemoryFormat : uint8_t { kContiguous = 0, kChannelsLast = 1, kPreserve = 2 };

struct TensorProperties {
  DType dtype = DType::kFloat32;
  bool requires_grad = false;
  MemoryFormat memory_format = MemoryFormat::kContiguous;
  bool pin_memory = false;
  std::optional<Shape> strides;  // only newest PyTorch records it; never written by default
  friend bool operator==(const TensorProperties&, const TensorProperties&) = default;
};

struct TensorStorageMetadata {
  TensorProperties properties;
  Shape size;
  std::vector<ChunkBox> chunks;
};

struct BytesStorageMetadata {};

using StorageMetadata = std::variant<TensorStorageMetadata, BytesStorageMetadata>;

// Key of one saved item. Identity is (fqn, offset); `index` is only a lookup hint.
struct MetadataIndex {
  std::string fqn;
  std::optional<Shape> offset;  // chunk offsets for tensors, absent for bytes
  std::optional<int64_t> index;

  std::string ToString() const;  // "fqn" or "fqn@[0, 4]"
  friend bool operator==(const MetadataIndex& a, const MetadataIndex& b) {
    return a.fqn == b.fqn && a.offset == b.offset;
  }
  friend bool operator<(const MetadataIndex& a, const MetadataIndex& b) {
    if (a.fqn != b.fqn) return a.fqn < b.fqn;
    return a.offset < b.offset;
  }
};

// A MetadataIndex's identity by reference, to look one up without copying its fqn and offsets.
struct MetadataIndexRef {
  std::string_view fqn;
  const Shape* offset = nullptr;  // null: absent (bytes)
};

// MetadataIndex's order, also between a MetadataIndex and a MetadataIndexRef.
struct MetadataIndexLess {
  using is_transparent = void;
  bool operator()(const MetadataIndex& a, const MetadataIndex& b) const { return a < b; }
  bool operator()(const MetadataIndex& a, const MetadataIndexRef& b) const {
    return Less(a.fqn, a.offset ? &*a.offset : nullptr, b.fqn, b.offset);
  }
  bool operator()(const MetadataIndexRef& a, const MetadataIndex& b) const {
    return Less(a.fqn, a.offset, b.fqn, b.offset ? &*b.offset : nullptr);
  }

 private:
  static bool Less(std::string_view af, const Shape* ao, std::string_view bf, const Shape* bo) {
    if (af != bf) return af < bf;
    if (!ao || !bo) return !ao && bo;  // absent first, as std::optional orders
    return *ao < *bo;
  }
};

// Where an item's bytes are: `length` bytes at `offset` of `relative_path` (a file name in the
// checkpoint directory). Matches PyTorch's filesystem._StorageInfo.
struct StorageInfo {
  std::string relative_path;
  int64_t offset = 0;
  int64_t length = 0;
  std::vector<std::string> transform_descriptors;  // e.g. "stream.zstd/1"; empty: raw
  friend bool operator==(const StorageInfo&, const StorageInfo&) = default;
};

struct StorageMeta {
  std::optional<std::string> checkpoint_id;
  std::optional<std::string> save_id;
  std::optional<std::string> load_id;
  std::vector<std::string> modules;
};

// Insertion-ordered map from fqn to storage metadata (PyTorch's dict keeps order; so do we).
class StateDictMetadata {
 public:
  // Inserts or returns the existing entry.
  StorageMetadata& operator[](const std::string& fqn);
  // Room for n entries, so adding them moves and rehashes nothing.
  void Reserve(size_t n) {
    entries_.reserve(n);
    Rehash(n);
  }
  const StorageMetadata* Find(std::string_view fqn) const;
  StorageMetadata* Find(std::string_view fqn);
  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }
  auto begin() { return entries_.begin(); }
  auto end() { return entries_.end(); }

 private:
  // The slot that holds `fqn` (hash `h`), or the empty slot where it would go.
  size_t Probe(std::string_view fqn, uint64_t h) const;
  // Slots for at least n entries at most half full.
  void Rehash(size_t n);

  std::vector<std::pair<std::string, StorageMetadata>> entries_;
  // The index of entries_ by key, open addressing: a slot is 0 (empty) or the key hash's high
  // 32 bits over the entry's position + 1. One allocation, where a hash map of tens of
  // thousands of keys took one per key (and the time to free each).
  std::vector<uint64_t> slots_;
};

struct Metadata {
  StateDictMetadata state_dict_metadata;
  // fqn -> path in the nested dict (DefaultSavePlanner's flattening mappings). Absent when the
  // checkpoint was not flattened (e.g. the 1.13 prototype).
  std::optional<std::map<std::string, ObjectPath>> planner_data;
  std::map<MetadataIndex, StorageInfo, MetadataIndexLess> storage_data;
  std::optional<StorageMeta> storage_meta;
  std::optional<std::string> version;  // "1.0.0" from current writers

  // Storage info for an item, or NotFound naming it.
  Result<const StorageInfo*> FindStorage(const MetadataIndex& index) const;
};

// Which PyTorch the encoded `.metadata` must load in.
enum class MetadataFlavor : uint8_t {
  // torch.distributed.checkpoint.* classes; TensorProperties by its long-standing
  // torch.distributed._shard.sharded_tensor.metadata path (resolvable in 1.13 and every 2.x);
  // StorageMeta and version written as current PyTorch does (StorageMeta needs PyTorch >= 2.4).
  kTorch2,
  // As kTorch2 without StorageMeta: loads in every PyTorch 2.x.
  kTorch2Portable,
  // The 1.13 prototype's torch.distributed._shard.checkpoint.* classes, no StorageMeta/version.
  kTorch113Prototype,
};

struct MetadataEncodeOptions {
  MetadataFlavor flavor = MetadataFlavor::kTorch2;
  int protocol = 4;  // Python's default for current CPython
};

Result<Metadata> ParseMetadata(std::string_view pickle_bytes);
Result<std::string> EncodeMetadata(const Metadata& metadata,
                                   const MetadataEncodeOptions& options = {});

// The global view of a checkpoint saved without collectives (PyTorch's use_collectives=False),
// where rank r wrote `__{r}.metadata` (per_rank[r]) describing only its own items: entries are
// united, file `first` first and then in rank order; a chunk or storage key that several files
// have (replicated data, or a rank that kept an older save) is taken from the first file that
// has it. A dtype, size or kind that differs between files is DataLoss.
Result<Metadata> MergeRankLocalMetadata(const std::vector<Metadata>& per_rank, int first = 0);

// Bounds and consistency checks (chunks inside size, matching ranks, storage keys present).
// `what` names the source in messages.
Status ValidateMetadata(const Metadata& metadata, std::string_view what);
// The planner_data part of ValidateMetadata alone (list indexes and the holes they leave), for
// planners that have checked the chunks themselves.
Status ValidatePlannerData(const Metadata& metadata, std::string_view what);

}  // namespace dcpp
