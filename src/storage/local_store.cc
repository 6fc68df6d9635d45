// LocalStore: a Store over a POSIX directory.
//
// Every descriptor is opened O_CLOEXEC so a forked writer process does not inherit it. Writes
// loop over short writes and EINTR; appends below kBufferSize are gathered in a buffer, larger
// ones go straight from the caller's memory to write(2) so tensor bytes are copied once.
// Reads use pread, which is thread-safe on one descriptor.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/storage.h"

namespace dcpp {
namespace {

constexpr size_t kBufferSize = size_t{1} << 20;  // appends >= this bypass the buffer
constexpr size_t kMaxIo = size_t{1} << 30;       // Linux caps one read/write near 2 GiB
constexpr uint64_t kWriteBehindBytes = uint64_t{32} << 20;

Status WriteFully(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min(n, kMaxIo));
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

Status SyncFd(int fd, const std::string& what) {
  while (::fsync(fd) != 0) {
    if (errno != EINTR) return ErrnoToStatus(errno, "syncing " + what);
  }
  return Status::Ok();
}

// mkdir -p: creates `path` and its missing parents.
Status MakeDirs(const std::string& path) {
  if (path.empty()) return Status::Ok();
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    std::string prefix = path.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) == 0) continue;
    if (errno != EEXIST) return ErrnoToStatus(errno, "creating directory " + prefix);
    struct stat st;
    if (::stat(prefix.c_str(), &st) != 0)
      return ErrnoToStatus(errno, "creating directory " + prefix);
    if (!S_ISDIR(st.st_mode)) {
      return FailedPreconditionError("creating directory " + prefix + ": a file is in the way");
    }
  }
  return Status::Ok();
}

class PosixWritableFile final : public WritableFile {
 public:
  PosixWritableFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~PosixWritableFile() override {
    if (fd_ >= 0) {
      (void)FlushBuffer();
      ::close(fd_);
    }
  }

  Status Append(const void* data, size_t n) override {
    DCPP_RETURN_IF_ERROR(CheckUsable());
    if (n == 0) return Status::Ok();
    const char* p = static_cast<const char*>(data);
    if (used_ + n <= kBufferSize && n < kBufferSize) {
      if (!buffer_) buffer_ = std::make_unique<char[]>(kBufferSize);
      std::memcpy(buffer_.get() + used_, p, n);
      used_ += n;
      position_ += n;
      return Status::Ok();
    }
    DCPP_RETURN_IF_ERROR(FlushBuffer());
    if (n < kBufferSize) return Append(data, n);  // fits the now-empty buffer
    error_ = WriteFully(fd_, p, n, path_);
    if (error_.ok()) position_ += n;
    StartWriteBack();
    return error_;
  }

  Status Sync() override {
    DCPP_RETURN_IF_ERROR(CheckUsable());
    DCPP_RETURN_IF_ERROR(FlushBuffer());
    error_ = SyncFd(fd_, path_);
    return error_;
  }

  Status Close() override {
    if (fd_ < 0) return FailedPreconditionError(path_ + ": already closed");
    Status st = error_.ok() ? FlushBuffer() : error_;
    if (::close(fd_) != 0 && st.ok()) st = ErrnoToStatus(errno, "closing " + path_);
    fd_ = -1;
    buffer_.reset();
    return st;
  }

  uint64_t position() const override { return position_; }
  std::string name() const override { return path_; }

 private:
  Status CheckUsable() const {
    if (fd_ < 0) return FailedPreconditionError(path_ + ": file is closed");
    return error_;  // a failed write leaves the file's tail unknown; later calls repeat the error
  }
  Status FlushBuffer() {
    if (used_ == 0) return Status::Ok();
    error_ = WriteFully(fd_, buffer_.get(), used_, path_);
    used_ = 0;
    StartWriteBack();
    return error_;
  }
  // Write-behind: each time kWriteBehindBytes more have reached the page cache, their writeback
  // is started (sync_file_range WRITE, which does not wait), so the device writes while later
  // bytes are still being copied and the final fsync waits only for the tail. A hint only:
  // errors surface at fsync.
  void StartWriteBack() {
    if (!error_.ok() || position_ - started_ < kWriteBehindBytes) return;
    ::sync_file_range(fd_, static_cast<off_t>(started_), static_cast<off_t>(position_ - started_),
                      SYNC_FILE_RANGE_WRITE);
    started_ = position_;
  }

