#include "dcpp/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "dcpp/storage.h"
#include "dcpp/verify.h"
#include "testing/fault_store.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

// The chunks of an [rows, cols] tensor split into a grid of `gr` x `gc` uneven pieces.
std::vector<ChunkBox> Grid(int64_t rows, int64_t cols, int64_t gr, int64_t gc) {
  std::vector<ChunkBox> out;
  auto cuts = [](int64_t n, int64_t parts) {
    std::vector<int64_t> c{0};
    for (int64_t i = 1; i <= parts; ++i) c.push_back(n * i / parts + (i < parts ? i % 2 : 0));
    return c;
  };
  auto r = cuts(rows, gr), c = cuts(cols, gc);
  for (size_t i = 0; i + 1 < r.size(); ++i) {
    for (size_t j = 0; j + 1 < c.size(); ++j) {
      out.push_back({{r[i], c[j]}, {r[i + 1] - r[i], c[j + 1] - c[j]}});
    }
  }
  return out;
}

// A sharded tensor holding `boxes` of `full`.
ShardedTensor Shards(const Tensor& full, const std::vector<ChunkBox>& boxes) {
  ShardedTensor st{full.dtype(), full.shape(), {}};
  for (const auto& b : boxes) {
    Tensor piece = Tensor::Zeros(full.dtype(), b.sizes);
    EXPECT_TRUE(CopyRegion(piece.view(), Shape(b.dim(), 0), full.view(), b.offsets, b.sizes).ok());
    st.shards.push_back({b.offsets, piece});
  }
  return st;
}

// Empty destination shards for `boxes`.
ShardedTensor EmptyShards(DType dtype, const Shape& shape, const std::vector<ChunkBox>& boxes) {
  ShardedTensor st{dtype, shape, {}};
  for (const auto& b : boxes) st.shards.push_back({b.offsets, Tensor::Zeros(dtype, b.sizes)});
  return st;
}

void ExpectShardsOf(const Tensor& full, const ShardedTensor& st) {
  for (const auto& s : st.shards) {
    Tensor expect = Tensor::Zeros(full.dtype(), s.tensor.shape());
    ASSERT_TRUE(
        CopyRegion(expect.view(), Shape(full.dim(), 0), full.view(), s.offsets, s.tensor.shape())
            .ok());
    EXPECT_TRUE(expect.BitwiseEqual(s.tensor)) << s.box().ToString();
  }
}

TEST(CheckpointTest, EveryDTypeRoundTrips) {
  TempDir dir;
  Value sd = Value::MakeDict();
  for (int i = 0; i < kNumDTypes; ++i) {
    DType d = static_cast<DType>(i);
    sd.Set(std::string(DTypeName(d)), Value::FromTensor(PatternTensor(d, {3, 5}, i)));
  }
  sd.Set("scalar", Value::FromTensor(PatternTensor(DType::kFloat64, {})));
  sd.Set("empty", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {0, 4})));
  DCPP_ASSERT_OK(Save(sd, dir.Join("ck")).status());
  Value back = Value::MakeDict();
  for (const auto& [k, v] : sd.dict()) {
    back.Set(k.as_str(), Value::FromTensor(Tensor::Zeros(v.tensor().dtype(), v.tensor().shape())));
  }
  DCPP_ASSERT_OK(Load(back, dir.Join("ck")));
  EXPECT_EQ(back, sd);
}

