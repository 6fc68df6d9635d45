#include "layout/manifest.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "codec/zip.h"
#include "testing/testing.h"

namespace dcpp::internal {
namespace {

using ::dcpp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr uint64_t kSeg = kManifestMinSegmentBytes;  // small segments: many per test blob

std::string Bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

Manifest Sample() {
  Manifest m;
  m.segment_bytes = kSeg;
  m.metadata_hash = 0x1234;
  uint64_t off = 0;
  for (uint64_t len : {uint64_t{0}, uint64_t{100}, kSeg, kSeg + 1, 5 * kSeg + 17}) {
    m.Add("__0_0.distcp", off, len, HashSegments(Bytes(len, len), kSeg));
    off += len;
  }
  m.Add("__1_0.distcp", 4096, 10, HashSegments(Bytes(10, 7), kSeg));  // a gap before it
  return m;
}

// Re-seals bytes whose body was edited: the trailing checksum over everything before it.
std::string Seal(std::string body) {
  const uint64_t h = XXH3_64bits(body.data(), body.size());
  for (int i = 0; i < 8; ++i) body.push_back(static_cast<char>(h >> (8 * i)));
  return body;
}

TEST(ManifestTest, RoundTripsAndFindsEveryBlob) {
  Manifest m = Sample();
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeManifest(m));
  DCPP_ASSERT_OK_AND_ASSIGN(Manifest back, DecodeManifest(bytes, "m"));
  EXPECT_EQ(back.segment_bytes, kSeg);
  EXPECT_EQ(back.metadata_hash, 0x1234u);
  ASSERT_EQ(back.blobs.size(), m.blobs.size());
  EXPECT_EQ(back.hashes, m.hashes);
  const ManifestBlob* b = back.Find("__0_0.distcp", kSeg + 100, kSeg + 1);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->length, kSeg + 1);
  EXPECT_EQ(b->hash_count, 2u);
  EXPECT_EQ(back.Find("__0_0.distcp", 7, 1), nullptr);
  EXPECT_EQ(back.Find("__0_0.distcp", kSeg + 100, kSeg), nullptr);
  ASSERT_NE(back.Find("__0_0.distcp", 0, 0), nullptr);  // the empty blob beside the next one
  ASSERT_NE(back.Find("__0_0.distcp", 0, 100), nullptr);
  EXPECT_EQ(back.Find("__2_0.distcp", 0, 0), nullptr);
  ASSERT_NE(back.Find("__1_0.distcp", 4096, 10), nullptr);
  // 8 bytes a hash and a few bytes a blob: compact enough for millions of items.
  EXPECT_LT(bytes.size(), 32 + 8 + m.hashes.size() * 8 + m.blobs.size() * 4 + 40);
}

TEST(ManifestTest, OverlappingBlobsAndWrongHashCountsAreNotEncoded) {
  Manifest m;
  m.segment_bytes = kSeg;
  m.Add("f", 0, 100, {1});
  m.Add("f", 50, 100, {2});
  EXPECT_THAT(EncodeManifest(m), StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
  Manifest e;
  e.segment_bytes = kSeg;
  e.Add("f", 8, 0, {1});
  e.Add("f", 8, 0, {1});
  EXPECT_THAT(EncodeManifest(e), StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
  Manifest n;
  n.segment_bytes = kSeg;
  n.Add("f", 0, 3 * kSeg, {1});
  EXPECT_THAT(EncodeManifest(n), StatusIs(StatusCode::kInvalidArgument, HasSubstr("hashes")));
}

TEST(ManifestTest, EveryTruncationAndEveryFlipIsDataLoss) {
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, EncodeManifest(Sample()));
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_THAT(DecodeManifest(bytes.substr(0, n), "m"),
                StatusIs(StatusCode::kDataLoss, ::testing::_))
        << n;
  }
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::string b = bytes;
    b[i] ^= 0x10;
    EXPECT_FALSE(DecodeManifest(b, "m").ok()) << i;
  }
}

