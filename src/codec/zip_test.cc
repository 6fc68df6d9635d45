#include "codec/zip.h"

#include <sys/mman.h>
#include <zlib.h>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "codec/testdata_torch113.h"
#include "testing/testing.h"

namespace dcpp::internal {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

std::string FromHex(const char* hex) {
  std::string out;
  for (const char* p = hex; p[0] && p[1]; p += 2) {
    out.push_back(static_cast<char>(std::stoi(std::string(p, 2), nullptr, 16)));
  }
  return out;
}

std::string Archive(const std::vector<std::pair<std::string, std::string>>& records,
                    ZipWriterOptions options = {}) {
  StringSink sink;
  ZipWriter w(sink, options);
  for (const auto& [name, data] : records) {
    EXPECT_THAT(w.AddRecord(name, data.data(), data.size()), IsOk());
  }
  EXPECT_THAT(w.Finish(), IsOk());
  return sink.Release();
}

void Poke16(std::string& s, size_t at, uint16_t v) {
  s[at] = static_cast<char>(v & 0xFF);
  s[at + 1] = static_cast<char>(v >> 8);
}
void Poke32(std::string& s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xFF);
}

TEST(ZipTest, WriteThenReadEveryRecordAlignedWithCrc) {
  std::vector<std::pair<std::string, std::string>> records;
  for (size_t size : {0, 1, 2, 63, 64, 65, 1000, 4096 + 7}) {
    std::string data(size, '\0');
    for (size_t i = 0; i < size; ++i) data[i] = static_cast<char>(i * 31 + size);
    records.emplace_back("archive/data/" + std::to_string(size) + std::string(size % 7, 'n'), data);
  }
  const std::string bytes = Archive(records);
  MemorySource source(bytes, "test.zip");
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(source));
  ASSERT_EQ(reader.entries().size(), records.size());
  for (size_t i = 0; i < records.size(); ++i) {
    const ZipEntry& e = reader.entries()[i];
    EXPECT_EQ(e.name, records[i].first);
    EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
    EXPECT_EQ(e.size, records[i].second.size());
    EXPECT_EQ(e.crc32, static_cast<uint32_t>(
                           ::crc32(0, reinterpret_cast<const Bytef*>(records[i].second.data()),
                                   records[i].second.size())));
    EXPECT_EQ(reader.Find(e.name), &e);
    DCPP_ASSERT_OK_AND_ASSIGN(std::string got, reader.Read(e));
    EXPECT_EQ(got, records[i].second);
    EXPECT_THAT(reader.VerifyCrc(e), IsOk());
  }
  EXPECT_EQ(reader.Find("archive/missing"), nullptr);
}

TEST(ZipTest, ByteIdenticalToPyTorch113) {
  // Rewriting the records of a PyTorch-written archive in the same order reproduces its bytes.
  const std::string golden = FromHex(testdata::kTorch113Arange6Hex);
  ASSERT_EQ(golden.size(), 747u);
  MemorySource source(golden);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(source));
  std::vector<std::pair<std::string, std::string>> records;
  for (const ZipEntry& e : reader.entries()) {
    DCPP_ASSERT_OK(reader.VerifyCrc(e));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string data, reader.Read(e));
    records.emplace_back(e.name, data);
  }
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].first, "archive/data.pkl");
  EXPECT_EQ(records[2].second, "3\n");
  EXPECT_EQ(Archive(records), golden);
}

TEST(ZipTest, OffsetsAreRelativeToTheArchiveStart) {
  // An archive written after 13 bytes of other data (a blob in a .distcp file) is laid out as if
  // it started at 0.
  StringSink sink;
  ASSERT_THAT(sink.Write("0123456789abc", 13), IsOk());
  ZipWriter w(sink);
  ASSERT_THAT(w.AddRecord("a/x", "hello", 5), IsOk());
  EXPECT_EQ(w.position() + 13, sink.position());
  ASSERT_THAT(w.Finish(), IsOk());
  const std::string all = sink.Release();
  EXPECT_EQ(all.substr(13), Archive({{"a/x", "hello"}}));
  MemorySource whole(all);
  SubSource blob(whole, 13, all.size() - 13);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(blob));
  EXPECT_EQ(reader.entries()[0].data_offset % 64, 0u);
  EXPECT_EQ(*reader.Read(reader.entries()[0]), "hello");
}