TEST(CheckpointTest, NestedValuesAndLoadEverything) {
  TempDir dir;
  Value sd = Value::MakeDict();
  Value model = Value::MakeDict();
  model.Set("w", Value::FromTensor(IotaTensor(DType::kFloat32, {4, 4})));
  Value layers = Value::MakeList();
  layers.items().push_back(Value::FromTensor(IotaTensor(DType::kInt64, {3})));
  layers.items().push_back(Value::FromTensor(IotaTensor(DType::kInt32, {2})));
  model.Set("layers", layers);
  sd.Set("model", model);
  sd.Set("step", Value::Int(42));
  sd.Set("name", Value::Str("run-7"));
  sd.Set("betas", Value::MakeTuple({Value::Float(0.9), Value::Float(0.999)}));
  sd.Set("groups", Value::MakeList({Value::MakeList({Value::Int(1), Value::None()})}));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, Save(sd, dir.Join("ck")));
  EXPECT_EQ(md.state_dict_metadata.size(), 7u);

  Value everything = Value::MakeDict();
  DCPP_ASSERT_OK(Load(everything, dir.Join("ck")));
  EXPECT_EQ(everything, sd) << everything.DebugString();
}

struct Layout {
  const char* name;
  int64_t save_r, save_c, load_r, load_c;
};

class ReshardTest : public ::testing::TestWithParam<Layout> {};

TEST_P(ReshardTest, LoadsUnderAnotherSharding) {
  const Layout& l = GetParam();
  TempDir dir;
  Tensor full = PatternTensor(DType::kFloat32, {37, 23}, 3);
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromSharded(Shards(full, Grid(37, 23, l.save_r, l.save_c))));
  for (int threads : {1, 3}) {
    SaveOptions so;
    so.writer.thread_count = threads;
    DCPP_ASSERT_OK(Save(sd, dir.Join("ck"), so).status());
    Value dst = Value::MakeDict();
    dst.Set("w", Value::FromSharded(
                     EmptyShards(DType::kFloat32, {37, 23}, Grid(37, 23, l.load_r, l.load_c))));
    LoadOptions lo;
    lo.reader.thread_count = threads;
    DCPP_ASSERT_OK(Load(dst, dir.Join("ck"), lo));
    ExpectShardsOf(full, dst.Find("w")->sharded());
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ReshardTest,
                         ::testing::Values(Layout{"rows_to_cols", 4, 1, 1, 3},
                                           Layout{"cols_to_rows", 1, 5, 3, 1},
                                           Layout{"blocks_to_blocks", 3, 2, 2, 3},
                                           Layout{"rows_to_whole", 5, 1, 1, 1},
                                           Layout{"whole_to_blocks", 1, 1, 4, 4}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(CheckpointTest, OneFilePerItemAndPartialLoad) {
  TempDir dir;
  Value sd = Value::MakeDict();
  sd.Set("a", Value::FromTensor(IotaTensor(DType::kFloat32, {8})));
  sd.Set("b", Value::FromTensor(IotaTensor(DType::kFloat64, {2, 2})));
  SaveOptions so;
  so.writer.single_file_per_rank = false;
  DCPP_ASSERT_OK(Save(sd, dir.Join("ck"), so).status());
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.Join("ck"))) {
    files += e.path().extension() == ".distcp";
  }
  EXPECT_EQ(files, 2);

  Value dst = Value::MakeDict();
  dst.Set("a", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {8})));
  dst.Set("not_saved", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {1})));
  EXPECT_THAT(Load(dst, dir.Join("ck")),
              StatusIs(StatusCode::kNotFound, HasSubstr("\"not_saved\" is not in the checkpoint")));
  LoadOptions lo;
  lo.planner_options.allow_partial_load = true;
  DCPP_ASSERT_OK(Load(dst, dir.Join("ck"), lo));
  EXPECT_EQ(*dst.Find("a"), *sd.Find("a"));
}

TEST(CheckpointTest, ClearErrorsForMissingAndCorruptFiles) {
  TempDir dir;
  Value none = Value::MakeDict();
  EXPECT_THAT(Load(none, dir.Join("nothing")),
              StatusIs(StatusCode::kNotFound, HasSubstr("nothing")));

  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(IotaTensor(DType::kFloat32, {64})));
  sd.Set("step", Value::Int(3));
  DCPP_ASSERT_OK(Save(sd, dir.Join("ck")).status());
  const std::string data = dir.Join("ck/__0_0.distcp");
  std::filesystem::resize_file(data, std::filesystem::file_size(data) - 100);
  Value dst = Value::MakeDict();
  dst.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {64})));
  Status s = Load(dst, dir.Join("ck"));
  EXPECT_THAT(s, StatusIs(StatusCode::kDataLoss, HasSubstr("__0_0.distcp")));
  EXPECT_THAT(s, StatusIs(StatusCode::kDataLoss, HasSubstr("\"w")));

  std::ofstream(dir.Join("ck/.metadata"), std::ios::trunc) << "garbage";
  EXPECT_THAT(Load(dst, dir.Join("ck")), StatusIs(StatusCode::kDataLoss, HasSubstr(".metadata")));
}

