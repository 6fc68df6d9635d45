// FileSystemReader::ReadData on many small blobs: read in windows, grouped by file and blob
// whatever the plan's order, several read items per blob, and every corruption still caught.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "codec/torch_save.h"
#include "dcpp/checkpoint.h"
#include "dcpp/layout.h"
#include "dcpp/planner.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::FlipByte;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::ReadFileBytes;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

constexpr int kTensors = 240;

// Small tensors of several dtypes and sizes (40 B .. 64 KiB), a few past the window's whole-blob
// limit, and a bytes item.
Value ManySmall() {
  Value sd = Value::MakeDict();
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kInt64, DType::kUInt8};
  for (int i = 0; i < kTensors; ++i) {
    const DType d = dtypes[i % 4];
    const int64_t n = i % 40 == 7 ? (300 << 10) : int64_t{10} << (i % 13);
    sd.Set("t" + std::to_string(i), Value::FromTensor(PatternTensor(d, {n}, i + 1)));
  }
  sd.Set("blob", Value::Bytes(std::string(5000, 'x')));
  return sd;
}

Value ZerosLike(const Value& sd) {
  Value out = Value::MakeDict();
  for (const auto& [k, v] : sd.dict()) {
    out.Set(k.as_str(),
            v.is_tensor() ? Value::FromTensor(Tensor::Zeros(v.tensor().dtype(), v.tensor().shape()))
                          : Value::None());
  }
  return out;
}

// Loads `dest` from `path` with the plan's items in the order `reorder` leaves them.
Status LoadWithPlanOrder(const std::string& path, Value& dest,
                         const std::function<void(std::vector<ReadItem>&)>& reorder,
                         bool verify = true) {
  DCPP_ASSIGN_OR_RETURN(auto reader, FileSystemReader::Open(path, {.verify = verify}));
  DCPP_ASSIGN_OR_RETURN(Metadata md, reader->ReadMetadata());
  DefaultLoadPlanner planner;
  DCPP_RETURN_IF_ERROR(planner.SetUp(&dest, md, true));
  DCPP_ASSIGN_OR_RETURN(LoadPlan plan, planner.CreateLocalPlan());
  reorder(plan.items);
  DCPP_RETURN_IF_ERROR(reader->SetUp(md, true, 0));
  return reader->ReadData(plan, planner);
}

TEST(FileSystemReadTest, ManySmallBlobsLoadInAnyPlanOrder) {
  TempDir dir;
  const std::string path = dir.Join("ck");
  SaveOptions so;
  so.writer.thread_count = 3;  // three data files, read side by side
  DCPP_ASSERT_OK(Save(ManySmall(), path, so).status());
  std::mt19937_64 rng(7);
  const std::vector<std::pair<const char*, std::function<void(std::vector<ReadItem>&)>>> orders = {
      {"as planned", [](std::vector<ReadItem>&) {}},
      {"reversed", [](std::vector<ReadItem>& v) { std::reverse(v.begin(), v.end()); }},
      {"shuffled", [&](std::vector<ReadItem>& v) { std::shuffle(v.begin(), v.end(), rng); }}};
  for (const auto& [name, reorder] : orders) {
    Value back = ZerosLike(ManySmall());
    DCPP_ASSERT_OK(LoadWithPlanOrder(path, back, reorder)) << name;
    EXPECT_EQ(back, ManySmall()) << name;
  }
  // An item the metadata does not hold is NotFound naming it.
  Value back = ZerosLike(ManySmall());
  EXPECT_THAT(
      LoadWithPlanOrder(path, back,
                        [](std::vector<ReadItem>& v) { v[3].storage_index.fqn = "no_such_key"; }),
      StatusIs(StatusCode::kNotFound, HasSubstr("no_such_key")));
}

// A planner that is not thread-safe: it checks that no two of its calls overlap, counts them,
// and can refuse one key's destination.
class SerialCheckingPlanner final : public LoadPlanner {
 public:
  explicit SerialCheckingPlanner(std::string refuse = "") : refuse_(std::move(refuse)) {}
  Status SetUp(StateDict* sd, const Metadata& md, bool c) override {
    return inner_.SetUp(sd, md, c);
  }
  Result<LoadPlan> CreateLocalPlan() override { return inner_.CreateLocalPlan(); }
  Result<TensorView> ResolveTensor(const ReadItem& item) override {
    Enter();
    ++resolved[item.dest_index.fqn];
    auto out = item.dest_index.fqn == refuse_
                   ? Result<TensorView>(InternalError("refused \"" + refuse_ + "\""))
                   : inner_.ResolveTensor(item);
    Leave();
    return out;
  }
  Status LoadBytes(const ReadItem& item, Value v) override {
    Enter();
    Status s = inner_.LoadBytes(item, std::move(v));
    Leave();
    return s;
  }
  std::map<std::string, int> resolved;
  bool overlapped = false;

