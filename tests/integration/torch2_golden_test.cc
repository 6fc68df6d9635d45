// Checkpoints PyTorch 2.13 wrote (tests/data/dcp_213_2ranks, made by
// tests/data/make_torch2_goldens.py) read without torch: the metadata variants 2.13 pickles,
// every dtype, DTensor chunks from 1-D and 2-D meshes, rank-local metadata, and the values,
// compared bit for bit with the torch.save file of the whole state the same run wrote.
#include <filesystem>
#include <mutex>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/convert.h"
#include "dcpp/layout.h"
#include "testing/expected_state.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::ExpectedState;
using ::dcpp::testing::LoadAndCompare;
using ::dcpp::testing::ReadExpectedState;
using ::dcpp::testing::SourceDir;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::string Golden(const std::string& name) {
  return SourceDir() + "/tests/data/dcp_213_2ranks/" + name;
}

TEST(Torch2GoldenTest, MetadataVariantsOf213AreRead) {
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(Golden("sync")));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, reader->ReadMetadata());
  EXPECT_EQ(md.version, "1.0.0");
  ASSERT_TRUE(md.storage_meta.has_value());
  EXPECT_EQ(md.storage_meta->save_id->size(), 36u);  // a uuid4
  ASSERT_TRUE(md.planner_data.has_value());
  EXPECT_EQ(PathToString(md.planner_data->at("optim.state.net.0.weight.exp_avg")),
            "('optim', 'state', 'net.0.weight', 'exp_avg')");
  // Each dtype torch 2.13 has, the float8 and float4 kinds included.
  for (int i = 0; i < kNumDTypes; ++i) {
    const std::string fqn = "dtypes." + std::string(DTypeName(static_cast<DType>(i)));
    const auto* m = md.state_dict_metadata.Find(fqn);
    ASSERT_NE(m, nullptr) << fqn;
    const auto& t = std::get<TensorStorageMetadata>(*m);
    EXPECT_EQ(t.properties.dtype, static_cast<DType>(i));
    EXPECT_EQ(t.chunks.size(), 2u) << fqn;  // Shard(0) over 2 ranks
  }
  // The 2-D mesh (Shard(0), Shard(1)) on 2 ranks is a 2 x 1 grid.
  const auto& block = std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("dt.block2d"));
  EXPECT_EQ(block.chunks.size(), 2u);
  EXPECT_TRUE(std::holds_alternative<BytesStorageMetadata>(
      *md.state_dict_metadata.Find("optim.param_groups.0.lr")));
}

TEST(Torch2GoldenTest, RankLocalMetadataIsMerged) {
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(Golden("nocoll")));
  EXPECT_THAT(reader->ReadMetadata(), StatusIs(StatusCode::kNotFound, HasSubstr(".metadata")));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata all, reader->ReadMetadata(0));
  const auto& merged = std::get<TensorStorageMetadata>(*all.state_dict_metadata.Find("dt.shard0"));
  EXPECT_EQ(merged.chunks.size(), 2u);  // one per saving rank
  // Both ranks saved the replicated model: one chunk, from the asking rank's own file.
  const auto& w =
      std::get<TensorStorageMetadata>(*all.state_dict_metadata.Find("model.net.0.weight"));
  EXPECT_EQ(w.chunks.size(), 1u);
  MetadataIndex index{"model.net.0.weight", Shape{0, 0}, std::nullopt};
  DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* info, all.FindStorage(index));
  EXPECT_EQ(info->relative_path, "__0_0.distcp");
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata all1, reader->ReadMetadata(1));
  DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* info1, all1.FindStorage(index));
  EXPECT_EQ(info1->relative_path, "__1_0.distcp");
}

class Torch2GoldenLoadTest : public ::testing::TestWithParam<const char*> {};

TEST_P(Torch2GoldenLoadTest, LoadsOnOneTwoAndThreeRanks) {
  DCPP_ASSERT_OK_AND_ASSIGN(ExpectedState expected, ReadExpectedState(Golden("expected.pt")));
  const std::string dir = Golden(GetParam());
  EXPECT_THAT(LoadAndCompare(dir, expected, nullptr, 0), IsEmpty());
  for (auto [world, dim] : {std::pair{2, 9}, std::pair{3, 0}}) {
    std::mutex mu;
    std::vector<std::string> bad;
    RunOnThreads(world, [&](Communicator& comm) {
      auto b = LoadAndCompare(dir, expected, &comm, dim);
      std::lock_guard<std::mutex> lock(mu);
      bad.insert(bad.end(), b.begin(), b.end());
    });
    EXPECT_THAT(bad, IsEmpty()) << world << " ranks";
  }
}

TEST_P(Torch2GoldenLoadTest, ConvertsToTheFullValues) {
  TempDir tmp;
  DCPP_ASSERT_OK(ConvertDcpToTorch(Golden(GetParam()), tmp.Join("full.pt")));
  DCPP_ASSERT_OK_AND_ASSIGN(DiffReport diff,
                            DiffCheckpoints(tmp.Join("full.pt"), Golden("expected.pt")));
  EXPECT_THAT(diff.differences, IsEmpty());
  EXPECT_GT(diff.compared, 50);
}

INSTANTIATE_TEST_SUITE_P(Savers, Torch2GoldenLoadTest, ::testing::Values("sync", "nocoll"));

}  // namespace
}  // namespace dcpp
