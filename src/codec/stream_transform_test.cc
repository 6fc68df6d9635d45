#include "codec/stream_transform.h"

#include "testing/testing.h"

namespace dcpp::internal {
namespace {

using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

TEST(StreamTransformTest, ZstdRoundTripsAndIsFoundByDescriptor) {
  const std::string blob(100000, 'x');
  DCPP_ASSERT_OK_AND_ASSIGN(std::string frame, ZstdTransform(3).Encode(blob));
  EXPECT_LT(frame.size(), blob.size() / 10);
  DCPP_ASSERT_OK_AND_ASSIGN(const StreamTransform* t, FindStreamTransform("stream.zstd/1"));
  EXPECT_EQ(t->descriptor(), "stream.zstd/1");
  MemorySource src(frame);
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, t->Decode(src, blob.size(), "item"));
  EXPECT_EQ(back, blob);
  EXPECT_THAT(FindStreamTransform("stream.brotli/1"),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("stream.brotli/1")));
}

TEST(StreamTransformTest, DecodingIsCappedAtWhatTheItemCanHold) {
  const std::string blob(1 << 20, '\0');
  DCPP_ASSERT_OK_AND_ASSIGN(std::string frame, ZstdTransform(1).Encode(blob));
  MemorySource src(frame);
  EXPECT_THAT(ZstdTransform(1).Decode(src, 4096, "item \"w\""),
              StatusIs(StatusCode::kDataLoss, HasSubstr("item \"w\"")));
  MemorySource cut(std::string_view(frame).substr(0, frame.size() / 2));
  EXPECT_THAT(ZstdTransform(1).Decode(cut, blob.size(), "item"),
              StatusIs(StatusCode::kDataLoss, ::testing::_));
  MemorySource junk("not a zstd frame at all");
  EXPECT_THAT(ZstdTransform(1).Decode(junk, 100, "item"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("zstd")));
}

}  // namespace
}  // namespace dcpp::internal
