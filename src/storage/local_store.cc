// LocalStore: a Store over a POSIX directory, on the I/O stack of storage/posix_io.h.
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/storage.h"
#include "storage/posix_io.h"

namespace dcpp {
namespace {

using internal::MakeDirs;
using internal::OpenFd;
using internal::PosixReadableFile;
using internal::PosixWritableFile;

// An flock(2) held on an open descriptor; closing the descriptor releases it.
class FlockLock final : public StoreLock {
 public:
  explicit FlockLock(int fd) : fd_(fd) {}
  ~FlockLock() override { ::close(fd_); }

 private:
  int fd_;
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
    // Read access too: a file switching to direct I/O reads back its last partial block.
    DCPP_ASSIGN_OR_RETURN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
    return std::unique_ptr<WritableFile>(new PosixWritableFile(fd, std::move(path)));
  }

  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    std::string path = Describe(key);
    uint64_t size = 0;
    DCPP_ASSIGN_OR_RETURN(int fd, internal::OpenRegularForRead(path, &size));
    return std::unique_ptr<ReadableFile>(new PosixReadableFile(fd, size, std::move(path)));
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
    return internal::SyncDirectory(Describe(dir));
  }

  Status CreateDir() override { return MakeDirs(root_); }

  Result<std::vector<std::string>> ListDirectory(std::string_view dir) override {
    if (!dir.empty()) DCPP_RETURN_IF_ERROR(ValidateKey(dir));
    std::vector<std::string> keys;
    DCPP_RETURN_IF_ERROR(ListDir(std::string(dir), keys, /*recursive=*/false));
    std::sort(keys.begin(), keys.end());
    return keys;
  }

  bool CanLock() const override { return true; }

  Result<std::unique_ptr<StoreLock>> TryLock(std::string_view key, LockMode mode) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    DCPP_RETURN_IF_ERROR(MakeParents(key));
    const std::string path = Describe(key);
    // A new lock file's name is made durable at once: it marks the directory as dcpp's (see
    // FileSystemWriter), also after a crash.
    bool created = false;
    auto opened = OpenFd(path, O_RDWR | O_NOFOLLOW);
    if (!opened.ok() && opened.status().code() == StatusCode::kNotFound) {
      opened = OpenFd(path, O_RDWR | O_CREAT | O_NOFOLLOW, 0644);
      created = true;
    }
    if (!opened.ok()) return opened.status().WithContext("locking " + path);
    const int fd = *opened;
    const int op = (mode == LockMode::kExclusive ? LOCK_EX : LOCK_SH) | LOCK_NB;
    int rc;
    do {
      rc = ::flock(fd, op);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      const int err = errno;
      std::string holder;
      if (err == EWOULDBLOCK) {
        char buf[256];
        ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
        if (n > 0) holder.assign(buf, static_cast<size_t>(n));
        while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\0')) {
          holder.pop_back();
        }
      }
      ::close(fd);
      if (err == EWOULDBLOCK) {
        return UnavailableError(path + " is locked by another save or clean-up" +
                                (holder.empty() ? std::string() : " (" + holder + ")") +
                                "; two saves to one checkpoint directory cannot run at once");
      }
      return ErrnoToStatus(err, "locking " + path);
    }
    auto lock = std::make_unique<FlockLock>(fd);
    if (mode == LockMode::kExclusive) {
      // Who holds it, for the message of a save that finds it taken. Best effort.
      char host[HOST_NAME_MAX + 1] = {};
      (void)::gethostname(host, sizeof(host) - 1);
      const std::string who =
          "pid " + std::to_string(::getpid()) + " on host " + std::string(host) + "\n";
      if (::ftruncate(fd, 0) == 0) (void)::pwrite(fd, who.data(), who.size(), 0);
    }
    if (created) DCPP_RETURN_IF_ERROR(internal::SyncDirectory(Describe(KeyDirectory(key))));
    return std::unique_ptr<StoreLock>(std::move(lock));
  }

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

  // Appends the files in directory `rel` ("" = root) to keys, and with `recursive` those of its
  // subdirectories.
  Status ListDir(const std::string& rel, std::vector<std::string>& keys, bool recursive = true) {
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
      } else if (recursive && S_ISDIR(st.st_mode)) {
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
