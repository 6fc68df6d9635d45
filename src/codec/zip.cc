#include "codec/zip.h"

#include <zlib.h>
#ifdef DCPP_HAVE_ISAL
#include <isa-l/crc.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

namespace dcpp::internal {

namespace {
// Archives with at most this many entries find names by a linear scan.
constexpr uint64_t kZipLinearLookup = 32;
// A large record is CRC'd and written in pieces of this size, so each piece is read from memory
// once while it is still in cache.
constexpr size_t kCrcPieceBytes = size_t{8} << 20;
}  // namespace

// ISA-L's folding CRC (PCLMUL/AVX-512) runs 4x zlib's on the development machine; the two give
// the same values (both the reflected IEEE polynomial, chained the same way).
uint32_t Crc32(uint32_t crc, const void* data, size_t n) {
#ifdef DCPP_HAVE_ISAL
  return ::crc32_gzip_refl(crc, static_cast<const unsigned char*>(data), n);
#else
  return static_cast<uint32_t>(::crc32_z(crc, static_cast<const Bytef*>(data), n));
#endif
}

namespace {

// Little-endian fields, each appended in one call (a byte at a time, these showed at 4-5 % of a
// save of 20 000 small tensors).
template <typename T>
void PutLE(std::string& out, T v) {
  char b[sizeof(T)];
  for (size_t i = 0; i < sizeof(T); ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  out.append(b, sizeof(T));
}
void Put16(std::string& out, uint16_t v) { PutLE(out, v); }
void Put32(std::string& out, uint32_t v) { PutLE(out, v); }
void Put64(std::string& out, uint64_t v) { PutLE(out, v); }

uint16_t Get16(const char* p) {
  return static_cast<uint16_t>(static_cast<uint8_t>(p[0]) | (static_cast<uint8_t>(p[1]) << 8));
}
uint32_t Get32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t Get64(const char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

// a + b <= limit, without overflow.
bool FitsWithin(uint64_t a, uint64_t b, uint64_t limit) { return a <= limit && b <= limit - a; }

}  // namespace

// ---- layout math ----

size_t Zip64LocalExtraSize(uint64_t local_header_offset, uint64_t size) {
  if (size < kZip32Max && local_header_offset < kZip32Max) return 0;
  return 4 + (size >= kZip32Max ? 16 : 0) + (local_header_offset >= kZip32Max ? 8 : 0);
}

std::string Zip64ExtraField(uint64_t local_header_offset, uint64_t size) {
  std::string out;
  const size_t n = Zip64LocalExtraSize(local_header_offset, size);
  if (n == 0) return out;
  Put16(out, kZip64ExtraId);
  Put16(out, static_cast<uint16_t>(n - 4));
  if (size >= kZip32Max) {
    Put64(out, size);  // uncompressed
    Put64(out, size);  // compressed (stored: the same)
  }
  if (local_header_offset >= kZip32Max) Put64(out, local_header_offset);
  return out;
}

size_t ZipPaddingSize(uint64_t local_header_offset, size_t name_size, uint64_t size,
                      uint32_t alignment) {
  // The FB field header (4 bytes) is always present, even with no padding bytes.
  const uint64_t start = local_header_offset + kZipLocalHeaderSize + name_size + 4 +
                         Zip64LocalExtraSize(local_header_offset, size);
  const uint64_t mod = start % alignment;
  return mod == 0 ? 0 : static_cast<size_t>(alignment - mod);
}

// ---- writer ----

ZipWriter::ZipWriter(ByteSink& sink, ZipWriterOptions options)
    : sink_(sink), options_(options), base_(sink.position()) {
  if (options_.alignment == 0 || (options_.alignment & (options_.alignment - 1)) != 0 ||
      options_.alignment > 4096) {
    options_.alignment = 64;
  }
}

Status ZipWriter::AddRecord(std::string_view name, const void* data, size_t size) {
  if (finished_)
    return FailedPreconditionError("zip record \"" + std::string(name) + "\" after Finish");
  if (name.empty() || name.size() > 0xFFFF) {
    return InvalidArgumentError("zip record name of " + std::to_string(name.size()) +
                                " bytes (must be 1..65535)");
  }
  const uint64_t offset = position();
  const size_t pad = ZipPaddingSize(offset, name.size(), size, options_.alignment);
  const size_t zip64_size = Zip64LocalExtraSize(offset, size);
  const bool zip64 = zip64_size > 0;
  const size_t extra_size = zip64_size + 4 + pad;

  // Local header: sizes and CRC are zero here; they follow the data in the descriptor. Like
  // miniz, an empty record has no descriptor and so no descriptor flag. Built in a buffer kept
  // between records: a small record costs no allocation.
  const uint16_t flags = size > 0 ? kZipFlags : kZipFlagUtf8;
  std::string& header = scratch_;
  header.clear();
  Put32(header, kZipLocalHeaderSig);
  Put16(header, 0);  // version needed
  Put16(header, flags);
  Put16(header, 0);  // method: stored
  Put16(header, 0);  // time
  Put16(header, 0);  // date
  Put32(header, 0);  // crc
  Put32(header, 0);  // compressed size
  Put32(header, 0);  // uncompressed size
  Put16(header, static_cast<uint16_t>(name.size()));
  Put16(header, static_cast<uint16_t>(extra_size));
  header.append(name);
  if (zip64) header.append(Zip64ExtraField(offset, size));
  Put16(header, kZipPaddingExtraId);
  Put16(header, static_cast<uint16_t>(pad));
  header.append(pad, 'Z');
  DCPP_RETURN_IF_ERROR(sink_.Write(header.data(), header.size()));
  uint32_t crc = 0;
  const auto* bytes = static_cast<const char*>(data);
  for (size_t done = 0; done < size;) {
    const size_t n = std::min(kCrcPieceBytes, size - done);
    if (options_.compute_crc32) crc = Crc32(crc, bytes + done, n);
    DCPP_RETURN_IF_ERROR(sink_.Write(bytes + done, n));
    done += n;
  }
  if (size > 0) {
    std::string& descriptor = scratch_;
    descriptor.clear();
    Put32(descriptor, kZipDataDescriptorSig);
    Put32(descriptor, crc);
    if (zip64) {
      Put64(descriptor, size);
      Put64(descriptor, size);
    } else {
      Put32(descriptor, static_cast<uint32_t>(size));
      Put32(descriptor, static_cast<uint32_t>(size));
    }
    DCPP_RETURN_IF_ERROR(sink_.Write(descriptor.data(), descriptor.size()));
  }
  central_.push_back({names_.size(), name.size(), offset, size, crc, flags});
  names_.append(name);
  crcs_.push_back(crc);
  return Status::Ok();
}

Status ZipWriter::Finish() {
  if (finished_) return FailedPreconditionError("zip archive finished twice");
  finished_ = true;
  const uint64_t cd_offset = position();
  std::string cd;
  size_t cd_reserve = 98;  // the end records
  for (const Central& e : central_) cd_reserve += kZipCentralHeaderSize + e.name_size + 28;
  cd.reserve(cd_reserve);
  for (const Central& e : central_) {
    const std::string_view name(names_.data() + e.name_offset, e.name_size);
    const size_t extra_size = Zip64LocalExtraSize(e.local_header_offset, e.size);
    Put32(cd, kZipCentralHeaderSig);
    Put16(cd, 0);  // version made by
    Put16(cd, 0);  // version needed
    Put16(cd, e.flags);
    Put16(cd, 0);  // method
    Put16(cd, 0);  // time
    Put16(cd, 0);  // date
    Put32(cd, e.crc32);
    Put32(cd, static_cast<uint32_t>(std::min(e.size, kZip32Max)));
    Put32(cd, static_cast<uint32_t>(std::min(e.size, kZip32Max)));
    Put16(cd, static_cast<uint16_t>(name.size()));
    Put16(cd, static_cast<uint16_t>(extra_size));
    Put16(cd, 0);  // comment length
    Put16(cd, 0);  // disk number start
    Put16(cd, 0);  // internal attributes
    Put32(cd, 0);  // external attributes
    Put32(cd, static_cast<uint32_t>(std::min(e.local_header_offset, kZip32Max)));
    cd.append(name);
    if (extra_size > 0) cd.append(Zip64ExtraField(e.local_header_offset, e.size));
  }
  const uint64_t cd_size = cd.size();
  const uint64_t zip64_end_offset = cd_offset + cd_size;
  const uint64_t n = central_.size();
  // ZIP64 end of central directory record.
  Put32(cd, kZip64EndSig);
  Put64(cd, kZip64EndSize - 12);  // size of the rest of the record
  Put16(cd, 0x031E);              // made by: UNIX, spec 3.0 (as miniz writes)
  Put16(cd, 45);                  // needed: 4.5 (ZIP64)
  Put32(cd, 0);                   // this disk
  Put32(cd, 0);                   // disk with the central directory
  Put64(cd, n);
  Put64(cd, n);
  Put64(cd, cd_size);
  Put64(cd, cd_offset);
  // ZIP64 locator.
  Put32(cd, kZip64LocatorSig);
  Put32(cd, 0);
  Put64(cd, zip64_end_offset);
  Put32(cd, 1);  // total disks
  // Classic end record, values clamped (readers take the real ones from the ZIP64 record).
  Put32(cd, kZipEndSig);
  Put16(cd, 0);
  Put16(cd, 0);
  Put16(cd, static_cast<uint16_t>(std::min<uint64_t>(n, 0xFFFF)));
  Put16(cd, static_cast<uint16_t>(std::min<uint64_t>(n, 0xFFFF)));
  Put32(cd, static_cast<uint32_t>(std::min(cd_size, kZip32Max)));
  Put32(cd, static_cast<uint32_t>(std::min(cd_offset, kZip32Max)));
  Put16(cd, 0);  // comment length
  return sink_.Write(cd.data(), cd.size());
}

// ---- reader ----

namespace {

class Parser {
 public:
  explicit Parser(const ByteSource& source) : source_(source), name_(source.name()) {}

  Status Corrupt(const std::string& what) const {
    return DataLossError("zip archive " + name_ + ": " + what);
  }
  Status CorruptEntry(const std::string& entry, const std::string& what) const {
    return DataLossError("zip archive " + name_ + ", entry \"" + entry + "\": " + what);
  }

  // The bytes [offset, offset + n): in place when the source is in memory, else read into
  // `scratch`. Small archives parsed from memory (a DCP blob in a read window) copy nothing.
  Result<const char*> View(uint64_t offset, size_t n, std::string& scratch) const {
    if (const std::byte* p = source_.Peek(offset, n)) return reinterpret_cast<const char*>(p);
    DCPP_RETURN_IF_ERROR(Read(offset, n, scratch));
    return static_cast<const char*>(scratch.data());
  }

  Status Read(uint64_t offset, size_t n, std::string& out) const {
    out.resize(n);
    Status s = source_.ReadAt(offset, out.data(), n);
    if (!s.ok() && s.code() == StatusCode::kDataLoss) {
      return Corrupt("truncated: " + std::string(s.message()));
    }
    return s;
  }

  const ByteSource& source_;
  std::string name_;
};

struct EndInfo {
  uint64_t entries = 0;
  uint64_t cd_size = 0;
  uint64_t cd_offset = 0;
  uint64_t cd_limit = 0;  // the central directory must end at or before this offset
};

Result<EndInfo> FindEnd(const Parser& p) {
  const uint64_t size = p.source_.size();
  if (size < kZipEndSize) {
    return p.Corrupt("too small (" + std::to_string(size) + " bytes) to be a zip archive");
  }
  // The end record is the last 22 bytes plus a comment of at most 65535 bytes.
  const uint64_t tail_len = std::min<uint64_t>(size, kZipEndSize + 0xFFFF);
  const uint64_t tail_start = size - tail_len;
  std::string tail_buf;
  DCPP_ASSIGN_OR_RETURN(const char* tail, p.View(tail_start, tail_len, tail_buf));
  int64_t found = -1;
  for (int64_t i = static_cast<int64_t>(tail_len - kZipEndSize); i >= 0; --i) {
    if (Get32(tail + i) == kZipEndSig &&
        static_cast<uint64_t>(i) + kZipEndSize + Get16(tail + i + 20) <= tail_len) {
      found = i;
      break;
    }
  }
  if (found < 0) return p.Corrupt("no end of central directory record (not a zip archive?)");
  const char* e = tail + found;
  const uint64_t end_offset = tail_start + static_cast<uint64_t>(found);
  if (Get16(e + 4) != 0 || Get16(e + 6) != 0) {
    return UnimplementedError("zip archive " + p.name_ + ": multi-disk archives are not supported");
  }
  EndInfo info;
  info.entries = Get16(e + 10);
  info.cd_size = Get32(e + 12);
  info.cd_offset = Get32(e + 16);
  info.cd_limit = end_offset;

  // A ZIP64 locator right before the end record points at the ZIP64 end record, which holds
  // the full-width values (PyTorch always writes both).
  if (end_offset >= kZip64LocatorSize) {
    std::string loc_buf;
    DCPP_ASSIGN_OR_RETURN(const char* loc,
                          p.View(end_offset - kZip64LocatorSize, kZip64LocatorSize, loc_buf));
    if (Get32(loc) == kZip64LocatorSig) {
      const uint64_t z64 = Get64(loc + 8);
      const uint64_t locator_offset = end_offset - kZip64LocatorSize;
      if (!FitsWithin(z64, kZip64EndSize, locator_offset)) {
        return p.Corrupt("ZIP64 end record offset " + std::to_string(z64) + " is out of range");
      }
      std::string rec_buf;
      DCPP_ASSIGN_OR_RETURN(const char* rec, p.View(z64, kZip64EndSize, rec_buf));
      if (Get32(rec) != kZip64EndSig) {
        return p.Corrupt("bad ZIP64 end record signature at offset " + std::to_string(z64));
      }
      if (Get64(rec + 4) < kZip64EndSize - 12) {
        return p.Corrupt("ZIP64 end record too short");
      }
      if (Get32(rec + 16) != 0 || Get32(rec + 20) != 0) {
        return UnimplementedError("zip archive " + p.name_ +
                                  ": multi-disk archives are not supported");
      }
      info.entries = Get64(rec + 32);
      info.cd_size = Get64(rec + 40);
      info.cd_offset = Get64(rec + 48);
      info.cd_limit = z64;
    }
  }
  if (!FitsWithin(info.cd_offset, info.cd_size, info.cd_limit)) {
    return p.Corrupt("central directory [" + std::to_string(info.cd_offset) + ", +" +
                     std::to_string(info.cd_size) + ") lies outside the archive");
  }
  if (info.entries > info.cd_size / kZipCentralHeaderSize) {
    return p.Corrupt(std::to_string(info.entries) +
                     " entries cannot fit in a central directory of " +
                     std::to_string(info.cd_size) + " bytes");
  }
  return info;
}

}  // namespace

Result<ZipReader> ZipReader::Open(const ByteSource& source) {
  Parser p(source);
  DCPP_ASSIGN_OR_RETURN(EndInfo end, FindEnd(p));
  std::string cd_buf;
  DCPP_ASSIGN_OR_RETURN(const char* cd_bytes, p.View(end.cd_offset, end.cd_size, cd_buf));
  const std::string_view cd(cd_bytes, end.cd_size);

  ZipReader reader;
  reader.source_ = &source;
  reader.entries_.reserve(end.entries);
  size_t pos = 0;
  for (uint64_t i = 0; i < end.entries; ++i) {
    auto where = [i] { return "central directory entry " + std::to_string(i); };
    if (cd.size() - pos < kZipCentralHeaderSize) return p.Corrupt(where() + " is truncated");
    const char* h = cd.data() + pos;
    if (Get32(h) != kZipCentralHeaderSig) return p.Corrupt(where() + " has a bad signature");
    const uint16_t flags = Get16(h + 8);
    const uint16_t method = Get16(h + 10);
    uint32_t crc = Get32(h + 16);
    uint64_t comp = Get32(h + 20);
    uint64_t uncomp = Get32(h + 24);
    const size_t name_len = Get16(h + 28);
    const size_t extra_len = Get16(h + 30);
    const size_t comment_len = Get16(h + 32);
    const uint16_t disk = Get16(h + 34);
    uint64_t lho = Get32(h + 42);
    if (cd.size() - pos - kZipCentralHeaderSize < name_len + extra_len + comment_len) {
      return p.Corrupt(where() + " is truncated");
    }
    ZipEntry entry;
    entry.name.assign(h + kZipCentralHeaderSize, name_len);
    const char* extra = h + kZipCentralHeaderSize + name_len;
    pos += kZipCentralHeaderSize + name_len + extra_len + comment_len;

    // ZIP64 extra field: the full values of the fields that are 0xFFFFFFFF, in a fixed order.
    for (size_t x = 0; x + 4 <= extra_len;) {
      const uint16_t id = Get16(extra + x);
      const size_t len = Get16(extra + x + 2);
      if (x + 4 + len > extra_len) return p.CorruptEntry(entry.name, "extra field overruns");
      if (id == kZip64ExtraId) {
        const char* f = extra + x + 4;
        size_t left = len;
        auto take = [&](uint64_t& field) -> bool {
          if (field != kZip32Max) return true;
          if (left < 8) return false;
          field = Get64(f);
          f += 8;
          left -= 8;
          return true;
        };
        if (!take(uncomp) || !take(comp) || !take(lho)) {
          return p.CorruptEntry(entry.name, "ZIP64 extra field too short");
        }
      }
      x += 4 + len;
    }
    if (disk != 0 && disk != 0xFFFF) {
      return UnimplementedError("zip archive " + p.name_ +
                                ": multi-disk archives are not supported");
    }
    if (flags & 0x0001) {
      return UnimplementedError("zip archive " + p.name_ + ", entry \"" + entry.name +
                                "\": encrypted entries are not supported");
    }
    if (method != 0) {
      return UnimplementedError("zip archive " + p.name_ + ", entry \"" + entry.name +
                                "\": compression method " + std::to_string(method) +
                                " is not supported (only stored entries)");
    }
    if (comp != uncomp) {
      return p.CorruptEntry(entry.name, "stored entry with compressed size " +
                                            std::to_string(comp) + " != size " +
                                            std::to_string(uncomp));
    }
    entry.size = uncomp;
    entry.crc32 = crc;
    entry.local_header_offset = lho;

    // The data offset comes from the local header, whose extra field may differ from the
    // central one (it carries the alignment padding).
    if (!FitsWithin(lho, kZipLocalHeaderSize + name_len, end.cd_offset)) {
      return p.CorruptEntry(entry.name,
                            "local header offset " + std::to_string(lho) + " is out of range");
    }
    std::string local_buf;
    DCPP_ASSIGN_OR_RETURN(const char* local,
                          p.View(lho, kZipLocalHeaderSize + name_len, local_buf));
    if (Get32(local) != kZipLocalHeaderSig) {
      return p.CorruptEntry(entry.name,
                            "bad local header signature at offset " + std::to_string(lho));
    }
    const size_t local_name_len = Get16(local + 26);
    const size_t local_extra_len = Get16(local + 28);
    if (local_name_len != name_len ||
        std::memcmp(local + kZipLocalHeaderSize, entry.name.data(), name_len) != 0) {
      return p.CorruptEntry(entry.name, "local header names a different entry");
    }
    if (Get16(local + 8) != 0) {
      return UnimplementedError("zip archive " + p.name_ + ", entry \"" + entry.name +
                                "\": compressed in its local header (method " +
                                std::to_string(Get16(local + 8)) + ")");
    }
    entry.data_offset = lho + kZipLocalHeaderSize + local_name_len + local_extra_len;
    if (!FitsWithin(entry.data_offset, entry.size, end.cd_offset)) {
      return p.CorruptEntry(entry.name, "data [" + std::to_string(entry.data_offset) + ", +" +
                                            std::to_string(entry.size) +
                                            ") runs into the central directory");
    }
    // A torch.save archive has a handful of entries: compared in place, without a hash table.
    bool duplicate = false;
    if (end.entries <= kZipLinearLookup) {
      for (const ZipEntry& e : reader.entries_) duplicate = duplicate || e.name == entry.name;
    } else {
      duplicate = !reader.by_name_.emplace(entry.name, reader.entries_.size()).second;
    }
    if (duplicate) return p.CorruptEntry(entry.name, "duplicate entry name");
    reader.entries_.push_back(std::move(entry));
  }
  return reader;
}

const ZipEntry* ZipReader::Find(std::string_view name) const {
  if (by_name_.empty()) {
    for (const ZipEntry& e : entries_) {
      if (e.name == name) return &e;
    }
    return nullptr;
  }
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

Result<std::string> ZipReader::Read(const ZipEntry& entry) const {
  std::string out(entry.size, '\0');
  Status s = source_->ReadAt(entry.data_offset, out.data(), out.size());
  if (!s.ok()) return s.WithContext("zip entry \"" + entry.name + "\"");
  return out;
}

Status ZipReader::VerifyCrc(const ZipEntry& entry) const {
  return VerifyZipCrc(*source_, entry.name, entry.data_offset, entry.size, entry.crc32);
}

Status VerifyZipCrc(const ByteSource& source, const std::string& entry_name, uint64_t offset,
                    uint64_t size, uint32_t crc) {
  constexpr size_t kChunk = 4 << 20;
  uint32_t actual = 0;
  std::string buf;
  for (uint64_t done = 0; done < size;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, size - done));
    if (const std::byte* p = source.Peek(offset + done, n)) {
      actual = Crc32(actual, p, n);
    } else {
      buf.resize(n);
      Status s = source.ReadAt(offset + done, buf.data(), n);
      if (!s.ok()) return s.WithContext("zip entry \"" + entry_name + "\"");
      actual = Crc32(actual, buf.data(), n);
    }
    done += n;
  }
  if (actual != crc) {
    char msg[64];
    std::snprintf(msg, sizeof(msg), "CRC-32 mismatch: stored %08x, computed %08x", crc, actual);
    return DataLossError("zip archive " + source.name() + ", entry \"" + entry_name + "\": " + msg);
  }
  return Status::Ok();
}

}  // namespace dcpp::internal
