#include "storage/posix_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "core/stream_copy.h"

#ifdef DCPP_HAVE_URING
#include <liburing.h>
#endif

namespace dcpp::internal {

namespace {
std::atomic<int> direct_io_for_testing{-1};
}  // namespace

bool DirectWritesEnabled() {
  if (const int forced = direct_io_for_testing.load(std::memory_order_relaxed); forced >= 0) {
    return forced == 1;
  }
  // On unless DCPP_DIRECT_IO=0: buffered saves on a VM paid 1.5-3 CPU s per GiB for page-cache
  // pages the host had to fault in, direct ones 0.2-0.4 at 2-6x the speed; the price is that a
  // load soon after a save reads the disk (docs/benchmarks.md has both sides of the trade).
  static const bool enabled = [] {
    const char* v = std::getenv("DCPP_DIRECT_IO");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

void SetDirectIoForTesting(int mode) { direct_io_for_testing.store(mode); }

// One submission queue per file being written directly: up to kDirectChunks - 1 chunks in flight.
struct DirectRing {
#ifdef DCPP_HAVE_URING
  io_uring ring;
  bool ready = false;
  ~DirectRing() {
    if (ready) io_uring_queue_exit(&ring);  // waits for a write still in flight
  }
#endif
};

Result<int> OpenFd(const std::string& path, int flags, mode_t mode) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const char* what = (flags & O_ACCMODE) == O_RDONLY ? "opening " : "opening for writing ";
    if (errno == ELOOP && (flags & O_NOFOLLOW)) {
      return FailedPreconditionError(what + path + ": is a symbolic link (not followed)");
    }
    return ErrnoToStatus(errno, what + path);
  }
  return fd;
}

Result<int> OpenRegularForRead(const std::string& path, uint64_t* size) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
  DCPP_ASSIGN_OR_RETURN(int fd, OpenFd(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    Status s = ErrnoToStatus(errno, "stat " + path);
    ::close(fd);
    return s;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return FailedPreconditionError("opening " + path + ": not a regular file");
  }
  *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

Status WriteFully(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min(n, kMaxIoBytes));
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "writing " + path);
    }
    if (w == 0) return UnavailableError("writing " + path + ": write made no progress");
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

Status PreadFully(int fd, uint64_t offset, void* dst, size_t n, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, std::min(n, kMaxIoBytes), static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "reading " + path + " at offset " + std::to_string(offset));
    }
    if (r == 0) {
      return DataLossError(path + ": file ended at offset " + std::to_string(offset) +
                           " while reading (truncated since it was opened?)");
    }
    p += r;
    offset += static_cast<uint64_t>(r);
    n -= static_cast<size_t>(r);
  }
  return Status::Ok();
}

Status SyncFd(int fd, const std::string& what) {
  while (::fsync(fd) != 0) {
    if (errno != EINTR) return ErrnoToStatus(errno, "syncing " + what);
  }
  return Status::Ok();
}

Status SyncDirectory(const std::string& dir) {
  DCPP_ASSIGN_OR_RETURN(int fd, OpenFd(dir, O_RDONLY | O_DIRECTORY));
  Status st = SyncFd(fd, "directory " + dir);
  ::close(fd);
  return st;
}

Status MakeDirs(const std::string& path) {
  if (path.empty()) return Status::Ok();
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) == 0) continue;
    if (errno != EEXIST) return ErrnoToStatus(errno, "creating directory " + prefix);
    struct stat st;
    if (::stat(prefix.c_str(), &st) != 0) {
      return ErrnoToStatus(errno, "creating directory " + prefix);
    }
    if (!S_ISDIR(st.st_mode)) {
      return FailedPreconditionError("creating directory " + prefix + ": a file is in the way");
    }
  }
  return Status::Ok();
}

// ---- PosixWritableFile ----

PosixWritableFile::PosixWritableFile(int fd, std::string path)
    : fd_(fd), path_(std::move(path)), direct_refused_(!DirectWritesEnabled()) {}

PosixWritableFile::~PosixWritableFile() {
  if (fd_ >= 0) {
    (void)(direct_ ? FlushDirectTail() : FlushBuffer());
    ring_.reset();
    ::close(fd_);
  }
}