  int fd_;
  std::string path_;
  std::unique_ptr<char[]> buffer_;  // allocated on the first small append
  size_t used_ = 0;
  uint64_t position_ = 0;
  uint64_t started_ = 0;  // writeback started for [0, started_)
  Status error_;
};

class PosixReadableFile final : public ReadableFile {
 public:
  PosixReadableFile(int fd, uint64_t size, std::string path)
      : fd_(fd), size_(size), path_(std::move(path)) {}
  ~PosixReadableFile() override { ::close(fd_); }

  uint64_t size() const override { return size_; }
  std::string name() const override { return path_; }

  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    if (offset > size_ || n > size_ - offset) {
      return DataLossError(path_ + ": read of " + std::to_string(n) + " bytes at offset " +
                           std::to_string(offset) + " is past the end (" + std::to_string(size_) +
                           " bytes)");
    }
    char* p = static_cast<char*>(dst);
    while (n > 0) {
      ssize_t r = ::pread(fd_, p, std::min(n, kMaxIo), static_cast<off_t>(offset));
      if (r < 0) {
        if (errno == EINTR) continue;
        return ErrnoToStatus(errno, "reading " + path_ + " at offset " + std::to_string(offset));
      }
      if (r == 0) {
        return DataLossError(path_ + ": file ended at offset " + std::to_string(offset) +
                             " while reading (truncated since it was opened?)");
      }
      p += r;
      offset += static_cast<uint64_t>(r);
      n -= static_cast<size_t>(r);
    }
    return Status::Ok();
  }

 private:
  int fd_;
  uint64_t size_;
  std::string path_;
};

class LocalStore final : public Store {
 public:
  explicit LocalStore(std::string root) : root_(std::move(root)) {}

  std::string Describe(std::string_view key) const override {
    if (key.empty()) return root_;
    return root_ == "/" ? "/" + std::string(key) : root_ + "/" + std::string(key);
  }

  Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    DCPP_RETURN_IF_ERROR(MakeParents(key));
    std::string path = Describe(key);
    int fd;
    do {
      fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return ErrnoToStatus(errno, "opening " + path + " for writing");
    return std::unique_ptr<WritableFile>(new PosixWritableFile(fd, std::move(path)));
  }

  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    std::string path = Describe(key);
    int fd;
    do {
      fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return ErrnoToStatus(errno, "opening " + path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      Status s = ErrnoToStatus(errno, "stat " + path);
      ::close(fd);
      return s;
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return NotFoundError("opening " + path + ": not a regular file");
    }
    return std::unique_ptr<ReadableFile>(
        new PosixReadableFile(fd, static_cast<uint64_t>(st.st_size), std::move(path)));
  }

