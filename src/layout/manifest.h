// The checksum manifest: xxHash3-64 of every stored blob, in a sidecar file PyTorch ignores.
//
// Each blob (an item's bytes on disk, after stream transforms) is cut into segments of
// `segment_bytes` counted from the blob's first byte; a blob of at most one segment has one hash
// over all of it (an empty blob: the hash of no bytes). A partial read verifies only the
// segments it touches. Hashes are computed while writing (HashingSink), travel in WriteResult
// to the coordinator, and are written by Finish to `<metadata key>.<xxh3 of the metadata
// bytes, 16 hex>.manifest` before the metadata is committed. Naming the manifest after the exact
// metadata bytes pairs the two without a second commit point: a crash between the two renames
// leaves a manifest no metadata names, and a reader of an older `.metadata` finds that
// metadata's own manifest (or none). docs/format.md ("Checksum manifest") draws the bytes.
//
// Readers: a missing manifest means "not written by dcpp" (zip CRCs are checked instead); a
// manifest that is present but malformed is DataLoss. Decoding is bounded by the input: every
// count is checked against the bytes that remain before anything is allocated.
//
// Thread-safety: Manifest is immutable after decoding. A HashingSink is used by one thread. A
// VerifiedBlobSource may be read from several threads (its segment cache is locked).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/lent_writes.h"
#include "dcpp/io.h"
#include "dcpp/status.h"

namespace dcpp::internal {

// 256 KiB: a partial read of a blob costs at most a quarter MiB more at each end (and for the
// blob's first segment, where its zip headers are), while a TiB of data takes 32 MiB of hashes.
inline constexpr uint64_t kManifestSegmentBytes = uint64_t{256} << 10;
inline constexpr uint64_t kManifestMinSegmentBytes = uint64_t{4} << 10;
inline constexpr uint64_t kManifestMaxSegmentBytes = uint64_t{1} << 30;
inline constexpr uint32_t kManifestVersion = 1;
inline constexpr uint32_t kManifestHashXxh3_64 = 1;

uint64_t Xxh3(const void* data, size_t n);

// Hashes a blob of `length` bytes has: max(1, ceil(length / segment_bytes)).
uint64_t SegmentCount(uint64_t length, uint64_t segment_bytes);

// Segment hashes of bytes in memory.
std::vector<uint64_t> HashSegments(std::string_view bytes, uint64_t segment_bytes);

// "<metadata key>.<16 hex digits>.manifest".
std::string ManifestKey(std::string_view metadata_key, uint64_t metadata_hash);
// True for a key ManifestKey could have produced (for listings: gc, lock, inspect).
bool IsManifestKey(std::string_view key);

struct ManifestBlob {
  uint32_t file = 0;  // index into Manifest::files
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t first_hash = 0;  // index into Manifest::hashes of its first segment's hash
  uint64_t hash_count = 0;
};

struct Manifest {
  uint64_t segment_bytes = kManifestSegmentBytes;
  uint64_t metadata_hash = 0;  // xxh3-64 of the metadata file's bytes it belongs to
  std::vector<std::string> files;
  std::vector<ManifestBlob> blobs;  // by (file, offset, length), not overlapping in a file
  std::vector<uint64_t> hashes;

  // Adds a blob (any order; Encode sorts). `hashes` must hold SegmentCount(length) values.
  void Add(const std::string& file, uint64_t offset, uint64_t length,
           const std::vector<uint64_t>& blob_hashes);
  // The blob of `length` bytes stored at `offset` of `file`, or nullptr (on a decoded manifest:
  // blobs in order). An empty blob may
  // share its offset with the next one.
  const ManifestBlob* Find(std::string_view file, uint64_t offset, uint64_t length) const;
  // The same by the file's index (FileIndex), for readers that look up many blobs of one file.
  const ManifestBlob* Find(uint32_t file, uint64_t offset, uint64_t length) const;
  std::optional<uint32_t> FileIndex(std::string_view file) const;
  const uint64_t* HashesOf(const ManifestBlob& b) const { return hashes.data() + b.first_hash; }

