// Local files as byte streams: FileSource (random-access reads with pread) and FileSink
// (buffered appends), plus whole-file helpers with an atomic, durable write.
//
// These work on plain paths; a checkpoint directory with validated keys is a Store (storage.h),
// which may use these underneath. Every error is a Status from errno naming the path
// (ENOENT → NotFound, ENOSPC/EIO → Unavailable, ...); a file shorter than a read expects is
// DataLoss.
//
// Durability: bytes written to a FileSink are durable only after Sync() returns OK, and a new
// name only after its directory is synced. WriteFileAtomic does both in the right order, so after
// a crash `path` holds either its old or its new bytes.
//
// Thread-safety: FileSource::ReadAt may be called from several threads at once (pread, no shared
// cursor). A FileSink is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "dcpp/io.h"
#include "dcpp/status.h"

namespace dcpp {

// A read-only file; its size is fixed when opened.
class FileSource final : public ByteSource {
 public:
  static Result<std::unique_ptr<FileSource>> Open(const std::string& path);
  ~FileSource() override;
  FileSource(const FileSource&) = delete;
  FileSource& operator=(const FileSource&) = delete;

  uint64_t size() const override { return size_; }
  // Reads exactly n bytes; a range past the end (or a file that shrank) is DataLoss.
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  std::string name() const override { return path_; }

 private:
  FileSource(int fd, std::string path, uint64_t size)
      : fd_(fd), path_(std::move(path)), size_(size) {}
  int fd_;
  std::string path_;
  uint64_t size_;
};

struct FileSinkOptions {
  // Small writes are gathered into a buffer of this size; writes at least this large go straight
  // to the file.
  size_t buffer_size = 4 << 20;
  // Fail with FailedPrecondition if the file exists (O_EXCL) instead of truncating it.
  bool exclusive = false;
};

// A file being written from the start (created or truncated).
class FileSink final : public ByteSink {
 public:
  static Result<std::unique_ptr<FileSink>> Open(const std::string& path,
                                                const FileSinkOptions& options = {});
  // Closes the file if Close() was not called; errors are lost then, and nothing is synced.
  ~FileSink() override;
  FileSink(const FileSink&) = delete;
  FileSink& operator=(const FileSink&) = delete;

  Status Write(const void* data, size_t n) override;
  uint64_t position() const override { return position_; }
  std::string name() const override { return path_; }

  // Writes buffered bytes to the file (no fsync).
  Status Flush();
  // Flush, then fsync: every byte written so far is durable.
  Status Sync();
  // Flush and close. Later calls fail with FailedPrecondition.
  Status Close();

 private:
  FileSink(int fd, std::string path, size_t buffer_size);
  Status WriteFully(const void* data, size_t n);

  int fd_;
  std::string path_;
  std::unique_ptr<char[]> buffer_;
  size_t buffer_size_;
  size_t buffered_ = 0;
  uint64_t position_ = 0;
};

// Reads a whole file (one allocation of its size).
Result<std::string> ReadFile(const std::string& path);

// fsync of a directory, so that names created, renamed or removed in it are durable.
Status SyncDirectory(const std::string& dir);

// Writes `path` atomically: `fill` writes the content into a temporary file in the same
// directory, which is then fsynced, renamed over `path`, and the directory fsynced. On any
// failure the temporary is removed and `path` is untouched.
Status WriteFileAtomic(const std::string& path, const std::function<Status(ByteSink&)>& fill);
Status WriteFileAtomic(const std::string& path, std::string_view bytes);

}  // namespace dcpp
