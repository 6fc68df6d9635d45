// The one POSIX I/O stack of dcpp: every open, read, write and fsync of a local file goes
// through these functions, so EINTR, short transfers, O_CLOEXEC, the largest single transfer and
// the errno -> Status mapping live in one place.
//
// Errors name the path (ENOENT -> NotFound, ENOSPC/EIO -> Unavailable, ...); a read past the end
// of a file is DataLoss. Opening for read accepts only regular files, and the last component
// must not be a symbolic link: a FIFO would block forever and a link could leave the checkpoint.
//
// A file that grows past kDirectAfterBytes (a checkpoint's data file) switches to direct I/O:
// O_DIRECT writes of aligned kDirectChunkBytes chunks from kDirectChunks staging buffers, one
// filled while the others are written (io_uring where the kernel allows it, pwrite otherwise:
// then one chunk at a time); an append of an
// aligned buffer at an aligned position is written from where it lies, with no copy. The page-cache
// copy and dirty-page throttling that bound buffered saves go away; the bytes on disk are the
// same. A partial last chunk is written padded to the alignment and the file truncated back to
// its true length. File systems without O_DIRECT, or that refuse an alignment, keep buffered
// writes. Direct I/O is the default; DCPP_DIRECT_IO=0 in the environment turns it off for the
// process. Files written so are not left in the page cache (a training job's own cache is not
// evicted by its checkpoints, and a load soon after a save reads from the disk).
//
// Thread-safety: the functions are reentrant; a PosixReadableFile may be read from several
// threads at once (pread), a PosixWritableFile is used by one thread at a time.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "core/lent_writes.h"
#include "dcpp/storage.h"

namespace dcpp::internal {

// Linux moves at most ~2 GiB per read/write call; larger requests are split at this size.
inline constexpr size_t kMaxIoBytes = size_t{1} << 30;
// Appends smaller than this are gathered in a buffer; larger ones go straight to write(2), so
// tensor bytes are copied once, from the caller's memory into the page cache.
inline constexpr size_t kAppendBufferBytes = size_t{1} << 20;
// Writeback of a file being written is started every this many bytes (see StartWriteBack), and
// large appends are written in pieces of this size. Small steps keep the dirty pages of a save
// few: a one-thread save of 1 GiB with 8 MiB steps ran 0.5-2.9 GB/s where one write per tensor
// and an fsync at the end ran 0.4-0.5 on the development machine's disk.
inline constexpr uint64_t kWriteBehindBytes = uint64_t{8} << 20;
// Direct I/O (see above): offsets, lengths and buffers aligned to kDirectAlign (the largest
// logical block size in use, and the page size); a file switches once it reaches
// kDirectAfterBytes, so small files (a small checkpoint's metadata, manifests, per-item files)
// stay in the page cache. 1 MiB, not more: each of the first buffered MiBs of a data file cost
// ~3 ms of CPU on the development machine's VM (its host faults in page-cache pages), a tenth
// of the CPU of a 20 000-tensor save for 4 files at 8 MiB.
inline constexpr size_t kDirectAlign = 4096;
inline constexpr size_t kDirectChunkBytes = size_t{8} << 20;
// Staging chunks of a file written directly: one being filled, up to kDirectChunks - 1 in
// flight. Two writes in flight instead of one took two files' 1 GiB from 1.25 to 1.44-1.59 GB/s
// in fio on the development machine's disk (--direct=1, 8 MiB blocks, io_uring depth 1 and 2).
inline constexpr int kDirectChunks = 3;
// Lent writes (core/lent_writes.h) a file in direct I/O keeps in flight. A one-thread save of
// 20 480 small tensors whose 8 MiB buffers a second thread wrote one at a time: median first save
// 0.98 -> 1.03 GB/s, later saves 0.93 -> 1.04, over twelve alternating pairs on a day this disk
// took 1.1-1.3 GB/s one job direct (fio: 8 MiB blocks at depth 2 beat depth 1 by 4-20%).
inline constexpr int kLentDepth = 2;
inline constexpr uint64_t kDirectAfterBytes = uint64_t{1} << 20;

// Reads at least this large may bypass the page cache (see PosixReadableFile).
inline constexpr size_t kDirectReadBytes = size_t{8} << 20;

// False when DCPP_DIRECT_IO=0 (read once per process).
bool DirectWritesEnabled();
// Tests: 1 forces direct I/O on, 0 off, -1 back to the environment's choice.
void SetDirectIoForTesting(int mode);

// open(2) with O_CLOEXEC, retried on EINTR. Returns the descriptor or a Status naming `path`.
Result<int> OpenFd(const std::string& path, int flags, mode_t mode = 0);
// Opens a regular file for reading (no FIFO, device, directory or final symlink) and its size.
Result<int> OpenRegularForRead(const std::string& path, uint64_t* size);

Status WriteFully(int fd, const void* data, size_t n, const std::string& path);
// Reads exactly n bytes at offset; an early end of file is DataLoss.
Status PreadFully(int fd, uint64_t offset, void* dst, size_t n, const std::string& path);
Status SyncFd(int fd, const std::string& what);
// fsync of a directory, so names created, renamed or removed in it are durable.
Status SyncDirectory(const std::string& dir);
// mkdir -p.
Status MakeDirs(const std::string& path);

struct DirectRing;  // io_uring state, defined in posix_io.cc

// A WritableFile over a descriptor it owns (see kAppendBufferBytes and direct I/O above). A
// failed write leaves the file's tail unknown, so every later call repeats that error. Direct
// I/O needs the descriptor opened O_RDWR (the partial block before the switch is read back);
// a write-only descriptor stays buffered.
//
// Lent writes of aligned buffers at aligned positions go to the ring without a copy, up to
// kLentDepth at once; other lent writes are written before WriteLent returns.
class PosixWritableFile final : public WritableFile, public LentWrites {
 public:
  PosixWritableFile(int fd, std::string path);
  ~PosixWritableFile() override;

