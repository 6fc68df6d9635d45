// DCP's file-system layout: FileSystemWriter and FileSystemReader.
//
// Steps of a save as this file carries them out (design.md §3):
//   1. SetUp: create the directory. The coordinator (every rank in rank-local mode) refuses a
//      directory that is not a checkpoint and takes the save lock (leftovers.h names the files).
//      If a committed checkpoint (.metadata) is already there,
//      refuse (overwrite=false) or give this save's data files a unique tag
//      (`__{rank}_{n}_{tag}.distcp`) so the old checkpoint's files are never touched before the
//      new metadata is committed.
//   2. PrepareGlobalPlan (coordinator): prefix `__{rank}_` for each rank's files.
//   3. WriteData (every rank): items split into buckets (one per writer thread, or one per item);
//      each bucket is one file, written front to back: bytes items first, then tensors, each a
//      complete torch.save archive streamed from the caller's memory. With sync_files, every
//      file is fsync'ed before WriteData returns.
//   4. Finish (coordinator, only after every rank's writes succeeded): storage data merged into
//      the Metadata, which is encoded and written to `.metadata.tmp`, fsync'ed, renamed to
//      `.metadata`, and the directory fsync'ed. The rename is the commit point: before it the
//      previous checkpoint (if any) is intact; after it the new one is complete and durable.
//      Before the metadata, the manifest of every blob's xxHash3 checksums (computed while
//      writing, carried in the WriteResults) is written atomically under a name derived from the
//      metadata's bytes (layout/manifest.h), so it pairs with exactly that metadata.
//   5. CleanUp (coordinator): the replaced checkpoint's data files that the new metadata does
//      not reference are removed, and its manifest; so are the leftovers of earlier failed or
//      killed saves (data files no committed metadata references, commit temporaries, manifests
//      of no committed metadata). SetUp removes those leftovers already, once it holds the lock,
//      so a save finds the space a failed one took.
//   6. EndSave (every rank): the lock is released, whatever the outcome.
// A load reads `.metadata` (or `__{rank}.metadata` in rank-local mode), then reads for each
// item only its byte range, decoding the torch.save archive in place.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <string_view>
#include <unordered_map>

#include "codec/metadata_encoder.h"
#include "codec/stream_transform.h"
#include "codec/torch_save.h"
#include "codec/zip.h"
#include "core/log.h"
#include "core/thread_pool.h"
#include "dcpp/layout.h"
#include "dcpp/storage.h"
#include "layout/leftovers.h"
#include "layout/manifest.h"
#include "planner/plan_wire.h"

namespace dcpp {

namespace {

constexpr const char* kVersion = "1.0.0";
constexpr const char* kSuffix = ".distcp";
// Loads: blobs up to this size are read whole, neighbours together in windows of up to
// kWindowBytes (holes up to kWindowGapBytes, e.g. a skipped item, are read through). 2 MiB
// windows read as fast as 8 MiB ones and keep 6 MiB less per reader thread (load peak RSS).
constexpr size_t kWholeBlobBytes = 512 << 10;
constexpr uint64_t kWindowBytes = 2 << 20;
constexpr uint64_t kWindowGapBytes = 64 << 10;

// An anonymous mapping of n bytes (contents undefined until written), unmapped when dropped.
class MappedBuffer {
 public:
  MappedBuffer() = default;
  MappedBuffer(const MappedBuffer&) = delete;
  MappedBuffer& operator=(const MappedBuffer&) = delete;
  ~MappedBuffer() { Release(); }
  bool Allocate(size_t n) {
    Release();
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    data_ = static_cast<char*>(p);
    size_ = n;
    return true;
  }
  char* data() const { return data_; }

 private:
  void Release() {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }
  char* data_ = nullptr;
  size_t size_ = 0;
};

// Files that FileSystemWriter::WriteData is writing in this process now (see write_bucket).
std::atomic<size_t> files_being_written{0};

// Saves: small records are gathered into writes of this size (per writer thread). A file with
// write-behind (a thread of its own writes each full buffer while the next is filled) takes
// larger ones: its one write at a time is what bounds it. One-thread save of 20 480 tensors,
// twelve alternating pairs of first saves: median 1.42 GB/s with 4 MiB, 1.50 with 8 MiB (the
// device's one-job direct write: 8 MiB blocks beat 4). Four files at once, each filling and
// writing in turn, ran slower with 8 MiB (1.22 against 1.39 GB/s).
constexpr size_t kWriteBatchBytes = 4 << 20;
constexpr size_t kWriteBehindBatchBytes = 8 << 20;
// Saves: every blob starts at a multiple of this in its file, zeros between (readers, PyTorch's
// included, go by each item's offset and length). A torch.save archive aligns its records to 64
// bytes from its own start, so tensor bytes then lie at the same offset within a cache line in
// the file as in tensor memory: a warm load's copy out of the page cache ran at 7.8 GB/s from
// unaligned offsets against 10.9 aligned on the development machine.
constexpr uint64_t kBlobAlign = 64;

std::string RandomHex(int n) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s.push_back(kHex[rng() & 15]);
  return s;
}

std::string Uuid4() {
  std::string h = RandomHex(32);
  h[12] = '4';
  h[16] = "89ab"[h[16] % 4];
  return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) +
         "-" + h.substr(20);
}

std::string RankMetadataName(int rank) { return "__" + std::to_string(rank) + ".metadata"; }

