#include "storage/posix_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

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

// Bytes that differ at every offset, so a chunk written at the wrong place shows.
std::string Pattern(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    s[i] = static_cast<char>(x >> 24);
  }
  return s;
}

uint64_t FileSize(int fd) {
  struct stat st;
  EXPECT_EQ(::fstat(fd, &st), 0);
  return static_cast<uint64_t>(st.st_size);
}

// Whether this directory's file system takes O_DIRECT at all (ext4 does, some tmpfs do not).
bool SupportsODirect(const std::string& dir) {
  const std::string probe = dir + "/odirect-probe";
  int fd = ::open(probe.c_str(), O_RDWR | O_CREAT | O_DIRECT, 0644);
  if (fd >= 0) ::close(fd);
  ::unlink(probe.c_str());
  return fd >= 0;
}

// Large buffered appends go out in write-behind pieces: every byte lands at its offset whatever
// the pieces' boundaries (a piece and a half, exactly two, one byte more).
// A buffered file (direct I/O off for the test) in a fresh directory; each test checks the
// whole file against `expected_`.
class BufferedFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetDirectIoForTesting(0);
    DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path_, O_RDWR | O_CREAT | O_TRUNC, 0644));
    file_ = std::make_unique<PosixWritableFile>(fd, path_);
  }
  void ExpectWholeFile() {
    ASSERT_THAT(file_->Sync(), IsOk());
    ASSERT_THAT(file_->Close(), IsOk());
    EXPECT_TRUE(Slurp(path_) == expected_);
  }
  void TearDown() override { SetDirectIoForTesting(-1); }

  TempDir dir_;
  const std::string path_ = dir_.Join("pieces.bin");
  std::unique_ptr<PosixWritableFile> file_;
  std::string expected_;
};

TEST_F(BufferedFileTest, LargeAppendsInPiecesKeepEveryByte) {
  uint32_t seed = 1;
  for (size_t n : {size_t{11}, kWriteBehindBytes + kWriteBehindBytes / 2, size_t{5},
                   2 * kWriteBehindBytes, kWriteBehindBytes + 1}) {
    const std::string chunk = Pattern(n, seed++);
    ASSERT_THAT(file_->Append(chunk.data(), chunk.size()), IsOk());
    expected_ += chunk;
    EXPECT_EQ(file_->position(), expected_.size());
  }
  ExpectWholeFile();
}

// Direct I/O is the default unless DCPP_DIRECT_IO=0; these tests turn it on for their duration
// whatever the environment says.
class DirectIo {
 public:
  DirectIo() { SetDirectIoForTesting(1); }
  ~DirectIo() { SetDirectIoForTesting(-1); }
};

TEST(PosixIoTest, DirectWritesKeepEveryByteAndTheExactLength) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("big.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  std::string expected;
  auto append = [&](size_t n) {
    const std::string chunk = Pattern(n, static_cast<uint32_t>(expected.size()));
    ASSERT_THAT(file.Append(chunk.data(), chunk.size()), IsOk());
    expected += chunk;
    ASSERT_EQ(file.position(), expected.size());
  };
  // Buffered at first, and the switch happens in the middle of an unaligned block.
  append(100);
  append(kDirectAfterBytes / 2);
  EXPECT_FALSE(file.direct());
  append(kDirectAfterBytes + 13);
  if (SupportsODirect(dir.path().string())) {
    EXPECT_TRUE(file.direct());
  }
  // Small appends across chunk boundaries, a sync with a partial chunk, then more.
  for (int i = 0; i < 3000; ++i) append(4097);
  ASSERT_THAT(file.Sync(), IsOk());
  EXPECT_EQ(FileSize(fd), expected.size());  // the padding of the last block is cut off
  EXPECT_EQ(Slurp(path), expected);
  append(kDirectChunkBytes * 2 + 7);
  // A large append goes through the staging chunks.
  append(3 * kDirectChunkBytes + 5);
  append(1);
  ASSERT_THAT(file.Sync(), IsOk());
  EXPECT_EQ(FileSize(fd), expected.size());
  ASSERT_THAT(file.Close(), IsOk());
  EXPECT_EQ(Slurp(path), expected);
}

// Bytes this process has handed to write calls so far (/proc/self/io's wchar), or -1.
int64_t BytesWritten() {
  std::ifstream io("/proc/self/io");
  std::string key;
  int64_t value;
  while (io >> key >> value) {
    if (key == "wchar:") return value;
  }
  return -1;
}