 private:
  void Enter() {
    if (busy_.exchange(true)) overlapped = true;
  }
  void Leave() { busy_ = false; }
  DefaultLoadPlanner inner_;
  std::string refuse_;
  std::atomic<bool> busy_{false};
};

TEST(FileSystemReadTest, ReaderThreadsResolveEachItemOnceAndNeverAtOnce) {
  TempDir dir;
  const std::string path = dir.Join("ck");
  SaveOptions so;
  so.writer.thread_count = 3;
  DCPP_ASSERT_OK(Save(ManySmall(), path, so).status());
  auto load = [&](SerialCheckingPlanner& planner, Value& dest) {
    LoadOptions lo;
    lo.planner = &planner;
    lo.reader.thread_count = 3;
    return Load(dest, path, lo);
  };
  SerialCheckingPlanner planner;
  Value back = ZerosLike(ManySmall());
  DCPP_ASSERT_OK(load(planner, back));
  EXPECT_EQ(back, ManySmall());
  EXPECT_FALSE(planner.overlapped);
  EXPECT_EQ(planner.resolved.size(), static_cast<size_t>(kTensors));
  for (const auto& [key, n] : planner.resolved) EXPECT_EQ(n, 1) << key;
  // A destination the planner refuses fails the load with its message, whichever blob of its
  // file's run it is in.
  for (const char* key : {"t0", "t101", "t239"}) {
    SerialCheckingPlanner refusing(key);
    Value dest = ZerosLike(ManySmall());
    EXPECT_THAT(load(refusing, dest), StatusIs(StatusCode::kInternal, HasSubstr(key))) << key;
  }
}

TEST(FileSystemReadTest, BlobsAndTheirTensorBytesStartAt64ByteOffsetsWithZerosBetween) {
  // The writer pads between blobs so tensor bytes lie in the file as they lie in memory within a
  // cache line (fast copies out of the page cache); readers go by offsets, so the padding is
  // never read as data. Items of odd lengths make every later blob need some.
  TempDir dir;
  const std::string path = dir.Join("ck");
  SaveOptions so;
  so.writer.thread_count = 2;
  DCPP_ASSERT_OK(Save(ManySmall(), path, so).status());
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(path));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, reader->ReadMetadata());
  std::map<std::string, std::vector<const StorageInfo*>> by_file;
  size_t odd_lengths = 0;
  for (const auto& [idx, info] : md.storage_data) {
    by_file[info.relative_path].push_back(&info);
    odd_lengths += info.length % 64 != 0;
  }
  ASSERT_GT(odd_lengths, 10u);
  ASSERT_EQ(by_file.size(), 2u);
  for (auto& [name, infos] : by_file) {
    std::sort(infos.begin(), infos.end(),
              [](const StorageInfo* a, const StorageInfo* b) { return a->offset < b->offset; });
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFileBytes(path + "/" + name));
    uint64_t end = 0;
    for (const StorageInfo* info : infos) {
      const uint64_t at = static_cast<uint64_t>(info->offset);
      EXPECT_EQ(at % 64, 0u) << name << " @" << at;
      ASSERT_GE(at, end);
      EXPECT_LT(at - end, 64u) << name << " @" << at;
      EXPECT_EQ(bytes.substr(end, at - end), std::string(at - end, '\0')) << name << " @" << at;
      end = at + static_cast<uint64_t>(info->length);
      MemorySource blob(std::string_view(bytes).substr(info->offset, info->length));
      DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(blob));
      for (const auto& [rname, rec] : archive.records()) {
        if (rname.rfind("data/", 0) == 0) {
          EXPECT_EQ((at + rec.data_offset) % 64, 0u) << rname;
        }
      }
    }
    EXPECT_EQ(end, bytes.size()) << name;
  }
}