// A tensor over the caller's memory, without copying when the view is dense.
Result<Tensor> Borrow(const TensorView& v) {
  if (!v.device().is_cpu()) {
    return UnimplementedError("tensors on " + v.device().ToString() + " cannot be saved yet");
  }
  if (v.is_contiguous()) {
    auto storage = Storage::Wrap(v.data(), v.nbytes(), v.device(), nullptr);
    return Tensor::FromStorage(std::move(storage), v.dtype(), v.shape());
  }
  // A permuted dense view (e.g. a transpose) spans exactly its bytes: keep its strides, as
  // torch.save does. Anything with gaps is compacted.
  int64_t span = v.StorageElementsNeeded() - v.storage_offset();
  auto storage =
      Storage::Wrap(v.data(), static_cast<size_t>(span) * v.element_size(), v.device(), nullptr);
  Shape strides = v.strides();
  DCPP_ASSIGN_OR_RETURN(
      Tensor t, Tensor::FromStorage(std::move(storage), v.dtype(), v.shape(), std::move(strides)));
  if (span == v.numel()) return t;
  return t.Clone();
}

struct Bucket {
  std::vector<size_t> items;  // indexes into the plan
  int64_t bytes = 0;
};

// PyTorch's _split_by_size_and_type: bytes items round-robin, tensors largest first to the
// lightest bucket.
std::vector<Bucket> SplitBySizeAndType(const SavePlan& plan, size_t bins) {
  std::vector<Bucket> buckets(std::max<size_t>(bins, 1));
  if (buckets.size() == 1) {
    for (size_t i = 0; i < plan.items.size(); ++i) buckets[0].items.push_back(i);
    return buckets;
  }
  std::vector<std::pair<int64_t, size_t>> tensors;  // (size, item), sizes computed once
  size_t rr = 0;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    if (plan.items[i].type == WriteItemType::kByteIO) {
      buckets[rr++ % buckets.size()].items.push_back(i);
    } else {
      tensors.emplace_back(plan.items[i].StorageSize(), i);
    }
  }
  std::stable_sort(tensors.begin(), tensors.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (const auto& [size, i] : tensors) {
    size_t best = 0;
    for (size_t b = 1; b < buckets.size(); ++b) {
      if (buckets[b].bytes < buckets[best].bytes) best = b;
    }
    buckets[best].items.push_back(i);
    buckets[best].bytes += size;
  }
  return buckets;
}

// The most bytes an item's transformed blob may decode to: a tensor item is one torch.save
// archive of at most the tensor's bytes plus its records; a bytes item is bounded by a generous
// expansion ratio. Saturates instead of overflowing on hostile sizes.
uint64_t DecodedSizeCap(const Metadata& metadata, const ReadItem& item, uint64_t stored) {
  constexpr uint64_t kArchiveOverhead = uint64_t{1} << 20;
  constexpr uint64_t kMax = ~uint64_t{0};
  const auto* m = metadata.state_dict_metadata.Find(item.storage_index.fqn);
  const auto* t = m ? std::get_if<TensorStorageMetadata>(m) : nullptr;
  if (item.type == LoadItemType::kTensor && t) {
    unsigned __int128 bytes = ElementSize(t->properties.dtype);
    for (int64_t d : t->size) {
      bytes *= static_cast<uint64_t>(std::max<int64_t>(d, 0));
      if (bytes > kMax) return kMax;
    }
    return static_cast<uint64_t>(std::min<unsigned __int128>(bytes + kArchiveOverhead, kMax));
  }
  return std::max<uint64_t>(uint64_t{64} << 20, stored > kMax / 1024 ? kMax : stored * 1024);
}

}  // namespace

// ------------------------------------------------------------------ write results encoding

std::string EncodeWriteResults(const std::vector<WriteResult>& results) {
  internal::WireWriter w;
  w.U64(results.size());
  for (const auto& r : results) {
    internal::PutIndex(w, r.index);
    w.U64(static_cast<uint64_t>(r.size_in_bytes));
    w.Str(r.storage_data.relative_path);
    w.U64(static_cast<uint64_t>(r.storage_data.offset));
    w.U64(static_cast<uint64_t>(r.storage_data.length));
    w.U64(r.storage_data.transform_descriptors.size());
    for (const auto& d : r.storage_data.transform_descriptors) w.Str(d);
    w.U64(r.checksum_segment_bytes);
    w.U64(r.checksums.size());
    for (uint64_t h : r.checksums) w.U64(h);
  }
  return w.Release();
}

Result<std::vector<WriteResult>> DecodeWriteResults(std::string_view bytes) {
  internal::WireReader r(bytes, "write results");
  DCPP_ASSIGN_OR_RETURN(uint64_t count, r.Count());
  // Grown as results decode: a count is only bounded by the bytes left, and a WriteResult
  // takes far more memory than a byte.
  std::vector<WriteResult> out;
  for (uint64_t i = 0; i < count; ++i) {
    WriteResult& w = out.emplace_back();
    DCPP_RETURN_IF_ERROR(internal::GetIndex(r, &w.index));
    DCPP_ASSIGN_OR_RETURN(uint64_t size, r.U64());
    w.size_in_bytes = static_cast<int64_t>(size);
    DCPP_ASSIGN_OR_RETURN(w.storage_data.relative_path, r.Str());
    DCPP_ASSIGN_OR_RETURN(uint64_t offset, r.U64());
    DCPP_ASSIGN_OR_RETURN(uint64_t length, r.U64());
    w.storage_data.offset = static_cast<int64_t>(offset);
    w.storage_data.length = static_cast<int64_t>(length);
    DCPP_ASSIGN_OR_RETURN(uint64_t nd, r.Count());
    w.storage_data.transform_descriptors.resize(nd);
    for (auto& d : w.storage_data.transform_descriptors) {
      DCPP_ASSIGN_OR_RETURN(d, r.Str());
    }
    DCPP_ASSIGN_OR_RETURN(w.checksum_segment_bytes, r.U64());
    DCPP_ASSIGN_OR_RETURN(uint64_t nh, r.Count());
    w.checksums.resize(nh);
    for (auto& h : w.checksums) {
      DCPP_ASSIGN_OR_RETURN(h, r.U64());
    }
  }
  if (!r.done()) return r.Malformed();
  return out;
}

// ------------------------------------------------------------------ writer

