// Hugging Face safetensors storage: PyTorch's HuggingFaceStorageWriter/Reader,
// consolidate_safetensors_files and QuantizedHuggingFaceStorageReader, byte-compatible with them.
//
// Layout written (PyTorch's names):
//   <dir>/model-{i:05d}-of-{N:05d}.safetensors      whole tensors, file i from fqn_to_index_mapping
//   <dir>/model.safetensors.index.json               {"metadata": {"total_size"}, "weight_map"}
//   distributed saves: shard-{rank+1:05d}-model-{i:05d}-of-{N:05d}.safetensors per rank, each
//   tensor chunk with its global offsets in __metadata__["DCP_SHARDING_INFO"]; under sharded/
//   when consolidation is on (then consolidated into whole tensors in <dir>).
// There is no `.metadata`: the reader rebuilds the chunk list from the safetensors headers, so
// ordinary Hugging Face checkpoints (one file, or shards with an index) load too, under any
// sharding, through the default load planner, each rank reading only its byte ranges.
//
// Safetensors holds tensors only: a state dict with other values is refused (InvalidArgument).
// Thread-safety: one writer/reader per save/load; each runs its own I/O threads.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/dtype.h"
#include "dcpp/layout.h"
#include "dcpp/status.h"

namespace dcpp {

class Store;

inline constexpr const char* kHfIndexFileName = "model.safetensors.index.json";
inline constexpr const char* kHfShardedDirName = "sharded";

// "model-00001-of-00003.safetensors"; with shard_index > 0 prefixed "shard-00002-".
std::string HfFileName(int index, int count, int shard_index = 0);

struct HuggingFaceWriterOptions {
  // fqn -> 1-based output file; fqns not listed go to file 1. Empty: one file.
  std::map<std::string, int> fqn_to_index_mapping;
  int thread_count = 1;  // files written in parallel
  // Every rank writes its own chunks (shard-... files) instead of whole tensors.
  bool save_distributed = false;
  // With save_distributed: shards go to sharded/ and the coordinator consolidates them into
  // whole-tensor files in the directory at Finish.
  bool enable_consolidation = false;
  int thread_count_consolidation = 1;
  bool sync_files = true;
};

class HuggingFaceStorageWriter final : public StorageWriter {
 public:
  static Result<std::unique_ptr<HuggingFaceStorageWriter>> Open(
      const std::string& path, HuggingFaceWriterOptions options = {});
  HuggingFaceStorageWriter(Store* store, std::string checkpoint_id,
                           HuggingFaceWriterOptions options);
  ~HuggingFaceStorageWriter() override;

  Status SetUp(bool is_coordinator, int rank, bool use_collectives) override;
  Result<SavePlan> PrepareLocalPlan(SavePlan plan) override;
  Result<std::vector<SavePlan>> PrepareGlobalPlan(std::vector<SavePlan> plans) override;
  Result<std::vector<WriteResult>> WriteData(const SavePlan& plan, SavePlanner& planner) override;
  Status Finish(Metadata& metadata, const std::vector<std::vector<WriteResult>>& results) override;
  std::string checkpoint_id() const override { return checkpoint_id_; }

 private:
  std::unique_ptr<Store> owned_store_;
  Store* store_;
  std::string checkpoint_id_;
  HuggingFaceWriterOptions options_;
  int rank_ = 0;
};

struct HuggingFaceReaderOptions {
  int thread_count = 1;  // files read in parallel
};

class HuggingFaceStorageReader : public StorageReader {
 public:
  // `path` (a path or URL, through OpenStore): a directory (its *.safetensors files; DCP's
  // sharded/ output too) or one file ending in ".safetensors".
  static Result<std::unique_ptr<HuggingFaceStorageReader>> Open(
      const std::string& path, HuggingFaceReaderOptions options = {});
  // Over a store the caller keeps alive; `files` restricts the keys read (empty: every
  // top-level *.safetensors key).
  HuggingFaceStorageReader(Store* store, std::string checkpoint_id,
                           HuggingFaceReaderOptions options, std::vector<std::string> files = {});
  ~HuggingFaceStorageReader() override;

  Result<Metadata> ReadMetadata(int rank = -1) override;
  Status SetUp(const Metadata& metadata, bool is_coordinator, int rank) override;
  Status ReadData(const LoadPlan& plan, LoadPlanner& planner) override;
  std::string checkpoint_id() const override { return checkpoint_id_; }

