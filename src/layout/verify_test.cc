#include "dcpp/verify.h"

#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "codec/torch_save.h"
#include "dcpp/checkpoint.h"
#include "dcpp/storage.h"
#include "layout/manifest.h"
#include "storage/posix_io.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::FlipByte;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::ReadFileBytes;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::dcpp::testing::WriteFileBytes;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

// Tensors small (read in windows) and large (several manifest segments, read in place), a
// bytes item and a plain value.
Value SampleState() {
  Value sd = Value::MakeDict();
  sd.Set("big", Value::FromTensor(PatternTensor(DType::kFloat32, {640, 1024}, 1)));  // 2.5 MiB
  sd.Set("mid", Value::FromTensor(PatternTensor(DType::kBFloat16, {300, 1000}, 2)));
  sd.Set("small", Value::FromTensor(PatternTensor(DType::kInt64, {7, 5}, 3)));
  sd.Set("tiny", Value::FromTensor(PatternTensor(DType::kUInt8, {3}, 4)));
  sd.Set("blob", Value::Bytes(std::string(3000, 'b')));
  sd.Set("step", Value::Int(1234));
  return sd;
}

// Destinations of the same shapes (zeros), the stored values for the others.
Value Destinations(const Value& sd) {
  Value back = Value::MakeDict();
  for (const auto& [k, v] : sd.dict()) {
    if (v.is_tensor()) {
      back.Set(k.as_str(),
               Value::FromTensor(Tensor::Zeros(v.tensor().dtype(), v.tensor().shape())));
    } else {
      back.Set(k.as_str(), Value::None());
    }
  }
  return back;
}

std::vector<std::string> Files(const std::string& dir, const std::string& ending) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.size() >= ending.size() && name.substr(name.size() - ending.size()) == ending) {
      out.push_back(name);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(ChecksumTest, SaveWritesOneManifestPairedWithItsMetadataAndVerifyPasses) {
  TempDir dir;
  const std::string path = dir.Join("ck");
  DCPP_ASSERT_OK(Save(SampleState(), path).status());
  auto manifests = Files(path, ".manifest");
  ASSERT_EQ(manifests.size(), 1u);
  DCPP_ASSERT_OK_AND_ASSIGN(std::string md, ReadFileBytes(path + "/.metadata"));
  EXPECT_EQ(manifests[0], internal::ManifestKey(".metadata", internal::Xxh3(md.data(), md.size())));
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport r, VerifyCheckpoint(path));
  EXPECT_TRUE(r.ok()) << r.ToString();
  EXPECT_TRUE(r.has_manifest);
  EXPECT_EQ(r.items, 6);
  EXPECT_GT(r.segments_checked, 6);  // "big" alone has 3 segments
  EXPECT_GT(r.records_checked, 6 * 3);
  // A replacing save leaves only its own manifest.
  DCPP_ASSERT_OK(Save(SampleState(), path).status());
  manifests = Files(path, ".manifest");
  ASSERT_EQ(manifests.size(), 1u);
  DCPP_ASSERT_OK_AND_ASSIGN(md, ReadFileBytes(path + "/.metadata"));
  EXPECT_EQ(manifests[0], internal::ManifestKey(".metadata", internal::Xxh3(md.data(), md.size())));
  Value back = Destinations(SampleState());
  DCPP_ASSERT_OK(Load(back, path));
  EXPECT_EQ(back, SampleState());
}

TEST(ChecksumTest, AManifestOfOtherMetadataIsNotUsed) {
  // A crash between the manifest's rename and the metadata's leaves a manifest that no metadata
  // names: the previous checkpoint loads and verifies with its own manifest.
  TempDir dir;
  const std::string a = dir.Join("a"), b = dir.Join("b");
  DCPP_ASSERT_OK(Save(SampleState(), a).status());
  Value other = SampleState();
  other.Set("step", Value::Int(99));
  DCPP_ASSERT_OK(Save(other, b).status());
  const std::string mine = Files(a, ".manifest")[0];
  const std::string orphan = Files(b, ".manifest")[0];
  ASSERT_NE(mine, orphan);
  fs::copy_file(b + "/" + orphan, a + "/" + orphan);
  Value back = Destinations(SampleState());
  DCPP_ASSERT_OK(Load(back, a));
  EXPECT_EQ(back, SampleState());
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport r, VerifyCheckpoint(a));
  EXPECT_TRUE(r.ok()) << r.ToString();
  EXPECT_THAT(r.manifests, ::testing::ElementsAre(mine));
  // Another metadata's manifest under this metadata's name is refused, not used.
  fs::copy_file(b + "/" + orphan, a + "/" + mine, fs::copy_options::overwrite_existing);
  back = Destinations(SampleState());
  EXPECT_THAT(Load(back, a),
              StatusIs(StatusCode::kDataLoss, HasSubstr("belongs to other metadata")));
  DCPP_ASSERT_OK_AND_ASSIGN(r, VerifyCheckpoint(a));
  EXPECT_FALSE(r.ok());
}