Result<std::unique_ptr<FileSystemWriter>> FileSystemWriter::Open(const std::string& path,
                                                                 FileSystemWriterOptions options) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, OpenStore(path, {.create = true}));
  auto w = std::make_unique<FileSystemWriter>(store.get(), path, options);
  w->owned_store_ = std::move(store);
  return w;
}

FileSystemWriter::FileSystemWriter(Store* store, std::string checkpoint_id,
                                   FileSystemWriterOptions options)
    : store_(store), checkpoint_id_(std::move(checkpoint_id)), options_(options) {}

FileSystemWriter::~FileSystemWriter() = default;

Status FileSystemWriter::GuardDestination(bool rank_local) {
  if (lock_) return Status::Ok();  // set up again without EndSave: still held
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> keys, store_->List());
  DCPP_RETURN_IF_ERROR(internal::CheckCheckpointDirectory(keys, checkpoint_id_));
  if (!store_->CanLock()) return Status::Ok();  // unique file names instead (see SetUp)
  DCPP_ASSIGN_OR_RETURN(lock_,
                        store_->TryLock(internal::kLockFileName,
                                        rank_local ? LockMode::kShared : LockMode::kExclusive));
  if (rank_local) {
    auto mine = store_->TryLock(internal::RankLockFileName(rank_), LockMode::kExclusive);
    if (!mine.ok()) {
      lock_.reset();
      return mine.status();
    }
    rank_lock_ = std::move(*mine);
  }
  // Under the lock nobody else writes here: the leftovers of earlier saves go now, before this
  // save needs their space (a disk filled by a failed save). Best effort: a failure to remove is
  // logged, and CleanUp tries again after the commit.
  Status removed = RemoveLeftovers(/*after_commit=*/false);
  if (!removed.ok()) {
    internal::LogLine(internal::LogLevel::kInfo, "save.leftovers_not_removed",
                      "error=\"" + std::string(removed.message()) + "\"");
  }
  return Status::Ok();
}

Status FileSystemWriter::RemoveLeftovers(bool after_commit) {
  if (!lock_) return Status::Ok();  // another save's files in flight would look like leftovers
  // After the commit this writer knows what its metadata references: no need to parse it again.
  internal::KnownMetadata known;
  if (after_commit && !committed_.empty()) {
    known.key = committed_;
    known.hash = committed_hash_;
    known.referenced = referenced_;
  }
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> removed,
                        internal::RemoveLeftovers(*store_, use_collectives_ ? -1 : rank_,
                                                  known.key.empty() ? nullptr : &known));
  for (const auto& f : removed) {
    internal::LogLine(internal::LogLevel::kInfo, "save.removed_leftover",
                      "path=\"" + store_->Describe(f) + "\"");
  }
  return Status::Ok();
}

void FileSystemWriter::EndSave() {
  prepared_.reset();
  rank_lock_.reset();
  lock_.reset();
}

Status FileSystemWriter::SetUp(bool is_coordinator, int rank, bool use_collectives) {
  rank_ = rank;
  use_collectives_ = use_collectives;
  committed_.clear();
  committed_bytes_.clear();
  prepared_.reset();
  if (options_.guard_destination && (is_coordinator || !use_collectives)) {
    DCPP_RETURN_IF_ERROR(GuardDestination(!use_collectives));
  }
  const std::string marker = use_collectives ? kMetadataFileName : RankMetadataName(rank);
  DCPP_ASSIGN_OR_RETURN(bool exists, store_->Exists(marker));
  // A checkpoint of the other mode may live here too: its data files must survive as well.
  DCPP_ASSIGN_OR_RETURN(
      bool other, store_->Exists(use_collectives ? RankMetadataName(rank) : kMetadataFileName));
  save_tag_.clear();
  if (other && !exists) save_tag_ = RandomHex(8);
  replaced_.clear();
  replaced_manifest_.clear();
  if (exists) {
    if (!options_.overwrite && (is_coordinator || !use_collectives)) {
      return FailedPreconditionError("checkpoint \"" + checkpoint_id_ +
                                     "\" already exists and overwrite is off");
    }
    save_tag_ = RandomHex(8);
    // Remember the replaced checkpoint's files, to remove them once the new one is committed.
    // If its metadata cannot be read, nothing is removed.
    if (is_coordinator || !use_collectives) {
      auto old = store_->ReadAll(marker);
      auto md = old.ok() ? ParseMetadata(*old) : Result<Metadata>(old.status());
      if (old.ok())
        replaced_manifest_ =
            internal::ManifestKey(marker, internal::Xxh3(old->data(), old->size()));
      if (md.ok()) {
        for (const auto& [idx, info] : md->storage_data) replaced_.push_back(info.relative_path);
      }
    }
  }
  // Without a lock, two saves may run at once: each writes files of its own.
  if (save_tag_.empty() && !store_->CanLock()) save_tag_ = RandomHex(8);
  return Status::Ok();
}

Result<SavePlan> FileSystemWriter::PrepareLocalPlan(SavePlan plan) {
  if (!use_collectives_) plan.storage_prefix = "__" + std::to_string(rank_) + "_";
  return plan;
}

Result<std::vector<SavePlan>> FileSystemWriter::PrepareGlobalPlan(std::vector<SavePlan> plans) {
  for (size_t i = 0; i < plans.size(); ++i) {
    if (plans[i].storage_prefix.empty()) plans[i].storage_prefix = "__" + std::to_string(i) + "_";
  }
  return plans;
}