Status PosixWritableFile::Append(const void* data, size_t n) {
  DCPP_RETURN_IF_ERROR(CheckUsable());
  if (n == 0) return Status::Ok();
  if (lent_settled_ != lent_submitted_) DCPP_RETURN_IF_ERROR(Settle(0));
  const char* p = static_cast<const char*>(data);
  if (!direct_ && !direct_refused_ && position_ + n >= kDirectAfterBytes) EnterDirect();
  DCPP_RETURN_IF_ERROR(error_);
  if (direct_) return AppendDirect(p, n);
  if (used_ + n <= kAppendBufferBytes && n < kAppendBufferBytes) {
    if (!buffer_) buffer_ = std::make_unique<char[]>(kAppendBufferBytes);
    std::memcpy(buffer_.get() + used_, p, n);
    used_ += n;
    position_ += n;
    return Status::Ok();
  }
  DCPP_RETURN_IF_ERROR(FlushBuffer());
  if (n < kAppendBufferBytes) return Append(data, n);  // fits the now-empty buffer
  // Large appends go in write-behind steps, so the device writes the first pieces while later
  // ones are still being copied, and dirty pages never pile up to the kernel's throttle.
  while (n > 0) {
    const size_t piece = std::min<size_t>(n, kWriteBehindBytes);
    error_ = WriteFully(fd_, p, piece, path_);
    if (!error_.ok()) return error_;
    position_ += piece;
    p += piece;
    n -= piece;
    StartWriteBack();
  }
  return error_;
}

Status PosixWritableFile::Sync() {
  DCPP_RETURN_IF_ERROR(CheckUsable());
  DCPP_RETURN_IF_ERROR(direct_ ? FlushDirectTail() : FlushBuffer());
  error_ = SyncFd(fd_, path_);
  return error_;
}

Status PosixWritableFile::Close() {
  if (fd_ < 0) return FailedPreconditionError(path_ + ": already closed");
  if (direct_) (void)WaitInFlight();  // after a failure too: no write outlives its buffer
  Status st = !error_.ok() ? error_ : direct_ ? FlushDirectTail() : FlushBuffer();
  ring_.reset();
  // close() errors (EIO on NFS, say) can report lost writes, so they count.
  if (::close(fd_) != 0 && st.ok()) st = ErrnoToStatus(errno, "closing " + path_);
  fd_ = -1;
  buffer_.reset();
  staging_.reset();
  return st;
}

Status PosixWritableFile::CheckUsable() const {
  if (fd_ < 0) return FailedPreconditionError(path_ + ": file is closed");
  return error_;
}

Status PosixWritableFile::FlushBuffer() {
  if (used_ == 0) return Status::Ok();
  error_ = WriteFully(fd_, buffer_.get(), used_, path_);
  used_ = 0;
  StartWriteBack();
  return error_;
}

// Write-behind: each time kWriteBehindBytes more have reached the page cache, their writeback is
// started (sync_file_range WRITE does not wait), so the device writes while later bytes are
// still being copied and the final fsync waits only for the tail. A hint: errors surface at
// fsync, and a file system without it (ENOSYS, EINVAL) just skips it.
void PosixWritableFile::StartWriteBack() {
  if (!error_.ok() || position_ - used_ - started_ < kWriteBehindBytes) return;
  const uint64_t written = position_ - used_;
  (void)::sync_file_range(fd_, static_cast<off_t>(started_), static_cast<off_t>(written - started_),
                          SYNC_FILE_RANGE_WRITE);
  started_ = written;
}

// The switch: buffered bytes go out as before; the partial block they end in is read back into
// the first chunk, so every later write starts at an aligned offset. Whatever fails here (no
// O_DIRECT on this file system, a write-only descriptor, no memory) leaves the file buffered.
void PosixWritableFile::EnterDirect() {
  direct_refused_ = true;  // one try per file
  if (!FlushBuffer().ok()) return;
  void* mem = std::aligned_alloc(kDirectAlign, kDirectChunks * kDirectChunkBytes);
  if (mem == nullptr) return;
  std::unique_ptr<char, FreeAligned> staging(static_cast<char*>(mem));
  const uint64_t aligned = position_ & ~uint64_t{kDirectAlign - 1};
  const size_t head = static_cast<size_t>(position_ - aligned);
  if (head > 0) {
    ssize_t r;
    do {
      r = ::pread(fd_, staging.get(), head, static_cast<off_t>(aligned));
    } while (r < 0 && errno == EINTR);
    if (r != static_cast<ssize_t>(head)) return;
  }
  const int flags = ::fcntl(fd_, F_GETFL);
  if (flags < 0 || ::fcntl(fd_, F_SETFL, flags | O_DIRECT) != 0) return;
  staging_ = std::move(staging);
  direct_ = o_direct_ = true;
  current_ = 0;
  fill_ = head;
  fill_written_ = 0;
  chunk_offset_ = aligned;
#ifdef DCPP_HAVE_URING
  auto ring = std::make_unique<DirectRing>();
  ring->ready = io_uring_queue_init(kDirectChunks + kLentDepth, &ring->ring, 0) ==
                0;  // seccomp may forbid it
  if (ring->ready) ring_ = std::move(ring);
#endif
}