TEST(ZipTest, WithoutCrcStoresZero) {
  ZipWriterOptions options;
  options.compute_crc32 = false;
  const std::string bytes = Archive({{"a/x", "hello"}}, options);
  MemorySource source(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(source));
  EXPECT_EQ(reader.entries()[0].crc32, 0u);
  EXPECT_THAT(reader.VerifyCrc(reader.entries()[0]),
              StatusIs(StatusCode::kDataLoss, HasSubstr("CRC-32 mismatch")));
}

// A record larger than one CRC piece (8 MiB) is CRC'd piece by piece as it is written: the chained
// CRC is the whole record's, and the reader's check of it passes.
TEST(ZipTest, ARecordOfSeveralCrcPiecesCarriesTheWholeRecordsCrc) {
  std::string big((size_t{16} << 20) + 12345, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 40503u) >> 7);
  const std::string bytes = Archive({{"a/small", "xy"}, {"a/big", big}, {"a/z", "1"}});
  MemorySource source(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(source));
  ASSERT_EQ(reader.entries().size(), 3u);
  EXPECT_EQ(reader.entries()[1].crc32, Crc32(0, big.data(), big.size()));
  DCPP_EXPECT_OK(reader.VerifyCrc(reader.entries()[1]));
}

TEST(ZipTest, Zip64ExtraFieldMath) {
  const uint64_t k4G = 0xFFFFFFFFull;
  EXPECT_EQ(Zip64LocalExtraSize(0, 10), 0u);
  EXPECT_EQ(Zip64LocalExtraSize(k4G - 1, k4G - 1), 0u);
  EXPECT_EQ(Zip64LocalExtraSize(0, k4G), 20u);
  EXPECT_EQ(Zip64LocalExtraSize(k4G, 0), 12u);
  EXPECT_EQ(Zip64LocalExtraSize(k4G + 5, k4G + 5), 28u);
  EXPECT_EQ(Zip64ExtraField(0, 10), "");
  const std::string both = Zip64ExtraField(0x123456789ull, 0x100000000ull);
  ASSERT_EQ(both.size(), 28u);
  EXPECT_EQ(both.substr(0, 4), std::string("\x01\x00\x18\x00", 4));
  EXPECT_EQ(both.substr(4, 8), std::string("\x00\x00\x00\x00\x01\x00\x00\x00", 8));   // size
  EXPECT_EQ(both.substr(12, 8), std::string("\x00\x00\x00\x00\x01\x00\x00\x00", 8));  // size
  EXPECT_EQ(both.substr(20, 8), std::string("\x89\x67\x45\x23\x01\x00\x00\x00", 8));  // offset
  const std::string offset_only = Zip64ExtraField(k4G, 3);
  EXPECT_EQ(offset_only, std::string("\x01\x00\x08\x00\xff\xff\xff\xff\x00\x00\x00\x00", 12));

  // Padding: data start = offset + 30 + name + 4 (FB header) [+ zip64 extra], rounded up to 64.
  EXPECT_EQ(ZipPaddingSize(0, 16, 10, 64), 14u);  // 50 -> 64 (archive/data.pkl in 1.13)
  EXPECT_EQ(ZipPaddingSize(0, 30, 10, 64), 0u);   // 64 exactly
  EXPECT_EQ(ZipPaddingSize(0, 14, k4G, 64), 60u);
  EXPECT_EQ(ZipPaddingSize(k4G + 1, 14, 10, 64), (64 - (k4G + 1 + 48 + 12) % 64) % 64);
  EXPECT_EQ(ZipPaddingSize(5, 1, 1, 4096), 4096u - 40u);
  for (uint64_t off : std::vector<uint64_t>{0, 7, 1000, k4G - 3, k4G, k4G * 3 + 11}) {
    for (uint64_t size : std::vector<uint64_t>{0, 100, k4G - 1, k4G, k4G * 2}) {
      for (size_t name : {1u, 14u, 100u}) {
        const uint64_t start = off + 30 + name + 4 + Zip64LocalExtraSize(off, size) +
                               ZipPaddingSize(off, name, size, 64);
        EXPECT_EQ(start % 64, 0u) << off << " " << size << " " << name;
      }
    }
  }
}