TEST(ManifestTest, HostileCountsAndSizesAreRefusedBeforeAllocating) {
  DCPP_ASSERT_OK_AND_ASSIGN(std::string good, EncodeManifest(Manifest{}));
  const std::string header = good.substr(0, 32);  // magic, version, kind, segment, metadata
  auto varint = [](uint64_t v) {
    std::string s;
    while (v >= 0x80) {
      s.push_back(static_cast<char>((v & 0x7f) | 0x80));
      v >>= 7;
    }
    s.push_back(static_cast<char>(v));
    return s;
  };
  const std::string u64zero(8, '\0');
  // 2^60 files, 2^40 blobs in one file, a blob of 2^61 bytes (2^41 hashes), an offset gap
  // that overflows, a 12-byte varint, trailing bytes, a bad segment size.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {header + varint(uint64_t{1} << 60), "file count"},
      {header + varint(1) + varint(1) + "f" + varint(uint64_t{1} << 40), "blob count"},
      {header + varint(1) + varint(1) + "f" + varint(1) + varint(0) + varint(uint64_t{1} << 61) +
           u64zero,
       "hashes truncated"},
      {header + varint(1) + varint(1) + "f" + varint(2) + varint(0) + varint(1) + u64zero +
           varint(~uint64_t{0} >> 1) + varint(1) + u64zero,
       "overflows"},
      {header + std::string(11, '\xff') + "\x01", "varint"},
      {header + varint(1) + varint(1) + "f" + varint(2) + varint(0) + varint(0) + u64zero +
           varint(0) + varint(0) + u64zero,
       "two empty blobs"},
      {header + varint(0) + "x", "trailing"},
      {header + varint(1) + varint(uint64_t{1} << 40) + "f", "truncated"},
  };
  for (const auto& [body, why] : cases) {
    EXPECT_THAT(DecodeManifest(Seal(body), "m"), StatusIs(StatusCode::kDataLoss, HasSubstr(why)))
        << why;
  }
  std::string small_seg = header;
  small_seg[16] = 1;  // segment size 1 + ...: not a valid size
  small_seg[17] = 0;
  small_seg[18] = 0;
  EXPECT_THAT(DecodeManifest(Seal(small_seg + varint(0)), "m"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("segment size")));
  std::string v2 = header;
  v2[8] = 2;
  EXPECT_THAT(DecodeManifest(Seal(v2 + varint(0)), "m"),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("version 2")));
}

TEST(ManifestTest, KeysAreNamedAfterTheMetadata) {
  EXPECT_EQ(ManifestKey(".metadata", 0xabc), ".metadata.0000000000000abc.manifest");
  EXPECT_TRUE(IsManifestKey(ManifestKey("__3.metadata", 42)));
  EXPECT_FALSE(IsManifestKey(".metadata"));
  EXPECT_FALSE(IsManifestKey("__0_0.distcp"));
  EXPECT_FALSE(IsManifestKey(".metadata.000000000000zabc.manifest"));
}

TEST(HashingSinkTest, MatchesOneShotHashesWhateverTheWriteSizes) {
  std::mt19937_64 rng(3);
  for (size_t len : {size_t{0}, size_t{1}, size_t{kSeg - 1}, size_t{kSeg}, size_t{7 * kSeg + 5}}) {
    const std::string data = Bytes(len, len + 1);
    StringSink out;
    HashingSink sink(out, kSeg);
    DCPP_ASSERT_OK(sink.Write("prefix", 6));  // bytes before the blob are not part of it
    sink.BeginBlob();
    for (size_t pos = 0; pos < len;) {
      const size_t n = std::min<size_t>(len - pos, 1 + rng() % (3 * kSeg));
      DCPP_ASSERT_OK(sink.Write(data.data() + pos, n));
      pos += n;
    }
    EXPECT_EQ(sink.EndBlob(), HashSegments(data, kSeg)) << len;
    EXPECT_EQ(out.str().substr(6), data);
  }
}

