// Planners: what each rank writes or reads, decided before any byte moves.
//
// Saving (PyTorch's SavePlanner protocol, same step names):
//   1. SetUp(state_dict): every rank flattens its state dict;
//   2. CreateLocalPlan(): one WriteItem per leaf (a tensor, each local chunk of a sharded tensor,
//      or a bytes item for any other value);
//   3. CreateGlobalPlan(all plans) on the coordinator: items held identically by several ranks
//      are written once, by the holder with the least bytes assigned so far (the writing spreads
//      evenly over ranks); the Metadata is built and validated (chunks inside their tensor, no
//      overlap, and, unless disabled, chunks tiling the whole tensor);
//   4. FinishPlan(central plan) on every rank, then ResolveData for each item while writing.
// Loading (LoadPlanner):
//   1. SetUp(state_dict, metadata);
//   2. CreateLocalPlan(): for every requested chunk, one ReadItem per stored chunk it overlaps
//      (resharding), or a bytes item;
//   3. the storage layer reads; the planner hands out destinations (ResolveTensor) and takes
//      decoded values (LoadBytes).
//
// Planners are pure: no I/O, no communication. Plans serialize to bytes so communicators can
// move them. Thread-safety: a planner instance is used by one thread at a time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dcpp/chunk.h"
#include "dcpp/metadata.h"
#include "dcpp/state_dict.h"
#include "dcpp/status.h"
#include "dcpp/tensor.h"
#include "dcpp/value.h"

namespace dcpp {

enum class WriteItemType : uint8_t { kTensor = 1, kShard = 2, kByteIO = 3 };

struct TensorWriteData {
  ChunkBox chunk;  // global offsets and sizes of this piece
  TensorProperties properties;
  Shape size;  // global size
};

struct WriteItem {
  MetadataIndex index;
  WriteItemType type = WriteItemType::kTensor;
  std::optional<TensorWriteData> tensor_data;  // set for kTensor / kShard
  // Bytes this item stores (tensor payload; 1 for bytes items, as PyTorch counts them).
  int64_t StorageSize() const;
};

struct SavePlan {
  std::vector<WriteItem> items;
  std::string storage_prefix;  // set by the storage layer's global step: "__3_"
  // fqn -> path, for the coordinator to record in Metadata::planner_data.
  std::map<std::string, ObjectPath> mappings;
};

enum class LoadItemType : uint8_t { kTensor = 1, kByteIO = 2 };

struct ReadItem {
  LoadItemType type = LoadItemType::kTensor;
  MetadataIndex dest_index;     // fqn + offsets of the destination chunk
  Shape dest_offsets;           // where in the destination chunk
  MetadataIndex storage_index;  // fqn + offsets of the stored chunk
  Shape storage_offsets;        // where in the stored chunk
  Shape lengths;
};

struct LoadPlan {
  std::vector<ReadItem> items;
};

// Byte encodings of plans (for communicators; Metadata travels as its pickle). Decoding
// validates everything.
std::string EncodeSavePlan(const SavePlan& plan);
Result<SavePlan> DecodeSavePlan(std::string_view bytes);

// What a write item's bytes are: a tensor view in the caller's memory, or encoded bytes.
struct WriteData {
  TensorView tensor;  // valid for kTensor/kShard
  std::string bytes;  // torch.save archive bytes for kByteIO
};

class SavePlanner {
 public:
  virtual ~SavePlanner() = default;
  SavePlanner() = default;
  SavePlanner(const SavePlanner&) = delete;
  SavePlanner& operator=(const SavePlanner&) = delete;

  virtual Status SetUp(const StateDict& state_dict, bool is_coordinator) = 0;
  virtual Result<SavePlan> CreateLocalPlan() = 0;
  // Coordinator only. Returns one plan per rank and the global metadata.
  virtual Result<std::pair<std::vector<SavePlan>, Metadata>> CreateGlobalPlan(
      std::vector<SavePlan> plans) = 0;
  virtual Result<SavePlan> FinishPlan(SavePlan central_plan) = 0;
  virtual Result<WriteData> ResolveData(const WriteItem& item) = 0;
};

struct SavePlannerOptions {
  bool flatten_state_dict = true;
  // Assign replicated items to the lowest rank holding them instead of balancing bytes.
  bool dedup_save_to_lowest_rank = false;
  // PyTorch's enable_plan_caching: CreateGlobalPlan remembers its answer, and when the same
  // planner gets local plans of the same structure again (same keys, chunks, dtypes: the
  // second save of a training run), it returns the remembered plans and metadata without
  // redoing dedup, metadata creation and validation.
  bool enable_plan_caching = false;
  // Require the saved chunks of each tensor to cover it exactly (off in rank-local mode).
  bool require_full_coverage = true;
};

namespace internal {
struct PlanCache;
}  // namespace internal

// Identifies the structure of a set of local plans (a 128-bit hash of their encodings).
struct PlanFingerprint {
  uint64_t low = 0, high = 0;
  friend bool operator==(const PlanFingerprint&, const PlanFingerprint&) = default;
};

class DefaultSavePlanner : public SavePlanner {
 public:
  explicit DefaultSavePlanner(SavePlannerOptions options = {}) : options_(options) {}
  Status SetUp(const StateDict& state_dict, bool is_coordinator) override;
  Result<SavePlan> CreateLocalPlan() override;
  Result<std::pair<std::vector<SavePlan>, Metadata>> CreateGlobalPlan(
      std::vector<SavePlan> plans) override;
  Result<SavePlan> FinishPlan(SavePlan central_plan) override;
  Result<WriteData> ResolveData(const WriteItem& item) override;
  // Whether the last CreateGlobalPlan was answered from the plan cache.
  bool last_plan_cached() const { return last_plan_cached_; }

