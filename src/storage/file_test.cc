#include "dcpp/file.h"

#include <sys/stat.h>

#include <filesystem>
#include <string>

#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

std::vector<std::string> Names(const TempDir& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    out.push_back(e.path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(FileTest, SinkBuffersSmallWritesAndPassesLargeOnes) {
  TempDir dir;
  const std::string path = dir.Join("out.bin");
  FileSinkOptions options;
  options.buffer_size = 16;
  DCPP_ASSERT_OK_AND_ASSIGN(auto sink, FileSink::Open(path, options));
  std::string expected;
  for (size_t n : {3, 5, 7, 100, 1, 15, 16, 17, 0, 4}) {
    std::string chunk(n, static_cast<char>('a' + n % 26));
    ASSERT_THAT(sink->Write(chunk.data(), chunk.size()), IsOk());
    expected += chunk;
    EXPECT_EQ(sink->position(), expected.size());
  }
  EXPECT_EQ(sink->name(), path);
  ASSERT_THAT(sink->Sync(), IsOk());
  ASSERT_THAT(sink->Close(), IsOk());
  EXPECT_THAT(sink->Write("x", 1), StatusIs(StatusCode::kFailedPrecondition, HasSubstr(path)));
  EXPECT_THAT(sink->Close(), StatusIs(StatusCode::kFailedPrecondition, HasSubstr(path)));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string got, ReadFile(path));
  EXPECT_EQ(got, expected);
}

TEST(FileTest, SinkTruncatesOrRefusesExistingFiles) {
  TempDir dir;
  const std::string path = dir.Join("f");
  ASSERT_THAT(WriteFileAtomic(path, "old content"), IsOk());
  {
    DCPP_ASSERT_OK_AND_ASSIGN(auto sink, FileSink::Open(path));
    ASSERT_THAT(sink->Write("new", 3), IsOk());
    // Destructor flushes and closes.
  }
  EXPECT_EQ(*ReadFile(path), "new");
  FileSinkOptions excl;
  excl.exclusive = true;
  EXPECT_THAT(FileSink::Open(path, excl).status(),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr(path)));
}

TEST(FileTest, SourceReadsRangesAndRejectsPastTheEnd) {
  TempDir dir;
  const std::string path = dir.Join("src.bin");
  std::string content(10000, '\0');
  for (size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>(i * 7);
  ASSERT_THAT(WriteFileAtomic(path, content), IsOk());
  DCPP_ASSERT_OK_AND_ASSIGN(auto source, FileSource::Open(path));
  EXPECT_EQ(source->size(), content.size());
  EXPECT_EQ(source->name(), path);
  EXPECT_EQ(source->Peek(0, 1), nullptr);
  std::string buf(100, '\0');
  ASSERT_THAT(source->ReadAt(9900, buf.data(), 100), IsOk());
  EXPECT_EQ(buf, content.substr(9900));
  ASSERT_THAT(source->ReadAt(10000, buf.data(), 0), IsOk());
  EXPECT_THAT(
      source->ReadAt(9901, buf.data(), 100),
      StatusIs(StatusCode::kDataLoss, ::testing::AllOf(HasSubstr(path), HasSubstr("9901"))));
  EXPECT_THAT(source->ReadAt(~0ull, buf.data(), 2),
              StatusIs(StatusCode::kDataLoss, HasSubstr(path)));
}

TEST(FileTest, MissingFilesAreNotFoundNamingThePath) {
  TempDir dir;
  const std::string path = dir.Join("nope");
  EXPECT_THAT(FileSource::Open(path).status(), StatusIs(StatusCode::kNotFound, HasSubstr(path)));
  EXPECT_THAT(ReadFile(path).status(), StatusIs(StatusCode::kNotFound, HasSubstr(path)));
  EXPECT_THAT(FileSink::Open(dir.Join("no/such/dir")).status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("no/such/dir")));
  EXPECT_THAT(FileSource::Open(dir.path().string()).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("directory")));
  EXPECT_THAT(SyncDirectory(dir.Join("nope")), StatusIs(StatusCode::kNotFound, HasSubstr("nope")));
}

TEST(FileTest, WriteFileAtomicReplacesAndLeavesNoTemporaries) {
  TempDir dir;
  const std::string path = dir.Join("ckpt.pt");
  ASSERT_THAT(WriteFileAtomic(path, "first"), IsOk());
  ASSERT_THAT(WriteFileAtomic(path,
                              [](ByteSink& sink) {
                                DCPP_RETURN_IF_ERROR(sink.Write("sec", 3));
                                return sink.Write("ond", 3);
                              }),
              IsOk());
  EXPECT_EQ(*ReadFile(path), "second");
  EXPECT_EQ(Names(dir), std::vector<std::string>{"ckpt.pt"});
}

TEST(FileTest, WriteFileAtomicFailureKeepsTheOldFile) {
  TempDir dir;
  const std::string path = dir.Join("ckpt.pt");
  ASSERT_THAT(WriteFileAtomic(path, "old"), IsOk());
  Status s = WriteFileAtomic(path, [](ByteSink& sink) {
    DCPP_RETURN_IF_ERROR(sink.Write("partial", 7));
    return UnavailableError("disk went away");
  });
  EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable, HasSubstr("disk went away")));
  EXPECT_EQ(*ReadFile(path), "old");
  EXPECT_EQ(Names(dir), std::vector<std::string>{"ckpt.pt"});
  // A directory in the target's place makes the rename fail; the temporary is cleaned up.
  const std::string blocked = dir.Join("blocked");
  std::filesystem::create_directory(blocked);
  std::filesystem::create_directory(blocked + "/child");
  EXPECT_FALSE(WriteFileAtomic(blocked, "x").ok());
  EXPECT_EQ(Names(dir), (std::vector<std::string>{"blocked", "ckpt.pt"}));
}

}  // namespace
}  // namespace dcpp
