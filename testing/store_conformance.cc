#include "testing/store_conformance.h"

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "testing/testing.h"

namespace dcpp::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr size_t kMiB = size_t{1} << 20;

std::string Bytes(size_t n, uint64_t seed) {
  std::string out(n, '\0');
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = rng();
    std::memcpy(out.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return out;
}

::testing::AssertionResult SameBytes(const std::string& got, const std::string& want) {
  if (got == want) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  return ::testing::AssertionFailure() << "got " << got.size() << " bytes, want " << want.size()
                                       << "; first difference at byte " << i;
}

void WriteRead(Store& store) {
  DCPP_ASSERT_OK(store.WriteAll("__0_0.distcp", "hello, store"));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store.ReadAll("__0_0.distcp"));
  EXPECT_EQ(back, "hello, store");
  DCPP_ASSERT_OK_AND_ASSIGN(bool exists, store.Exists("__0_0.distcp"));
  EXPECT_TRUE(exists);
  DCPP_ASSERT_OK_AND_ASSIGN(uint64_t size, store.Size("__0_0.distcp"));
  EXPECT_EQ(size, 12u);
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenRead("__0_0.distcp"));
  EXPECT_EQ(file->size(), 12u);
  EXPECT_THAT(file->name(), HasSubstr("__0_0.distcp"));
  EXPECT_THAT(store.Describe("__0_0.distcp"), HasSubstr("__0_0.distcp"));

  DCPP_ASSERT_OK_AND_ASSIGN(exists, store.Exists("missing"));
  EXPECT_FALSE(exists);
  EXPECT_THAT(store.OpenRead("missing").status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("missing")));
  EXPECT_THAT(store.Size("missing").status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("missing")));
  EXPECT_THAT(store.ReadAll("missing").status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("missing")));
}

void PositionsAndLargeAppends(Store& store) {
  // Sizes straddle the 1 MiB buffer of the local store: small writes that fill it exactly, one
  // that overflows it, and large ones that bypass it.
  const std::vector<size_t> sizes = {1,        7, kMiB - 8, 3, kMiB, 0, 5, 3 * kMiB + 17,
                                     kMiB - 1, 2, 1000};
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("big.bin"));
  EXPECT_EQ(file->position(), 0u);
  EXPECT_THAT(file->name(), HasSubstr("big.bin"));
  std::string expected;
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string chunk = Bytes(sizes[i], i);
    if (i % 2 == 0) {
      DCPP_ASSERT_OK(file->Append(chunk.data(), chunk.size()));
    } else {
      ByteSink& sink = *file;  // the ByteSink face writes the same bytes
      DCPP_ASSERT_OK(sink.Write(chunk.data(), chunk.size()));
    }
    expected += chunk;
    EXPECT_EQ(file->position(), expected.size()) << "after append " << i;
  }
  DCPP_ASSERT_OK(file->Sync());
  DCPP_ASSERT_OK(file->Close());
  EXPECT_FALSE(file->Append("x", 1).ok()) << "append after close";
  EXPECT_FALSE(file->Close().ok()) << "second close";
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store.ReadAll("big.bin"));
  EXPECT_TRUE(SameBytes(back, expected));
  DCPP_ASSERT_OK_AND_ASSIGN(uint64_t size, store.Size("big.bin"));
  EXPECT_EQ(size, expected.size());
}

void UnsyncedBytesAreReadableAfterClose(Store& store) {
  DCPP_ASSERT_OK(store.WriteAll("nosync", "written but not synced", /*sync=*/false));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store.ReadAll("nosync"));
  EXPECT_EQ(back, "written but not synced");
}

void RangedReads(Store& store) {
  const std::string data = Bytes(10000, 3);
  DCPP_ASSERT_OK(store.WriteAll("r", data));
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenRead("r"));
  std::string buf(100, '\0');
  DCPP_ASSERT_OK(file->ReadAt(1234, buf.data(), 100));
  EXPECT_EQ(buf, data.substr(1234, 100));
  DCPP_ASSERT_OK(file->ReadAt(9900, buf.data(), 100));
  EXPECT_EQ(buf, data.substr(9900, 100));
  DCPP_EXPECT_OK(file->ReadAt(10000, buf.data(), 0));
  EXPECT_THAT(file->ReadAt(9999, buf.data(), 2),
              StatusIs(StatusCode::kDataLoss, HasSubstr("past the end")));
  EXPECT_THAT(file->ReadAt(10001, buf.data(), 0), StatusIs(StatusCode::kDataLoss, HasSubstr("r")));
  // Offsets and lengths near 2^64 must not wrap around the bounds check.
  EXPECT_THAT(file->ReadAt(UINT64_MAX, buf.data(), 1),
              StatusIs(StatusCode::kDataLoss, ::testing::_));
  EXPECT_THAT(file->ReadAt(10, buf.data(), SIZE_MAX),
              StatusIs(StatusCode::kDataLoss, ::testing::_));
  // A SubSource window over a store file reads through it.
  SubSource window(*file, 5000, 10);
  std::string w(10, '\0');
  DCPP_ASSERT_OK(window.ReadAt(0, w.data(), 10));
  EXPECT_EQ(w, data.substr(5000, 10));
}