TEST(ChecksumTest, EveryByteFlipInTheDataFilesIsDetectedByLoadAndByVerify) {
  TempDir dir;
  const std::string path = dir.Join("ck");
  SaveOptions so;
  so.writer.thread_count = 2;  // two data files
  DCPP_ASSERT_OK(Save(SampleState(), path, so).status());
  ASSERT_EQ(Files(path, ".distcp").size(), 2u);
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(path));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, reader->ReadMetadata());
  std::vector<StorageInfo> blobs;
  for (const auto& [idx, info] : md.storage_data) blobs.push_back(info);
  ASSERT_EQ(blobs.size(), 6u);
  // Every blob in turn, cycling through its zip headers and pickle (first 512 bytes), its
  // central directory and end records (last 256) and anywhere in it (mostly tensor payload).
  std::mt19937_64 rng(20261201);
  constexpr int kFlips = 200;
  int by_load = 0, by_verify = 0, named = 0;
  for (int i = 0; i < kFlips; ++i) {
    const StorageInfo& blob = blobs[i % blobs.size()];
    const uint64_t len = static_cast<uint64_t>(blob.length);
    uint64_t in_blob = 0;
    switch ((i / blobs.size()) % 3) {
      case 0:
        in_blob = rng() % std::min<uint64_t>(len, 512);
        break;
      case 1:
        in_blob = len - 1 - rng() % std::min<uint64_t>(len, 256);
        break;
      default:
        in_blob = rng() % len;
        break;
    }
    const uint64_t pos = static_cast<uint64_t>(blob.offset) + in_blob;
    const std::string file = path + "/" + blob.relative_path;
    FlipByte(file, pos);
    Value back = Destinations(SampleState());
    Status s = Load(back, path);
    if (s.code() == StatusCode::kDataLoss) ++by_load;
    if (s.ok()) ADD_FAILURE() << "flip at " << blob.relative_path << ":" << pos << " loaded";
    auto r = VerifyCheckpoint(path);
    if (r.ok() && !r->ok()) {
      ++by_verify;
      // The problem names the file and an offset at or before the flipped byte.
      for (const auto& p : r->problems) {
        if (p.file == blob.relative_path && p.offset >= 0 &&
            static_cast<uint64_t>(p.offset) <= pos && !p.key.empty()) {
          ++named;
          break;
        }
      }
    }
    FlipByte(file, pos);  // undo
  }
  std::printf(
      "byte flips: %d made, %d detected by Load, %d by VerifyCheckpoint (%d naming the "
      "item, file and an offset)\n",
      kFlips, by_load, by_verify, named);
  EXPECT_EQ(by_load, kFlips);
  EXPECT_EQ(by_verify, kFlips);
  EXPECT_EQ(named, kFlips);
  Value back = Destinations(SampleState());
  DCPP_ASSERT_OK(Load(back, path));  // all undone
  EXPECT_EQ(back, SampleState());
}

