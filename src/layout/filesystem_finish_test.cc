// FileSystemWriter::PrepareFinish: the commit it starts while the data is written is used only
// for the Metadata it saw; any other Metadata, or one whose entries changed, is committed whole.
#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

Metadata Planned(const std::vector<std::string>& names) {
  Metadata md;
  for (const auto& n : names) {
    md.state_dict_metadata[n] = TensorStorageMetadata{
        {DType::kFloat32, false, MemoryFormat::kContiguous, false, std::nullopt},
        {4},
        {{{0}, {4}}}};
  }
  md.planner_data = std::map<std::string, ObjectPath>{};
  return md;
}

std::vector<std::vector<WriteResult>> Results(const std::vector<std::string>& names) {
  std::vector<WriteResult> out;
  int64_t offset = 0;
  for (const auto& n : names) {
    out.push_back({{n, Shape{0}, 0}, 16, {"__0_0.distcp", offset, 16, {}}, {}, 0});
    offset += 16;
  }
  return {out};
}

std::vector<std::string> KeysOf(const Metadata& md) {
  std::vector<std::string> keys;
  for (const auto& [fqn, m] : md.state_dict_metadata) keys.push_back(fqn);
  return keys;
}

Result<Metadata> Commit(const std::string& dir, const Metadata* prepared, Metadata& md,
                        const std::vector<std::string>& written) {
  DCPP_ASSIGN_OR_RETURN(auto writer, FileSystemWriter::Open(dir));
  DCPP_RETURN_IF_ERROR(writer->SetUp(true, 0, true));
  if (prepared) writer->PrepareFinish(*prepared);
  Status st = writer->Finish(md, Results(written));
  writer->EndSave();
  DCPP_RETURN_IF_ERROR(st);
  DCPP_ASSIGN_OR_RETURN(auto reader, FileSystemReader::Open(dir));
  return reader->ReadMetadata();
}

TEST(FileSystemFinishTest, PreparedCommitGivesTheSameMetadata) {
  TempDir a, b;
  Metadata with = Planned({"a", "b"}), without = Planned({"a", "b"});
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata x, Commit(a.path().string(), &with, with, {"a", "b"}));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata y, Commit(b.path().string(), nullptr, without, {"a", "b"}));
  EXPECT_EQ(KeysOf(x), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(KeysOf(x), KeysOf(y));
  EXPECT_EQ(x.storage_data.size(), 2u);
}

TEST(FileSystemFinishTest, AnotherOrChangedMetadataIsCommittedWhole) {
  TempDir a, b;
  Metadata stale = Planned({"a", "z"}), md = Planned({"a", "b"});
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata x, Commit(a.path().string(), &stale, md, {"a", "b"}));
  EXPECT_EQ(KeysOf(x), (std::vector<std::string>{"a", "b"}));
  // The same object, grown after PrepareFinish saw it.
  Metadata grown = Planned({"a"});
  DCPP_ASSERT_OK_AND_ASSIGN(auto writer, FileSystemWriter::Open(b.path().string()));
  DCPP_ASSERT_OK(writer->SetUp(true, 0, true));
  writer->PrepareFinish(grown);
  grown.state_dict_metadata["c"] = Planned({"c"}).state_dict_metadata["c"];
  DCPP_ASSERT_OK(writer->Finish(grown, Results({"a", "c"})));
  writer->EndSave();
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, FileSystemReader::Open(b.path().string()));
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata y, reader->ReadMetadata());
  EXPECT_EQ(KeysOf(y), (std::vector<std::string>{"a", "c"}));
}

TEST(FileSystemFinishTest, APreparedCheckFailureIsFinishsError) {
  TempDir a;
  Metadata md = Planned({"a"});
  std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("a")).chunks[0].offsets[0] = 2;
  EXPECT_THAT(Commit(a.path().string(), &md, md, {"a"}).status(),
              StatusIs(StatusCode::kDataLoss, HasSubstr("\"a\"")));
}

}  // namespace
}  // namespace dcpp