void EmptyFiles(Store& store) {
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("empty"));
  DCPP_ASSERT_OK(file->Close());
  DCPP_ASSERT_OK_AND_ASSIGN(bool exists, store.Exists("empty"));
  EXPECT_TRUE(exists);
  DCPP_ASSERT_OK_AND_ASSIGN(uint64_t size, store.Size("empty"));
  EXPECT_EQ(size, 0u);
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, store.OpenRead("empty"));
  EXPECT_EQ(reader->size(), 0u);
  char c;
  DCPP_EXPECT_OK(reader->ReadAt(0, &c, 0));
  EXPECT_THAT(reader->ReadAt(0, &c, 1), StatusIs(StatusCode::kDataLoss, ::testing::_));
  DCPP_ASSERT_OK(store.WriteAtomic("empty_atomic", ""));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store.ReadAll("empty_atomic"));
  EXPECT_EQ(back, "");
}

void ReopenTruncates(Store& store) {
  DCPP_ASSERT_OK(store.WriteAll("t", "a long first version"));
  DCPP_ASSERT_OK(store.WriteAll("t", "v2"));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store.ReadAll("t"));
  EXPECT_EQ(back, "v2");
}

void AtomicReplace(Store& store) {
  DCPP_ASSERT_OK(store.WriteAtomic(".metadata", "first"));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string back, store.ReadAll(".metadata"));
  EXPECT_EQ(back, "first");
  // A reader opened before the replace keeps seeing the old, complete file.
  DCPP_ASSERT_OK_AND_ASSIGN(auto old_reader, store.OpenRead(".metadata"));
  const std::string second = Bytes(3 * kMiB + 5, 9);
  DCPP_ASSERT_OK(store.WriteAtomic(".metadata", second));
  DCPP_ASSERT_OK_AND_ASSIGN(back, store.ReadAll(".metadata"));
  EXPECT_TRUE(SameBytes(back, second));
  std::string old(old_reader->size(), '\0');
  DCPP_ASSERT_OK(old_reader->ReadAt(0, old.data(), old.size()));
  EXPECT_EQ(old, "first");
  // No temporary is left behind.
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store.List());
  EXPECT_THAT(keys, ElementsAre(".metadata"));
  // Nested keys commit too.
  DCPP_ASSERT_OK(store.WriteAtomic("step_1/.metadata", "nested"));
  DCPP_ASSERT_OK_AND_ASSIGN(back, store.ReadAll("step_1/.metadata"));
  EXPECT_EQ(back, "nested");
}

void KeysCannotEscape(Store& store) {
  const std::vector<std::string> bad = {
      "",  "/etc/passwd",          "../x", "a/../../x", "a//b", "a/", "./a", "a/./b", "..",
      ".", std::string("a\0b", 3), "/"};
  for (const std::string& key : bad) {
    SCOPED_TRACE("key of " + std::to_string(key.size()) + " bytes");
    const auto invalid = StatusIs(StatusCode::kInvalidArgument, HasSubstr("invalid store key"));
    EXPECT_THAT(store.OpenWrite(key).status(), invalid);
    EXPECT_THAT(store.OpenRead(key).status(), invalid);
    EXPECT_THAT(store.Exists(key).status(), invalid);
    EXPECT_THAT(store.Size(key).status(), invalid);
    EXPECT_THAT(store.Remove(key), invalid);
    EXPECT_THAT(store.Rename("ok", key), invalid);
    EXPECT_THAT(store.Rename(key, "ok"), invalid);
    EXPECT_THAT(store.WriteAtomic(key, "x"), invalid);
    if (!key.empty()) {
      EXPECT_THAT(store.SyncDir(key), invalid);
    }
  }
  // The message names the key, escaping bytes that would garble it.
  EXPECT_THAT(store.OpenRead("../secret").status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("\"../secret\"")));
  EXPECT_THAT(store.OpenRead(std::string("a\0b", 3)).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("a\\x00b")));
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store.List());
  EXPECT_THAT(keys, IsEmpty()) << "a rejected key created something";
  // Names that merely look odd are fine.
  DCPP_EXPECT_OK(store.WriteAll("..hidden", "1"));
  DCPP_EXPECT_OK(store.WriteAll("a..b/c.", "2"));
}