  // Rebuilds the lookup after blobs/files were filled directly.
  void Index();

 private:
  std::unordered_map<std::string, uint32_t> file_index_;
  uint32_t last_file_ = 0;
};

// The manifest's bytes: sorts blobs by (file, offset) first. InvalidArgument for overlapping
// blobs or a wrong number of hashes.
Result<std::string> EncodeManifest(Manifest manifest);
// `what` names the file in errors. DataLoss for anything malformed.
Result<Manifest> DecodeManifest(std::string_view bytes, const std::string& what);

// A sink that hashes every byte written through it, blob by blob, then passes it on.
//
// With `batch_bytes` > 0, writes of up to kHashingSinkSmallWrite bytes are gathered in a buffer
// of that size and passed on together (a state dict of many small tensors costs one write call
// per buffer, not several per item), and a blob that lies whole in the buffer is hashed in one
// call over it when it ends, while its bytes are still in cache. Larger writes go straight
// through. The caller must then Flush before it syncs or closes the sink's base.
//
// The buffers are aligned to kHashingSinkAlign, and a full buffer is passed on up to the last
// aligned position of the stream only (the few bytes past it move to the next buffer): a base
// that writes aligned buffers at aligned offsets straight to the device (a local file in direct
// I/O) then writes every buffer from where it lies, without a copy.
//
// Write-behind (EnableWriteBehind, with batching): a full buffer is queued and a second one
// filled while another thread, running Drain, writes the first to the base; so encoding and
// hashing small items overlaps the base's write (a file's copy into the page cache). The
// producer writes a queued buffer itself whenever Drain is not at it, so the two never wait on
// each other: run the producer and Drain as two indices of one ParallelFor, the producer
// calling StopDraining when it is done. Writes reach the base in order, one at a time.
//
// Write-behind to a base that takes lent writes (core/lent_writes.h: a local file in direct
// I/O with io_uring) needs no thread: while the base's lent_depth() is above 0, each full buffer
// is lent to it, up to that many in flight while the next is filled, and the drainer has nothing
// to do. The sink owns those buffers until the base settles them (at the latest when the sink is
// destroyed). A base that does not lend (buffered, no io_uring) gets its buffers from the drainer.
inline constexpr size_t kHashingSinkSmallWrite = size_t{256} << 10;
// The direct-I/O alignment of local files (storage's kDirectAlign).
inline constexpr size_t kHashingSinkAlign = 4096;

class HashingSink final : public ByteSink {
 public:
  explicit HashingSink(ByteSink& base, uint64_t segment_bytes = kManifestSegmentBytes,
                       size_t batch_bytes = 0);
  ~HashingSink() override;
  HashingSink(const HashingSink&) = delete;
  HashingSink& operator=(const HashingSink&) = delete;

  // Starts a blob at the current position; EndBlob returns its segment hashes.
  void BeginBlob();
  std::vector<uint64_t> EndBlob();

  Status Write(const void* data, size_t n) override;
  // Passes the gathered bytes on and, with write-behind, waits until the base has them all.
  Status Flush();
  uint64_t position() const override { return base_start_ + handed_ + used_; }
  std::string name() const override { return base_.name(); }

  // Write-behind (see above); needs batching. Drain returns the first write error.
  void EnableWriteBehind();
  Status Drain();
  void StopDraining();

