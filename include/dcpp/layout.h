// Storage layouts: how plans become files. StorageWriter/StorageReader are PyTorch's interfaces
// of the same names; FileSystemWriter/FileSystemReader implement DCP's directory layout:
//
//   <dir>/__{rank}_{n}.distcp   items of one rank (one file per writer thread, or per item),
//                               each item a complete torch.save archive (bytes items: the
//                               torch.save of the value), at the offset recorded in .metadata
//   <dir>/.metadata             the pickled Metadata; its appearance is the commit point
//   <dir>/__{rank}.metadata     per-rank metadata in rank-local (no-collective) mode
//   <dir>/.dcpp.lock            dcpp's save lock (flock; empty but for the holder's pid), which
//                               also marks the directory as a checkpoint; PyTorch ignores it
//
// Concurrency: a save holds the directory's lock from SetUp until EndSave, so two saves (or a
// save and `dcpp gc`) to one directory never interleave: the later one fails at once with
// Unavailable on every rank. The leftovers of failed or killed saves (data files no committed
// metadata references, commit temporaries) are removed by the next successful save after its
// commit, still under the lock, and by CollectGarbage (`dcpp gc`).
//
// Writers stream tensors from the caller's memory; readers read only the byte ranges a plan
// needs and land them directly in the destination tensors when the layouts allow.
// Thread-safety: one writer/reader per save/load; they run their own I/O threads internally.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/metadata.h"
#include "dcpp/planner.h"
#include "dcpp/status.h"

namespace dcpp {

class Communicator;
class Store;
class StoreLock;
namespace internal {
struct Manifest;
}

struct WriteResult {
  MetadataIndex index;
  int64_t size_in_bytes = 0;
  StorageInfo storage_data;
  // xxHash3-64 of the stored blob's bytes, one per `checksum_segment_bytes` segment from the
  // blob's start (one hash for a blob of at most one segment); empty when the writer kept none.
  // The coordinator writes them to the checkpoint's manifest.
  std::vector<uint64_t> checksums;
  uint64_t checksum_segment_bytes = 0;
};

std::string EncodeWriteResults(const std::vector<WriteResult>& results);
Result<std::vector<WriteResult>> DecodeWriteResults(std::string_view bytes);

class StorageWriter {
 public:
  virtual ~StorageWriter() = default;
  StorageWriter() = default;
  StorageWriter(const StorageWriter&) = delete;
  StorageWriter& operator=(const StorageWriter&) = delete;

  // Prepares for a save by `rank`; the coordinator also checks the overwrite policy.
  virtual Status SetUp(bool is_coordinator, int rank, bool use_collectives) = 0;
  virtual Result<SavePlan> PrepareLocalPlan(SavePlan plan) = 0;
  // Coordinator: assigns each rank's file prefix.
  virtual Result<std::vector<SavePlan>> PrepareGlobalPlan(std::vector<SavePlan> plans) = 0;
  // Writes this rank's items; blocking; returns where each went.
  virtual Result<std::vector<WriteResult>> WriteData(const SavePlan& plan,
                                                     SavePlanner& planner) = 0;
  // Optional, by whoever calls Finish: once the global plan is made, with the Metadata Finish
  // will be given, whose state_dict_metadata and planner_data no longer change (Finish fills in
  // the rest). It runs on a thread of its own while WriteData writes, so the writer may start
  // on its commit here (FileSystemWriter encodes and checks most of `.metadata`); it must be
  // safe beside WriteData. A failure here is Finish's to report.
  virtual void PrepareFinish(const Metadata& metadata) { (void)metadata; }
  // Coordinator (or every rank in rank-local mode): records storage data in `metadata` and
  // commits it. Nothing is visible as a checkpoint before this returns OK.
  virtual Status Finish(Metadata& metadata,
                        const std::vector<std::vector<WriteResult>>& results) = 0;
  // After a successful Finish (by the rank that called it): removes the data files of the
  // checkpoint this save replaced that the new one does not use.
  virtual Status CleanUp() { return Status::Ok(); }
  // Every rank, once the save's outcome is known (success or failure): releases what SetUp took
  // (the destination's lock). The writer may be set up again for another save afterwards.
  virtual void EndSave() {}
  // After a successful Finish: the committed metadata's pickle bytes, handed over once (empty
  // when the writer kept none). The coordinator sends them to the other ranks rather than
  // encoding the metadata a second time.
  virtual std::string TakeCommittedMetadata() { return {}; }
  // The checkpoint's name for messages and StorageMeta.
  virtual std::string checkpoint_id() const = 0;
};

class StorageReader {
 public:
  virtual ~StorageReader() = default;
  StorageReader() = default;
  StorageReader(const StorageReader&) = delete;
  StorageReader& operator=(const StorageReader&) = delete;