Status PosixWritableFile::AppendDirect(const char* p, size_t n) {
  while (n > 0) {
    if (fill_ == 0 && n >= kDirectAlign && reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0) {
      // An aligned buffer at an aligned offset (a batching sink's, see HashingSink) is written
      // from where it lies: no copy into the staging chunks. Synchronous, so the caller may
      // reuse the buffer when this returns; a caller that wants overlap writes from another
      // thread (HashingSink's write-behind) or has other files in flight.
      DCPP_RETURN_IF_ERROR(WaitInFlight());
      const size_t k = n & ~(kDirectAlign - 1);
      DCPP_RETURN_IF_ERROR(WriteAt(p, k, chunk_offset_));
      chunk_offset_ += k;
      position_ += k;
      p += k;
      n -= k;
      continue;
    }
    const size_t k = std::min(n, kDirectChunkBytes - fill_);
    // The chunk is read by the device, not by this core: streaming stores for large pieces.
    StreamingCopy(chunk(current_) + fill_, p, k);
    fill_ += k;
    position_ += k;
    p += k;
    n -= k;
    if (fill_ == kDirectChunkBytes) DCPP_RETURN_IF_ERROR(SubmitChunk());
  }
  return Status::Ok();
}

// The full current chunk is written (asynchronously where a ring exists) and the next one
// becomes current, once its own earlier write has finished.
Status PosixWritableFile::SubmitChunk() {
  const char* data = chunk(current_);
  bool submitted = false;
#ifdef DCPP_HAVE_URING
  if (ring_) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
    if (sqe != nullptr) {
      io_uring_prep_write(sqe, fd_, data, static_cast<unsigned>(kDirectChunkBytes), chunk_offset_);
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(current_));
      if (io_uring_submit(&ring_->ring) == 1) {
        submitted = true;
        busy_[current_] = true;
        busy_offset_[current_] = chunk_offset_;
      }
    }
    // No room or no submission: wait for what is in flight, then pwrite from now on.
    if (!submitted) {
      DCPP_RETURN_IF_ERROR(WaitInFlight());
      ring_.reset();
    }
  }
#endif
  if (!submitted) DCPP_RETURN_IF_ERROR(WriteAt(data, kDirectChunkBytes, chunk_offset_));
  chunk_offset_ += kDirectChunkBytes;
  current_ = (current_ + 1) % kDirectChunks;
  fill_ = fill_written_ = 0;
  return WaitChunk(current_);
}

// Completions come in any order: each one reaped frees its chunk or lent slot, and a short or
// refused write is finished with pwrite from its buffer, which stays intact until then.
Status PosixWritableFile::ReapOne() {
#ifdef DCPP_HAVE_URING
  io_uring_cqe* cqe = nullptr;
  int rc;
  do {
    rc = io_uring_wait_cqe(&ring_->ring, &cqe);
  } while (rc == -EINTR);
  if (rc < 0) {
    ring_broken_ = true;
    return Fail(ErrnoToStatus(-rc, "writing " + path_));
  }
  const int res = cqe->res;
  const uint64_t j = io_uring_cqe_get_data64(cqe);
  io_uring_cqe_seen(&ring_->ring, cqe);
  const char* data;
  size_t n;
  uint64_t offset;
  if (j < static_cast<uint64_t>(kDirectChunks) && busy_[j]) {
    busy_[j] = false;
    data = chunk(static_cast<int>(j));
    n = kDirectChunkBytes;
    offset = busy_offset_[j];
  } else if (j >= static_cast<uint64_t>(kDirectChunks) &&
             j - kDirectChunks < static_cast<uint64_t>(kLentDepth) &&
             lent_[j - kDirectChunks].busy) {
    Lent& l = lent_[j - kDirectChunks];
    l.busy = false;
    data = l.data;
    n = l.n;
    offset = l.offset;
  } else {
    ring_broken_ = true;
    return Fail(InternalError("writing " + path_ + ": unexpected io_uring completion"));
  }
  size_t done = 0;
  if (res < 0) {
    // EINVAL: the file system refused the alignment; WriteAt retries without O_DIRECT.
    if (res != -EINVAL && res != -EINTR && res != -EAGAIN) {
      return Fail(ErrnoToStatus(-res, "writing " + path_));
    }
  } else {
    done = static_cast<size_t>(res);
  }
  if (done < n && error_.ok()) return WriteAt(data + done, n - done, offset + done);
  return error_;
#else
  ring_broken_ = true;
  return Fail(InternalError("writing " + path_ + ": no io_uring"));
#endif
}

