// core/wire.h: the status envelope of collective messages, refusing what does not decode, and
// the seed corpus of wire_fuzz (envelopes as the collective steps send them).
#include "core/wire.h"

#include "testing/fuzz_seeds.h"
#include "testing/testing.h"

namespace dcpp::internal {
namespace {

using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

std::string Envelope(const Status& s, std::string_view payload) {
  WireWriter w;
  w.Status(s);
  w.Raw(payload);
  return w.Release();
}

TEST(WireTest, EnvelopeCarriesStatusAndPayload) {
  const std::string bytes = Envelope(UnavailableError("rank 2: disk full"), "payload");
  WireReader r(bytes, "collective message");
  Status carried;
  DCPP_ASSERT_OK(r.ReadStatus(&carried));
  EXPECT_EQ(carried.code(), StatusCode::kUnavailable);
  EXPECT_EQ(carried.message(), "rank 2: disk full");
  EXPECT_EQ(r.Rest(), "payload");
  EXPECT_TRUE(r.done());
}

TEST(WireTest, TruncatedEnvelopesAndHugeCodesAreMalformed) {
  const std::string bytes = Envelope(DataLossError("bad"), "");
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    WireReader r(std::string_view(bytes).substr(0, cut), "collective message");
    Status carried;
    EXPECT_THAT(r.ReadStatus(&carried),
                StatusIs(StatusCode::kDataLoss, HasSubstr("collective message")))
        << cut;
  }
  WireWriter w;
  w.U64(256);
  w.Str("x");
  const std::string huge_code = w.Release();  // the reader views it: it must outlive the reader
  WireReader r(huge_code, "collective message");
  Status carried;
  EXPECT_THAT(r.ReadStatus(&carried), StatusIs(StatusCode::kDataLoss, HasSubstr("malformed")));
}

TEST(WireTest, FuzzSeedsAreRealEnvelopes) {
  WireWriter plan_like;
  plan_like.Str("__0_");
  plan_like.U64(1);
  plan_like.Dims({2, 0});
  plan_like.Dims({2, 3});
  const std::map<std::string, std::string> seeds = {
      {"ok_empty.wire", Envelope(Status::Ok(), "")},
      {"ok_payload.wire", Envelope(Status::Ok(), plan_like.Release())},
      {"failed.wire", Envelope(AbortedError("planning failed on rank 1; rank 1: boom"), "")},
  };
  ::dcpp::testing::ExpectFuzzSeeds("wire_fuzz", seeds);
}

}  // namespace
}  // namespace dcpp::internal
