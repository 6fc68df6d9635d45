// Hostile `.metadata` contents: every size read from the file is checked before it is used, so
// each of these is a DataLoss naming the key instead of an overflow, a crash or a huge allocation.
#include "dcpp/metadata.h"

#include <limits>

#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

// One float32 tensor "w" of `size` with one chunk and its blob.
Metadata OneTensor(Shape size, ChunkBox chunk, int64_t blob_length) {
  Metadata md;
  TensorStorageMetadata t;
  t.size = std::move(size);
  t.chunks = {chunk};
  md.state_dict_metadata["w"] = t;
  md.storage_data[MetadataIndex{"w", chunk.offsets, std::nullopt}] =
      StorageInfo{"__0_0.distcp", 0, blob_length, {}};
  return md;
}

Status RoundTrip(const Metadata& md) {
  auto bytes = EncodeMetadata(md);
  if (!bytes.ok()) return bytes.status();
  return ParseMetadata(*bytes).status();
}

TEST(MetadataHostileTest, ElementCountsThatOverflowAreRefused) {
  const int64_t big = int64_t{1} << 40;
  EXPECT_THAT(RoundTrip(OneTensor({big, big}, {{0, 0}, {1, 1}}, 1000)),
              StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("\"w\""), HasSubstr("overflows"))));
  EXPECT_THAT(RoundTrip(OneTensor({int64_t{1} << 32, int64_t{1} << 32}, {{0, 0}, {1, 1}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("overflows")));
  EXPECT_THAT(RoundTrip(OneTensor({-4, 2}, {{0, 0}, {0, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("negative")));
}

TEST(MetadataHostileTest, ChunksOutsideTheirTensorAreRefusedWithoutWrapping) {
  const int64_t near = std::numeric_limits<int64_t>::max() - 2;
  EXPECT_THAT(RoundTrip(OneTensor({8, 2}, {{near, 0}, {8, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("does not fit")));
  EXPECT_THAT(RoundTrip(OneTensor({8, 2}, {{-2, 0}, {4, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("\"w\""), HasSubstr("negative"))));
  EXPECT_THAT(RoundTrip(OneTensor({8, 2}, {{4, 0}, {8, 2}}, 1000)),
              StatusIs(StatusCode::kDataLoss, HasSubstr("does not fit")));
}

TEST(MetadataHostileTest, AChunkCannotHoldMoreBytesThanItsBlob) {
  // 2^20 x 2^20 float32 (4 TiB) claimed by a 1000-byte blob: refused before any allocation.
  const int64_t m = int64_t{1} << 20;
  EXPECT_THAT(RoundTrip(OneTensor({m, m}, {{0, 0}, {m, m}}, 1000)),
              StatusIs(StatusCode::kDataLoss, AllOf(HasSubstr("needs"), HasSubstr("1000"))));
  EXPECT_TRUE(RoundTrip(OneTensor({4, 4}, {{0, 0}, {4, 4}}, 64 + 700)).ok());
}

TEST(MetadataHostileTest, PlannerDataListHolesAreBounded) {
  Metadata md = OneTensor({4}, {{0}, {4}}, 1000);
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{1} << 40}}};
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("list index")));
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{-1}}}};
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("list index -1")));
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{0}}}};
  EXPECT_TRUE(RoundTrip(md).ok());
  // Empty dicts leave no entry, so a real list index may exceed the number of entries: a
  // layer list whose first modules hold nothing, saved by PyTorch as ('layers', 3, 'w').
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"layers", int64_t{3}, "w"}}};
  EXPECT_TRUE(RoundTrip(md).ok());
  // The holes of all lists together are bounded: two lists with 2^19 + 1 holes each are not.
  md = OneTensor({4}, {{0}, {4}}, 1000);
  md.state_dict_metadata["v"] = BytesStorageMetadata{};
  md.storage_data[MetadataIndex{"v", std::nullopt, std::nullopt}] =
      StorageInfo{"__0_0.distcp", 0, 10, {}};
  const int64_t half = (int64_t{1} << 19) + 1;
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"a", half}}, {"v", {"b", half}}};
  EXPECT_THAT(RoundTrip(md), StatusIs(StatusCode::kDataLoss, HasSubstr("missing elements")));
  md.planner_data = std::map<std::string, ObjectPath>{{"w", {"a", half}}, {"v", {"a", int64_t{0}}}};
  EXPECT_TRUE(RoundTrip(md).ok());
}

}  // namespace
}  // namespace dcpp