TEST(FileSystemReadTest, SeveralReadItemsOfOneSmallBlobEachGetTheirBytes) {
  // One stored [12, 5] tensor loaded as three row shards: three read items of one blob.
  TempDir dir;
  const std::string path = dir.Join("ck");
  const Tensor w = PatternTensor(DType::kFloat32, {12, 5}, 3);
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(w));
  sd.Set("b", Value::FromTensor(PatternTensor(DType::kInt32, {9}, 4)));
  DCPP_ASSERT_OK(Save(sd, path).status());
  ShardedTensor st{DType::kFloat32, {12, 5}, {}};
  for (int64_t lo : {0, 4, 8}) {
    st.shards.push_back({{lo, 0}, Tensor::Zeros(DType::kFloat32, {4, 5})});
  }
  Value back = Value::MakeDict();
  back.Set("w", Value::FromSharded(st));
  back.Set("b", Value::FromTensor(Tensor::Zeros(DType::kInt32, {9})));
  DCPP_ASSERT_OK(Load(back, path));
  const auto& shards = back.Find("w")->sharded().shards;
  ASSERT_EQ(shards.size(), 3u);
  for (size_t s = 0; s < shards.size(); ++s) {
    // Rows [4s, 4s + 4) of the contiguous source.
    EXPECT_EQ(std::memcmp(shards[s].tensor.data(), w.data() + s * 4 * 5 * sizeof(float),
                          4 * 5 * sizeof(float)),
              0)
        << s;
  }
  EXPECT_TRUE(back.Find("b")->tensor().BitwiseEqual(sd.Find("b")->tensor()));
}

TEST(FileSystemReadTest, AFlipInASmallBlobInsideAWindowNamesItsItem) {
  // A payload byte of a small tensor in the middle of a read window: the manifest's hash finds
  // it; without a manifest the record's zip CRC does. Either way the error names the item and
  // the file, and the other items of the window are not blamed.
  TempDir dir;
  const std::string path = dir.Join("ck");
  DCPP_ASSERT_OK(Save(ManySmall(), path).status());
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(path));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, reader->ReadMetadata());
  const StorageInfo* info = nullptr;
  for (const auto& [idx, i] : md.storage_data) {
    if (idx.fqn == "t101") info = &i;
  }
  ASSERT_NE(info, nullptr);
  const std::string file = path + "/" + info->relative_path;
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFileBytes(file));
  MemorySource blob(std::string_view(bytes).substr(info->offset, info->length));
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(blob));
  const auto& rec = archive.records().at("data/0");
  for (uint64_t in_record : {uint64_t{0}, rec.size / 2, rec.size - 1}) {
    const uint64_t at = static_cast<uint64_t>(info->offset) + rec.data_offset + in_record;
    FlipByte(file, at, 0x10);
    Value back = ZerosLike(ManySmall());
    EXPECT_THAT(Load(back, path),
                StatusIs(StatusCode::kDataLoss,
                         AllOf(HasSubstr("item \"t101@[0]\""), HasSubstr(info->relative_path),
                               HasSubstr("checksum mismatch"))))
        << in_record;
    FlipByte(file, at, 0x10);
  }
  for (const auto& e : fs::directory_iterator(path)) {
    if (e.path().extension() == ".manifest") fs::remove(e.path());
  }
  for (uint64_t in_blob : {rec.data_offset + rec.size / 3, uint64_t{40}}) {
    // The payload (its CRC), then data.pkl near the front (its CRC, or its parse).
    const uint64_t at = static_cast<uint64_t>(info->offset) + in_blob;
    FlipByte(file, at, 0x10);
    Value back = ZerosLike(ManySmall());
    EXPECT_THAT(Load(back, path), StatusIs(StatusCode::kDataLoss, HasSubstr("t101@[0]")))
        << in_blob;
    FlipByte(file, at, 0x10);
  }
  Value back = ZerosLike(ManySmall());
  DCPP_ASSERT_OK(Load(back, path));
  EXPECT_EQ(back, ManySmall());
}

TEST(FileSystemReadTest, PyTorchsTensorBlobsTakeTheLoneTensorPath) {
  // PyTorch 2.13's DCP writes each tensor item as the canonical lone-tensor pickle, so its
  // checkpoints are read without pickle trees too (the golden was written by PyTorch).
  const std::string path = testing::SourceDir() + "/tests/data/dcp_213_2ranks/sync";
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(path));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, reader->ReadMetadata());
  int tensors = 0, lone = 0;
  for (const auto& [idx, info] : md.storage_data) {
    const StorageMetadata* m = md.state_dict_metadata.Find(idx.fqn);
    if (!m || !std::holds_alternative<TensorStorageMetadata>(*m)) continue;
    DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, ReadFileBytes(path + "/" + info.relative_path));
    MemorySource blob(std::string_view(bytes).substr(info.offset, info.length));
    DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive archive, TorchSaveArchive::Open(blob));
    ++tensors;
    lone += archive.lone_tensor();
    DCPP_EXPECT_OK(archive.RootTensor().status());
  }
  EXPECT_GT(tensors, 0);
  EXPECT_EQ(lone, tensors);
}

}  // namespace
}  // namespace dcpp