// A Sync writes the partial last chunk; a Close right after it has nothing left to write (it
// rewrote the whole tail once: up to a chunk per data file, and the whole `.metadata`).
TEST(PosixIoTest, CloseAfterSyncDoesNotWriteTheTailAgain) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("tail.bin");
  if (!SupportsODirect(dir.path().string()) || BytesWritten() < 0) {
    GTEST_SKIP() << "no O_DIRECT or no /proc/self/io here";
  }
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  const std::string bytes = Pattern(kDirectAfterBytes + kDirectChunkBytes / 2 + 13, 5);
  ASSERT_THAT(file.Append(bytes.data(), bytes.size()), IsOk());
  ASSERT_TRUE(file.direct());
  ASSERT_THAT(file.Sync(), IsOk());
  const int64_t before = BytesWritten();
  ASSERT_THAT(file.Close(), IsOk());
  EXPECT_EQ(BytesWritten() - before, 0);
  EXPECT_EQ(Slurp(path), bytes);
  // An append after a Sync is still flushed by the Close.
  DCPP_ASSERT_OK_AND_ASSIGN(int fd2, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile again(fd2, path);
  ASSERT_THAT(again.Append(bytes.data(), bytes.size()), IsOk());
  ASSERT_THAT(again.Sync(), IsOk());
  ASSERT_THAT(again.Append("tail", 4), IsOk());
  ASSERT_THAT(again.Close(), IsOk());
  EXPECT_EQ(Slurp(path), bytes + "tail");
}

// Appends patterned bytes to a file from an aligned buffer of `capacity` bytes, `misalign` bytes
// into it, and keeps what the file must then hold.
class AlignedAppender {
 public:
  AlignedAppender(PosixWritableFile& file, size_t capacity)
      : file_(file), buf_(static_cast<char*>(std::aligned_alloc(kDirectAlign, capacity))) {}
  bool ok() const { return buf_ != nullptr; }
  void Append(size_t n, size_t misalign) {
    const std::string bytes = Pattern(n, static_cast<uint32_t>(expected_.size()) * 7 + 1);
    std::memcpy(buf_.get() + misalign, bytes.data(), n);
    ASSERT_THAT(file_.Append(buf_.get() + misalign, n), IsOk());
    expected_ += bytes;
    ASSERT_EQ(file_.position(), expected_.size());
  }
  const std::string& expected() const { return expected_; }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  PosixWritableFile& file_;
  std::unique_ptr<char, Free> buf_;
  std::string expected_;
};

// Aligned buffers at aligned positions are written from where they lie; whatever is not (a
// buffer's unaligned end, an unaligned buffer, a position that lost its alignment) goes through
// the staging chunks, and every byte lands in place.
TEST(PosixIoTest, AlignedAppendsAreWrittenInPlaceAndMixWithCopiedOnes) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("aligned.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  AlignedAppender a(file, 3 * kDirectChunkBytes);
  ASSERT_TRUE(a.ok());
  a.Append(2 * kDirectChunkBytes, 0);  // the switch at offset 0, then in place
  if (SupportsODirect(dir.path().string())) {
    EXPECT_TRUE(file.direct());
  }
  a.Append(4 * kDirectAlign, 0);         // in place, less than a chunk
  a.Append(kDirectChunkBytes + 100, 0);  // in place, then 100 bytes into a chunk
  a.Append(5 * kDirectAlign, 0);         // the position is unaligned now: copied
  a.Append(kDirectAlign - 100, 0);       // realigns the position through the chunk
  a.Append(3 * kDirectAlign + 1, 0);     // still copied: the chunk is not empty
  a.Append(kDirectChunkBytes, 8);        // an unaligned buffer: copied
  ASSERT_THAT(file.Sync(), IsOk());      // a partial chunk, written padded and cut back
  EXPECT_EQ(FileSize(fd), a.expected().size());
  EXPECT_TRUE(Slurp(path) == a.expected());  // no diff of megabytes on failure
  a.Append(2 * kDirectAlign, 0);
  ASSERT_THAT(file.Close(), IsOk());
  EXPECT_TRUE(Slurp(path) == a.expected());  // no diff of megabytes on failure
}

