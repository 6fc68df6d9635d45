// The zip subset PyTorch's archives use (torch.save, TorchScript): stored entries only, data
// aligned to 64 bytes with an 'FB' padding extra field, a data descriptor after each non-empty
// record, and ZIP64 end records always present. The writer's output is byte-identical to
// PyTorch's (miniz) for the same records. docs/format.md ("torch.save archives") draws the bytes.
//
// ZipWriter streams to a ByteSink: each AddRecord writes header, data (straight from the
// caller's memory) and descriptor; Finish writes the central directory and end records. Offsets
// are relative to the sink position at construction, so an archive embedded in a larger stream
// (a DCP `.distcp` blob) is laid out exactly as a standalone one.
//
// ZipReader parses the end records and central directory of a ByteSource and locates each
// record's data through its local header. Every length and offset is bounds-checked against the
// source; inconsistencies are DataLoss naming the archive and entry. Compressed or encrypted
// entries are Unimplemented.
//
// Thread-safety: a ZipReader is immutable after Open. A ZipWriter is used by one thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "dcpp/io.h"
#include "dcpp/status.h"

namespace dcpp::internal {

inline constexpr uint32_t kZipLocalHeaderSig = 0x04034b50;
inline constexpr uint32_t kZipCentralHeaderSig = 0x02014b50;
inline constexpr uint32_t kZipDataDescriptorSig = 0x08074b50;
inline constexpr uint32_t kZip64EndSig = 0x06064b50;
inline constexpr uint32_t kZip64LocatorSig = 0x07064b50;
inline constexpr uint32_t kZipEndSig = 0x06054b50;
inline constexpr size_t kZipLocalHeaderSize = 30;
inline constexpr size_t kZipCentralHeaderSize = 46;
inline constexpr size_t kZip64EndSize = 56;
inline constexpr size_t kZip64LocatorSize = 20;
inline constexpr size_t kZipEndSize = 22;
inline constexpr uint16_t kZip64ExtraId = 0x0001;
inline constexpr uint16_t kZipPaddingExtraId = 0x4246;  // "FB"
inline constexpr uint16_t kZipFlags = 0x0808;           // data descriptor + UTF-8 names
inline constexpr uint16_t kZipFlagUtf8 = 0x0800;        // empty records: no descriptor
inline constexpr uint64_t kZip32Max = 0xFFFFFFFFu;

// One entry of the central directory, with its data located.
struct ZipEntry {
  std::string name;
  uint64_t local_header_offset = 0;
  uint64_t data_offset = 0;  // first byte of the record's data, within the source
  uint64_t size = 0;         // stored: compressed size == uncompressed size
  uint32_t crc32 = 0;
};

class ZipReader {
 public:
  // `source` must outlive the reader.
  static Result<ZipReader> Open(const ByteSource& source);

  const ByteSource& source() const { return *source_; }
  // Entries in central-directory order.
  const std::vector<ZipEntry>& entries() const { return entries_; }
  // Entry by exact name, or nullptr.
  const ZipEntry* Find(std::string_view name) const;

  // Whole record (the allocation is the record's size, which is bounded by the source size).
  Result<std::string> Read(const ZipEntry& entry) const;
  // Reads the record in pieces and compares its CRC-32 (DataLoss naming the entry).
  Status VerifyCrc(const ZipEntry& entry) const;

 private:
  const ByteSource* source_ = nullptr;
  std::vector<ZipEntry> entries_;
  std::unordered_map<std::string, size_t> by_name_;
};

struct ZipWriterOptions {
  uint32_t alignment = 64;  // record data alignment (a power of two, at most 4096)
  bool compute_crc32 = true;
};

class ZipWriter {
 public:
  explicit ZipWriter(ByteSink& sink, ZipWriterOptions options = {});

  // Writes one stored record. `data` is written straight from the caller's memory.
  Status AddRecord(std::string_view name, const void* data, size_t size);
  // Central directory, ZIP64 end record and locator, classic end record. Call once.
  Status Finish();

  // Bytes written so far, relative to the archive start.
  uint64_t position() const { return sink_.position() - base_; }
  // CRC-32 of each record in write order (0 when not computed), for serialization ids.
  const std::vector<uint32_t>& crcs() const { return crcs_; }

 private:
  struct Central {
    size_t name_offset;  // the name is names_[name_offset, +name_size)
    size_t name_size;
    uint64_t local_header_offset;
    uint64_t size;
    uint32_t crc32;
    uint16_t flags;
  };
  ByteSink& sink_;
  ZipWriterOptions options_;
  uint64_t base_;
  std::vector<Central> central_;
  std::string names_;    // every record's name, back to back
  std::string scratch_;  // a local header or descriptor being written
  std::vector<uint32_t> crcs_;
  bool finished_ = false;
};

// CRC-32 (zip's reflected IEEE polynomial) of n bytes, continuing from `crc` (0 to start).
uint32_t Crc32(uint32_t crc, const void* data, size_t n);

// Reads [offset, offset+size) of `source` in pieces and compares its CRC-32 with `crc`;
// DataLoss naming the source and `entry_name` on mismatch.
Status VerifyZipCrc(const ByteSource& source, const std::string& entry_name, uint64_t offset,
                    uint64_t size, uint32_t crc);

// ---- layout math, exposed for tests ----

// Bytes of the ZIP64 extra field PyTorch's writer puts in a local header (0 when none): sizes
// (16 bytes) when `size` >= 0xFFFFFFFF, the header offset (8 bytes) when `local_header_offset`
// >= 0xFFFFFFFF, plus the 4-byte field header when either applies.
size_t Zip64LocalExtraSize(uint64_t local_header_offset, uint64_t size);
// The ZIP64 extra field itself (id 0x0001): sizes when `size` >= 0xFFFFFFFF, then the offset
// when `local_header_offset` >= 0xFFFFFFFF. Empty when neither applies.
std::string Zip64ExtraField(uint64_t local_header_offset, uint64_t size);
// Number of 'Z' bytes in the FB field so the record data starts at a multiple of `alignment`.
size_t ZipPaddingSize(uint64_t local_header_offset, size_t name_size, uint64_t size,
                      uint32_t alignment);

}  // namespace dcpp::internal
