// torch.save archives: read and write PyTorch's zip serialization of tensors and plain values.
//
// An archive is a zip (all entries stored, data records 64-byte aligned) holding
// `<dir>/data.pkl` (a protocol-2 pickle of the object tree, tensors referring to storages by
// persistent id), `<dir>/data/<key>` (raw little-endian storage bytes, one per distinct storage),
// `<dir>/version`, and in newer PyTorch `byteorder`, `.format_version`, `.storage_alignment`,
// `.data/serialization_id`. docs/format.md describes the bytes.
//
// Reading maps the pickle to a dcpp::Value: tensors (any dtype, shared storages, storage offsets,
// arbitrary strides, 0-d, empty) and None/bool/int/float/str/bytes/list/tuple/dict/OrderedDict.
// Anything else is an error unless `opaque_objects` is set.
// Writing streams each storage from the caller's memory into the sink once (tensors sharing a
// Storage share one record); a tensor whose storage is larger than its own extent is compacted
// first, as DCP does.
//
// Thread-safety: functions are reentrant; the TorchSaveArchive is immutable after Open and may be
// read from several threads if its source allows.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "codec/pickle.h"
#include "dcpp/io.h"
#include "dcpp/status.h"
#include "dcpp/tensor.h"
#include "dcpp/value.h"

namespace dcpp {

namespace internal {
// The values of a lone tensor's data.pkl in the canonical form PyTorch and dcpp write (found by
// MatchLoneTensorPickle in torch_save.cc without building the pickle tree).
struct LoneTensorPickle {
  bool v3 = false;                      // _rebuild_tensor_v3 with an UntypedStorage
  DType dtype = DType::kFloat32;        // the tensor's
  DType storage_dtype = DType::kUInt8;  // the typed storage's (v2)
  int64_t numel = 0;                    // the persistent id's count (v3: bytes)
  int64_t storage_offset = 0;
  Shape shape;
  Shape strides;
};
}  // namespace internal

// Where one tensor's bytes are inside an archive, without reading them.
struct TorchSaveTensorRef {
  DType dtype = DType::kFloat32;
  Shape shape;
  Shape strides;
  int64_t storage_offset = 0;  // in elements
  std::string storage_key;     // "0", "1", ...
  uint64_t record_offset = 0;  // byte offset of the storage record's data in the source
  uint64_t record_size = 0;    // bytes of the storage record
  bool requires_grad = false;

  int64_t numel() const { return NumElements(shape); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * ElementSize(dtype); }
  bool is_contiguous() const;
};

// One leaf of an archive's object tree, found without reading tensor bytes (`dcpp inspect`).
// Dicts are descended into; lists and tuples only when they hold a tensor somewhere below.
struct TorchSaveLeaf {
  // Key path joined with '.': dict keys as written, list/tuple positions as numbers
  // ("model.layers.0.weight"); "" for a root that is itself a leaf.
  std::string key;
  bool is_tensor = false;
  TorchSaveTensorRef tensor;  // when is_tensor
  Value value;                // otherwise: the plain value (Opaque for uninterpreted objects)
};

class TorchSaveArchive {
 public:
  // Parses the zip directory and data.pkl. `source` must outlive the archive.
  static Result<TorchSaveArchive> Open(const ByteSource& source);

  // Archive directory prefix without slash ("archive", "my.model").
  const std::string& prefix() const { return prefix_; }
  int64_t version() const { return version_; }

  // data.pkl is a lone tensor's in its canonical form, read without the pickle tree.
  bool lone_tensor() const { return lone_.has_value(); }

  // If the root object is a single tensor, its reference.
  Result<TorchSaveTensorRef> RootTensor() const;

  // Reads the whole tree, materializing tensors (each storage read once, shared between the
  // tensors that use it). A subtree that is not plain data is an InvalidArgument error naming
  // its class, unless `opaque_objects` is set: then it becomes an Opaque whose type_name names
  // the class (torch_save_bytes left empty), for display (`dcpp inspect`).
  Result<Value> ReadValue(bool opaque_objects = false) const;

  // Copies the tensor `ref` (or its sub-box `src_offsets`/`sizes`) into `dst` at `dst_offsets`,
  // reading only the bytes needed; reads straight into dst when both layouts are contiguous.
  Status ReadTensorInto(const TorchSaveTensorRef& ref, const Shape& src_offsets,
                        const TensorView& dst, const Shape& dst_offsets, const Shape& sizes) const;

