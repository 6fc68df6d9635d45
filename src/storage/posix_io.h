// The one POSIX I/O stack of dcpp: every open, read, write and fsync of a local file goes
// through these functions, so EINTR, short transfers, O_CLOEXEC, the largest single transfer and
// the errno -> Status mapping live in one place.
//
// Errors name the path (ENOENT -> NotFound, ENOSPC/EIO -> Unavailable, ...); a read past the end
// of a file is DataLoss. Opening for read accepts only regular files, and the last component
// must not be a symbolic link: a FIFO would block forever and a link could leave the checkpoint.
//
// Thread-safety: the functions are reentrant; a PosixReadableFile may be read from several
// threads at once (pread), a PosixWritableFile is used by one thread at a time.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "dcpp/storage.h"

namespace dcpp::internal {

// Linux moves at most ~2 GiB per read/write call; larger requests are split at this size.
inline constexpr size_t kMaxIoBytes = size_t{1} << 30;
// Appends smaller than this are gathered in a buffer; larger ones go straight to write(2), so
// tensor bytes are copied once, from the caller's memory into the page cache.
inline constexpr size_t kAppendBufferBytes = size_t{1} << 20;
// Writeback of a file being written is started every this many bytes (see StartWriteBack).
inline constexpr uint64_t kWriteBehindBytes = uint64_t{32} << 20;

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

// A WritableFile over a descriptor it owns (see kAppendBufferBytes). A failed write leaves the
// file's tail unknown, so every later call repeats that error.
class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~PosixWritableFile() override;

  Status Append(const void* data, size_t n) override;
  Status Sync() override;
  Status Close() override;
  uint64_t position() const override { return position_; }
  std::string name() const override { return path_; }

 private:
  Status CheckUsable() const;
  Status FlushBuffer();
  void StartWriteBack();

  int fd_;
  std::string path_;
  std::unique_ptr<char[]> buffer_;  // allocated on the first small append
  size_t used_ = 0;
  uint64_t position_ = 0;
  uint64_t started_ = 0;  // writeback started for [0, started_)
  Status error_;
};

// A ReadableFile over a descriptor it owns; the size is fixed at open.
class PosixReadableFile final : public ReadableFile {
 public:
  PosixReadableFile(int fd, uint64_t size, std::string path)
      : fd_(fd), size_(size), path_(std::move(path)) {}
  ~PosixReadableFile() override;

  uint64_t size() const override { return size_; }
  std::string name() const override { return path_; }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;

 private:
  int fd_;
  uint64_t size_;
  std::string path_;
};

}  // namespace dcpp::internal