 private:
  struct Behind;
  struct FreeAligned {
    void operator()(char* p) const { std::free(p); }
  };
  using Buffer = std::unique_ptr<char, FreeAligned>;
  Buffer NewBuffer() const;
  // Lent writes: a buffer to fill next (the oldest lent one once the base settled it).
  Result<Buffer> NextBuffer();
  // Queues the buffer (write-behind) or writes it to the base; with `keep_tail`, only up to the
  // stream's last aligned position, the rest moving to the front of the next buffer.
  Status HandOff(bool keep_tail = false);
  // Waits until every queued byte is in the base, writing it here if no drainer is at it.
  Status WaitWritten();
  // With the lock of behind_ held: writes the queued buffer (unlocking around the write).
  void WriteQueued(std::unique_lock<std::mutex>& lock);
  // With the lock held: waits until the queued buffer is written and back as the spare, writing
  // it here if no drainer is at it. Returns the first write error.
  Status WaitForSpare(std::unique_lock<std::mutex>& lock);
  void Feed(const char* p, size_t n);
  // Feeds the current blob's gathered bytes that are not hashed yet to the streaming state.
  void FeedPending();

  ByteSink& base_;
  uint64_t base_start_;  // the base's position at construction
  uint64_t handed_ = 0;  // bytes written to the base or queued for it since
  uint64_t segment_bytes_;
  void* state_;  // XXH3_state_t
  uint64_t in_segment_ = 0;
  std::vector<uint64_t> hashes_;
  // Batching.
  Buffer buffer_;
  size_t capacity_ = 0;
  size_t used_ = 0;
  size_t pending_ = 0;  // the current blob's bytes in buffer_[pending_, used_) are not hashed yet
  bool fed_ = false;    // some of the current blob's bytes went through the streaming state
  std::unique_ptr<Behind> behind_;
  LentWrites* lent_ = nullptr;     // the base, where it takes lent writes
  std::deque<Buffer> lent_bufs_;   // lent to it, oldest first
  std::vector<Buffer> free_bufs_;  // settled, for reuse
};

// Checks `bytes` (a whole blob in memory) against its hashes; DataLoss naming `what`, the file
// offset `file_offset` of the first bad segment.
Status VerifyBlobBytes(std::string_view bytes, const uint64_t* hashes, uint64_t count,
                       uint64_t segment_bytes, uint64_t file_offset, const std::string& what);

// A blob read through its manifest hashes: every byte handed out belongs to a segment whose hash
// matched. A read that covers whole segments hashes them in the caller's buffer (no extra read);
// a segment read in part is read whole once, verified and kept in a small cache, so a read of a
// box of a large tensor costs at most one extra segment at each end.
class VerifiedBlobSource final : public ByteSource {
 public:
  // `blob` holds the blob's bytes (offset 0 = the blob's first byte), `file_offset` where it lies
  // in its file (for messages).
  VerifiedBlobSource(const ByteSource& blob, const uint64_t* hashes, uint64_t count,
                     uint64_t segment_bytes, uint64_t file_offset, std::string what);
  uint64_t size() const override { return blob_.size(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  std::string name() const override { return blob_.name(); }

 private:
  Status Check(uint64_t segment, const char* bytes, uint64_t n) const;
  Status ReadPart(uint64_t segment, uint64_t from, uint64_t n, char* dst) const;

  const ByteSource& blob_;
  const uint64_t* hashes_;
  uint64_t count_;
  uint64_t segment_bytes_;
  uint64_t file_offset_;
  std::string what_;
  mutable std::mutex mu_;
  mutable std::list<std::pair<uint64_t, std::string>> cache_;  // most recent first
};

// A source that checks the CRC-32 of each registered zip record a single read covers whole
// (a checkpoint without a manifest: the records read whole are checked, parts cannot be).
class CrcCheckingSource final : public ByteSource {
 public:
  explicit CrcCheckingSource(const ByteSource& base) : base_(base) {}
  void AddRecord(std::string name, uint64_t offset, uint64_t size, uint32_t crc) {
    records_.push_back({std::move(name), offset, size, crc});
  }
  uint64_t size() const override { return base_.size(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  std::string name() const override { return base_.name(); }

 private:
  struct Rec {
    std::string name;
    uint64_t offset, size;
    uint32_t crc;
  };
  const ByteSource& base_;
  std::vector<Rec> records_;
};

}  // namespace dcpp::internal