TEST(HashingSinkTest, BatchedWritesPassTheSameBytesAndHashesOfEveryBlob) {
  // Blobs of small and large pieces through a small batch buffer: blobs that lie whole in the
  // buffer, blobs cut by a flush, and writes that bypass the buffer.
  for (uint64_t seg : {kSeg, kManifestSegmentBytes}) {
    std::mt19937_64 rng(seg);
    StringSink out;
    HashingSink sink(out, seg, /*batch_bytes=*/300 << 10);
    std::string expected;
    for (int b = 0; b < 60; ++b) {
      const size_t len =
          b % 7 == 0 ? 0 : static_cast<size_t>(rng() % (b % 5 == 0 ? 900 << 10 : 40 << 10));
      const std::string data = Bytes(len, static_cast<uint64_t>(b) * 31 + seg);
      const uint64_t start = sink.position();
      EXPECT_EQ(start, expected.size());
      sink.BeginBlob();
      for (size_t pos = 0; pos < len;) {
        const size_t n = std::min<size_t>(len - pos, 1 + rng() % (b % 3 == 0 ? 400 << 10 : 5000));
        DCPP_ASSERT_OK(sink.Write(data.data() + pos, n));
        pos += n;
      }
      EXPECT_EQ(sink.position() - start, len);
      EXPECT_EQ(sink.EndBlob(), HashSegments(data, seg)) << "blob " << b << " of " << len;
      expected += data;
    }
    DCPP_ASSERT_OK(sink.Flush());
    EXPECT_EQ(out.str(), expected);
  }
}

// A large write (hashed and passed on in 4 MiB pieces) gives the hashes and bytes of small writes,
// wherever it starts within a segment, whether or not small writes are batched, and with a
// drainer writing the batches behind.
TEST(HashingSinkTest, LargeWritesHashLikeSmallOnesWithOrWithoutWriteBehind) {
  for (uint64_t seg : {kSeg, kManifestSegmentBytes}) {
    for (int mode = 0; mode < 3; ++mode) {  // unbatched, batched, batched and written behind
      for (size_t head :
           {size_t{0}, size_t{1}, static_cast<size_t>(seg) - 1, static_cast<size_t>(seg) + 3}) {
        const std::string lead = Bytes(head, head + 7);
        const std::string body = Bytes((size_t{9} << 20) + 2 * seg + 5, head + seg);
        StringSink out;
        HashingSink sink(out, seg, mode == 0 ? 0 : size_t{1} << 20);
        if (mode == 2) sink.EnableWriteBehind();
        Status drained;
        std::thread drainer([&] { drained = sink.Drain(); });
        DCPP_EXPECT_OK(sink.Write("before", 6));
        sink.BeginBlob();
        DCPP_EXPECT_OK(sink.Write(lead.data(), lead.size()));
        DCPP_EXPECT_OK(sink.Write(body.data(), body.size()));
        DCPP_EXPECT_OK(sink.Write("after", 5));
        EXPECT_EQ(sink.EndBlob(), HashSegments(lead + body + "after", seg))
            << "segment " << seg << " mode " << mode << " head " << head;
        DCPP_EXPECT_OK(sink.Flush());
        sink.StopDraining();
        drainer.join();
        DCPP_EXPECT_OK(drained);
        EXPECT_TRUE(out.str() == "before" + lead + body + "after");
      }
    }
  }
}

// A sink that fails every write after the first `good` ones.
class FailingSink final : public ByteSink {
 public:
  explicit FailingSink(int good) : good_(good) {}
  Status Write(const void* data, size_t n) override {
    if (writes_++ >= good_) return UnavailableError("disk gone");
    out_.append(static_cast<const char*>(data), n);
    return Status::Ok();
  }
  uint64_t position() const override { return out_.size(); }
  std::string name() const override { return "<failing>"; }

 private:
  int good_;
  int writes_ = 0;
  std::string out_;
};