Result<std::vector<WriteResult>> FileSystemWriter::WriteData(const SavePlan& plan,
                                                             SavePlanner& planner) {
  if (plan.storage_prefix.empty()) return InternalError("save plan without a file prefix");
  // Resolve in this thread (planners are single-threaded); tensor data stays in place.
  std::vector<dcpp::WriteData> data(plan.items.size());
  for (size_t i = 0; i < plan.items.size(); ++i) {
    DCPP_ASSIGN_OR_RETURN(data[i], planner.ResolveData(plan.items[i]));
  }
  std::vector<Bucket> buckets;
  if (options_.single_file_per_rank) {
    buckets = SplitBySizeAndType(plan, static_cast<size_t>(std::max(options_.thread_count, 1)));
  } else {
    for (size_t i = 0; i < plan.items.size(); ++i) buckets.push_back({{i}, 0});
  }
  const std::string tag = save_tag_.empty() ? "" : "_" + save_tag_;
  std::vector<std::vector<WriteResult>> results(buckets.size());
  const size_t writers = std::max<size_t>(
      1, std::min(buckets.size(), static_cast<size_t>(std::max(options_.thread_count, 1))));

  auto write_bucket = [&](size_t b) -> Status {
    const std::string name = plan.storage_prefix + std::to_string(b) + tag + kSuffix;
    // This process's cores are shared among the files being written at once: this save's, and
    // those of other saves in the process (ranks on threads), as far as they have started.
    const size_t others = files_being_written.fetch_add(1);
    struct Leave {
      ~Leave() { files_being_written.fetch_sub(1); }
    } leave;
    const size_t parallelism =
        options_.write_parallelism > 0
            ? static_cast<size_t>(options_.write_parallelism)
            : std::max<size_t>(1, internal::CoresForThisProcess() / std::max(writers, others + 1));
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, store_->OpenWrite(name));
    // torch.save archives stream into the file, hashed on the way for the manifest; small
    // records are gathered into large writes, large ones go straight from the caller's memory.
    internal::HashingSink sink(*file, internal::kManifestSegmentBytes,
                               parallelism > 1 ? kWriteBehindBatchBytes : kWriteBatchBytes);
    // Bytes items first, then tensors, each in plan order.
    std::vector<size_t> order;
    for (size_t i : buckets[b].items) {
      if (plan.items[i].type == WriteItemType::kByteIO) order.push_back(i);
    }
    for (size_t i : buckets[b].items) {
      if (plan.items[i].type != WriteItemType::kByteIO) order.push_back(i);
    }
    auto write_items = [&]() -> Status {
      static constexpr char kZeros[kBlobAlign] = {};
      for (size_t i : order) {
        const WriteItem& item = plan.items[i];
        if (const uint64_t mis = sink.position() % kBlobAlign; mis != 0) {
          // The message is built only on failure (this runs once per item).
          if (Status s = sink.Write(kZeros, kBlobAlign - mis); !s.ok()) {
            return s.WithContext("writing \"" + name + "\"");
          }
        }
        const uint64_t offset = sink.position();
        sink.BeginBlob();
        Status s;
        if (options_.zstd_level > 0) {
          // Encode in memory, then write one zstd frame.
          std::string blob;
          if (item.type == WriteItemType::kByteIO) {
            blob = std::move(data[i].bytes);
          } else {
            auto t = Borrow(data[i].tensor);
            auto encoded = t.ok() ? EncodeTorchSave(Value::FromTensor(*std::move(t)))
                                  : Result<std::string>(t.status());
            s = encoded.status();
            if (s.ok()) blob = std::move(*encoded);
          }
          if (s.ok()) {
            auto frame = internal::ZstdTransform(options_.zstd_level).Encode(blob);
            s = frame.ok() ? sink.Write(frame->data(), frame->size()) : frame.status();
          }
        } else if (item.type == WriteItemType::kByteIO) {
          s = sink.Write(data[i].bytes.data(), data[i].bytes.size());
        } else {
          auto t = Borrow(data[i].tensor);
          // Large records stay on this thread: checksumming a piece here while the drainer
          // writes the one before read every byte twice (different caches) and measured no
          // faster (0.47-0.59 against 0.36-0.37 CPU s per GiB on backed pages).
          s = t.ok() ? WriteTorchSave(Value::FromTensor(*std::move(t)), sink) : t.status();
        }
        if (!s.ok())
          return s.WithContext("writing \"" + name + "\" item \"" + item.index.ToString() + "\"");
        const int64_t length = static_cast<int64_t>(sink.position() - offset);
        StorageInfo info{name, static_cast<int64_t>(offset), length, {}};
        if (options_.zstd_level > 0) {
          info.transform_descriptors = {std::string(internal::kZstdDescriptor)};
        }
        results[b].push_back(
            {item.index, length, std::move(info), sink.EndBlob(), internal::kManifestSegmentBytes});
      }
      return sink.Flush().WithContext("writing \"" + name + "\"");
    };
    if (parallelism > 1) {
      // Write-behind: the items are encoded and hashed here while the previous buffers of them
      // are written, by the kernel (lent writes) or else by a pool thread (see HashingSink).
      sink.EnableWriteBehind();
      const std::vector<Status> done = internal::ParallelFor(2, 2, [&](size_t role) -> Status {
        if (role == 1) return sink.Drain();
        Status s = write_items();
        sink.StopDraining();
        return s;
      });
      DCPP_RETURN_IF_ERROR(done[0]);
      DCPP_RETURN_IF_ERROR(done[1].WithContext("writing \"" + name + "\""));
    } else {
      DCPP_RETURN_IF_ERROR(write_items());
    }
    if (options_.sync_files) {
      DCPP_RETURN_IF_ERROR(file->Sync().WithContext("syncing \"" + name + "\""));
    }
    return file->Close().WithContext("closing \"" + name + "\"");
  };

  const std::vector<Status> errors = internal::ParallelFor(
      buckets.size(), static_cast<size_t>(std::max(options_.thread_count, 1)), write_bucket);
  std::vector<WriteResult> all;
  for (size_t b = 0; b < buckets.size(); ++b) {
    DCPP_RETURN_IF_ERROR(errors[b]);
    for (auto& r : results[b]) all.push_back(std::move(r));
  }
  return all;
}

// The metadata's encoding up to storage_data and the checks of the parts before it, done while
// the data was written.
struct FileSystemWriter::PreparedCommit {
  explicit PreparedCommit(const MetadataEncodeOptions& options) : encoder(options) {}
  const Metadata* metadata = nullptr;  // the one it was prepared from
  size_t entries = 0;                  // its state_dict_metadata's size then
  internal::MetadataEncoder encoder;
  Status checked;
};