// Several staging chunks are in flight at once: copied appends that fill the ring many times
// over, an in-place write while copied chunks are still being written, and copied ones after it
// all land where they belong.
TEST(PosixIoTest, ChunksInFlightTogetherLandInPlace) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("ring.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  AlignedAppender a(file, 2 * kDirectChunkBytes);
  ASSERT_TRUE(a.ok());
  a.Append(kDirectAfterBytes + 1, 1);  // buffered, then direct from an unaligned position
  for (int i = 0; i < 3 * kDirectChunks; ++i) a.Append(kDirectChunkBytes - 1000 + i, 3);
  // Top up to a chunk boundary, so the next aligned buffer is written in place while the ring
  // still holds copied chunks.
  a.Append(kDirectChunkBytes - a.expected().size() % kDirectChunkBytes, 1);
  a.Append(kDirectChunkBytes + kDirectAlign, 0);
  for (int i = 0; i < 2 * kDirectChunks; ++i) a.Append(kDirectChunkBytes / 3 + i, 2);
  ASSERT_THAT(file.Sync(), IsOk());
  EXPECT_EQ(FileSize(fd), a.expected().size());
  ASSERT_THAT(file.Close(), IsOk());
  EXPECT_TRUE(Slurp(path) == a.expected());  // no diff of megabytes on failure
}

// Lent writes keep their buffers only until Settle says so: the caller refills the oldest
// buffer as soon as Settle(depth - 1) returns, so a write still reading it would land the new
// bytes. Unlendable ones (an unaligned buffer or length, a position a copied append unaligned)
// are written before WriteLent returns, and appends between lent writes keep their order.
TEST(PosixIoTest, LentBuffersComeBackOnlyWhenWrittenAndLandInOrder) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("lent.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  const size_t depth = file.lent_depth();
  ASSERT_GE(depth, 1u);  // not in direct I/O yet, but it will try
  constexpr size_t kBuf = 2 * kDirectChunkBytes;
  std::vector<std::unique_ptr<char, Free>> bufs;
  for (size_t i = 0; i <= depth; ++i) {
    bufs.emplace_back(static_cast<char*>(std::aligned_alloc(kDirectAlign, kBuf)));
    ASSERT_NE(bufs.back(), nullptr);
  }
  std::string expected;
  size_t next = 0, lent = 0;
  // Fills the next buffer (the oldest, once settled) with fresh bytes and lends n of them.
  auto lend = [&](size_t n, size_t misalign = 0) {
    if (lent >= depth) {
      ASSERT_THAT(file.Settle(depth - 1), IsOk());
      EXPECT_LE(file.lent_in_flight(), depth - 1);
    }
    char* b = bufs[next].get();
    next = (next + 1) % bufs.size();
    ++lent;
    const std::string bytes = Pattern(n, static_cast<uint32_t>(expected.size()) * 3 + 7);
    std::memcpy(b + misalign, bytes.data(), n);
    ASSERT_THAT(file.WriteLent(b + misalign, n), IsOk());
    expected += bytes;
    ASSERT_EQ(file.position(), expected.size());
  };
  for (int i = 0; i < 4 * static_cast<int>(depth) + 3; ++i) lend(kBuf - (i % 3) * kDirectAlign);
  if (SupportsODirect(dir.path().string())) {
    EXPECT_TRUE(file.direct());
  }
  lend(kDirectChunkBytes + 5);  // an unaligned length: written at once
  EXPECT_EQ(file.lent_in_flight(), 0u);
  const std::string mid = Pattern(kDirectAlign - 5, 99);  // realigns the position
  ASSERT_THAT(file.Append(mid.data(), mid.size()), IsOk());
  expected += mid;
  lend(kDirectChunkBytes, 16);  // an unaligned buffer: written at once
  for (int i = 0; i < 2 * static_cast<int>(depth); ++i) lend(kDirectChunkBytes);
  ASSERT_THAT(file.Sync(), IsOk());  // settles everything first
  EXPECT_EQ(file.lent_in_flight(), 0u);
  EXPECT_EQ(FileSize(fd), expected.size());
  lend(kDirectChunkBytes);
  ASSERT_THAT(file.Close(), IsOk());     // and so does Close
  EXPECT_TRUE(Slurp(path) == expected);  // no diff of megabytes on failure
}

