#include "dcpp/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

namespace dcpp {
namespace {

// Largest single read/write request; Linux transfers at most ~2 GiB per call anyway.
constexpr size_t kMaxIo = size_t{1} << 30;

int RetryOpen(const char* path, int flags, mode_t mode = 0) {
  int fd;
  do {
    fd = ::open(path, flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

std::string ParentDir(const std::string& path) {
  std::filesystem::path p(path);
  std::string dir = p.parent_path().string();
  return dir.empty() ? std::string(".") : dir;
}

}  // namespace

// ---- FileSource ----

Result<std::unique_ptr<FileSource>> FileSource::Open(const std::string& path) {
  int fd = RetryOpen(path.c_str(), O_RDONLY);
  if (fd < 0) return ErrnoToStatus(errno, "opening \"" + path + "\"");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    Status s = ErrnoToStatus(errno, "stat of \"" + path + "\"");
    ::close(fd);
    return s;
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    return InvalidArgumentError("\"" + path + "\" is a directory");
  }
  return std::unique_ptr<FileSource>(new FileSource(fd, path, static_cast<uint64_t>(st.st_size)));
}

FileSource::~FileSource() { ::close(fd_); }

Status FileSource::ReadAt(uint64_t offset, void* dst, size_t n) const {
  if (offset > size_ || n > size_ - offset) {
    return DataLossError("\"" + path_ + "\": read of " + std::to_string(n) + " bytes at offset " +
                         std::to_string(offset) + " is past the end (" + std::to_string(size_) +
                         " bytes)");
  }
  auto* out = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd_, out, std::min(n, kMaxIo), static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "reading \"" + path_ + "\" at offset " + std::to_string(offset));
    }
    if (got == 0) {
      return DataLossError("\"" + path_ + "\": unexpected end of file at offset " +
                           std::to_string(offset) + " (the file shrank while open)");
    }
    out += got;
    offset += static_cast<uint64_t>(got);
    n -= static_cast<size_t>(got);
  }
  return Status::Ok();
}

// ---- FileSink ----

FileSink::FileSink(int fd, std::string path, size_t buffer_size)
    : fd_(fd), path_(std::move(path)), buffer_size_(buffer_size) {
  if (buffer_size_ > 0) buffer_.reset(new char[buffer_size_]);
}

Result<std::unique_ptr<FileSink>> FileSink::Open(const std::string& path,
                                                 const FileSinkOptions& options) {
  int flags = O_WRONLY | O_CREAT | (options.exclusive ? O_EXCL : O_TRUNC);
  int fd = RetryOpen(path.c_str(), flags, 0644);
  if (fd < 0) return ErrnoToStatus(errno, "creating \"" + path + "\"");
  return std::unique_ptr<FileSink>(new FileSink(fd, path, options.buffer_size));
}

FileSink::~FileSink() {
  if (fd_ >= 0) {
    (void)Flush();
    ::close(fd_);
  }
}

Status FileSink::WriteFully(const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t put = ::write(fd_, p, std::min(n, kMaxIo));
    if (put < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "writing \"" + path_ + "\"");
    }
    p += put;
    n -= static_cast<size_t>(put);
  }
  return Status::Ok();
}

Status FileSink::Write(const void* data, size_t n) {
  if (fd_ < 0) return FailedPreconditionError("\"" + path_ + "\": write after Close");
  if (n == 0) return Status::Ok();
  if (buffered_ + n <= buffer_size_) {
    std::memcpy(buffer_.get() + buffered_, data, n);
    buffered_ += n;
  } else {
    DCPP_RETURN_IF_ERROR(Flush());
    if (n < buffer_size_) {
      std::memcpy(buffer_.get(), data, n);
      buffered_ = n;
    } else {
      // Large writes (tensor records) go straight from the caller's memory.
      DCPP_RETURN_IF_ERROR(WriteFully(data, n));
    }
  }
  position_ += n;
  return Status::Ok();
}

Status FileSink::Flush() {
  if (fd_ < 0) return FailedPreconditionError("\"" + path_ + "\": flush after Close");
  if (buffered_ == 0) return Status::Ok();
  Status s = WriteFully(buffer_.get(), buffered_);
  buffered_ = 0;  // on error the bytes are lost either way; do not write them twice
  return s;
}

Status FileSink::Sync() {
  DCPP_RETURN_IF_ERROR(Flush());
  if (::fsync(fd_) != 0) return ErrnoToStatus(errno, "fsync of \"" + path_ + "\"");
  return Status::Ok();
}

Status FileSink::Close() {
  if (fd_ < 0) return FailedPreconditionError("\"" + path_ + "\": closed twice");
  Status s = Flush();
  // close() errors (EIO on NFS, say) can report lost writes, so they count.
  if (::close(fd_) != 0 && s.ok()) s = ErrnoToStatus(errno, "closing \"" + path_ + "\"");
  fd_ = -1;
  return s;
}

// ---- whole-file helpers ----

Result<std::string> ReadFile(const std::string& path) {
  DCPP_ASSIGN_OR_RETURN(auto source, FileSource::Open(path));
  std::string out(source->size(), '\0');
  DCPP_RETURN_IF_ERROR(source->ReadAt(0, out.data(), out.size()));
  return out;
}

Status SyncDirectory(const std::string& dir) {
  int fd = RetryOpen(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return ErrnoToStatus(errno, "opening directory \"" + dir + "\"");
  Status s;
  if (::fsync(fd) != 0) s = ErrnoToStatus(errno, "fsync of directory \"" + dir + "\"");
  ::close(fd);
  return s;
}

Status WriteFileAtomic(const std::string& path, const std::function<Status(ByteSink&)>& fill) {
  // 1. A temporary beside the target (same file system, so rename is atomic); O_EXCL with a
  //    unique suffix keeps concurrent writers from sharing it.
  static std::atomic<uint64_t> counter{0};
  const std::string tmp =
      path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
  FileSinkOptions options;
  options.exclusive = true;
  DCPP_ASSIGN_OR_RETURN(auto sink, FileSink::Open(tmp, options));
  auto fail = [&](Status s) {
    sink.reset();
    ::unlink(tmp.c_str());
    return s;
  };
  // 2. Content, then fsync so the data is on disk before the name points at it.
  if (Status s = fill(*sink); !s.ok()) return fail(s);
  if (Status s = sink->Sync(); !s.ok()) return fail(s);
  if (Status s = sink->Close(); !s.ok()) return fail(s);
  // 3. Rename over the target, then fsync the directory so the new name is durable.
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return fail(ErrnoToStatus(errno, "renaming \"" + tmp + "\" to \"" + path + "\""));
  }
  return SyncDirectory(ParentDir(path));
}

Status WriteFileAtomic(const std::string& path, std::string_view bytes) {
  return WriteFileAtomic(
      path, [bytes](ByteSink& sink) { return sink.Write(bytes.data(), bytes.size()); });
}

}  // namespace dcpp