void FileSystemWriter::PrepareFinish(const Metadata& metadata) {
  auto p = std::make_unique<PreparedCommit>(options_.metadata);
  p->metadata = &metadata;
  p->entries = metadata.state_dict_metadata.size();
  p->checked =
      internal::ValidatePlannedMetadata(metadata, "metadata of \"" + checkpoint_id_ + "\"");
  if (p->checked.ok()) p->encoder.Begin(metadata);
  prepared_ = std::move(p);
}

Status FileSystemWriter::Finish(Metadata& metadata,
                                const std::vector<std::vector<WriteResult>>& results) {
  // What PrepareFinish did counts only for the Metadata it saw (the contract: unchanged since).
  std::unique_ptr<PreparedCommit> prepared = std::move(prepared_);
  if (prepared && (prepared->metadata != &metadata ||
                   prepared->entries != metadata.state_dict_metadata.size())) {
    prepared.reset();
  }
  // The storage data and the manifest's blobs are gathered side by side (each reads only the
  // results): a few small allocations per item each.
  internal::Manifest manifest;
  bool complete = true;
  (void)internal::ParallelFor(2, 2, [&](size_t part) -> Status {
    if (part == 0) {
      auto& storage = metadata.storage_data;
      storage.clear();
      for (const auto& rank_results : results) {
        for (const auto& r : rank_results) {
          // Results usually come in key order: each then lands at the end without a search.
          if (storage.empty() || storage.rbegin()->first < r.index) {
            storage.emplace_hint(storage.end(), r.index, r.storage_data);
          } else {
            storage[r.index] = r.storage_data;
          }
        }
      }
      return Status::Ok();
    }
    size_t blob_count = 0, hash_count = 0;
    for (const auto& rank_results : results) {
      blob_count += rank_results.size();
      for (const auto& r : rank_results) hash_count += r.checksums.size();
    }
    manifest.blobs.reserve(blob_count);
    manifest.hashes.reserve(hash_count);
    for (const auto& rank_results : results) {
      for (const auto& r : rank_results) {
        if (r.checksums.empty() || r.checksum_segment_bytes != manifest.segment_bytes) {
          // A writer that kept no checksums: no manifest rather than a partial one.
          complete = false;
          continue;
        }
        manifest.Add(r.storage_data.relative_path, static_cast<uint64_t>(r.storage_data.offset),
                     static_cast<uint64_t>(r.storage_data.length), r.checksums);
      }
    }
    return Status::Ok();
  });
  metadata.storage_meta = StorageMeta{checkpoint_id_, Uuid4(), std::nullopt, {}};
  metadata.version = kVersion;
  // Checked and encoded side by side (both only read it); the bytes are used only if it passed.
  Result<std::string> encoded = std::string();
  const std::vector<Status> checked = internal::ParallelFor(2, 2, [&](size_t part) -> Status {
    const std::string what = "metadata of \"" + checkpoint_id_ + "\"";
    if (part == 0) {
      if (!prepared) return ValidateMetadata(metadata, what);
      DCPP_RETURN_IF_ERROR(prepared->checked);
      return internal::ValidateStorageData(metadata, what);
    }
    encoded =
        prepared ? prepared->encoder.Finish(metadata) : EncodeMetadata(metadata, options_.metadata);
    return Status::Ok();
  });
  DCPP_RETURN_IF_ERROR(checked[0]);
  DCPP_ASSIGN_OR_RETURN(std::string bytes, std::move(encoded));
  const std::string name = use_collectives_ ? kMetadataFileName : RankMetadataName(rank_);
  // The manifest first, named after the metadata's bytes: until the metadata's rename nothing
  // names it, and a crash in between leaves the previous checkpoint with its own manifest.
  manifest_.clear();
  const uint64_t bytes_hash = internal::Xxh3(bytes.data(), bytes.size());
  if (complete) {
    manifest.metadata_hash = bytes_hash;
    DCPP_ASSIGN_OR_RETURN(std::string encoded, internal::EncodeManifest(std::move(manifest)));
    const std::string key = internal::ManifestKey(name, bytes_hash);
    DCPP_RETURN_IF_ERROR(
        store_->WriteAtomic(key, encoded).WithContext("writing the manifest \"" + key + "\""));
    manifest_ = key;
  }
  DCPP_RETURN_IF_ERROR(store_->WriteAtomic(name, bytes).WithContext("committing \"" + name + "\""));
  referenced_.clear();
  for (const auto& [idx, info] : metadata.storage_data) {
    if (referenced_.empty() || referenced_.back() != info.relative_path) {
      referenced_.push_back(info.relative_path);
    }
  }
  std::sort(referenced_.begin(), referenced_.end());
  referenced_.erase(std::unique(referenced_.begin(), referenced_.end()), referenced_.end());
  committed_ = name;
  committed_hash_ = bytes_hash;
  committed_bytes_ = std::move(bytes);
  return Status::Ok();
}

Status FileSystemWriter::CleanUp() {
  std::sort(referenced_.begin(), referenced_.end());
  std::sort(replaced_.begin(), replaced_.end());
  replaced_.erase(std::unique(replaced_.begin(), replaced_.end()), replaced_.end());
  for (const auto& f : replaced_) {
    if (std::binary_search(referenced_.begin(), referenced_.end(), f)) continue;
    Status s = store_->Remove(f);
    if (!s.ok() && s.code() != StatusCode::kNotFound) return s;
  }
  replaced_.clear();
  if (!replaced_manifest_.empty() && replaced_manifest_ != manifest_) {
    Status s = store_->Remove(replaced_manifest_);
    if (!s.ok() && s.code() != StatusCode::kNotFound) return s;
  }
  replaced_manifest_.clear();
  // Leftovers of failed or killed saves (the replaced checkpoint's files are gone by now too).
  return RemoveLeftovers(/*after_commit=*/true);
}