  Status Append(const void* data, size_t n) override;
  Status Sync() override;
  Status Close() override;
  uint64_t position() const override { return position_; }
  std::string name() const override { return path_; }
  // Whether writes have switched to direct I/O (for tests and benchmarks).
  bool direct() const { return direct_; }

  Status WriteLent(const void* data, size_t n) override;
  Status Settle(size_t keep) override;
  // kLentDepth while lent writes can go to the ring: direct I/O with a ring, or not yet
  // switched (the switch is tried); 0 once the file stays buffered or has no ring.
  size_t lent_depth() const override {
    return (direct_ ? o_direct_ && ring_ != nullptr : !direct_refused_) ? kLentDepth : 0;
  }
  size_t lent_in_flight() const override {
    return static_cast<size_t>(lent_submitted_ - lent_settled_);
  }

 private:
  struct FreeAligned {
    void operator()(char* p) const { std::free(p); }
  };

  Status CheckUsable() const;
  Status FlushBuffer();
  void StartWriteBack();
  // Direct I/O.
  void EnterDirect();
  Status AppendDirect(const char* p, size_t n);
  Status SubmitChunk();
  // Waits for one completion of the ring and finishes its write (a short or refused one with
  // pwrite); its chunk or lent slot is free afterwards, even on error. If the ring itself fails
  // (no completion came), ring_broken_ is set and nothing waits on it again.
  Status ReapOne();
  // Keeps the first error.
  Status Fail(Status s);
  // Waits until chunk i's write (if any) is done; WaitInFlight, every chunk's and lent write's.
  Status WaitChunk(int i);
  Status WaitInFlight();
  Status FlushDirectTail();
  Status WriteAt(const char* p, size_t n, uint64_t offset);
  char* chunk(int i) const { return staging_.get() + static_cast<size_t>(i) * kDirectChunkBytes; }

  int fd_;
  std::string path_;
  std::unique_ptr<char[]> buffer_;  // allocated on the first small append
  size_t used_ = 0;
  uint64_t position_ = 0;
  uint64_t started_ = 0;  // writeback started for [0, started_)
  Status error_;

  bool direct_ = false;          // writes go through the staging chunks
  bool direct_refused_ = false;  // tried (or disabled): stay buffered
  bool o_direct_ = false;        // the descriptor has O_DIRECT (dropped if the fs refuses)
  std::unique_ptr<char, FreeAligned> staging_;  // kDirectChunks chunks of kDirectChunkBytes
  int current_ = 0;                             // chunk being filled
  size_t fill_ = 0;                             // bytes in it
  size_t fill_written_ = 0;                     // of them, already in the file (a tail flush)
  uint64_t chunk_offset_ = 0;                   // its file offset (aligned)
  std::unique_ptr<DirectRing> ring_;            // null: synchronous pwrite
  bool busy_[kDirectChunks] = {};               // chunk i is being written
  uint64_t busy_offset_[kDirectChunks] = {};    // at this file offset
  struct Lent {
    const char* data = nullptr;
    size_t n = 0;
    uint64_t offset = 0;
    bool busy = false;
  };
  Lent lent_[kLentDepth];  // lent write number k uses slot k % kLentDepth
  uint64_t lent_submitted_ = 0;
  uint64_t lent_settled_ = 0;  // lent writes [0, lent_settled_) are complete
  bool ring_broken_ = false;
};

// A ReadableFile over a descriptor it owns; the size is fixed at open. A file of at least
// kDirectReadBytes also gets a second, O_DIRECT descriptor on the same inode: a read that large
// takes what the page cache holds (RWF_NOWAIT) and reads the rest directly, in aligned chunks
// through two staging buffers (io_uring keeps the next chunk in flight while one is copied out),
// so a file written with direct I/O is read at the device's speed rather than one readahead
// window at a time.
class PosixReadableFile final : public ReadableFile {
 public:
  PosixReadableFile(int fd, uint64_t size, std::string path);
  ~PosixReadableFile() override;

  uint64_t size() const override { return size_; }
  std::string name() const override { return path_; }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  // Starts readahead into the page cache (POSIX_FADV_WILLNEED).
  void Prefetch(uint64_t offset, uint64_t n) const override;

 private:
  Status ReadDirect(uint64_t offset, char* dst, size_t n) const;

  int fd_;
  int direct_fd_ = -1;  // O_DIRECT, same inode; -1 when unavailable
  uint64_t size_;
  std::string path_;
};

}  // namespace dcpp::internal