  Result<bool> Exists(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    std::string path = Describe(key);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      if (errno == ENOENT || errno == ENOTDIR) return false;
      return ErrnoToStatus(errno, "stat " + path);
    }
    return S_ISREG(st.st_mode);
  }

  Result<uint64_t> Size(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    std::string path = Describe(key);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return ErrnoToStatus(errno, "stat " + path);
    if (!S_ISREG(st.st_mode)) return NotFoundError(path + ": not a regular file");
    return static_cast<uint64_t>(st.st_size);
  }

  Result<std::vector<std::string>> List() override {
    std::vector<std::string> keys;
    DCPP_RETURN_IF_ERROR(ListDir("", keys));
    std::sort(keys.begin(), keys.end());
    return keys;
  }

  Status Remove(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    std::string path = Describe(key);
    if (::unlink(path.c_str()) != 0) return ErrnoToStatus(errno, "removing " + path);
    return Status::Ok();
  }

  Status Rename(std::string_view from, std::string_view to) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(from));
    DCPP_RETURN_IF_ERROR(ValidateKey(to));
    DCPP_RETURN_IF_ERROR(MakeParents(to));
    std::string a = Describe(from), b = Describe(to);
    if (::rename(a.c_str(), b.c_str()) != 0) {
      return ErrnoToStatus(errno, "renaming " + a + " to " + b);
    }
    return Status::Ok();
  }

  Status SyncDir(std::string_view dir) override {
    if (!dir.empty()) DCPP_RETURN_IF_ERROR(ValidateKey(dir));
    std::string path = Describe(dir);
    int fd;
    do {
      fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return ErrnoToStatus(errno, "opening directory " + path);
    Status st = SyncFd(fd, "directory " + path);
    ::close(fd);
    return st;
  }

  Status CreateDir() override { return MakeDirs(root_); }

 private:
  Status MakeParents(std::string_view key) {
    std::string_view dir = KeyDirectory(key);
    if (dir.empty()) return Status::Ok();
    // Only the components below the root are created here; the root must exist already.
    std::string path = root_;
    size_t start = 0;
    while (start <= dir.size()) {
      size_t end = dir.find('/', start);
      if (end == std::string_view::npos) end = dir.size();
      path += "/";
      path += dir.substr(start, end - start);
      if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoToStatus(errno, "creating directory " + path);
      }
      start = end + 1;
    }
    return Status::Ok();
  }

  // Appends the files under directory `rel` ("" = root) to keys, recursively.
  Status ListDir(const std::string& rel, std::vector<std::string>& keys) {
    std::string path = Describe(rel);
    DIR* d = ::opendir(path.c_str());
    if (d == nullptr) return ErrnoToStatus(errno, "listing " + path);
    std::unique_ptr<DIR, int (*)(DIR*)> closer(d, ::closedir);
    std::vector<std::string> subdirs;
    while (true) {
      errno = 0;
      struct dirent* e = ::readdir(d);
      if (e == nullptr) {
        if (errno != 0) return ErrnoToStatus(errno, "listing " + path);
        break;
      }
      std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      std::string key = rel.empty() ? name : rel + "/" + name;
      struct stat st;
      // Follows symlinks to files; a directory reached through a symlink is not descended.
      if (::stat(Describe(key).c_str(), &st) != 0) continue;  // vanished or dangling
      if (S_ISREG(st.st_mode)) {
        keys.push_back(std::move(key));
      } else if (S_ISDIR(st.st_mode)) {
        struct stat lst;
        if (::lstat(Describe(key).c_str(), &lst) == 0 && S_ISDIR(lst.st_mode)) {
          subdirs.push_back(std::move(key));
        }
      }
    }
    closer.reset();
    for (const std::string& sub : subdirs) DCPP_RETURN_IF_ERROR(ListDir(sub, keys));
    return Status::Ok();
  }

  std::string root_;
};

}  // namespace

Result<std::unique_ptr<Store>> OpenLocalStore(const std::string& path, bool create) {
  if (path.empty()) return InvalidArgumentError("OpenLocalStore: empty path");
  if (path.find('\0') != std::string::npos) {
    return InvalidArgumentError("OpenLocalStore: path contains a NUL byte");
  }
  std::string root = path;
  while (root.size() > 1 && root.back() == '/') root.pop_back();
  if (create) {
    DCPP_RETURN_IF_ERROR(MakeDirs(root));
  } else {
    struct stat st;
    if (::stat(root.c_str(), &st) != 0) return ErrnoToStatus(errno, "opening store " + root);
    if (!S_ISDIR(st.st_mode)) {
      return FailedPreconditionError("opening store " + root + ": not a directory");
    }
  }
  return std::unique_ptr<Store>(new LocalStore(std::move(root)));
}

}  // namespace dcpp