// Blobs of small writes and large writes; returns the hashes of each blob.
Status WriteBlobs(HashingSink& sink, std::vector<std::vector<uint64_t>>& hashes,
                  std::string& expected) {
  std::mt19937_64 rng(11);
  for (int b = 0; b < 40; ++b) {
    sink.BeginBlob();
    const size_t len = b % 13 == 5 ? (size_t{9} << 20) + 77 : rng() % (300 << 10);
    const std::string data = Bytes(len, static_cast<uint64_t>(b));
    if (b % 13 == 5) {
      DCPP_RETURN_IF_ERROR(sink.Write(data.data(), data.size()));
    } else {
      for (size_t pos = 0; pos < len;) {
        const size_t n = std::min<size_t>(len - pos, 1 + rng() % 70000);
        DCPP_RETURN_IF_ERROR(sink.Write(data.data() + pos, n));
        pos += n;
      }
    }
    hashes.push_back(sink.EndBlob());
    expected += data;
  }
  return sink.Flush();
}

// WriteBlobs with a drainer thread beside it, as a writer runs write-behind: what the producer
// and the drainer each returned.
struct Behind {
  Status produced, drained;
};
Behind WriteBlobsBehind(HashingSink& sink, std::vector<std::vector<uint64_t>>& hashes,
                        std::string& expected) {
  Behind r;
  std::thread drainer([&] { r.drained = sink.Drain(); });
  r.produced = WriteBlobs(sink, hashes, expected);
  sink.StopDraining();
  drainer.join();
  return r;
}

// Write-behind: the same bytes and hashes as without it, whether Drain runs beside the producer
// or only after it (the producer then writes every buffer itself, and nothing waits forever).
TEST(HashingSinkTest, WriteBehindKeepsBytesAndHashesWithOrWithoutADrainer) {
  std::string plain_expected;
  std::vector<std::vector<uint64_t>> plain_hashes;
  StringSink plain_out;
  {
    HashingSink plain(plain_out, kSeg, 1 << 20);
    DCPP_ASSERT_OK(WriteBlobs(plain, plain_hashes, plain_expected));
  }
  ASSERT_EQ(plain_out.str(), plain_expected);
  for (bool beside : {true, false}) {
    StringSink out;
    HashingSink sink(out, kSeg, 1 << 20);
    sink.EnableWriteBehind();
    std::string expected;
    std::vector<std::vector<uint64_t>> hashes;
    Behind r;
    if (beside) {
      r = WriteBlobsBehind(sink, hashes, expected);
    } else {
      r.produced = WriteBlobs(sink, hashes, expected);
      sink.StopDraining();
      r.drained = sink.Drain();
    }
    DCPP_EXPECT_OK(r.produced);
    DCPP_EXPECT_OK(r.drained);
    EXPECT_EQ(sink.position(), expected.size());
    EXPECT_TRUE(out.str() == plain_expected) << "drainer beside: " << beside;
    EXPECT_EQ(hashes, plain_hashes);
  }
}

// A failed write reaches the producer and the drainer, and neither waits forever.
TEST(HashingSinkTest, WriteBehindReportsAFailedWriteToBothSides) {
  for (int good : {0, 1, 3}) {
    FailingSink out(good);
    HashingSink sink(out, kSeg, 1 << 20);
    sink.EnableWriteBehind();
    std::string expected;
    std::vector<std::vector<uint64_t>> hashes;
    const auto [produced, drained] = WriteBlobsBehind(sink, hashes, expected);
    EXPECT_THAT(produced, StatusIs(StatusCode::kUnavailable, HasSubstr("disk gone"))) << good;
    if (!drained.ok()) {
      EXPECT_THAT(drained, StatusIs(StatusCode::kUnavailable, HasSubstr("disk gone")));
    }
  }
}

