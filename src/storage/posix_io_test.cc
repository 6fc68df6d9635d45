#include "storage/posix_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "testing/testing.h"

namespace dcpp::internal {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

std::string Slurp(const std::string& path) {
  uint64_t size = 0;
  auto fd = OpenRegularForRead(path, &size);
  EXPECT_TRUE(fd.ok()) << fd.status().ToString();
  std::string out(size, '\0');
  EXPECT_TRUE(PreadFully(*fd, 0, out.data(), out.size(), path).ok());
  ::close(*fd);
  return out;
}

TEST(PosixIoTest, AppendsBufferSmallWritesAndPassLargeOnesThrough) {
  TempDir dir;
  const std::string path = dir.Join("out.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_WRONLY | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  std::string expected;
  for (size_t n : {size_t{3}, kAppendBufferBytes - 2, size_t{7}, kAppendBufferBytes + 5, size_t{0},
                   size_t{1}}) {
    std::string chunk(n, static_cast<char>('a' + n % 26));
    ASSERT_THAT(file.Append(chunk.data(), chunk.size()), IsOk());
    expected += chunk;
    EXPECT_EQ(file.position(), expected.size());
  }
  ASSERT_THAT(file.Sync(), IsOk());
  ASSERT_THAT(file.Close(), IsOk());
  EXPECT_THAT(file.Close(), StatusIs(StatusCode::kFailedPrecondition, HasSubstr("closed")));
  EXPECT_EQ(Slurp(path), expected);
}

TEST(PosixIoTest, ReadsPastTheEndAreDataLossNamingThePath) {
  TempDir dir;
  const std::string path = dir.Join("f");
  DCPP_ASSERT_OK_AND_ASSIGN(int wfd, OpenFd(path, O_WRONLY | O_CREAT, 0644));
  ASSERT_THAT(WriteFully(wfd, "0123456789", 10, path), IsOk());
  ::close(wfd);
  uint64_t size = 0;
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenRegularForRead(path, &size));
  PosixReadableFile file(fd, size, path);
  char buf[4];
  ASSERT_THAT(file.ReadAt(6, buf, 4), IsOk());
  EXPECT_EQ(std::string(buf, 4), "6789");
  EXPECT_THAT(file.ReadAt(7, buf, 4), StatusIs(StatusCode::kDataLoss, HasSubstr(path)));
  EXPECT_THAT(file.ReadAt(uint64_t{1} << 63, buf, 4),
              StatusIs(StatusCode::kDataLoss, ::testing::_));
}

TEST(PosixIoTest, OnlyRegularFilesAreOpenedForReading) {
  TempDir dir;
  uint64_t size = 0;
  EXPECT_THAT(OpenRegularForRead(dir.Join("absent"), &size),
              StatusIs(StatusCode::kNotFound, HasSubstr("absent")));
  // A FIFO is refused at once instead of blocking for a writer.
  ASSERT_EQ(::mkfifo(dir.Join("fifo").c_str(), 0644), 0);
  EXPECT_THAT(OpenRegularForRead(dir.Join("fifo"), &size),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("not a regular file")));
  EXPECT_THAT(OpenRegularForRead(dir.path().string(), &size),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("not a regular file")));
  // A symbolic link could point out of the checkpoint: it is not followed.
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(dir.Join("real"), O_WRONLY | O_CREAT, 0644));
  ::close(fd);
  std::filesystem::create_symlink(dir.Join("real"), dir.Join("link"));
  EXPECT_THAT(OpenRegularForRead(dir.Join("link"), &size),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("symbolic link")));
}

TEST(PosixIoTest, MakeDirsCreatesParentsAndRefusesFilesInTheWay) {
  TempDir dir;
  ASSERT_THAT(MakeDirs(dir.Join("a/b/c")), IsOk());
  ASSERT_THAT(MakeDirs(dir.Join("a/b/c")), IsOk());
  EXPECT_TRUE(std::filesystem::is_directory(dir.Join("a/b/c")));
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(dir.Join("file"), O_WRONLY | O_CREAT, 0644));
  ::close(fd);
  EXPECT_THAT(MakeDirs(dir.Join("file/x")),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("a file is in the way")));
  EXPECT_THAT(SyncDirectory(dir.Join("a/b")), IsOk());
}

}  // namespace
}  // namespace dcpp::internal