 private:
  SavePlannerOptions options_;
  bool last_plan_cached_ = false;
  std::shared_ptr<const internal::PlanCache> cache_;  // with enable_plan_caching
  std::vector<FlatEntry> flat_;
  std::unordered_map<std::string_view, const Value*> by_fqn_;  // views of flat_'s names
};

// Removes duplicates of the same MetadataIndex across plans, keeping each in one plan.
std::vector<SavePlan> DedupSavePlans(std::vector<SavePlan> plans, bool save_to_lowest_rank);

// Builds Metadata from deduplicated plans and rewrites chunk index hints (PyTorch's
// create_default_global_save_plan).
Result<std::pair<std::vector<SavePlan>, Metadata>> CreateDefaultGlobalSavePlan(
    std::vector<SavePlan> plans);

// Checks every tensor's chunks: inside the tensor, pairwise disjoint, and (if
// `require_full_coverage`) covering it. O(n log n) for row, column, block and grid shardings.
Status ValidateGlobalPlan(const Metadata& metadata, bool require_full_coverage);

class LoadPlanner {
 public:
  virtual ~LoadPlanner() = default;
  LoadPlanner() = default;
  LoadPlanner(const LoadPlanner&) = delete;
  LoadPlanner& operator=(const LoadPlanner&) = delete;

  // `state_dict` is the caller's tree, filled in place (it must outlive the load).
  virtual Status SetUp(StateDict* state_dict, const Metadata& metadata, bool is_coordinator) = 0;
  virtual Result<LoadPlan> CreateLocalPlan() = 0;
  // The destination chunk of a tensor read item, a view into the caller's memory.
  virtual Result<TensorView> ResolveTensor(const ReadItem& item) = 0;
  // Hands a decoded bytes item to the planner (stored into the state dict).
  virtual Status LoadBytes(const ReadItem& item, Value value) = 0;
  // Called after all reads (e.g. to rebuild nesting).
  virtual Status Finish() { return Status::Ok(); }
};

struct LoadPlannerOptions {
  bool flatten_state_dict = true;
  // Keys of the state dict absent from the checkpoint are skipped instead of failing.
  bool allow_partial_load = false;
};

// Loads into the tensors the caller provides (whole tensors or sharded tensors with their local
// chunks); other leaves are replaced by the stored values. An empty dict state dict means "load
// everything as stored" (PyTorch's _EmptyStateDictLoadPlanner): tensors are allocated from the
// metadata and the nesting is rebuilt from planner_data.
class DefaultLoadPlanner : public LoadPlanner {
 public:
  explicit DefaultLoadPlanner(LoadPlannerOptions options = {}) : options_(options) {}
  Status SetUp(StateDict* state_dict, const Metadata& metadata, bool is_coordinator) override;
  Result<LoadPlan> CreateLocalPlan() override;
  Result<TensorView> ResolveTensor(const ReadItem& item) override;
  Status LoadBytes(const ReadItem& item, Value value) override;

 private:
  struct Dest {
    ObjectPath path;
    Value* value = nullptr;
  };
  void IndexDestinations();

  LoadPlannerOptions options_;
  StateDict* state_dict_ = nullptr;
  const Metadata* metadata_ = nullptr;
  std::map<std::string, Dest> dest_;  // in key order, the order of the plan's items
  // Per-item lookups while reading (ResolveTensor, LoadBytes) hash the key instead of walking
  // dest_; the keys are views of dest_'s.
  std::unordered_map<std::string_view, Dest*> by_fqn_;
};

// Read items that fill `local` chunks of `fqn` from the stored `saved` chunks (the overlap
// rule of PyTorch's create_read_items_for_chunk_list). O((n + m) log(n + m) + overlaps).
std::vector<ReadItem> CreateReadItemsForChunks(const std::string& fqn,
                                               const std::vector<ChunkBox>& local,
                                               const std::vector<ChunkBox>& saved);

}  // namespace dcpp