TEST(ChecksumTest, AMismatchNamesKeyFileOffsetAndRank) {
  TempDir dir;
  const std::string path = dir.Join("ck");
  DCPP_ASSERT_OK(Save(SampleState(), path).status());
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, [&]() -> Result<Metadata> {
    DCPP_ASSIGN_OR_RETURN(auto r, FileSystemReader::Open(path));
    return r->ReadMetadata();
  }());
  const StorageInfo* big = nullptr;
  for (const auto& [idx, info] : md.storage_data) {
    if (idx.fqn == "big") big = &info;
  }
  ASSERT_NE(big, nullptr);
  // A byte deep inside the payload of "big" (its second segment).
  const uint64_t at = static_cast<uint64_t>(big->offset) + internal::kManifestSegmentBytes + 77;
  FlipByte(path + "/" + big->relative_path, at);
  Value back = Destinations(SampleState());
  const uint64_t seg_start = static_cast<uint64_t>(big->offset) + internal::kManifestSegmentBytes;
  EXPECT_THAT(
      Load(back, path),
      StatusIs(StatusCode::kDataLoss,
               AllOf(HasSubstr("rank 0"), HasSubstr("item \"big@[0, 0]\""),
                     HasSubstr(big->relative_path),
                     HasSubstr("checksum mismatch in bytes [" + std::to_string(seg_start)))));
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport r, VerifyCheckpoint(path));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.problems[0].key, "big@[0, 0]");
  EXPECT_EQ(r.problems[0].file, big->relative_path);
  EXPECT_EQ(r.problems[0].offset, static_cast<int64_t>(seg_start));
  // Loading something else of the checkpoint does not read the bad bytes.
  Value other = Value::MakeDict();
  other.Set("small", Value::FromTensor(Tensor::Zeros(DType::kInt64, {7, 5})));
  LoadOptions partial;
  partial.planner_options.allow_partial_load = true;
  DCPP_EXPECT_OK(Load(other, path, partial));
}

TEST(ChecksumTest, SkippingVerificationLoadsAFlippedFile) {
  // verify=false is for salvaging what a damaged checkpoint still holds: the bad tensor loads
  // with the flipped value, so the caller can decide what to keep.
  TempDir dir;
  const std::string path = dir.Join("ck");
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {1024, 512}, 5)));
  DCPP_ASSERT_OK(Save(sd, path).status());
  const std::string file = path + "/" + Files(path, ".distcp")[0];
  FlipByte(file, fs::file_size(file) / 2);
  Value back = Destinations(sd);
  EXPECT_THAT(Load(back, path), StatusIs(StatusCode::kDataLoss, HasSubstr("checksum mismatch")));
  LoadOptions skip;
  skip.reader.verify = false;
  back = Destinations(sd);
  DCPP_ASSERT_OK(Load(back, path, skip));
  EXPECT_FALSE(back.Find("w")->tensor().BitwiseEqual(sd.Find("w")->tensor()));
}

TEST(ChecksumTest, WithoutAManifestAStaleCrcIsRefused) {
  // A checkpoint without a manifest (as PyTorch writes them): loads work, and a payload whose
  // zip CRC no longer matches is refused when its record is read whole, large or small.
  TempDir dir;
  const std::string path = dir.Join("ck");
  DCPP_ASSERT_OK(Save(SampleState(), path).status());
  for (const auto& m : Files(path, ".manifest")) fs::remove(path + "/" + m);
  Value back = Destinations(SampleState());
  DCPP_ASSERT_OK(Load(back, path));
  EXPECT_EQ(back, SampleState());
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport clean, VerifyCheckpoint(path));
  EXPECT_TRUE(clean.ok()) << clean.ToString();
  EXPECT_FALSE(clean.has_manifest);
  EXPECT_THAT(clean.ToString(), HasSubstr("no manifest"));
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(path));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, reader->ReadMetadata());
  for (const char* key : {"big", "small"}) {
    const StorageInfo* info = nullptr;
    for (const auto& [idx, i] : md.storage_data) {
      if (idx.fqn == key) info = &i;
    }
    ASSERT_NE(info, nullptr);
    // A byte of the tensor's storage record: its CRC is now stale.
    const std::string file = path + "/" + info->relative_path;
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFileBytes(file));
    MemorySource blob(std::string_view(bytes).substr(info->offset, info->length));
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(blob));
    const auto& rec = archive.records().at("data/0");
    const uint64_t at = static_cast<uint64_t>(info->offset) + rec.data_offset + rec.size / 3;
    FlipByte(file, at);
    Value b2 = Destinations(SampleState());
    EXPECT_THAT(Load(b2, path), StatusIs(StatusCode::kDataLoss, HasSubstr("CRC"))) << key;
    DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport r, VerifyCheckpoint(path));
    EXPECT_FALSE(r.ok()) << key;
    EXPECT_THAT(r.ToString(), HasSubstr("CRC-32 mismatch")) << key;
    FlipByte(file, at);
  }
}