Status PosixWritableFile::Fail(Status s) {
  if (error_.ok()) error_ = std::move(s);
  return error_;
}

Status PosixWritableFile::WaitChunk(int i) {
  while (busy_[i] && !ring_broken_) (void)ReapOne();
  return error_;
}

// Waits for every write, whatever fails: none may outlive its buffer.
Status PosixWritableFile::WaitInFlight() {
  for (int i = 0; i < kDirectChunks; ++i) (void)WaitChunk(i);
  (void)Settle(0);
  return error_;
}

Status PosixWritableFile::WriteLent(const void* data, size_t n) {
  DCPP_RETURN_IF_ERROR(CheckUsable());
  if (n == 0) return Status::Ok();
  const char* p = static_cast<const char*>(data);
  if (!direct_ && !direct_refused_ && position_ + n >= kDirectAfterBytes) EnterDirect();
  DCPP_RETURN_IF_ERROR(error_);
#ifdef DCPP_HAVE_URING
  // Whole blocks from an aligned buffer at an aligned position (no partial chunk pending), and
  // few enough bytes for one submission's 32-bit length.
  if (direct_ && o_direct_ && ring_ && fill_ == 0 && n % kDirectAlign == 0 &&
      n <= kDirectChunkBytes * 4 && reinterpret_cast<uintptr_t>(p) % kDirectAlign == 0) {
    DCPP_RETURN_IF_ERROR(Settle(kLentDepth - 1));  // a free slot
    const int slot = static_cast<int>(lent_submitted_ % kLentDepth);
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
    if (sqe != nullptr) {
      io_uring_prep_write(sqe, fd_, p, static_cast<unsigned>(n), chunk_offset_);
      io_uring_sqe_set_data64(sqe, static_cast<uint64_t>(kDirectChunks + slot));
      if (io_uring_submit(&ring_->ring) == 1) {
        lent_[slot] = {p, n, chunk_offset_, true};
        ++lent_submitted_;
        chunk_offset_ += n;
        position_ += n;
        return Status::Ok();
      }
    }
  }
#endif
  // Not lendable here: written now, after the lent writes before it.
  DCPP_RETURN_IF_ERROR(Settle(0));
  return Append(p, n);
}

Status PosixWritableFile::Settle(size_t keep) {
  while (lent_submitted_ - lent_settled_ > keep) {
    Lent& l = lent_[lent_settled_ % kLentDepth];
    while (l.busy && !ring_broken_) (void)ReapOne();
    if (l.busy) return error_;  // the ring itself failed: this write's fate is unknown
    ++lent_settled_;
  }
  return error_;
}

// Makes the file hold exactly [0, position_): the partial chunk is written padded to the
// alignment (O_DIRECT needs whole blocks) and the padding cut off again. The chunk stays
// current, so later appends complete it and it is rewritten whole.
Status PosixWritableFile::FlushDirectTail() {
  DCPP_RETURN_IF_ERROR(WaitInFlight());
  // Nothing appended since the last flush (a Sync, then Close): the file already holds it.
  if (fill_ > 0 && fill_ != fill_written_) {
    size_t n = fill_;
    if (o_direct_) {
      n = (fill_ + kDirectAlign - 1) & ~(kDirectAlign - 1);
      std::memset(chunk(current_) + fill_, 0, n - fill_);
    }
    DCPP_RETURN_IF_ERROR(WriteAt(chunk(current_), n, chunk_offset_));
    if (chunk_offset_ + n > position_) {
      while (::ftruncate(fd_, static_cast<off_t>(position_)) != 0) {
        if (errno != EINTR) return error_ = ErrnoToStatus(errno, "truncating " + path_);
      }
    }
    fill_written_ = fill_;
  }
  return Status::Ok();
}

