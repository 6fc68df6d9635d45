#include "convert/torch_file.h"

#include <sys/stat.h>

#include "dcpp/storage.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

Value OneTensor() {
  Value v = Value::MakeDict();
  v.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {4, 4})));
  return v;
}

TEST(TorchFileTest, FilesUseTheBasenameAsArchiveName) {
  TempDir dir;
  const std::string path = dir.Join("my.model.pt");
  const Value v = OneTensor();
  ASSERT_THAT(SaveTorchFile(v, path), IsOk());
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, LoadTorchFile(path));
  EXPECT_TRUE(back == v);
  DCPP_ASSERT_OK_AND_ASSIGN(StoreFile f, OpenStoreFile(path));
  DCPP_ASSERT_OK_AND_ASSIGN(auto source, f.store->OpenRead(f.key));
  DCPP_ASSERT_OK_AND_ASSIGN(TorchSaveArchive a, TorchSaveArchive::Open(*source));
  EXPECT_EQ(a.prefix(), "my.model");
  EXPECT_THAT(LoadTorchFile(dir.Join("absent.pt")).status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("absent.pt")));
}

TEST(TorchFileTest, FileUrlsAndPlainPathsAreTheSameFile) {
  TempDir dir;
  ASSERT_THAT(SaveTorchFile(OneTensor(), "file://" + dir.Join("a.pt")), IsOk());
  DCPP_ASSERT_OK_AND_ASSIGN(Value back, LoadTorchFile(dir.Join("a.pt")));
  EXPECT_TRUE(back == OneTensor());
  DCPP_ASSERT_OK_AND_ASSIGN(CheckpointFormat f, DetectFormat("file://" + dir.Join("a.pt")));
  EXPECT_EQ(f, CheckpointFormat::kTorchSave);
  EXPECT_THAT(SaveTorchFile(OneTensor(), "nosuch://x/a.pt"),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("nosuch://")));
}

TEST(TorchFileTest, DetectFormatNamesWhatItFound) {
  TempDir dir;
  EXPECT_THAT(DetectFormat(dir.Join("absent")),
              StatusIs(StatusCode::kNotFound, HasSubstr("absent")));
  EXPECT_THAT(DetectFormat(dir.path().string()),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("without DCP metadata")));
  ASSERT_EQ(::mkfifo(dir.Join("fifo").c_str(), 0644), 0);
  EXPECT_THAT(DetectFormat(dir.Join("fifo")),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("not a regular file")));
}

}  // namespace
}  // namespace dcpp