void ConcurrentReads(Store& store) {
  const std::string data = Bytes(4 * kMiB + 3, 11);
  DCPP_ASSERT_OK(store.WriteAll("shared", data));
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenRead("shared"));
  std::atomic<int> mismatches{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::string buf;
      for (int i = 0; i < 200; ++i) {
        const uint64_t offset = rng() % data.size();
        const size_t n = rng() % std::min<uint64_t>(data.size() - offset, 65536);
        buf.resize(n);
        if (!file->ReadAt(offset, buf.data(), n).ok()) {
          ++errors;
        } else if (std::memcmp(buf.data(), data.data() + offset, n) != 0) {
          ++mismatches;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

void ConcurrentWriters(Store& store) {
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      const std::string key = "__" + std::to_string(t) + "_0.distcp";
      auto file = store.OpenWrite(key);
      if (!file.ok()) {
        ++errors;
        return;
      }
      const std::string data = Bytes(100000 * (t + 1), 100 + t);
      for (size_t off = 0; off < data.size(); off += 30000) {
        const size_t n = std::min<size_t>(30000, data.size() - off);
        if (!(*file)->Append(data.data() + off, n).ok()) ++errors;
      }
      if (!(*file)->Sync().ok() || !(*file)->Close().ok()) ++errors;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  for (int t = 0; t < 8; ++t) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string back,
                              store.ReadAll("__" + std::to_string(t) + "_0.distcp"));
    EXPECT_TRUE(SameBytes(back, Bytes(100000 * (t + 1), 100 + t))) << "writer " << t;
  }
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store.List());
  EXPECT_EQ(keys.size(), 8u);
}

void ListRemoveRename(Store& store) {
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store.List());
  EXPECT_THAT(keys, IsEmpty());
  DCPP_ASSERT_OK(store.WriteAll("b", "B"));
  DCPP_ASSERT_OK(store.WriteAll("a", "A"));
  DCPP_ASSERT_OK(store.WriteAll("sub/c", "C"));
  DCPP_ASSERT_OK(store.WriteAll("sub/d/e", "E"));
  DCPP_ASSERT_OK_AND_ASSIGN(keys, store.List());
  EXPECT_THAT(keys, ElementsAre("a", "b", "sub/c", "sub/d/e"));
  // A directory is not a key.
  DCPP_ASSERT_OK_AND_ASSIGN(bool exists, store.Exists("sub"));
  EXPECT_FALSE(exists);

  DCPP_ASSERT_OK(store.Rename("a", "z"));
  DCPP_ASSERT_OK_AND_ASSIGN(exists, store.Exists("a"));
  EXPECT_FALSE(exists);
  DCPP_ASSERT_OK_AND_ASSIGN(std::string z, store.ReadAll("z"));
  EXPECT_EQ(z, "A");
  DCPP_ASSERT_OK(store.Rename("z", "b"));  // replaces b
  DCPP_ASSERT_OK_AND_ASSIGN(std::string b, store.ReadAll("b"));
  EXPECT_EQ(b, "A");
  DCPP_ASSERT_OK(store.Rename("b", "sub/new/b"));  // into a directory that does not exist yet
  DCPP_ASSERT_OK_AND_ASSIGN(b, store.ReadAll("sub/new/b"));
  EXPECT_EQ(b, "A");
  EXPECT_THAT(store.Rename("nope", "x"), StatusIs(StatusCode::kNotFound, HasSubstr("nope")));

  DCPP_ASSERT_OK(store.Remove("sub/c"));
  EXPECT_THAT(store.Remove("sub/c"), StatusIs(StatusCode::kNotFound, HasSubstr("sub/c")));
  DCPP_ASSERT_OK_AND_ASSIGN(keys, store.List());
  EXPECT_THAT(keys, ElementsAre("sub/d/e", "sub/new/b"));

  DCPP_EXPECT_OK(store.SyncDir());
  DCPP_EXPECT_OK(store.SyncDir("sub"));
  DCPP_EXPECT_OK(store.SyncDir("sub/d"));
  EXPECT_THAT(store.SyncDir("no_such_dir"), StatusIs(StatusCode::kNotFound, ::testing::_));
  DCPP_EXPECT_OK(store.CreateDir());
  DCPP_EXPECT_OK(store.CreateDir());  // idempotent
}