// pwrite until done. EINVAL under O_DIRECT means this file system (or this offset) refuses
// direct I/O: the flag is dropped and the write retried through the page cache.
Status PosixWritableFile::WriteAt(const char* p, size_t n, uint64_t offset) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd_, p, std::min(n, kMaxIoBytes), static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EINVAL && o_direct_) {
        const int flags = ::fcntl(fd_, F_GETFL);
        if (flags >= 0 && ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) == 0) {
          o_direct_ = false;
          continue;
        }
        errno = EINVAL;
      }
      return error_ = ErrnoToStatus(errno, "writing " + path_);
    }
    if (w == 0) return error_ = UnavailableError("writing " + path_ + ": write made no progress");
    p += w;
    offset += static_cast<uint64_t>(w);
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

// ---- PosixReadableFile ----

PosixReadableFile::PosixReadableFile(int fd, uint64_t size, std::string path)
    : fd_(fd), size_(size), path_(std::move(path)) {
  if (size_ < kDirectReadBytes || !DirectWritesEnabled()) return;
  int dfd;
  do {
    dfd = ::open(path_.c_str(), O_RDONLY | O_DIRECT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  } while (dfd < 0 && errno == EINTR);
  if (dfd < 0) return;  // no O_DIRECT here: buffered reads only
  // The name may point elsewhere by now: only the inode opened first is read.
  struct stat a, b;
  if (::fstat(fd_, &a) == 0 && ::fstat(dfd, &b) == 0 && a.st_dev == b.st_dev &&
      a.st_ino == b.st_ino) {
    direct_fd_ = dfd;
  } else {
    ::close(dfd);
  }
}

PosixReadableFile::~PosixReadableFile() {
  ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
}

Status PosixReadableFile::ReadAt(uint64_t offset, void* dst, size_t n) const {
  if (offset > size_ || n > size_ - offset) {
    return DataLossError(path_ + ": read of " + std::to_string(n) + " bytes at offset " +
                         std::to_string(offset) + " is past the end (" + std::to_string(size_) +
                         " bytes)");
  }
  char* p = static_cast<char*>(dst);
  if (direct_fd_ >= 0 && n >= kDirectReadBytes) {
    // What the page cache already holds is copied from there without waiting for the device.
    while (n > 0) {
      iovec v{p, std::min(n, kMaxIoBytes)};
      const ssize_t r = ::preadv2(fd_, &v, 1, static_cast<off_t>(offset), RWF_NOWAIT);
      if (r <= 0) break;  // EAGAIN: not cached; anything else is retried below
      p += r;
      offset += static_cast<uint64_t>(r);
      n -= static_cast<size_t>(r);
    }
    if (n >= kDirectAlign) return ReadDirect(offset, p, n);
  }
  return PreadFully(fd_, offset, p, n, path_);
}

void PosixReadableFile::Prefetch(uint64_t offset, uint64_t n) const {
  if (offset >= size_ || n == 0) return;
  n = std::min(n, size_ - offset);
  // Readahead of pages the cache holds already only walks them (tens of microseconds per
  // MiB): when the range's last byte is cached, as it is in a checkpoint read again, the rest
  // most likely is, and the kernel's own readahead covers what is not.
  char last;
  iovec v{&last, 1};
  if (::preadv2(fd_, &v, 1, static_cast<off_t>(offset + n - 1), RWF_NOWAIT) == 1) return;
  (void)::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(n),
                        POSIX_FADV_WILLNEED);
}