// A base that takes lent writes and reads each lent buffer only when it is settled, as late as
// the contract allows: a buffer the sink refilled too early shows as wrong bytes. Put number
// `fail_at` (0-based, lent or not) fails. With `depth` 0 it does not lend.
class LateLendingSink final : public ByteSink, public LentWrites {
 public:
  explicit LateLendingSink(int fail_at = -1, size_t depth = 2) : fail_at_(fail_at), depth_(depth) {}
  Status Write(const void* data, size_t n) override {
    DCPP_RETURN_IF_ERROR(Settle(0));
    return Put(static_cast<const char*>(data), n);
  }
  Status WriteLent(const void* data, size_t n) override {
    DCPP_RETURN_IF_ERROR(Settle(lent_depth() - 1));
    pending_.push_back({static_cast<const char*>(data), n});
    position_ += n;
    ++lent_;
    return Status::Ok();
  }
  Status Settle(size_t keep) override {
    while (pending_.size() > keep) {
      const auto [p, n] = pending_.front();
      pending_.erase(pending_.begin());
      position_ -= n;  // Put counts it again
      (void)Put(p, n);
    }
    return error_;
  }
  size_t lent_depth() const override { return depth_; }
  size_t lent_in_flight() const override { return pending_.size(); }
  uint64_t position() const override { return position_; }
  std::string name() const override { return "<late>"; }
  const std::string& str() const { return out_; }
  int lent() const { return lent_; }

 private:
  Status Put(const char* p, size_t n) {
    if (puts_++ == fail_at_ && error_.ok()) error_ = UnavailableError("disk gone");
    if (!error_.ok()) return error_;
    out_.append(p, n);
    position_ += n;
    return Status::Ok();
  }
  int fail_at_;
  size_t depth_;
  int puts_ = 0;
  int lent_ = 0;
  uint64_t position_ = 0;
  std::vector<std::pair<const char*, size_t>> pending_;
  std::string out_;
  Status error_;
};

// Write-behind to a base that takes lent writes needs no drainer: every full buffer is lent,
// none is refilled before the base is done with it, and the bytes and hashes are those of the
// plain sink. A base that does not lend (depth 0) gets every buffer from the drainer instead.
TEST(HashingSinkTest, WriteBehindLendsFullBuffersAndRefillsOnlySettledOnes) {
  std::string plain_expected;
  std::vector<std::vector<uint64_t>> plain_hashes;
  StringSink plain_out;
  {
    HashingSink plain(plain_out, kSeg, 1 << 20);
    DCPP_ASSERT_OK(WriteBlobs(plain, plain_hashes, plain_expected));
  }
  for (size_t depth : {size_t{2}, size_t{0}}) {
    LateLendingSink out(/*fail_at=*/-1, depth);
    {
      HashingSink sink(out, kSeg, 1 << 20);
      sink.EnableWriteBehind();
      std::string expected;
      std::vector<std::vector<uint64_t>> hashes;
      const auto [produced, drained] = WriteBlobsBehind(sink, hashes, expected);
      DCPP_ASSERT_OK(produced);
      DCPP_EXPECT_OK(drained);
      EXPECT_EQ(out.lent_in_flight(), 0u);  // Flush settled them all
      EXPECT_EQ(sink.position(), expected.size());
      EXPECT_EQ(hashes, plain_hashes) << depth;
    }
    if (depth > 0) {
      EXPECT_GT(out.lent(), 3);
    } else {
      EXPECT_EQ(out.lent(), 0);
    }
    EXPECT_TRUE(out.str() == plain_expected) << depth;
  }
}

// A failed lent write reaches the producer, and buffers still lent when the sink goes away are
// settled before they are freed (AddressSanitizer would see the base read freed memory).
TEST(HashingSinkTest, AFailedLentWriteIsReportedAndLentBuffersOutliveNothing) {
  for (int fail_at : {0, 1, 3, 1000}) {
    LateLendingSink out(fail_at);
    {
      HashingSink sink(out, kSeg, 1 << 20);
      sink.EnableWriteBehind();
      std::string expected;
      std::vector<std::vector<uint64_t>> hashes;
      const Status produced = WriteBlobs(sink, hashes, expected);
      if (fail_at < 1000) {
        EXPECT_THAT(produced, StatusIs(StatusCode::kUnavailable, HasSubstr("disk gone")))
            << fail_at;
      } else {
        DCPP_EXPECT_OK(produced);
      }
    }
    EXPECT_EQ(out.lent_in_flight(), 0u) << fail_at;
  }
  // A producer that stops early (an item failed) leaves lent buffers to the destructor.
  LateLendingSink out;
  {
    HashingSink sink(out, kSeg, 1 << 20);
    sink.EnableWriteBehind();
    const std::string data = Bytes(200 << 10, 3);
    for (int i = 0; i < 30; ++i) DCPP_ASSERT_OK(sink.Write(data.data(), data.size()));
    EXPECT_GT(out.lent_in_flight(), 0u);
  }
  EXPECT_EQ(out.lent_in_flight(), 0u);
  EXPECT_EQ(out.str().size() % (200 << 10), 0u);
}