TEST(CheckpointTest, OverwritePolicyAndFailedSaveKeepsLastGoodCheckpoint) {
  MemoryStore mem;
  FaultStore faults(mem);
  Value v1 = Value::MakeDict();
  v1.Set("w", Value::FromTensor(IotaTensor(DType::kFloat32, {16})));
  {
    FileSystemWriter w(&faults, "mem", {});
    DCPP_ASSERT_OK(Save(v1, w).status());
  }
  {
    FileSystemWriterOptions no;
    no.overwrite = false;
    FileSystemWriter w(&faults, "mem", no);
    EXPECT_THAT(Save(v1, w),
                StatusIs(StatusCode::kFailedPrecondition, HasSubstr("already exists")));
  }
  // A second save dies while writing its data: the first checkpoint still loads, intact.
  Value v2 = Value::MakeDict();
  v2.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {16}, 9)));
  faults.AddFault({StoreOp::kAppend, 2, UnavailableError("disk on fire")});
  {
    FileSystemWriter w(&faults, "mem", {});
    EXPECT_THAT(Save(v2, w), StatusIs(StatusCode::kUnavailable, HasSubstr("disk on fire")));
  }
  faults.ClearFaults();
  ASSERT_TRUE(faults.DropUnsyncedData().ok());
  Value back = Value::MakeDict();
  back.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {16})));
  FileSystemReader r(&faults, "mem", {});
  DCPP_ASSERT_OK(Load(back, r));
  EXPECT_EQ(back, v1);

  // A replacing save that succeeds removes the old files.
  {
    FileSystemWriter w(&faults, "mem", {});
    DCPP_ASSERT_OK(Save(v2, w).status());
  }
  DCPP_ASSERT_OK(Load(back, r));
  EXPECT_EQ(back, v2);
  auto keys = *mem.List();
  int data_files = 0;
  for (const auto& k : keys) data_files += k.find(".distcp") != std::string::npos;
  EXPECT_EQ(data_files, 1) << ::testing::PrintToString(keys);
}

// With write parallelism a file's batches of small records are written behind while the next
// ones are encoded, and a large record is written between them: the data file is the same, byte
// for byte, as one thread's, and it verifies (CRC-32s and manifest hashes) and loads.
TEST(CheckpointTest, FilesWrittenBehindMatchOneThreadsFile) {
  TempDir dir;
  Value sd = Value::MakeDict();
  for (int i = 0; i < 600; ++i) {  // ~9 MiB of 4-28 KiB tensors: several 4 MiB batches
    sd.Set("s" + std::to_string(i),
           Value::FromTensor(PatternTensor(DType::kFloat32, {1 + i % 7, 1024}, i)));
  }
  sd.Set("big", Value::FromTensor(PatternTensor(DType::kFloat32, {3, 2 << 20}, 9)));  // 24 MiB
  sd.Set("small", Value::FromTensor(PatternTensor(DType::kInt64, {5}, 4)));
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  std::string one_thread;
  for (int parallelism : {1, 4}) {
    const std::string ck = dir.Join("ck" + std::to_string(parallelism));
    SaveOptions so;
    so.writer.write_parallelism = parallelism;
    DCPP_ASSERT_OK(Save(sd, ck, so).status());
    const std::string data = slurp(ck + "/__0_0.distcp");
    ASSERT_GT(data.size(), size_t{33} << 20);
    if (parallelism == 1) {
      one_thread = data;
    } else {
      EXPECT_TRUE(data == one_thread);
    }
    DCPP_ASSERT_OK_AND_ASSIGN(VerifyReport report, VerifyCheckpoint(ck));
    EXPECT_TRUE(report.ok()) << report.ToString();
    EXPECT_TRUE(report.has_manifest);
    Value back = Value::MakeDict();
    DCPP_ASSERT_OK(Load(back, ck));
    EXPECT_TRUE(back.Find("big")->tensor().BitwiseEqual(sd.Find("big")->tensor()));
    EXPECT_TRUE(back.Find("s599")->tensor().BitwiseEqual(sd.Find("s599")->tensor()));
  }
}

