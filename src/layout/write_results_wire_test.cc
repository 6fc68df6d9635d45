// The write-results wire encoding: round trip, truncation, and the seed corpus of
// write_results_fuzz (results of real writes to a temporary directory).
#include "dcpp/layout.h"
#include "dcpp/planner.h"
#include "testing/fuzz_seeds.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

Value StateDict() {
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {4, 8})));
  sd.Set("e", Value::FromTensor(PatternTensor(DType::kBFloat16, {0, 3})));
  sd.Set("step", Value::Int(12));
  sd.Set("names", Value::MakeList({Value::Str("a"), Value::Str("b")}));
  return sd;
}

// What one rank's real write returns, with `options`, in a fresh directory.
Result<std::vector<WriteResult>> RealWrite(const TempDir& tmp, const std::string& name,
                                           FileSystemWriterOptions options) {
  const Value sd = StateDict();
  DefaultSavePlanner planner;
  DCPP_RETURN_IF_ERROR(planner.SetUp(sd, true));
  DCPP_ASSIGN_OR_RETURN(SavePlan local, planner.CreateLocalPlan());
  DCPP_ASSIGN_OR_RETURN(auto writer, FileSystemWriter::Open(tmp.Join(name), options));
  DCPP_RETURN_IF_ERROR(writer->SetUp(true, 0, true));
  DCPP_ASSIGN_OR_RETURN(local, writer->PrepareLocalPlan(std::move(local)));
  DCPP_ASSIGN_OR_RETURN(auto global, planner.CreateGlobalPlan({local}));
  DCPP_ASSIGN_OR_RETURN(auto plans, writer->PrepareGlobalPlan(std::move(global.first)));
  DCPP_ASSIGN_OR_RETURN(SavePlan mine, planner.FinishPlan(plans[0]));
  return writer->WriteData(mine, planner);
}

TEST(WriteResultsWireTest, RoundTripsAndRefusesEveryTruncation) {
  TempDir tmp;
  DCPP_ASSERT_OK_AND_ASSIGN(auto results, RealWrite(tmp, "ckpt", {}));
  ASSERT_EQ(results.size(), 4u);
  const std::string bytes = EncodeWriteResults(results);
  DCPP_ASSERT_OK_AND_ASSIGN(auto back, DecodeWriteResults(bytes));
  ASSERT_EQ(back.size(), results.size());
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(back[i].index, results[i].index);
    EXPECT_EQ(back[i].size_in_bytes, results[i].size_in_bytes);
    EXPECT_EQ(back[i].storage_data, results[i].storage_data);
  }
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    EXPECT_THAT(DecodeWriteResults(std::string_view(bytes).substr(0, cut)),
                StatusIs(StatusCode::kDataLoss, HasSubstr("write results")))
        << cut;
  }
  EXPECT_THAT(DecodeWriteResults(bytes + "x"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("write results")));
}

TEST(WriteResultsWireTest, ACountBeyondTheResultsPresentIsMalformed) {
  // 80 zero bytes decode as one empty result; a count of 2^24 over 2^24 such bytes passes the
  // count's bound but not the decoding. The results are grown as they decode, not sized by the
  // count up front (2^24 WriteResults are gigabytes).
  const uint64_t count = uint64_t{1} << 24;
  std::string bytes(8 + count, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(count >> (8 * i));
  EXPECT_THAT(DecodeWriteResults(bytes), StatusIs(StatusCode::kDataLoss, HasSubstr("malformed")));
  bytes.resize(8 + 80);  // index, size, storage info (64 bytes), no checksums (16)
  bytes[3] = 0;
  bytes[0] = 1;  // a count of 1: the one empty result decodes
  DCPP_ASSERT_OK_AND_ASSIGN(auto one, DecodeWriteResults(bytes));
  EXPECT_EQ(one.size(), 1u);
}

TEST(WriteResultsWireTest, FuzzSeedsAreRealResults) {
  TempDir tmp;
  std::map<std::string, std::string> seeds;
  seeds["empty.results"] = EncodeWriteResults({});
  FileSystemWriterOptions per_item;
  per_item.single_file_per_rank = false;
  FileSystemWriterOptions zstd;
  zstd.zstd_level = 3;
  FileSystemWriterOptions threads;
  threads.thread_count = 2;
  threads.sync_files = false;
  const std::map<std::string, FileSystemWriterOptions> variants = {
      {"single_file", {}}, {"per_item", per_item}, {"zstd", zstd}, {"two_threads", threads}};
  for (const auto& [name, options] : variants) {
    DCPP_ASSERT_OK_AND_ASSIGN(auto results, RealWrite(tmp, name, options));
    seeds[name + ".results"] = EncodeWriteResults(results);
  }
  ::dcpp::testing::ExpectFuzzSeeds("write_results_fuzz", seeds);
}

}  // namespace
}  // namespace dcpp
