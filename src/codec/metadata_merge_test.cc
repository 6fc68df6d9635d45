#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "dcpp/metadata.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

// What rank `rank` of 2 writes without collectives: its half of "w" (rows) and a copy of the
// replicated "b".
Metadata RankLocal(int rank, DType w_dtype = DType::kFloat32) {
  Metadata md;
  TensorStorageMetadata w{{w_dtype}, {4, 3}, {{{2 * rank, 0}, {2, 3}}}};
  TensorStorageMetadata b{{DType::kFloat64}, {3}, {{{0}, {3}}}};
  md.state_dict_metadata["w"] = w;
  md.state_dict_metadata["b"] = b;
  md.state_dict_metadata["step"] = BytesStorageMetadata{};
  const std::string file = "__" + std::to_string(rank) + "_0.distcp";
  md.storage_data[{"w", Shape{2 * rank, 0}, 0}] = {file, 0, 24};
  md.storage_data[{"b", Shape{0}, 0}] = {file, 24, 24};
  md.storage_data[{"step", std::nullopt, std::nullopt}] = {file, 48, 10};
  md.planner_data =
      std::map<std::string, ObjectPath>{{"w", {"w"}}, {"b", {"b"}}, {"step", {"step"}}};
  md.version = "1.0.0";
  return md;
}

TEST(MergeRankLocalMetadataTest, UnitesChunksAndKeepsReplicatedDataOnce) {
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, MergeRankLocalMetadata({RankLocal(0), RankLocal(1)}));
  EXPECT_EQ(std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("w")).chunks.size(), 2u);
  EXPECT_EQ(std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("b")).chunks.size(), 1u);
  EXPECT_EQ(md.storage_data.size(), 4u);
  DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* b, md.FindStorage({"b", Shape{0}, std::nullopt}));
  EXPECT_EQ(b->relative_path, "__0_0.distcp");  // the lowest rank's copy
  DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* w1,
                            md.FindStorage({"w", Shape{2, 0}, std::nullopt}));
  EXPECT_EQ(w1->relative_path, "__1_0.distcp");
  EXPECT_EQ(md.version, "1.0.0");
  EXPECT_EQ(md.planner_data->size(), 3u);
}

TEST(MergeRankLocalMetadataTest, DisagreementIsDataLossNamingTheRank) {
  EXPECT_THAT(MergeRankLocalMetadata({RankLocal(0), RankLocal(1, DType::kFloat16)}),
              StatusIs(StatusCode::kDataLoss, HasSubstr("__1.metadata: tensor \"w\"")));
  Metadata bytes_w = RankLocal(1);
  bytes_w.state_dict_metadata["w"] = BytesStorageMetadata{};
  EXPECT_THAT(MergeRankLocalMetadata({RankLocal(0), bytes_w}),
              StatusIs(StatusCode::kDataLoss, HasSubstr("\"w\" is bytes")));
  // The file named first wins where files disagree.
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, MergeRankLocalMetadata({RankLocal(0), RankLocal(1)}, 1));
  DCPP_ASSERT_OK_AND_ASSIGN(const StorageInfo* b, md.FindStorage({"b", Shape{0}, std::nullopt}));
  EXPECT_EQ(b->relative_path, "__1_0.distcp");
  EXPECT_THAT(MergeRankLocalMetadata({}), StatusIs(StatusCode::kInvalidArgument, HasSubstr("no")));
}

}  // namespace
}  // namespace dcpp