TEST(CheckpointTest, ZstdCompressedItemsRoundTrip) {
  TempDir dir;
  Value sd = Value::MakeDict();
  sd.Set("zeros", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {256, 256})));
  sd.Set("w", Value::FromSharded(
                  Shards(PatternTensor(DType::kBFloat16, {40, 8}, 2), Grid(40, 8, 3, 1))));
  sd.Set("note", Value::Str("compressed"));
  SaveOptions so;
  so.writer.zstd_level = 3;
  so.writer.thread_count = 2;
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, Save(sd, dir.Join("ck"), so));
  int64_t stored = 0;
  for (const auto& [idx, info] : md.storage_data) {
    EXPECT_EQ(info.transform_descriptors, std::vector<std::string>{"stream.zstd/1"});
    stored += info.length;
  }
  EXPECT_LT(stored, 256 * 256 * 4 / 10);  // the zeros compress away
  Value back = Value::MakeDict();
  DCPP_ASSERT_OK(Load(back, dir.Join("ck")));
  EXPECT_TRUE(back.Find("zeros")->tensor().BitwiseEqual(sd.Find("zeros")->tensor()));
  EXPECT_EQ(back.Find("note")->as_str(), "compressed");
  Value dst = Value::MakeDict();
  dst.Set("w", Value::FromSharded(EmptyShards(DType::kBFloat16, {40, 8}, Grid(40, 8, 1, 2))));
  DCPP_ASSERT_OK(Load(dst, dir.Join("ck"), {.planner_options = {.allow_partial_load = true}}));
  ExpectShardsOf(PatternTensor(DType::kBFloat16, {40, 8}, 2), dst.Find("w")->sharded());
}

// A user object that checkpoints itself.
class Counter : public Stateful {
 public:
  Tensor weights = Tensor::Zeros(DType::kFloat32, {4});
  int64_t count = 0;
  StateDict GetStateDict() override {
    Value sd = Value::MakeDict();
    sd.Set("weights", Value::FromTensor(weights));  // shares storage: loads land in place
    sd.Set("count", Value::Int(count));
    return sd;
  }
  Status LoadStateDict(const StateDict& sd) override {
    const Value* c = sd.Find("count");
    if (!c || !c->is_int()) return InvalidArgumentError("count missing");
    count = c->as_int();
    return Status::Ok();
  }
};

TEST(CheckpointTest, StatefulObjectsSaveAndLoadThemselves) {
  TempDir dir;
  Counter a, b;
  a.weights = IotaTensor(DType::kFloat32, {4});
  a.count = 5;
  b.count = 9;
  DCPP_ASSERT_OK(Save(AppState{{"a", &a}, {"b", &b}}, dir.Join("ck")).status());
  Counter a2, b2;
  DCPP_ASSERT_OK(Load(AppState{{"a", &a2}, {"b", &b2}}, dir.Join("ck")));
  EXPECT_TRUE(a2.weights.BitwiseEqual(a.weights));
  EXPECT_EQ(a2.count, 5);
  EXPECT_EQ(b2.count, 9);
  EXPECT_THAT(Save(AppState{{"a", &a}, {"a", &b}}, dir.Join("ck2")),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("appears twice")));
}

}  // namespace
}  // namespace dcpp