// A sink that records where each write started and whether its buffer was aligned.
class RecordingSink final : public ByteSink {
 public:
  explicit RecordingSink(uint64_t start) : start_(start) {}
  Status Write(const void* data, size_t n) override {
    writes.push_back(
        {start_ + bytes.size(), n, reinterpret_cast<uintptr_t>(data) % kHashingSinkAlign == 0});
    bytes.append(static_cast<const char*>(data), n);
    return Status::Ok();
  }
  uint64_t position() const override { return start_ + bytes.size(); }
  std::string name() const override { return "recording"; }
  struct Rec {
    uint64_t at;
    size_t n;
    bool aligned;
  };
  std::vector<Rec> writes;
  std::string bytes;

 private:
  uint64_t start_;
};

// Full buffers are passed on from aligned memory and end at aligned positions of the stream
// (where a file in direct I/O writes them without a copy), starting from any position; the
// bytes and hashes are those of the unbatched stream, with or without write-behind.
TEST(HashingSinkTest, FullBuffersEndAtAlignedPositionsOfTheStream) {
  // Every write of the test comes from one byte past an aligned address, so the base sees
  // aligned memory exactly when it is given one of the sink's buffers.
  std::unique_ptr<char, void (*)(void*)> src(
      static_cast<char*>(std::aligned_alloc(kHashingSinkAlign, 1 << 20)), std::free);
  for (uint64_t start : {uint64_t{0}, uint64_t{1000}, uint64_t{kHashingSinkAlign * 3 + 17}}) {
    for (bool behind : {false, true}) {
      RecordingSink out(start);
      HashingSink sink(out, kSeg, /*batch_bytes=*/(1 << 20) + 123);
      if (behind) sink.EnableWriteBehind();  // no drainer: the producer writes queued buffers
      std::mt19937_64 rng(start + behind);
      std::string expected;
      for (int b = 0; b < 200; ++b) {
        const size_t len = static_cast<size_t>(rng() % (b % 50 == 0 ? 600 << 10 : 30 << 10));
        const std::string data = Bytes(len, b + start);
        std::memcpy(src.get() + 1, data.data(), len);
        sink.BeginBlob();
        DCPP_ASSERT_OK(sink.Write(src.get() + 1, len));
        EXPECT_EQ(sink.EndBlob(), HashSegments(data, kSeg)) << b;
        expected += data;
      }
      DCPP_ASSERT_OK(sink.Flush());
      EXPECT_TRUE(out.bytes == expected);
      size_t batches = 0;
      for (size_t i = 0; i < out.writes.size(); ++i) {
        const auto& w = out.writes[i];
        if (!w.aligned) {
          EXPECT_GT(w.n, kHashingSinkSmallWrite / 2);  // only large writes pass through
          continue;
        }
        ++batches;
        // A buffer followed by another buffer was full: it ends at an aligned position. (One
        // before a large write or at the end was flushed whole.)
        if (i + 1 < out.writes.size() && out.writes[i + 1].aligned) {
          EXPECT_EQ((w.at + w.n) % kHashingSinkAlign, 0u) << i << " from " << start;
        }
      }
      EXPECT_GT(batches, 3u);
    }
  }
}