// Keeps small writes and records large ones as holes of zeros, so a multi-GiB archive can be
// written and read back without the memory.
class SparseSink final : public ByteSink {
 public:
  Status Write(const void* data, size_t n) override {
    if (n >= (1u << 20)) {
      holes_[position_] = n;
    } else {
      small_[position_] = std::string(static_cast<const char*>(data), n);
    }
    position_ += n;
    return Status::Ok();
  }
  uint64_t position() const override { return position_; }
  std::string name() const override { return "<sparse>"; }

  std::map<uint64_t, std::string> small_;
  std::map<uint64_t, uint64_t> holes_;
  uint64_t position_ = 0;
};

class SparseSource final : public ByteSource {
 public:
  explicit SparseSource(const SparseSink& sink) : sink_(sink) {}
  uint64_t size() const override { return sink_.position_; }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    if (offset > size() || n > size() - offset) return DataLossError("past the end");
    auto* out = static_cast<char*>(dst);
    std::memset(out, 0, n);
    for (const auto& [at, bytes] : sink_.small_) {
      const uint64_t lo = std::max(at, offset), hi = std::min(at + bytes.size(), offset + n);
      if (lo < hi) std::memcpy(out + (lo - offset), bytes.data() + (lo - at), hi - lo);
    }
    return Status::Ok();
  }
  std::string name() const override { return "<sparse>"; }

 private:
  const SparseSink& sink_;
};

TEST(ZipTest, Zip64RecordsPastFourGiB) {
  // A 4.5 GiB record (sizes in ZIP64 fields) followed by a record whose header lies past 4 GiB
  // (offset in ZIP64 fields). The big record's memory is an untouched anonymous mapping.
  const size_t big = (size_t{9} << 29);
  void* mem = ::mmap(nullptr, big, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) GTEST_SKIP() << "cannot reserve 4.5 GiB of address space";
  SparseSink sink;
  ZipWriterOptions options;
  options.compute_crc32 = false;  // would read 4.5 GiB
  ZipWriter w(sink, options);
  ASSERT_THAT(w.AddRecord("archive/data.pkl", "pkl", 3), IsOk());
  ASSERT_THAT(w.AddRecord("archive/data/0", mem, big), IsOk());
  ASSERT_THAT(w.AddRecord("archive/version", "3\n", 2), IsOk());
  ASSERT_THAT(w.Finish(), IsOk());
  ::munmap(mem, big);

  SparseSource source(sink);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(source));
  ASSERT_EQ(reader.entries().size(), 3u);
  const ZipEntry& e0 = reader.entries()[1];
  const ZipEntry& e1 = reader.entries()[2];
  EXPECT_EQ(e0.size, big);
  EXPECT_EQ(e0.data_offset % 64, 0u);
  EXPECT_GT(e1.local_header_offset, 0xFFFFFFFFull);
  EXPECT_EQ(e1.data_offset % 64, 0u);
  EXPECT_EQ(*reader.Read(e1), "3\n");
  // The big record's descriptor is the 24-byte ZIP64 form.
  std::string desc(24, '\0');
  ASSERT_THAT(source.ReadAt(e0.data_offset + big, desc.data(), 24), IsOk());
  EXPECT_EQ(desc.substr(0, 4), "PK\x07\x08");
  EXPECT_EQ(desc.substr(8, 8), std::string("\x00\x00\x00\x20\x01\x00\x00\x00", 8));
}

TEST(ZipTest, EveryTruncationIsDataLoss) {
  const std::string bytes = Archive({{"archive/data.pkl", "abc"}, {"archive/version", "3\n"}});
  for (size_t n = 0; n < bytes.size(); ++n) {
    const std::string cut = bytes.substr(0, n);
    MemorySource source(cut, "cut.zip");
    auto reader = ZipReader::Open(source);
    EXPECT_THAT(reader.status(), StatusIs(StatusCode::kDataLoss, HasSubstr("cut.zip"))) << n;
  }
}

