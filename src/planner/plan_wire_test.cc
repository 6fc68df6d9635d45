// The save-plan wire encoding against hostile bytes (what save_plan_fuzz found), global-plan
// validation of plans built in process, and the fuzzer's seed corpus.
#include <limits>

#include "core/wire.h"
#include "dcpp/checkpoint.h"
#include "dcpp/planner.h"
#include "planner/plan_wire.h"
#include "testing/fuzz_seeds.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// One tensor item, encoded field by field as EncodeSavePlan does, with any geometry.
std::string OneTensorItem(const Shape& offsets, const Shape& sizes, const Shape& size) {
  internal::WireWriter w;
  w.Str("");  // storage prefix
  w.U64(1);   // items
  internal::PutIndex(w, {"t", offsets, std::nullopt});
  w.U64(static_cast<uint64_t>(WriteItemType::kTensor));
  w.Dims(offsets);
  w.Dims(sizes);
  w.Dims(size);
  w.U64(static_cast<uint64_t>(DType::kUInt8));
  w.U64(0);  // mappings
  return w.Release();
}

TEST(SavePlanWireTest, WellFormedItemDecodes) {
  DCPP_ASSERT_OK_AND_ASSIGN(SavePlan p, DecodeSavePlan(OneTensorItem({2, 0}, {2, 3}, {4, 3})));
  ASSERT_EQ(p.items.size(), 1u);
  EXPECT_EQ(p.items[0].tensor_data->chunk, (ChunkBox{{2, 0}, {2, 3}}));
  EXPECT_EQ(p.items[0].StorageSize(), 6);
}

TEST(SavePlanWireTest, GeometryThatDoesNotHoldTogetherIsMalformed) {
  // The first input save_plan_fuzz found: offsets of rank 1, sizes and size of rank 0. The
  // coordinator planned it and produced metadata that load refuses.
  const std::vector<std::string> hostile = {
      OneTensorItem({int64_t{1} << 56}, {}, {}),
      OneTensorItem({0}, {2, 2}, {2, 2}),           // offsets of another rank
      OneTensorItem({0}, {-1}, {4}),                // negative extent
      OneTensorItem({-2}, {2}, {4}),                // negative offset
      OneTensorItem({3}, {2}, {4}),                 // outside the tensor
      OneTensorItem({kMax}, {2}, {kMax}),           // past the tensor through a wrapping sum
      OneTensorItem({0, 0}, {1, 1}, {kMax, kMax}),  // tensor bytes overflow int64
  };
  for (const auto& bytes : hostile) {
    EXPECT_THAT(DecodeSavePlan(bytes), StatusIs(StatusCode::kDataLoss, HasSubstr("save plan")));
  }
}

TensorStorageMetadata Tensor1d(DType dtype, int64_t size, std::vector<ChunkBox> chunks) {
  return TensorStorageMetadata{{dtype}, {size}, std::move(chunks)};
}

TEST(SavePlanWireTest, GlobalValidationRefusesBrokenChunksBuiltInProcess) {
  // Plans of a custom planner never pass the decoder: ValidateGlobalPlan is their guard.
  Metadata md;
  md.state_dict_metadata["x"] = Tensor1d(DType::kUInt8, 4, {{{0, 0}, {4}}});
  EXPECT_THAT(ValidateGlobalPlan(md, false),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("outside")));
  md.state_dict_metadata["x"] = Tensor1d(DType::kUInt8, 4, {{{2}, {-1}}});
  EXPECT_THAT(ValidateGlobalPlan(md, false),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("outside")));
  md.state_dict_metadata["x"] = TensorStorageMetadata{{DType::kFloat32}, {kMax, 2}, {}};
  EXPECT_THAT(ValidateGlobalPlan(md, false),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("overflows")));
  // Two copies of a chunk of 2^62 elements: their sum passes int64; the overlap is the error.
  const int64_t big = int64_t{1} << 62;
  md.state_dict_metadata["x"] =
      Tensor1d(DType::kUInt8, big, {{{0}, {big}}, {{0}, {big}}, {{0}, {big}}});
  EXPECT_THAT(ValidateGlobalPlan(md, true),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
}