  // `rank` >= 0 reads that rank's rank-local metadata (`__{rank}.metadata`).
  virtual Result<Metadata> ReadMetadata(int rank = -1) = 0;
  virtual Status SetUp(const Metadata& metadata, bool is_coordinator, int rank) = 0;
  // Reads every item of `plan`, handing destinations and values through `planner`.
  virtual Status ReadData(const LoadPlan& plan, LoadPlanner& planner) = 0;
  virtual std::string checkpoint_id() const = 0;
};

struct FileSystemWriterOptions {
  // One file per writer thread (DCP's single_file_per_rank) or one file per item.
  bool single_file_per_rank = true;
  int thread_count = 1;
  // Threads that work on one file at once: with 2 or more the file writes behind (its small
  // records are gathered, CRC'd and hashed into one buffer while a pool thread writes the
  // previous one); large records are written from the caller's memory on the writer thread. 0:
  // this process's cores (its affinity mask, or the machine's shared among the processes its
  // launcher started here: torchrun's LOCAL_WORLD_SIZE, Open MPI's and MPICH's local sizes),
  // shared among the files it is writing at once (AsyncSave takes 1, leaving the cores to the
  // training beside it); 1: all on the file's writer thread.
  int write_parallelism = 0;
  // fsync every file before the commit. On local file systems a file past 1 MiB is written
  // with O_DIRECT from aligned staging buffers (its bytes never enter the page cache, so a
  // checkpoint does not evict the job's cached data, and a load soon after reads the disk);
  // DCPP_DIRECT_IO=0 in the environment keeps the process's files buffered.
  bool sync_files = true;
  // An existing committed checkpoint in the directory is replaced (atomically: its files stay
  // valid until the new .metadata is committed) when true, refused when false.
  bool overwrite = true;
  MetadataEncodeOptions metadata;
  // Compress each item blob as one zstd frame (PyTorch's `_extensions=[ZStandard()]`, recorded
  // as transform descriptor "stream.zstd/1"; PyTorch >= 2.7 with the zstandard module reads it).
  // Costs one in-memory copy of each item. 0 = off, else the zstd level (1..19).
  int zstd_level = 0;
  // Guard the destination (the coordinator, or every rank in rank-local mode, at SetUp):
  //   - a directory that is not empty must be a checkpoint: it holds `.metadata`,
  //     `__{rank}.metadata`, dcpp's lock file or another name only dcpp writes. Otherwise the save
  //     fails with FailedPrecondition naming the directory and some of its files, so a user's
  //     files (even one named `__0_0.distcp`) are never overwritten;
  //   - the save lock is taken (see above); a store that cannot lock gets unique data file names.
  // Off only for a helper writing on behalf of a save that holds the lock (the writer process).
  bool guard_destination = true;
};

class FileSystemWriter final : public StorageWriter {
 public:
  // Creates the directory if needed.
  static Result<std::unique_ptr<FileSystemWriter>> Open(const std::string& path,
                                                        FileSystemWriterOptions options = {});
  // Over a store the caller keeps alive (in-memory and fault-injecting stores in tests).
  FileSystemWriter(Store* store, std::string checkpoint_id, FileSystemWriterOptions options);
  ~FileSystemWriter() override;

  Status SetUp(bool is_coordinator, int rank, bool use_collectives) override;
  Result<SavePlan> PrepareLocalPlan(SavePlan plan) override;
  Result<std::vector<SavePlan>> PrepareGlobalPlan(std::vector<SavePlan> plans) override;
  Result<std::vector<WriteResult>> WriteData(const SavePlan& plan, SavePlanner& planner) override;
  void PrepareFinish(const Metadata& metadata) override;
  Status Finish(Metadata& metadata, const std::vector<std::vector<WriteResult>>& results) override;
  Status CleanUp() override;
  void EndSave() override;
  std::string TakeCommittedMetadata() override { return std::move(committed_bytes_); }
  std::string checkpoint_id() const override { return checkpoint_id_; }

 private:
  struct PreparedCommit;
  Status GuardDestination(bool rank_local);
  Status RemoveLeftovers(bool after_commit);