TEST(ZipTest, FlippedDataByteFailsCrc) {
  std::string bytes = Archive({{"archive/data/0", std::string(100, 'x')}});
  MemorySource clean(bytes);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader r0, ZipReader::Open(clean));
  const uint64_t at = r0.entries()[0].data_offset + 50;
  bytes[at] ^= 1;
  MemorySource source(bytes, "flip.zip");
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader reader, ZipReader::Open(source));
  EXPECT_THAT(reader.VerifyCrc(reader.entries()[0]),
              StatusIs(StatusCode::kDataLoss,
                       ::testing::AllOf(HasSubstr("flip.zip"), HasSubstr("archive/data/0"),
                                        HasSubstr("CRC-32"))));
}

TEST(ZipTest, CorruptHeadersNameTheEntry) {
  const std::string good = Archive({{"archive/data.pkl", "abc"}, {"archive/version", "3\n"}});
  MemorySource gs(good);
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader gr, ZipReader::Open(gs));
  const uint64_t lho = gr.entries()[1].local_header_offset;
  // Central directory position: find the first central header signature.
  const size_t cd = good.find(std::string("PK\x01\x02", 4));
  ASSERT_NE(cd, std::string::npos);
  const size_t cd2 = good.find(std::string("PK\x01\x02", 4), cd + 4);

  {  // Bad local header signature.
    std::string b = good;
    b[lho] = 'X';
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss,
                         ::testing::AllOf(HasSubstr("bad.zip"), HasSubstr("archive/version"),
                                          HasSubstr("local header"))));
  }
  {  // Local header offset pointing past the data area.
    std::string b = good;
    Poke32(b, cd2 + 42, 0x7FFFFFF0);
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss, HasSubstr("archive/version")));
  }
  {  // Size running into the central directory.
    std::string b = good;
    Poke32(b, cd2 + 20, 1000);
    Poke32(b, cd2 + 24, 1000);
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss, HasSubstr("central directory")));
  }
  {  // Compressed sizes that differ from the size.
    std::string b = good;
    Poke32(b, cd + 20, 2);
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss, HasSubstr("archive/data.pkl")));
  }
  {  // Deflated entry.
    std::string b = good;
    Poke16(b, cd2 + 10, 8);
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kUnimplemented,
                         ::testing::AllOf(HasSubstr("archive/version"), HasSubstr("method 8"))));
  }
  {  // Central directory offset out of range (in the ZIP64 end record).
    std::string b = good;
    const size_t z64 = b.find(std::string("PK\x06\x06", 4));
    Poke32(b, z64 + 48, 0x7FFFFFFF);
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss, HasSubstr("central directory")));
  }
  {  // Entry count larger than the directory can hold.
    std::string b = good;
    const size_t z64 = b.find(std::string("PK\x06\x06", 4));
    Poke32(b, z64 + 32, 1000000);
    MemorySource s(b, "bad.zip");
    EXPECT_THAT(ZipReader::Open(s).status(), StatusIs(StatusCode::kDataLoss, HasSubstr("entries")));
  }
  {  // Duplicate names.
    const std::string dup = Archive({{"a/x", "1"}, {"a/x", "2"}});
    MemorySource s(dup, "dup.zip");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss, HasSubstr("duplicate")));
  }
  {  // Not a zip at all.
    const std::string junk(100, 'j');
    MemorySource s(junk, "junk.bin");
    EXPECT_THAT(ZipReader::Open(s).status(),
                StatusIs(StatusCode::kDataLoss, HasSubstr("not a zip")));
  }
}

TEST(ZipTest, WriterRejectsBadNamesAndUseAfterFinish) {
  StringSink sink;
  ZipWriter w(sink);
  EXPECT_THAT(w.AddRecord("", "x", 1), StatusIs(StatusCode::kInvalidArgument, HasSubstr("name")));
  EXPECT_THAT(w.AddRecord(std::string(70000, 'n'), "x", 1),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("name")));
  ASSERT_THAT(w.Finish(), IsOk());
  EXPECT_THAT(w.AddRecord("a", "x", 1), StatusIs(StatusCode::kFailedPrecondition, HasSubstr("a")));
  EXPECT_THAT(w.Finish(), StatusIs(StatusCode::kFailedPrecondition, HasSubstr("twice")));
  // An empty archive is still a valid one.
  MemorySource s(sink.str());
  DCPP_ASSERT_OK_AND_ASSIGN(ZipReader r, ZipReader::Open(s));
  EXPECT_TRUE(r.entries().empty());
}

}  // namespace
}  // namespace dcpp::internal