// ------------------------------------------------------------------ garbage collection

Result<std::vector<std::string>> CollectGarbage(Store& store, const std::string& checkpoint_id,
                                                bool dry_run) {
  const std::string what = "collecting garbage in \"" + checkpoint_id + "\"";
  auto run = [&]() -> Result<std::vector<std::string>> {
    DCPP_ASSIGN_OR_RETURN(std::vector<std::string> keys, store.List());
    DCPP_RETURN_IF_ERROR(internal::CheckCheckpointDirectory(keys, checkpoint_id));
    std::unique_ptr<StoreLock> lock;
    if (store.CanLock()) {
      DCPP_ASSIGN_OR_RETURN(lock, store.TryLock(internal::kLockFileName, LockMode::kExclusive));
      // What was listed before the lock may have changed.
      DCPP_ASSIGN_OR_RETURN(keys, store.List());
    }
    if (dry_run) return internal::FindLeftovers(store, keys);
    DCPP_ASSIGN_OR_RETURN(std::vector<std::string> removed, internal::RemoveLeftovers(store));
    if (!removed.empty()) DCPP_RETURN_IF_ERROR(store.SyncDir());
    return removed;
  };
  auto out = run();
  if (!out.ok()) return out.status().WithContext(what);
  return out;
}

Result<std::vector<std::string>> CollectGarbage(const std::string& path, bool dry_run) {
  auto store = OpenStore(path);
  if (!store.ok()) return store.status().WithContext("collecting garbage in \"" + path + "\"");
  return CollectGarbage(**store, path, dry_run);
}

// ------------------------------------------------------------------ reader

Result<std::unique_ptr<FileSystemReader>> FileSystemReader::Open(const std::string& path,
                                                                 FileSystemReaderOptions options) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, OpenStore(path));
  auto r = std::make_unique<FileSystemReader>(store.get(), path, options);
  r->owned_store_ = std::move(store);
  return r;
}

FileSystemReader::FileSystemReader(Store* store, std::string checkpoint_id,
                                   FileSystemReaderOptions options)
    : store_(store), checkpoint_id_(std::move(checkpoint_id)), options_(options) {}

FileSystemReader::~FileSystemReader() = default;

Result<Metadata> FileSystemReader::ReadMetadata(int rank) {
  manifests_.clear();
  manifest_complete_ = false;
  if (rank < 0) {
    auto md = ReadMetadataFile(-1);
    manifest_complete_ = md.ok() && !manifests_.empty();
    return md;
  }
  // Saved without collectives: one `__{r}.metadata` per saving rank (numbered densely from 0),
  // each describing that rank's items. Their union is the checkpoint whatever world size loads
  // it; this rank's own file comes first, so where files disagree (a rank whose save failed kept
  // its previous checkpoint) a rank reads what it saved itself, as in PyTorch.
  std::vector<Metadata> per_rank;
  for (int r = 0;; ++r) {
    auto md = ReadMetadataFile(r);
    if (!md.ok() && md.status().code() == StatusCode::kNotFound) {
      if (per_rank.empty()) return md;
      break;
    }
    if (!md.ok()) return md.status();
    per_rank.push_back(std::move(*md));
  }
  auto merged = MergeRankLocalMetadata(per_rank, rank);
  if (!merged.ok()) {
    return merged.status().WithContext("merging the rank-local metadata of \"" + checkpoint_id_ +
                                       "\"");
  }
  return merged;
}

Result<Metadata> FileSystemReader::ReadMetadataFile(int rank) {
  const std::string name = rank < 0 ? kMetadataFileName : RankMetadataName(rank);
  const std::string where = "\"" + checkpoint_id_ + "/" + name + "\"";
  auto file = store_->OpenRead(name);
  if (!file.ok()) {
    if (file.status().code() == StatusCode::kNotFound) {
      return NotFoundError("no committed checkpoint at \"" + checkpoint_id_ + "\" (" + name +
                           " is missing)");
    }
    return file.status().WithContext("reading " + where);
  }
  std::string bytes((*file)->size(), '\0');
  DCPP_RETURN_IF_ERROR(
      (*file)->ReadAt(0, bytes.data(), bytes.size()).WithContext("reading " + where));
  auto md = ParseMetadata(bytes);
  if (!md.ok()) return md.status().WithContext("parsing " + where);
  if (options_.verify) DCPP_RETURN_IF_ERROR(ReadManifest(name, bytes));
  return md;
}

Status FileSystemReader::ReadManifest(const std::string& name, std::string_view bytes) {
  const uint64_t hash = internal::Xxh3(bytes.data(), bytes.size());
  const std::string key = internal::ManifestKey(name, hash);
  auto data = store_->ReadAll(key);
  if (!data.ok()) {
    // No manifest for this metadata: written by PyTorch (or a crash removed nothing of ours).
    if (data.status().code() == StatusCode::kNotFound) return Status::Ok();
    return data.status().WithContext("reading the manifest \"" + store_->Describe(key) + "\"");
  }
  auto m = internal::DecodeManifest(*data, store_->Describe(key));
  if (!m.ok()) return m.status();
  if (m->metadata_hash != hash) {
    return DataLossError(store_->Describe(key) + ": manifest belongs to other metadata than \"" +
                         name + "\"");
  }
  manifests_.push_back(std::make_shared<const internal::Manifest>(*std::move(m)));
  return Status::Ok();
}

Status FileSystemReader::SetUp(const Metadata& metadata, bool /*is_coordinator*/, int rank) {
  metadata_ = &metadata;
  rank_ = rank;
  return Status::Ok();
}

