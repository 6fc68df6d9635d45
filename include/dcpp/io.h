// Byte streams the codecs read from and write to, independent of where bytes live.
//
// ByteSource: random-access reads of a fixed-size byte range (a whole file, a blob inside a
// `.distcp` file, or memory). Codecs pull only the ranges they need, so a tensor record can be
// read straight into its destination.
// ByteSink: an append-only stream with a running position (a file being written, or memory).
//
// Thread-safety: ReadAt on one source may be called from several threads at once (implementations
// use pread or immutable memory). A sink is used by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dcpp/status.h"

namespace dcpp {

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Total size in bytes.
  virtual uint64_t size() const = 0;
  // Reads exactly n bytes at offset into dst; DataLoss if the range is past the end.
  virtual Status ReadAt(uint64_t offset, void* dst, size_t n) const = 0;
  // Name for error messages: a file path, "__0_0.distcp[1024, +512]", or "<memory>".
  virtual std::string name() const = 0;
  // Direct pointer to [offset, offset+n) if the source is memory-backed, else nullptr.
  virtual const std::byte* Peek(uint64_t /*offset*/, size_t /*n*/) const { return nullptr; }
};

// A source over memory the caller keeps alive.
class MemorySource final : public ByteSource {
 public:
  explicit MemorySource(std::string_view bytes, std::string name = "<memory>")
      : bytes_(bytes), name_(std::move(name)) {}
  uint64_t size() const override { return bytes_.size(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  std::string name() const override { return name_; }
  const std::byte* Peek(uint64_t offset, size_t n) const override;

 private:
  std::string_view bytes_;
  std::string name_;
};

// A window [offset, offset+length) of another source (which must outlive it).
class SubSource final : public ByteSource {
 public:
  SubSource(const ByteSource& base, uint64_t offset, uint64_t length)
      : base_(base), offset_(offset), length_(length) {}
  uint64_t size() const override { return length_; }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  std::string name() const override;
  const std::byte* Peek(uint64_t offset, size_t n) const override;

 private:
  const ByteSource& base_;
  uint64_t offset_;
  uint64_t length_;
};

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  virtual Status Write(const void* data, size_t n) = 0;
  // Bytes written so far.
  virtual uint64_t position() const = 0;
  virtual std::string name() const = 0;
};

// Appends to a std::string owned by the sink.
class StringSink final : public ByteSink {
 public:
  Status Write(const void* data, size_t n) override {
    out_.append(static_cast<const char*>(data), n);
    return Status::Ok();
  }
  uint64_t position() const override { return out_.size(); }
  std::string name() const override { return "<memory>"; }
  const std::string& str() const { return out_; }
  std::string Release() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace dcpp