void FileAndDirectoryClash(Store& store) {
  DCPP_ASSERT_OK(store.WriteAll("f", "file"));
  EXPECT_FALSE(store.OpenWrite("f/g").ok()) << "a file cannot be a directory";
  DCPP_ASSERT_OK(store.WriteAll("d/x", "x"));
  EXPECT_FALSE(store.OpenWrite("d").ok()) << "a directory cannot be a file";
  EXPECT_FALSE(store.Rename("f", "d").ok());
  DCPP_ASSERT_OK_AND_ASSIGN(std::string f, store.ReadAll("f"));
  EXPECT_EQ(f, "file");
}

// Stores that lock: exclusive excludes everyone, shared holders coexist, destroying a lock
// releases it, and the lock file is an ordinary key. Others say Unimplemented.
void Locks(Store& store) {
  if (!store.CanLock()) {
    EXPECT_THAT(store.TryLock(".dcpp.lock", LockMode::kExclusive),
                StatusIs(StatusCode::kUnimplemented, ::testing::_));
    return;
  }
  {
    DCPP_ASSERT_OK_AND_ASSIGN(auto held, store.TryLock(".dcpp.lock", LockMode::kExclusive));
    EXPECT_THAT(store.TryLock(".dcpp.lock", LockMode::kExclusive),
                StatusIs(StatusCode::kUnavailable, HasSubstr(".dcpp.lock")));
    EXPECT_THAT(store.TryLock(".dcpp.lock", LockMode::kShared),
                StatusIs(StatusCode::kUnavailable, HasSubstr("locked")));
    // Another name is another lock.
    DCPP_EXPECT_OK(store.TryLock("sub/.other.lock", LockMode::kExclusive).status());
  }
  {
    DCPP_ASSERT_OK_AND_ASSIGN(auto a, store.TryLock(".dcpp.lock", LockMode::kShared));
    DCPP_ASSERT_OK_AND_ASSIGN(auto b, store.TryLock(".dcpp.lock", LockMode::kShared));
    EXPECT_THAT(store.TryLock(".dcpp.lock", LockMode::kExclusive),
                StatusIs(StatusCode::kUnavailable, ::testing::_));
    a.reset();
    EXPECT_THAT(store.TryLock(".dcpp.lock", LockMode::kExclusive),
                StatusIs(StatusCode::kUnavailable, ::testing::_));
  }
  DCPP_EXPECT_OK(store.TryLock(".dcpp.lock", LockMode::kExclusive).status());
  DCPP_ASSERT_OK_AND_ASSIGN(bool exists, store.Exists(".dcpp.lock"));
  EXPECT_TRUE(exists);
  EXPECT_THAT(store.TryLock("../escape.lock", LockMode::kShared),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
}

// ListDirectory: the files directly in one directory, nothing below it.
void ListsOneDirectory(Store& store) {
  DCPP_ASSERT_OK(store.WriteAll("a", "1"));
  DCPP_ASSERT_OK(store.WriteAll("d/b", "2"));
  DCPP_ASSERT_OK(store.WriteAll("d/e/c", "3"));
  DCPP_ASSERT_OK(store.WriteAll("d/f", "4"));
  DCPP_ASSERT_OK_AND_ASSIGN(auto root, store.ListDirectory(""));
  EXPECT_THAT(root, ElementsAre("a"));
  DCPP_ASSERT_OK_AND_ASSIGN(auto d, store.ListDirectory("d"));
  EXPECT_THAT(d, ElementsAre("d/b", "d/f"));
}

}  // namespace

const std::vector<StoreCheck>& StoreConformanceChecks() {
  static const std::vector<StoreCheck> checks = {
      {"WriteRead", WriteRead},
      {"PositionsAndLargeAppends", PositionsAndLargeAppends},
      {"UnsyncedBytesAreReadableAfterClose", UnsyncedBytesAreReadableAfterClose},
      {"RangedReads", RangedReads},
      {"EmptyFiles", EmptyFiles},
      {"ReopenTruncates", ReopenTruncates},
      {"AtomicReplace", AtomicReplace},
      {"KeysCannotEscape", KeysCannotEscape},
      {"ConcurrentReads", ConcurrentReads},
      {"ConcurrentWriters", ConcurrentWriters},
      {"ListRemoveRename", ListRemoveRename},
      {"FileAndDirectoryClash", FileAndDirectoryClash},
      {"Locks", Locks},
      {"ListsOneDirectory", ListsOneDirectory},
  };
  return checks;
}

void RunStoreConformance(const StoreConformanceParam& param) {
  std::shared_ptr<Store> store = std::get<0>(param).make();
  ASSERT_NE(store, nullptr);
  std::get<1>(param).run(*store);
}

std::string StoreConformanceTestName(const ::testing::TestParamInfo<StoreConformanceParam>& info) {
  return std::get<0>(info.param).name + "_" + std::get<1>(info.param).name;
}

}  // namespace dcpp::testing