// A real full file system (a tmpfs of 6 MiB, which takes O_DIRECT on recent kernels): the
// failed lent write is reported, as ENOSPC naming the file, by the WriteLent, Settle or Sync
// that learns of it, every later call repeats it, and nothing waits forever.
TEST(PosixIoTest, LentWritesToAFullFileSystemFailNamingTheFile) {
  DirectIo on;
  TempDir dir;
  const std::string mnt = dir.Join("tmpfs");
  ASSERT_EQ(::mkdir(mnt.c_str(), 0755), 0);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=6m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (" << std::strerror(errno) << ")";
  }
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  const std::string path = mnt + "/full.bin";
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  constexpr size_t kBuf = 2 << 20;
  std::vector<std::unique_ptr<char, Free>> bufs;
  for (size_t i = 0; i <= file.lent_depth(); ++i) {
    bufs.emplace_back(static_cast<char*>(std::aligned_alloc(kDirectAlign, kBuf)));
    ASSERT_NE(bufs.back(), nullptr);
    std::memset(bufs.back().get(), 'x', kBuf);
  }
  Status failed;
  for (size_t i = 0; i < 8 && failed.ok(); ++i) {  // 16 MiB into 6
    if (i >= file.lent_depth()) failed = file.Settle(file.lent_depth() - 1);
    if (failed.ok()) failed = file.WriteLent(bufs[i % bufs.size()].get(), kBuf);
  }
  if (failed.ok()) failed = file.Sync();
  EXPECT_THAT(failed, StatusIs(StatusCode::kUnavailable, HasSubstr(path)));
  // Settle waits for what is still in flight even after a failure, and repeats it.
  EXPECT_THAT(file.Settle(0), StatusIs(StatusCode::kUnavailable, HasSubstr(path)));
  EXPECT_EQ(file.lent_in_flight(), 0u);
  EXPECT_THAT(file.WriteLent(bufs[0].get(), kBuf),
              StatusIs(StatusCode::kUnavailable, HasSubstr(path)));
  EXPECT_THAT(file.Sync(), StatusIs(StatusCode::kUnavailable, HasSubstr(path)));
  EXPECT_THAT(file.Close(), StatusIs(StatusCode::kUnavailable, HasSubstr(path)));
}

// Where the file is not in direct I/O (turned off, or still small), lent writes are ordinary
// appends.
TEST(PosixIoTest, LentWritesToABufferedFileAreAppends) {
  SetDirectIoForTesting(0);
  TempDir dir;
  const std::string path = dir.Join("lent-buffered.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  EXPECT_EQ(file.lent_depth(), 0u);  // callers had better write from a thread of their own
  const std::string a = Pattern(3 * kDirectAlign, 1), b = Pattern(kDirectChunkBytes + 3, 2);
  ASSERT_THAT(file.WriteLent(a.data(), a.size()), IsOk());
  ASSERT_THAT(file.WriteLent(b.data(), b.size()), IsOk());
  EXPECT_EQ(file.lent_in_flight(), 0u);
  EXPECT_FALSE(file.direct());
  ASSERT_THAT(file.Close(), IsOk());
  SetDirectIoForTesting(-1);
  EXPECT_TRUE(Slurp(path) == a + b);
}

TEST(PosixIoTest, DirectWritesEndingOnAChunkBoundaryNeedNoTail) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("exact.bin");
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  const std::string bytes = Pattern(2 * kDirectChunkBytes, 7);
  ASSERT_THAT(file.Append(bytes.data(), bytes.size()), IsOk());
  ASSERT_THAT(file.Close(), IsOk());  // no Sync: Close alone leaves the whole file
  EXPECT_EQ(Slurp(path), bytes);
}

TEST(PosixIoTest, AWriteOnlyDescriptorStaysBufferedAndCorrect) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("wo.bin");
  // Write-only: the partial block before the switch cannot be read back.
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_WRONLY | O_CREAT | O_TRUNC, 0644));
  PosixWritableFile file(fd, path);
  std::string expected = Pattern(101, 1) + Pattern(kDirectAfterBytes + 5, 2);
  ASSERT_THAT(file.Append(expected.data(), 101), IsOk());
  ASSERT_THAT(file.Append(expected.data() + 101, expected.size() - 101), IsOk());
  EXPECT_FALSE(file.direct());
  ASSERT_THAT(file.Sync(), IsOk());
  ASSERT_THAT(file.Close(), IsOk());
  EXPECT_EQ(Slurp(path), expected);
}