TEST(HashingSinkTest, SmallWritesWaitForTheBufferOrAFlush) {
  StringSink out;
  HashingSink sink(out, kManifestSegmentBytes, /*batch_bytes=*/1 << 20);
  for (int b = 0; b < 10; ++b) {
    sink.BeginBlob();
    DCPP_ASSERT_OK(sink.Write("header", 6));
    const std::string data = Bytes(4096, static_cast<uint64_t>(b));
    DCPP_ASSERT_OK(sink.Write(data.data(), data.size()));
    EXPECT_EQ(sink.EndBlob(), HashSegments("header" + data, kManifestSegmentBytes));
  }
  EXPECT_EQ(out.str().size(), 0u);  // nothing passed on yet: one write for all of them
  EXPECT_EQ(sink.position(), 10u * 4102);
  DCPP_ASSERT_OK(sink.Flush());
  EXPECT_EQ(out.str().size(), 10u * 4102);
}

TEST(Xxh3Test, EqualsLibxxhashForEverySizeAndAlignment) {
  const std::string data = Bytes((1 << 20) + 64, 11);
  for (size_t n = 0; n <= 300; ++n) {
    for (size_t at : {size_t{0}, size_t{1}, size_t{7}}) {
      ASSERT_EQ(Xxh3(data.data() + at, n), XXH3_64bits(data.data() + at, n)) << n << "@" << at;
    }
  }
  for (size_t n : {size_t{1000}, size_t{4096}, size_t{25600}, size_t{65536 + 3},
                   size_t{kManifestSegmentBytes}, size_t{1} << 20}) {
    EXPECT_EQ(Xxh3(data.data() + 5, n), XXH3_64bits(data.data() + 5, n)) << n;
  }
}

// A source over memory that counts the bytes read from it.
class CountingSource final : public ByteSource {
 public:
  explicit CountingSource(const std::string& b) : mem_(b) {}
  uint64_t size() const override { return mem_.size(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    read_ += n;
    largest_read_ = std::max<uint64_t>(largest_read_, n);
    return mem_.ReadAt(offset, dst, n);
  }
  std::string name() const override { return "blob"; }
  mutable uint64_t read_ = 0;
  mutable uint64_t largest_read_ = 0;

 private:
  MemorySource mem_;
};

TEST(VerifiedBlobSourceTest, ReadsReturnTheBytesAndCostAtMostASegmentAtEachEnd) {
  const std::string data = Bytes(20 * kSeg + 123, 9);
  const auto hashes = HashSegments(data, kSeg);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    CountingSource base(data);
    VerifiedBlobSource v(base, hashes.data(), hashes.size(), kSeg, 1000, "f");
    const uint64_t off = rng() % data.size();
    const size_t n = static_cast<size_t>(rng() % (data.size() - off + 1));
    std::string got(n, '\0');
    DCPP_ASSERT_OK(v.ReadAt(off, got.data(), n));
    EXPECT_EQ(got, data.substr(off, n));
    EXPECT_LE(base.read_, n + 2 * kSeg);
  }
}

TEST(VerifiedBlobSourceTest, AFlipIsFoundByEveryReadOfItsSegmentAndNoOther) {
  std::string data = Bytes(8 * kSeg, 11);
  const auto hashes = HashSegments(data, kSeg);
  data[3 * kSeg + 10] ^= 1;
  MemorySource base(data);
  VerifiedBlobSource v(base, hashes.data(), hashes.size(), kSeg, 5000, "\"__0_0.distcp\"");
  std::string buf(kSeg * 8, '\0');
  EXPECT_THAT(v.ReadAt(3 * kSeg + 10, buf.data(), 1),
              StatusIs(StatusCode::kDataLoss,
                       HasSubstr("checksum mismatch in bytes [" + std::to_string(5000 + 3 * kSeg) +
                                 ", +4096) of the file (segment 3 of 8")));
  EXPECT_FALSE(v.ReadAt(0, buf.data(), 8 * kSeg).ok());
  EXPECT_FALSE(v.ReadAt(2 * kSeg, buf.data(), 2 * kSeg).ok());
  DCPP_EXPECT_OK(v.ReadAt(0, buf.data(), 3 * kSeg));
  DCPP_EXPECT_OK(v.ReadAt(4 * kSeg - 0, buf.data(), 4 * kSeg));
  DCPP_EXPECT_OK(v.ReadAt(4 * kSeg + 1, buf.data(), 100));
}