// [offset, offset + n) through aligned chunks of the O_DIRECT descriptor. Errors the direct
// path alone can have (EINVAL: an alignment the file system refuses) fall back to pread.
Status PosixReadableFile::ReadDirect(uint64_t offset, char* dst, size_t n) const {
  constexpr size_t kChunk = kDirectChunkBytes;
  // Per thread, so concurrent reads of one file never share a buffer; kept for the next read.
  thread_local std::unique_ptr<char, void (*)(void*)> staging(nullptr, std::free);
  if (!staging) {
    staging.reset(static_cast<char*>(std::aligned_alloc(kDirectAlign, 2 * kChunk)));
    if (!staging) return PreadFully(fd_, offset, dst, n, path_);
  }
  const uint64_t first = offset & ~uint64_t{kDirectAlign - 1};
  const uint64_t end = offset + n;
  const size_t chunks = static_cast<size_t>((end - first + kChunk - 1) / kChunk);
  auto chunk_start = [&](size_t i) { return first + i * kChunk; };
  // Copies the part of chunk i that [offset, end) needs; `got` bytes of it were read.
  auto deliver = [&](size_t i, const char* buf, size_t got) -> Status {
    const uint64_t cs = chunk_start(i);
    const uint64_t lo = std::max(cs, offset), hi = std::min(cs + kChunk, end);
    if (cs + got < hi) {
      // Short: the file ended (truncated since it was opened?) or a direct read stopped early.
      const uint64_t from = cs + got > lo ? cs + got : lo;
      std::memcpy(dst + (lo - offset), buf + (lo - cs), static_cast<size_t>(from - lo));
      return PreadFully(fd_, from, dst + (from - offset), static_cast<size_t>(hi - from), path_);
    }
    std::memcpy(dst + (lo - offset), buf + (lo - cs), static_cast<size_t>(hi - lo));
    return Status::Ok();
  };
  auto read_sync = [&](size_t i, char* buf) -> Status {
    ssize_t r;
    do {
      r = ::pread(direct_fd_, buf, kChunk, static_cast<off_t>(chunk_start(i)));
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
      const uint64_t cs = chunk_start(i);
      const uint64_t lo = std::max(cs, offset), hi = std::min(cs + kChunk, end);
      return PreadFully(fd_, lo, dst + (lo - offset), static_cast<size_t>(hi - lo), path_);
    }
    return deliver(i, buf, static_cast<size_t>(r));
  };
#ifdef DCPP_HAVE_URING
  DirectRing ring;
  ring.ready = chunks > 1 && io_uring_queue_init(2, &ring.ring, 0) == 0;
  if (ring.ready) {
    auto submit = [&](size_t i) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring.ring);
      io_uring_prep_read(sqe, direct_fd_, staging.get() + (i % 2) * kChunk,
                         static_cast<unsigned>(kChunk), chunk_start(i));
      io_uring_sqe_set_data64(sqe, i);
      return io_uring_submit(&ring.ring) == 1;
    };
    // Two chunks in flight; each is copied out as it arrives, then its buffer refilled.
    // Completions may come out of order: each is kept by chunk until its turn.
    size_t submitted = 0;
    while (submitted < std::min<size_t>(2, chunks) && submit(submitted)) ++submitted;
    bool done[2] = {false, false};
    int result[2] = {0, 0};
    Status st;
    for (size_t i = 0; i < chunks; ++i) {
      char* buf = staging.get() + (i % 2) * kChunk;
      if (i >= submitted) {  // submission failed: this chunk and the rest synchronously
        if (st.ok()) st = read_sync(i, buf);
        continue;
      }
      while (!done[i % 2]) {
        io_uring_cqe* cqe = nullptr;
        int rc;
        do {
          rc = io_uring_wait_cqe(&ring.ring, &cqe);
        } while (rc == -EINTR);
        if (rc < 0) return ErrnoToStatus(-rc, "reading " + path_);
        const uint64_t which = io_uring_cqe_get_data64(cqe);
        result[which % 2] = cqe->res;
        done[which % 2] = true;
        io_uring_cqe_seen(&ring.ring, cqe);
      }
      done[i % 2] = false;
      const int res = result[i % 2];
      if (st.ok()) {
        if (res < 0) {
          const uint64_t cs = chunk_start(i);
          const uint64_t lo = std::max(cs, offset), hi = std::min(cs + kChunk, end);
          st = PreadFully(fd_, lo, dst + (lo - offset), static_cast<size_t>(hi - lo), path_);
        } else {
          st = deliver(i, buf, static_cast<size_t>(res));
        }
      }
      if (submitted < chunks && submitted == i + 2 && st.ok() && submit(submitted)) ++submitted;
    }
    return st;  // the ring is torn down only after every submitted read completed
  }
#endif
  for (size_t i = 0; i < chunks; ++i) {
    DCPP_RETURN_IF_ERROR(read_sync(i, staging.get() + (i % 2) * kChunk));
  }
  return Status::Ok();
}

}  // namespace dcpp::internal