Status FileSystemReader::ReadData(const LoadPlan& plan, LoadPlanner& planner) {
  if (!metadata_) return FailedPreconditionError("FileSystemReader::ReadData before SetUp");
  // 1. Each item's stored blob. Plans list items in key order, as storage_data holds them, so
  //    the blob is usually the one found last or the next one; anything else is looked up.
  struct Entry {
    const StorageInfo* info;
    const ReadItem* item;
    uint32_t file;
  };
  std::vector<Entry> entries;
  entries.reserve(plan.items.size());
  std::unordered_map<std::string_view, uint32_t> file_ids;
  std::vector<const std::string*> file_names;
  const auto& storage = metadata_->storage_data;
  auto cursor = storage.end();
  for (const ReadItem& item : plan.items) {
    if (cursor != storage.end() && !(cursor->first == item.storage_index)) {
      ++cursor;
      if (cursor != storage.end() && !(cursor->first == item.storage_index)) cursor = storage.end();
    }
    if (cursor == storage.end()) {
      cursor = storage.find(item.storage_index);
      if (cursor == storage.end()) return metadata_->FindStorage(item.storage_index).status();
    }
    const StorageInfo* info = &cursor->second;
    auto [it, inserted] = file_ids.try_emplace(info->relative_path, file_names.size());
    if (inserted) file_names.push_back(&info->relative_path);
    entries.push_back({info, &item, it->second});
  }
  // 2. Grouped by file, blobs in file order, and the items of one blob together (in plan order),
  //    so each archive is parsed once.
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    if (a.file != b.file) return a.file < b.file;
    if (a.info->offset != b.info->offset) return a.info->offset < b.info->offset;
    return std::less<const StorageInfo*>()(a.info, b.info);
  });
  struct Blob {
    const StorageInfo* info;
    size_t begin, end;  // its items: entries[begin, end)
  };
  std::vector<Blob> blobs;
  std::vector<size_t> file_blobs;  // file f's blobs: [file_blobs[f], file_blobs[f + 1])
  for (size_t e = 0; e < entries.size(); ++e) {
    if (e == 0 || entries[e].file != entries[e - 1].file) file_blobs.push_back(blobs.size());
    if (e > 0 && entries[e].info == entries[e - 1].info) {
      blobs.back().end = e + 1;
    } else {
      blobs.push_back({entries[e].info, e, e + 1});
    }
  }
  file_blobs.push_back(blobs.size());
  std::mutex planner_mu;  // planners are not thread-safe
  // Tensor destinations by entry, resolved a run of blobs at a time under one lock: with many
  // small tensors, a lock per item made the reader threads queue on it.
  constexpr size_t kResolveRun = 64;
  std::vector<TensorView> dsts(entries.size());

  auto read_file = [&](size_t w) -> Status {
    const std::string& name = *file_names[w];
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, store_->OpenRead(name));
    const std::string described = store_->Describe(name);
    // This file's position in each manifest, looked up once.
    std::vector<std::pair<const internal::Manifest*, uint32_t>> manifests;
    if (options_.verify) {
      for (const auto& m : manifests_) {
        if (auto f = m->FileIndex(name)) manifests.push_back({m.get(), *f});
      }
    }
    // Runs of small neighbouring blobs are read with one pread into a window and parsed from
    // memory, so a state dict of many small tensors is not bound by several small reads per
    // item; large blobs read only the byte ranges they need.
    // Mapped, not from malloc: each reader thread's window goes back to the system when its
    // file is done, instead of staying in that thread's malloc arena (load peak RSS).
    MappedBuffer window;  // not zero-filled: every byte is read over
    size_t window_capacity = 0, window_size = 0;
    uint64_t window_start = 0;
    auto small = [](const StorageInfo& i) {
      return i.transform_descriptors.empty() && i.length <= int64_t{kWholeBlobBytes};
    };
    const size_t first = file_blobs[w], last = file_blobs[w + 1];
    size_t resolved = first;  // blobs [first, resolved) have their destinations in dsts
    for (size_t o = first; o < last; ++o) {
      const Blob& blob = blobs[o];
      const ReadItem& front = *entries[blob.begin].item;
      const StorageInfo& info = *blob.info;
      // Messages are built only when something fails.
      auto what = [&] {
        return "\"" + name + "\" item \"" + front.storage_index.ToString() + "\"";
      };
      auto fail = [&](const Status& s) { return s.WithContext("reading " + what()); };
      if (static_cast<uint64_t>(info.offset) + static_cast<uint64_t>(info.length) > file->size()) {
        return DataLossError(what() + ": byte range [" + std::to_string(info.offset) + ", +" +
                             std::to_string(info.length) + ") is past the end of the file (" +
                             std::to_string(file->size()) + " bytes)");
      }
      SubSource raw(*file, static_cast<uint64_t>(info.offset), static_cast<uint64_t>(info.length));
      // The blob's checksums, when the checkpoint has a manifest.
      const internal::Manifest* manifest = nullptr;
      const internal::ManifestBlob* sums = nullptr;
      if (options_.verify) {
        for (const auto& [m, f] : manifests) {
          sums = m->Find(f, static_cast<uint64_t>(info.offset), static_cast<uint64_t>(info.length));
          if (sums) {
            manifest = m;
            break;
          }
        }
        if (!sums && manifest_complete_) {
          return DataLossError("reading " + what() +
                               ": the checkpoint's manifest has no checksum "
                               "for its bytes at offset " +
                               std::to_string(info.offset));
        }
      }
      std::optional<internal::VerifiedBlobSource> verified;
      std::optional<internal::CrcCheckingSource> crc_checked;
      // Transforms were applied in order when writing: undo them last to first.
      std::string decoded;
      std::optional<MemorySource> memory;
      const ByteSource* src = &raw;
      if (sums && !small(info)) {
        verified.emplace(raw, manifest->HashesOf(*sums), sums->hash_count, manifest->segment_bytes,
                         static_cast<uint64_t>(info.offset), described);
        src = &*verified;
      } else if (options_.verify && !sums && info.transform_descriptors.empty()) {
        crc_checked.emplace(raw);
        src = &*crc_checked;
      }
      if (small(info)) {
        const uint64_t begin = static_cast<uint64_t>(info.offset);
        const uint64_t end = begin + static_cast<uint64_t>(info.length);
        if (begin < window_start || end > window_start + window_size) {
          // A new window from this blob over the following small blobs that lie close behind.
          uint64_t stop = end;
          for (size_t n = o + 1; n < last; ++n) {
            const StorageInfo& next = *blobs[n].info;
            const uint64_t nb = static_cast<uint64_t>(next.offset);
            const uint64_t ne = nb + static_cast<uint64_t>(next.length);
            if (!small(next) || nb > stop + kWindowGapBytes || ne - begin > kWindowBytes ||
                ne > file->size()) {
              break;
            }
            stop = std::max(stop, ne);
          }
          window_size = static_cast<size_t>(stop - begin);
          if (window_capacity < window_size) {
            window_capacity = std::max<size_t>(window_size, kWindowBytes);
            if (!window.Allocate(window_capacity)) {
              return fail(UnavailableError("out of memory for a read window of " +
                                           std::to_string(window_capacity) + " bytes"));
            }
          }
          if (Status s = file->ReadAt(begin, window.data(), window_size); !s.ok()) {
            return fail(s);
          }
          window_start = begin;
          // The next window is fetched while this one is parsed.
          file->Prefetch(stop, kWindowBytes);
        }
        const std::string_view bytes(window.data() + (begin - window_start),
                                     static_cast<size_t>(info.length));
        if (sums) {
          Status s = internal::VerifyBlobBytes(bytes, manifest->HashesOf(*sums), sums->hash_count,
                                               manifest->segment_bytes, begin, described);
          if (!s.ok()) return fail(s);
        }
        memory.emplace(bytes, name);
        src = &*memory;
      }
      if (!info.transform_descriptors.empty()) {
        const uint64_t cap = DecodedSizeCap(*metadata_, front, raw.size());
        for (auto d = info.transform_descriptors.rbegin(); d != info.transform_descriptors.rend();
             ++d) {
          auto transform = internal::FindStreamTransform(*d);
          if (!transform.ok()) return fail(transform.status());
          DCPP_ASSIGN_OR_RETURN(std::string out, (*transform)->Decode(*src, cap, what()));
          decoded = std::move(out);
          memory.reset();
          memory.emplace(decoded, name);
          src = &*memory;
        }
      }
      auto archive = TorchSaveArchive::Open(*src);
      if (!archive.ok()) return fail(archive.status());
      if (options_.verify && !sums) {
        // No manifest: zip CRCs. Records in memory, and small ones, are checked now; a large
        // (tensor) record when a read covers it whole, from the bytes read.
        constexpr uint64_t kCheckNow = 1 << 20;
        for (const auto& [rname, rec] : archive->records()) {
          if (crc_checked && rec.size > kCheckNow) {
            crc_checked->AddRecord(archive->prefix() + "/" + rname, rec.data_offset, rec.size,
                                   rec.crc32);
            continue;
          }
          if (const std::byte* p = src->Peek(rec.data_offset, rec.size);
              p && internal::Crc32(0, p, rec.size) == rec.crc32) {
            continue;  // the common case, without building the record's name
          }
          Status s = internal::VerifyZipCrc(*src, archive->prefix() + "/" + rname, rec.data_offset,
                                            rec.size, rec.crc32);
          if (!s.ok()) return fail(s);
        }
      }
      if (front.type == LoadItemType::kByteIO) {
        auto value = archive->ReadValue();
        Value v;
        if (value.ok()) {
          v = std::move(*value);
        } else if (value.status().code() == StatusCode::kInvalidArgument) {
          // A Python object dcpp does not model: keep its exact bytes.
          Opaque op;
          op.torch_save_bytes.resize(src->size());
          DCPP_RETURN_IF_ERROR(
              src->ReadAt(0, op.torch_save_bytes.data(), op.torch_save_bytes.size()));
          auto shown = archive->ReadValue(/*opaque_objects=*/true);
          op.type_name = shown.ok() && shown->is_opaque() ? shown->opaque().type_name : "object";
          v = Value::FromOpaque(std::move(op));
        } else {
          return fail(value.status());
        }
        std::lock_guard<std::mutex> lock(planner_mu);
        for (size_t e = blob.begin; e < blob.end; ++e) {
          DCPP_RETURN_IF_ERROR(planner.LoadBytes(*entries[e].item, v));
        }
        continue;
      }
      auto ref = archive->RootTensor();
      if (!ref.ok()) return fail(ref.status());
      if (o >= resolved) {
        const size_t stop = std::min(last, o + kResolveRun);
        std::lock_guard<std::mutex> lock(planner_mu);
        for (size_t b = o; b < stop; ++b) {
          for (size_t e = blobs[b].begin; e < blobs[b].end; ++e) {
            const ReadItem& item = *entries[e].item;
            if (item.type != LoadItemType::kTensor) continue;
            DCPP_ASSIGN_OR_RETURN(dsts[e], planner.ResolveTensor(item));
          }
        }
        resolved = stop;
      }
      for (size_t e = blob.begin; e < blob.end; ++e) {
        const ReadItem& item = *entries[e].item;
        const TensorView& dst = dsts[e];
        if (dst.dtype() != ref->dtype) {
          return DataLossError("reading " + what() + ": stored " +
                               std::string(DTypeName(ref->dtype)) + " but the metadata says " +
                               std::string(DTypeName(dst.dtype())));
        }
        Status s = archive->ReadTensorInto(*ref, item.storage_offsets, dst, item.dest_offsets,
                                           item.lengths);
        if (!s.ok()) return fail(s);
      }
    }
    return Status::Ok();
  };

  DCPP_RETURN_IF_ERROR(internal::FirstError(internal::ParallelFor(
      file_names.size(), static_cast<size_t>(std::max(options_.thread_count, 1)), read_file)));
  return planner.Finish();
}

}  // namespace dcpp