TEST(SavePlanWireTest, GlobalPlanRefusesPlannerDataThatLoadWouldRefuse) {
  // The second input save_plan_fuzz found: a mapping with list index 2^47 was planned, and
  // the save failed only at commit, after every rank had written its data.
  SavePlan p;
  WriteItem item;
  item.index = {"layers.0.bias", Shape{0}, std::nullopt};
  item.tensor_data = TensorWriteData{{{0}, {3}}, {DType::kFloat32}, {3}};
  p.items.push_back(item);
  p.mappings["layers.0.bias"] = {std::string("layers"), int64_t{1} << 47, std::string("bias")};
  DefaultSavePlanner coordinator;
  EXPECT_THAT(coordinator.CreateGlobalPlan({p}),
              StatusIs(StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("global plan"), HasSubstr("list index"))));
}

TEST(SavePlanWireTest, ListsWhoseFirstDictsAreEmptySaveAndLoad) {
  // Flattening drops empty dicts, so the only entry is ('layers', 3, 'w'): one entry, list
  // index 3. Such a state dict used to be refused at commit as DataLoss.
  TempDir tmp;
  Value layer = Value::MakeDict();
  layer.Set("w", Value::FromTensor(IotaTensor(DType::kFloat32, {2})));
  Value sd = Value::MakeDict();
  sd.Set("layers",
         Value::MakeList({Value::MakeDict(), Value::MakeDict(), Value::MakeDict(), layer}));
  DCPP_ASSERT_OK(Save(sd, tmp.Join("ckpt")).status());
  Value back = Value::MakeDict();
  DCPP_ASSERT_OK(Load(back, tmp.Join("ckpt")));
  EXPECT_EQ(back.DebugString(), "{'layers': [None, None, None, {'w': tensor(float32[2])}]}");
}

// ---- seeds of save_plan_fuzz: local and global plans of real state dicts ----

Value ShardedRows(int rank, int world, int64_t rows, int64_t cols) {
  ShardedTensor st{DType::kBFloat16, {rows, cols}, {}};
  const int64_t per = (rows + world - 1) / world;
  const int64_t lo = std::min(rows, rank * per), hi = std::min(rows, lo + per);
  st.shards.push_back({{lo, 0}, PatternTensor(DType::kBFloat16, {hi - lo, cols})});
  Value layer = Value::MakeDict();
  layer.Set("weight", Value::FromSharded(st));
  layer.Set("bias", Value::FromTensor(IotaTensor(DType::kFloat32, {cols})));  // replicated
  Value layers = Value::MakeList({layer});
  Value sd = Value::MakeDict();
  sd.Set("layers", layers);
  sd.Set("step", Value::Int(3));
  sd.Set("lr", Value::MakeList({Value::Float(0.1), Value::Str("cosine")}));
  sd.Set("ids", Value::FromTensor(IotaTensor(DType::kInt64, {})));  // 0-d
  return sd;
}

TEST(SavePlanWireTest, FuzzSeedsAreRealPlans) {
  std::map<std::string, std::string> seeds;
  seeds["empty.plan"] = EncodeSavePlan(SavePlan{});
  std::vector<SavePlan> local;
  for (int r = 0; r < 2; ++r) {
    const Value sd = ShardedRows(r, 2, 5, 3);  // the planner keeps pointers into it
    DefaultSavePlanner p;
    DCPP_ASSERT_OK(p.SetUp(sd, r == 0));
    DCPP_ASSERT_OK_AND_ASSIGN(SavePlan plan, p.CreateLocalPlan());
    seeds["local_rank" + std::to_string(r) + ".plan"] = EncodeSavePlan(plan);
    local.push_back(std::move(plan));
  }
  DefaultSavePlanner coordinator;
  DCPP_ASSERT_OK_AND_ASSIGN(auto global, coordinator.CreateGlobalPlan(local));
  for (size_t r = 0; r < global.first.size(); ++r) {
    global.first[r].storage_prefix = "__" + std::to_string(r) + "_";  // as the writer sets it
    seeds["global_rank" + std::to_string(r) + ".plan"] = EncodeSavePlan(global.first[r]);
  }
  // Rank-local mode: the plan carries its own prefix; properties beyond the dtype.
  SavePlan own = local[1];
  own.storage_prefix = "__1_";
  own.items[0].tensor_data->properties.requires_grad = true;
  own.items[0].tensor_data->properties.memory_format = MemoryFormat::kChannelsLast;
  seeds["rank_local.plan"] = EncodeSavePlan(own);
  for (const auto& [name, bytes] : seeds) DCPP_EXPECT_OK(DecodeSavePlan(bytes));
  ::dcpp::testing::ExpectFuzzSeeds("save_plan_fuzz", seeds);
}

}  // namespace
}  // namespace dcpp