  // Where one stored chunk lives.
  struct Piece {
    std::string file;
    uint64_t at = 0;
    Shape shape;
    DType dtype = DType::kFloat32;
  };

 protected:
  Store* store() const { return store_; }
  const std::map<MetadataIndex, Piece>& pieces() const;

 private:
  std::unique_ptr<Store> owned_store_;
  Store* store_;
  std::string checkpoint_id_;
  HuggingFaceReaderOptions options_;
  std::vector<std::string> files_;
  struct State;
  std::unique_ptr<State> state_;
};

// PyTorch's QuantizedHuggingFaceStorageReader for DeepSeek-V3-style fp8 checkpoints: a tensor
// "X.weight" stored as float8_e4m3fn with a "X.weight_scale_inv" tensor holding one scale per
// block_size x block_size block is dequantized on load (w * scale in float32, then rounded to
// the destination's dtype, float32 or bfloat16). The metadata reports such weights with
// `target_dtype`, so loading everything as stored allocates dequantized tensors. Any sharding
// of the destination works: each rank reads only its rows and columns (in bounded strips) and
// the scale tensor. Quantized weights must be stored whole (not sharded), as in PyTorch.
struct QuantizedReaderOptions {
  int thread_count = 1;
  DType target_dtype = DType::kFloat32;  // kFloat32 or kBFloat16
  int64_t block_size = 128;
};

class QuantizedHuggingFaceStorageReader final : public HuggingFaceStorageReader {
 public:
  static Result<std::unique_ptr<QuantizedHuggingFaceStorageReader>> Open(
      const std::string& path, QuantizedReaderOptions options = {});
  QuantizedHuggingFaceStorageReader(Store* store, std::string checkpoint_id,
                                    QuantizedReaderOptions options);
  ~QuantizedHuggingFaceStorageReader() override;

  Result<Metadata> ReadMetadata(int rank = -1) override;
  Status ReadData(const LoadPlan& plan, LoadPlanner& planner) override;

 private:
  std::unique_ptr<Store> owned_store_;
  QuantizedReaderOptions qoptions_;
  std::map<std::string, std::string> scale_of_;  // weight fqn -> scale fqn
};

// Dequantizes `rows` x `cols` float8_e4m3fn values (row stride `src_stride` bytes) into `dst`
// (float32 or bfloat16, row stride `dst_stride` elements), multiplying every value of column j
// by scales[j / block] (float32, one per block of columns, for this row strip).
void DequantizeFp8Rows(const uint8_t* src, int64_t src_stride, int64_t rows, int64_t cols,
                       const float* scales, int64_t first_col, int64_t block, DType dst_dtype,
                       void* dst, int64_t dst_stride);

struct ConsolidateOptions {
  // fqn -> 1-based output file (PyTorch's fqn_to_index_mapping); empty: one file.
  std::map<std::string, int> fqn_to_index_mapping;
  int thread_count = 1;
  // Bytes of one assembly window; at most 2 x thread_count windows are in memory at once (plus
  // one bounded read piece of at most 8 MiB per thread).
  uint64_t window_bytes = 8 << 20;
  bool sync_files = true;
  // Key prefix (a directory) of the shards in the input store; "" = its top level.
  std::string input_dir;
};

struct ConsolidateReport {
  int files = 0;
  int64_t tensors = 0;
  int64_t bytes = 0;  // tensor bytes written
  // The most assembly memory held at once: 2 x threads windows + 8 MiB read piece per thread.
  uint64_t buffer_bound_bytes = 0;
};

// Assembles DCP's sharded safetensors output (files with DCP_SHARDING_INFO) in `input` into
// whole-tensor files and the index json in `output`. Streaming: each output file is written
// front to back from windows of at most `window_bytes`, assembled in parallel from the shards'
// byte ranges; no tensor is ever whole in memory.
Result<ConsolidateReport> ConsolidateSafetensors(Store& input, Store& output,
                                                 const ConsolidateOptions& options = {});
Result<ConsolidateReport> ConsolidateSafetensorsFiles(const std::string& input_dir,
                                                      const std::string& output_dir,
                                                      const ConsolidateOptions& options = {});

}  // namespace dcpp
