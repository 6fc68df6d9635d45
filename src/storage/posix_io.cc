#include "storage/posix_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace dcpp::internal {

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

PosixWritableFile::~PosixWritableFile() {
  if (fd_ >= 0) {
    (void)FlushBuffer();
    ::close(fd_);
  }
}

Status PosixWritableFile::Append(const void* data, size_t n) {
  DCPP_RETURN_IF_ERROR(CheckUsable());
  if (n == 0) return Status::Ok();
  const char* p = static_cast<const char*>(data);
  if (used_ + n <= kAppendBufferBytes && n < kAppendBufferBytes) {
    if (!buffer_) buffer_ = std::make_unique<char[]>(kAppendBufferBytes);
    std::memcpy(buffer_.get() + used_, p, n);
    used_ += n;
    position_ += n;
    return Status::Ok();
  }
  DCPP_RETURN_IF_ERROR(FlushBuffer());
  if (n < kAppendBufferBytes) return Append(data, n);  // fits the now-empty buffer
  error_ = WriteFully(fd_, p, n, path_);
  if (error_.ok()) position_ += n;
  StartWriteBack();
  return error_;
}

Status PosixWritableFile::Sync() {
  DCPP_RETURN_IF_ERROR(CheckUsable());
  DCPP_RETURN_IF_ERROR(FlushBuffer());
  error_ = SyncFd(fd_, path_);
  return error_;
}

Status PosixWritableFile::Close() {
  if (fd_ < 0) return FailedPreconditionError(path_ + ": already closed");
  Status st = error_.ok() ? FlushBuffer() : error_;
  // close() errors (EIO on NFS, say) can report lost writes, so they count.
  if (::close(fd_) != 0 && st.ok()) st = ErrnoToStatus(errno, "closing " + path_);
  fd_ = -1;
  buffer_.reset();
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

// ---- PosixReadableFile ----

PosixReadableFile::~PosixReadableFile() { ::close(fd_); }

Status PosixReadableFile::ReadAt(uint64_t offset, void* dst, size_t n) const {
  if (offset > size_ || n > size_ - offset) {
    return DataLossError(path_ + ": read of " + std::to_string(n) + " bytes at offset " +
                         std::to_string(offset) + " is past the end (" + std::to_string(size_) +
                         " bytes)");
  }
  return PreadFully(fd_, offset, dst, n, path_);
}

}  // namespace dcpp::internal