TEST(ChecksumTest, APyTorchGoldenLoadsAndVerifiesWithoutAManifest) {
  for (const char* name : {"sync", "nocoll"}) {
    const std::string path = testing::SourceDir() + "/tests/data/dcp_213_2ranks/" + name;
    DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport r, VerifyCheckpoint(path));
    EXPECT_TRUE(r.ok()) << r.ToString();
    EXPECT_FALSE(r.has_manifest);
    EXPECT_GT(r.items, 0);
    EXPECT_GT(r.records_checked, r.items);
    EXPECT_EQ(r.segments_checked, 0);
    EXPECT_THAT(r.ToString(), HasSubstr("no manifest"));
    Value everything = Value::MakeDict();
    DCPP_EXPECT_OK(Load(everything, path)) << name;
    EXPECT_FALSE(everything.dict().empty());
  }
}

int64_t ReadChars() {
  std::ifstream in("/proc/self/io");
  std::string key;
  int64_t v = 0;
  while (in >> key >> v) {
    if (key == "rchar:") return v;
  }
  return -1;
}

TEST(ChecksumTest, APartialLoadReadsAtMostASegmentMoreAtEachEnd) {
  // Buffered, so every byte read is counted: /proc/self/io does not count io_uring's reads.
  internal::SetDirectIoForTesting(0);
  struct Restore {
    ~Restore() { internal::SetDirectIoForTesting(-1); }
  } restore;
  TempDir dir;
  const std::string path = dir.Join("ck");
  const Tensor full = PatternTensor(DType::kFloat32, {8192, 1024}, 6);  // 32 MiB, one blob
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(full));
  DCPP_ASSERT_OK(Save(sd, path).status());
  // Rows [2001, 6001): 16 MiB of the middle, starting mid-segment.
  ShardedTensor st{DType::kFloat32, {8192, 1024}, {}};
  st.shards.push_back({{2001, 0}, Tensor::Zeros(DType::kFloat32, {4000, 1024})});
  Value dst = Value::MakeDict();
  dst.Set("w", Value::FromSharded(std::move(st)));
  const int64_t before = ReadChars();
  DCPP_ASSERT_OK(Load(dst, path));
  const int64_t read = ReadChars() - before;
  const int64_t needed = int64_t{4000} * 1024 * 4;
  std::printf("partial load: %lld bytes read for %lld needed (%.4fx)\n",
              static_cast<long long>(read), static_cast<long long>(needed),
              static_cast<double>(read) / static_cast<double>(needed));
  EXPECT_LE(read, needed + 3 * static_cast<int64_t>(internal::kManifestSegmentBytes) + (64 << 10));
  Tensor expect = Tensor::Zeros(DType::kFloat32, {4000, 1024});
  DCPP_ASSERT_OK(CopyRegion(expect.view(), {0, 0}, full.view(), {2001, 0}, {4000, 1024}));
  EXPECT_TRUE(dst.Find("w")->sharded().shards[0].tensor.BitwiseEqual(expect));
}

TEST(ChecksumTest, VerifyReportsDamagedStructure) {
  TempDir dir;
  const std::string path = dir.Join("ck");
  DCPP_ASSERT_OK(Save(SampleState(), path).status());
  // A missing data file: every item in it is named.
  const auto data = Files(path, ".distcp");
  fs::rename(path + "/" + data[0], path + "/moved");
  DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport r, VerifyCheckpoint(path));
  EXPECT_EQ(r.problems.size(), 6u) << r.ToString();
  nlohmann::json j = nlohmann::json::parse(r.ToJson());
  EXPECT_FALSE(j["ok"].get<bool>());
  EXPECT_EQ(j["problems"].size(), 6u);
  fs::rename(path + "/moved", path + "/" + data[0]);
  // A corrupt manifest is reported, and loading refuses it.
  const std::string m = path + "/" + Files(path, ".manifest")[0];
  FlipByte(m, 40);
  DCPP_ASSERT_OK_AND_ASSIGN(r, VerifyCheckpoint(path));
  EXPECT_THAT(r.ToString(), HasSubstr("manifest checksum mismatch"));
  Value back = Destinations(SampleState());
  EXPECT_THAT(Load(back, path), StatusIs(StatusCode::kDataLoss, HasSubstr("manifest")));
  // No checkpoint at all.
  EXPECT_THAT(VerifyCheckpoint(dir.Join("nothing")), StatusIs(StatusCode::kNotFound, ::testing::_));
}

}  // namespace
}  // namespace dcpp