  std::unique_ptr<Store> owned_store_;
  Store* store_;
  std::string checkpoint_id_;
  FileSystemWriterOptions options_;
  std::unique_ptr<StoreLock> lock_;       // the directory's lock, from SetUp to EndSave
  std::unique_ptr<StoreLock> rank_lock_;  // rank-local mode: this rank's own lock
  int rank_ = 0;
  bool use_collectives_ = true;
  std::string save_tag_;  // non-empty when replacing a checkpoint: makes file names unique
  std::vector<std::string> referenced_;  // files of the committed metadata (for CleanUp)
  std::string committed_;                // the committed metadata's key, and its bytes' hash
  uint64_t committed_hash_ = 0;
  std::string committed_bytes_;               // until TakeCommittedMetadata
  std::vector<std::string> replaced_;         // files of the checkpoint this save replaces
  std::string replaced_manifest_;             // the replaced checkpoint's manifest (for CleanUp)
  std::string manifest_;                      // this save's manifest, once committed
  std::unique_ptr<PreparedCommit> prepared_;  // PrepareFinish's work, until Finish
};

struct FileSystemReaderOptions {
  int thread_count = 1;  // files read in parallel
  // Check what is read: every blob or segment against the checkpoint's manifest of xxHash3
  // checksums, or, for a checkpoint without one (written by PyTorch), the CRC-32 of every
  // torch.save record read whole. A mismatch is DataLoss naming the key, file, offset and rank.
  // Off only to salvage what a damaged checkpoint still holds (the values read may be wrong),
  // or where the bytes were just verified by other means.
  bool verify = true;
};

class FileSystemReader final : public StorageReader {
 public:
  static Result<std::unique_ptr<FileSystemReader>> Open(const std::string& path,
                                                        FileSystemReaderOptions options = {});
  FileSystemReader(Store* store, std::string checkpoint_id, FileSystemReaderOptions options);
  ~FileSystemReader() override;

  // `rank` >= 0 (a save without collectives): the union of every `__{r}.metadata`
  // (MergeRankLocalMetadata) with `rank`'s own file first, so any world size loads it and a rank
  // reads its own entries where the files disagree.
  Result<Metadata> ReadMetadata(int rank = -1) override;
  Status SetUp(const Metadata& metadata, bool is_coordinator, int rank) override;
  Status ReadData(const LoadPlan& plan, LoadPlanner& planner) override;
  std::string checkpoint_id() const override { return checkpoint_id_; }

 private:
  Result<Metadata> ReadMetadataFile(int rank);
  // Reads the manifest paired with the metadata file `name` whose bytes are `bytes`, if any.
  Status ReadManifest(const std::string& name, std::string_view bytes);

  std::unique_ptr<Store> owned_store_;
  Store* store_;
  std::string checkpoint_id_;
  FileSystemReaderOptions options_;
  const Metadata* metadata_ = nullptr;
  int rank_ = 0;
  // Manifests of the metadata files read (several in rank-local mode).
  std::vector<std::shared_ptr<const internal::Manifest>> manifests_;
  bool manifest_complete_ = false;  // one manifest covers the whole metadata
};

// Reads one torch.save file on the root rank and broadcasts it (PyTorch's
// BroadcastingTorchSaveReader): every rank loads the same file into its own sharding, and the
// file is read once per job. The top-level value must be a dict; its flattened keys are the
// checkpoint keys, each tensor one whole chunk. ReadMetadata and ReadData are collective: call
// them (through Load with the same communicator) on every rank.
class BroadcastingTorchSaveReader final : public StorageReader {
 public:
  BroadcastingTorchSaveReader(std::string path, Communicator* comm, int root = 0);
  ~BroadcastingTorchSaveReader() override;

  Result<Metadata> ReadMetadata(int rank = -1) override;
  Status SetUp(const Metadata& metadata, bool is_coordinator, int rank) override;
  Status ReadData(const LoadPlan& plan, LoadPlanner& planner) override;
  std::string checkpoint_id() const override { return path_; }

 private:
  std::string path_;
  Communicator* comm_;
  int root_;
  Value root_value_;             // the loaded file, on the root rank only
  std::vector<FlatEntry> flat_;  // its leaves, on the root rank only
  const Metadata* metadata_ = nullptr;
};

// Name of the file that marks a committed checkpoint.
inline constexpr const char* kMetadataFileName = ".metadata";

// Removes the leftovers of failed or killed saves from the checkpoint directory of `store`
// (`dcpp gc`): data files that no committed metadata (`.metadata`, `__{rank}.metadata`)
// references and commit temporaries; only names dcpp or DCP writes, never other files. Holds the
// directory's lock while it works (Unavailable if a save holds it). FailedPrecondition if the
// directory is not a checkpoint (see FileSystemWriterOptions::guard_destination). Returns the
// keys removed (with dry_run: that would be removed), sorted. If some committed metadata cannot
// be read, no data file is removed.
Result<std::vector<std::string>> CollectGarbage(Store& store, const std::string& checkpoint_id,
                                                bool dry_run = false);
Result<std::vector<std::string>> CollectGarbage(const std::string& path, bool dry_run = false);

}  // namespace dcpp