// A large read is read and hashed in pieces of at most 512 KiB (each hashed while it is in L2):
// every byte is read once, and a flip in the last piece is still found.
TEST(VerifiedBlobSourceTest, ALargeReadIsReadAndHashedInPieces) {
  std::string data = Bytes((size_t{9} << 20) + 3 * kSeg + 17, 13);
  const auto hashes = HashSegments(data, kSeg);
  CountingSource base(data);
  VerifiedBlobSource v(base, hashes.data(), hashes.size(), kSeg, 0, "f");
  std::string got(data.size(), '\0');
  DCPP_ASSERT_OK(v.ReadAt(0, got.data(), got.size()));
  EXPECT_TRUE(got == data);
  EXPECT_EQ(base.read_, data.size());
  EXPECT_LE(base.largest_read_, uint64_t{512} << 10);
  data[data.size() - 2 * kSeg] ^= 8;
  CountingSource flipped(data);
  VerifiedBlobSource w(flipped, hashes.data(), hashes.size(), kSeg, 0, "f");
  EXPECT_THAT(w.ReadAt(0, got.data(), got.size()),
              StatusIs(StatusCode::kDataLoss, HasSubstr("checksum mismatch")));
}

// Without a manifest: a read that covers a registered zip record whole checks its CRC-32, read
// and checked in pieces (every byte read once); records a read covers only in part are not
// checked (they cannot be), and a flip anywhere in a covered record is found and named.
TEST(CrcCheckingSourceTest, ChecksTheRecordsAReadCoversWholeReadingInPieces) {
  std::string data = Bytes((size_t{3} << 20) + 4099, 21);
  const uint64_t big_at = 77, big_size = (uint64_t{5} << 19) + 33, small_at = 3 << 20;
  auto add = [&](CrcCheckingSource& src) {
    src.AddRecord("a/data/0", big_at, big_size, Crc32(0, data.data() + big_at, big_size));
    src.AddRecord("a/data/1", small_at, 100, Crc32(0, data.data() + small_at, 100));
    src.AddRecord("a/empty", small_at + 200, 0, 0);
  };
  {
    CountingSource base(data);
    CrcCheckingSource src(base);
    add(src);
    std::string got(data.size(), '\0');
    DCPP_ASSERT_OK(src.ReadAt(0, got.data(), got.size()));
    EXPECT_TRUE(got == data);
    EXPECT_EQ(base.read_, data.size());
    EXPECT_LE(base.largest_read_, uint64_t{512} << 10);
  }
  for (const uint64_t flip_at : {big_at, big_at + big_size / 2, big_at + big_size - 1}) {
    std::string bad = data;
    bad[flip_at] ^= 2;
    MemorySource base(bad);
    CrcCheckingSource src(base);
    add(src);
    std::string got(bad.size(), '\0');
    EXPECT_THAT(
        src.ReadAt(big_at, got.data(), big_size),
        StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("CRC-32 mismatch"), HasSubstr("a/data/0"))))
        << flip_at;
    // The small record alone, and a part of the big one, read without complaint.
    DCPP_EXPECT_OK(src.ReadAt(small_at, got.data(), 100));
    DCPP_EXPECT_OK(src.ReadAt(big_at + 1, got.data(), big_size - 1));
  }
}

TEST(VerifyBlobBytesTest, NamesTheFirstBadSegment) {
  std::string data = Bytes(3 * kSeg, 2);
  const auto hashes = HashSegments(data, kSeg);
  DCPP_EXPECT_OK(VerifyBlobBytes(data, hashes.data(), hashes.size(), kSeg, 0, "f"));
  data[kSeg * 2] ^= 4;
  EXPECT_THAT(VerifyBlobBytes(data, hashes.data(), hashes.size(), kSeg, 64, "f"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("segment 2 of 3")));
  EXPECT_THAT(VerifyBlobBytes(data, hashes.data(), 2, kSeg, 64, "f"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("2 hashes for a blob of")));
}

}  // namespace
}  // namespace dcpp::internal