  // Every leaf in tree order, tensors as references (no tensor bytes are read).
  Result<std::vector<TorchSaveLeaf>> Leaves(bool opaque_objects = true) const;

  // Raw bytes of a record by its name without the prefix ("version", "data/0").
  Result<std::string> ReadRecord(const std::string& name) const;
  // Record names in archive order (without prefix).
  std::vector<std::string> RecordNames() const;

  struct Record {
    uint64_t data_offset = 0;  // within the source
    uint64_t size = 0;
    uint32_t crc32 = 0;
  };
  // Records by name (without the prefix), in name order: a sorted vector, since an archive has
  // a handful of them and one is opened per stored item.
  class RecordMap {
   public:
    using value_type = std::pair<std::string, Record>;
    using const_iterator = std::vector<value_type>::const_iterator;
    const_iterator begin() const { return sorted_.begin(); }
    const_iterator end() const { return sorted_.end(); }
    size_t size() const { return sorted_.size(); }
    bool empty() const { return sorted_.empty(); }
    const_iterator find(std::string_view name) const;
    size_t count(std::string_view name) const { return find(name) == end() ? 0 : 1; }
    // Throws std::out_of_range for a missing name, as std::map::at does.
    const Record& at(std::string_view name) const;

   private:
    friend class TorchSaveArchive;
    std::vector<value_type> sorted_;
    std::vector<uint32_t> order_;  // indexes into sorted_, in archive order
  };
  const RecordMap& records() const { return records_; }

  // Checks every record's CRC-32 (DataLoss naming the record on mismatch).
  Status VerifyChecksums() const;

  const ByteSource& source() const { return *source_; }
  // The `byteorder` record said "big": storages are byteswapped when read.
  bool big_endian() const { return big_endian_; }

 private:
  const ByteSource* source_ = nullptr;
  std::string prefix_;
  int64_t version_ = 0;
  bool big_endian_ = false;
  RecordMap records_;
  PickleRef root_;  // null when lone_ holds the canonical lone-tensor pickle's values
  std::optional<internal::LoneTensorPickle> lone_;
};

struct TorchSaveWriteOptions {
  std::string archive_name = "archive";  // torch.save to a stream uses "archive"
  bool compute_crc32 = true;
  // Write PyTorch 2.x's extra records (byteorder, .format_version, .storage_alignment,
  // .data/serialization_id). Both forms load in torch >= 1.13.
  bool modern_records = true;
  // Streaming: when set, each storage record's bytes come from materialize(t), called just
  // before the record is written with the (first) tensor of that storage as found in the value,
  // and released right after. The value may then hold placeholder tensors whose storage has the
  // right size but no data (Storage::Wrap(nullptr, nbytes, ...)); each must own its storage
  // alone and cover it exactly. Peak memory is one tensor.
  std::function<Result<Tensor>(const Tensor& placeholder)> materialize;
};

// Writes `value` (tensors and plain values; ShardedTensor and Opaque are rejected) as one
// torch.save archive: protocol-2 data.pkl as PyTorch writes it, then one `data/<key>` record per
// distinct Storage in first-seen order. A tensor that owns its storage alone keeps its strides if
// it covers the storage exactly from offset 0 (`w.t()`), else it is compacted; tensors sharing a
// Storage share one record holding the whole storage, offsets and strides preserved (they must
// agree on the dtype). Dtypes without a typed storage class (uint16/32/64, complex32, float8)
// are written as `_rebuild_tensor_v3` + UntypedStorage, which torch < 2.1 cannot load.
// Parameters are written as plain tensors (requires_grad false).
Status WriteTorchSave(const Value& value, ByteSink& sink,
                      const TorchSaveWriteOptions& options = {});
Result<std::string> EncodeTorchSave(const Value& value, const TorchSaveWriteOptions& options = {});

namespace internal {
// data.pkl as WriteTorchSave writes it for `value`; with `via_tree`, always through the pickle
// tree, which a lone tensor's direct path must match byte for byte (tests).
Result<std::string> TorchSavePickle(const Value& value, bool via_tree);
}  // namespace internal

}  // namespace dcpp