TEST(PosixIoTest, LargeReadsGiveTheSameBytesCachedOrNot) {
  DirectIo on;
  TempDir dir;
  const std::string path = dir.Join("big.bin");
  const std::string bytes = Pattern(3 * kDirectChunkBytes + 12345, 9);
  {
    DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
    PosixWritableFile file(fd, path);
    ASSERT_THAT(file.Append(bytes.data(), bytes.size()), IsOk());
    ASSERT_THAT(file.Sync(), IsOk());
    ASSERT_THAT(file.Close(), IsOk());
  }
  uint64_t size = 0;
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenRegularForRead(path, &size));
  ASSERT_EQ(size, bytes.size());
  // Out of the page cache, so the direct path is taken where the file system has one.
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  PosixReadableFile file(fd, size, path);
  struct Range {
    uint64_t offset;
    size_t n;
  };
  for (const Range r : {Range{0, bytes.size()}, Range{77, kDirectReadBytes + 5},
                        Range{kDirectChunkBytes - 3, 2 * kDirectChunkBytes + 1},
                        Range{bytes.size() - kDirectReadBytes - 1, kDirectReadBytes + 1},
                        Range{4096, 2 * kDirectChunkBytes}, Range{5, 100}}) {
    std::string out(r.n, '\0');
    ASSERT_THAT(file.ReadAt(r.offset, out.data(), out.size()), IsOk());
    EXPECT_TRUE(out == bytes.substr(r.offset, r.n)) << "offset " << r.offset << " n " << r.n;
  }
  // Half in the page cache (just read buffered), half not.
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  std::string half(kDirectChunkBytes, '\0');
  ASSERT_THAT(PreadFully(fd, 0, half.data(), half.size(), path), IsOk());
  std::string out(bytes.size() - 10, '\0');
  ASSERT_THAT(file.ReadAt(10, out.data(), out.size()), IsOk());
  EXPECT_TRUE(out == bytes.substr(10));
  std::string past(kDirectReadBytes, '\0');
  EXPECT_THAT(file.ReadAt(bytes.size() - 100, past.data(), past.size()),
              StatusIs(StatusCode::kDataLoss, HasSubstr("past the end")));
}

// Pages of [offset, offset + n) of `fd` the page cache holds.
size_t CachedPages(int fd, uint64_t offset, size_t n) {
  void* map = ::mmap(nullptr, n, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  if (map == MAP_FAILED) return 0;
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in((n + page - 1) / page);
  size_t cached = 0;
  if (::mincore(map, n, in.data()) == 0) {
    for (unsigned char c : in) cached += c & 1;
  }
  ::munmap(map, n);
  return cached;
}

TEST(PosixIoTest, PrefetchReadsAheadWhatThePageCacheLacksAndNothingPastTheEnd) {
  TempDir dir;
  const std::string path = dir.Join("ahead.bin");
  const size_t kRange = 1 << 20;
  const std::string bytes = Pattern(4 * kRange, 5);
  {
    DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenFd(path, O_RDWR | O_CREAT | O_TRUNC, 0644));
    ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
  }
  uint64_t size = 0;
  DCPP_ASSERT_OK_AND_ASSIGN(int fd, OpenRegularForRead(path, &size));
  PosixReadableFile file(fd, size, path);
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  if (CachedPages(fd, kRange, kRange) != 0) {
    GTEST_SKIP() << "this file system keeps its pages (tmpfs)";
  }
  // A range out of the cache is read ahead (asynchronously: waited for, with a generous bound).
  file.Prefetch(kRange, kRange);
  const size_t pages = kRange / static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  for (int i = 0; i < 1000 && CachedPages(fd, kRange, kRange) < pages; ++i) ::usleep(10000);
  EXPECT_EQ(CachedPages(fd, kRange, kRange), pages);
  // A cached range, an empty one and ones at or past the end are no-ops that do not fail.
  file.Prefetch(kRange, kRange);
  file.Prefetch(0, 0);
  file.Prefetch(size - 1, kRange);
  file.Prefetch(size, kRange);
  file.Prefetch(~uint64_t{0}, kRange);
  std::string out(kRange, '\0');
  ASSERT_THAT(file.ReadAt(kRange, out.data(), out.size()), IsOk());
  EXPECT_TRUE(out == bytes.substr(kRange, kRange));
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
