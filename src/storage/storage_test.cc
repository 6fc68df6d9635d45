#include "dcpp/storage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "testing/fault_store.h"
#include "testing/store_conformance.h"
#include "testing/testing.h"

namespace dcpp::testing {
namespace {

using ::testing::_;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// ------------------------------------------------------------------ conformance, every backend

TEST_P(StoreConformanceTest, Check) { RunStoreConformance(GetParam()); }

std::vector<StoreBackend> Backends() {
  return {
      {"Local",
       [] {
         auto dir = std::make_shared<TempDir>();
         std::unique_ptr<Store> store = OpenLocalStore(dir->Join("root"), true).value();
         return std::shared_ptr<Store>(store.release(), [dir](Store* s) { delete s; });
       }},
      {"Memory", [] { return std::make_shared<MemoryStore>(); }},
      {"FaultOverMemory",
       [] {
         auto base = std::make_shared<MemoryStore>();
         return std::shared_ptr<Store>(new FaultStore(*base), [base](Store* s) { delete s; });
       }},
      {"FaultOverLocal",
       [] {
         auto dir = std::make_shared<TempDir>();
         std::shared_ptr<Store> base = OpenLocalStore(dir->Join("root"), true).value();
         return std::shared_ptr<Store>(new FaultStore(*base), [dir, base](Store* s) { delete s; });
       }},
  };
}

INSTANTIATE_TEST_SUITE_P(All, StoreConformanceTest,
                         ::testing::Combine(::testing::ValuesIn(Backends()),
                                            ::testing::ValuesIn(StoreConformanceChecks())),
                         StoreConformanceTestName);

// ------------------------------------------------------------------ keys

TEST(ValidateKeyTest, AcceptsRelativeKeys) {
  for (const char* key : {"a", ".metadata", "__0_0.distcp", "a/b/c", "..x", "x..", "a.b/.c"}) {
    EXPECT_THAT(ValidateKey(key), IsOk()) << key;
  }
}

TEST(ValidateKeyTest, RejectsEscapes) {
  EXPECT_THAT(ValidateKey(""), StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(ValidateKey("/abs"), StatusIs(StatusCode::kInvalidArgument, HasSubstr("absolute")));
  EXPECT_THAT(ValidateKey("a/../b"), StatusIs(StatusCode::kInvalidArgument, HasSubstr("'..'")));
  EXPECT_THAT(ValidateKey("a//b"),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty path component")));
  EXPECT_THAT(ValidateKey(std::string("a\0", 2)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("NUL")));
}

TEST(KeyDirectoryTest, SplitsAtLastSlash) {
  EXPECT_EQ(KeyDirectory("a"), "");
  EXPECT_EQ(KeyDirectory("a/b"), "a");
  EXPECT_EQ(KeyDirectory("a/b/c"), "a/b");
}

// ------------------------------------------------------------------ LocalStore

TEST(LocalStoreTest, OpenRequiresDirectoryUnlessCreating) {
  TempDir dir;
  EXPECT_THAT(OpenLocalStore(dir.Join("absent"), false).status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("absent")));
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("x/y/z/"), true));
  EXPECT_TRUE(std::filesystem::is_directory(dir.path() / "x/y/z"));
  EXPECT_EQ(store->Describe("k"), dir.Join("x/y/z") + "/k");
  DCPP_ASSERT_OK(store->WriteAll("k", "v"));
  std::ofstream(dir.Join("file")) << "not a dir";
  EXPECT_THAT(OpenLocalStore(dir.Join("file"), false).status(),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("not a directory")));
  EXPECT_THAT(OpenLocalStore("", true).status(), StatusIs(StatusCode::kInvalidArgument, _));
}

TEST(LocalStoreTest, FilesLandAtTheirPaths) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("ckpt"), true));
  DCPP_ASSERT_OK(store->WriteAll("__0_0.distcp", "data"));
  DCPP_ASSERT_OK(store->WriteAtomic(".metadata", "meta"));
  DCPP_ASSERT_OK(store->WriteAll("nested/dir/k", "n"));
  std::ifstream in(dir.Join("ckpt/__0_0.distcp"));
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "data");
  EXPECT_TRUE(std::filesystem::exists(dir.path() / "ckpt/.metadata"));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "ckpt/.metadata.tmp"));
  EXPECT_TRUE(std::filesystem::exists(dir.path() / "ckpt/nested/dir/k"));
}

TEST(LocalStoreTest, RejectedKeysTouchNothingOutsideTheRoot) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("root"), true));
  EXPECT_FALSE(store->WriteAll("../outside", "x").ok());
  EXPECT_FALSE(store->WriteAtomic("sub/../../outside", "x").ok());
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "outside"));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "outside.tmp"));
}

TEST(LocalStoreTest, ListIgnoresDirectoriesAndFollowsFileLinks) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("root"), true));
  std::filesystem::create_directories(dir.path() / "root/empty_dir");
  std::ofstream(dir.Join("target")) << "t";
  std::filesystem::create_symlink(dir.path() / "target", dir.path() / "root/link");
  std::filesystem::create_directory_symlink(dir.path(), dir.path() / "root/loop");
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store->List());
  EXPECT_THAT(keys, ElementsAre("link"));  // no descent through the directory link
}

TEST(LocalStoreTest, ReadOfFileTruncatedAfterOpenIsDataLoss) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("root"), true));
  DCPP_ASSERT_OK(store->WriteAll("f", std::string(4096, 'a')));
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store->OpenRead("f"));
  ASSERT_EQ(::truncate(dir.Join("root/f").c_str(), 100), 0);
  std::string buf(1000, '\0');
  EXPECT_THAT(file->ReadAt(0, buf.data(), buf.size()),
              StatusIs(StatusCode::kDataLoss, HasSubstr("ended at offset 100")));
}

TEST(LocalStoreTest, DescriptorsAreCloseOnExec) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("root"), true));
  DCPP_ASSERT_OK_AND_ASSIGN(auto writer, store->OpenWrite("w"));
  DCPP_ASSERT_OK(store->WriteAll("r", "r"));
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, store->OpenRead("r"));
  // Every descriptor open on one of the store's files carries FD_CLOEXEC.
  const std::string root = std::filesystem::canonical(dir.path()).string();
  int checked = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    auto target = std::filesystem::read_symlink(entry.path(), ec);
    if (ec || target.string().rfind(root, 0) != 0) continue;
    const int fd = std::stoi(entry.path().filename().string());
    EXPECT_TRUE(::fcntl(fd, F_GETFD) & FD_CLOEXEC) << target;
    ++checked;
  }
  EXPECT_EQ(checked, 2);
}

TEST(LocalStoreTest, WritesThroughAFileInTheWayFail) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto store, OpenLocalStore(dir.Join("root"), true));
  DCPP_ASSERT_OK(store->WriteAll("f", "x"));
  EXPECT_THAT(store->OpenWrite("f/g").status(),
              StatusIs(StatusCode::kNotFound, HasSubstr("root/f")));
}

// ------------------------------------------------------------------ MemoryStore crash model

Status WriteSynced(Store& store, const std::string& key, const std::string& bytes) {
  return store.WriteAll(key, bytes, /*sync=*/true);
}

std::string ReadOr(Store& store, const std::string& key, const std::string& absent) {
  auto r = store.ReadAll(key);
  if (!r.ok()) return r.status().code() == StatusCode::kNotFound ? absent : "<error>";
  return *r;
}

TEST(MemoryStoreCrashTest, NameWithoutSyncDirIsLost) {
  MemoryStore store;
  DCPP_ASSERT_OK(WriteSynced(store, "a", "synced data"));
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, "a", "<absent>"), "<absent>");
}

TEST(MemoryStoreCrashTest, FileRevertsToLastSync) {
  MemoryStore store;
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("a"));
  DCPP_ASSERT_OK(file->Append("durable", 7));
  DCPP_ASSERT_OK(file->Sync());
  DCPP_ASSERT_OK(store.SyncDir());
  DCPP_ASSERT_OK(file->Append(" and not", 8));
  DCPP_ASSERT_OK_AND_ASSIGN(uint64_t synced, store.SyncedSize("a"));
  EXPECT_EQ(synced, 7u);
  EXPECT_EQ(store.UnsyncedBytes(), 8u);
  EXPECT_EQ(ReadOr(store, "a", ""), "durable and not");
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, "a", ""), "durable");
  EXPECT_EQ(store.UnsyncedBytes(), 0u);
  // The writer belonged to the crashed process.
  EXPECT_THAT(file->Append("x", 1), StatusIs(StatusCode::kAborted, HasSubstr("crashed")));
}

TEST(MemoryStoreCrashTest, UnsyncedFileIsEmptyAfterCrash) {
  MemoryStore store;
  DCPP_ASSERT_OK(store.WriteAll("a", "never synced", /*sync=*/false));
  DCPP_ASSERT_OK(store.SyncDir());
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, "a", "<absent>"), "");
}

TEST(MemoryStoreCrashTest, RenameWithoutSyncDirKeepsOldFile) {
  MemoryStore store;
  DCPP_ASSERT_OK(store.WriteAtomic(".metadata", "v1"));
  // WriteAtomic without its final SyncDir.
  DCPP_ASSERT_OK(WriteSynced(store, ".metadata.tmp", "v2"));
  DCPP_ASSERT_OK(store.Rename(".metadata.tmp", ".metadata"));
  EXPECT_EQ(ReadOr(store, ".metadata", ""), "v2");
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, ".metadata", ""), "v1");
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store.List());
  EXPECT_THAT(keys, ElementsAre(".metadata"));
}

TEST(MemoryStoreCrashTest, WriteAtomicSurvivesCrash) {
  MemoryStore store;
  DCPP_ASSERT_OK(store.WriteAtomic(".metadata", "v1"));
  DCPP_ASSERT_OK(store.WriteAtomic(".metadata", "v2"));
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, ".metadata", ""), "v2");
}

TEST(MemoryStoreCrashTest, RemoveWithoutSyncDirIsUndone) {
  MemoryStore store;
  DCPP_ASSERT_OK(WriteSynced(store, "a", "A"));
  DCPP_ASSERT_OK(WriteSynced(store, "b", "B"));
  DCPP_ASSERT_OK(store.SyncDir());
  DCPP_ASSERT_OK(store.Remove("a"));
  DCPP_ASSERT_OK(store.Remove("b"));
  DCPP_ASSERT_OK(store.SyncDir());
  DCPP_ASSERT_OK(WriteSynced(store, "b", "B2"));
  DCPP_ASSERT_OK(store.SyncDir());
  DCPP_ASSERT_OK(store.Remove("b"));
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, "a", "<absent>"), "<absent>");
  EXPECT_EQ(ReadOr(store, "b", "<absent>"), "B2");
}

TEST(MemoryStoreCrashTest, TruncationOfDurableFileIsPessimistic) {
  // Rewriting a committed data file in place destroys it even if the rewrite never syncs.
  MemoryStore store;
  DCPP_ASSERT_OK(WriteSynced(store, "__0_0.distcp", "old checkpoint"));
  DCPP_ASSERT_OK(store.SyncDir());
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("__0_0.distcp"));
  DCPP_ASSERT_OK(file->Append("new", 3));
  store.DropUnsyncedData();
  EXPECT_EQ(ReadOr(store, "__0_0.distcp", "<absent>"), "");
}

TEST(MemoryStoreCrashTest, DirectoriesSyncIndependently) {
  MemoryStore store;
  DCPP_ASSERT_OK(WriteSynced(store, "top", "t"));
  DCPP_ASSERT_OK(WriteSynced(store, "step_1/__0_0.distcp", "d"));
  DCPP_ASSERT_OK(store.SyncDir());
  store.DropUnsyncedData();
  DCPP_ASSERT_OK_AND_ASSIGN(auto keys, store.List());
  EXPECT_THAT(keys, ElementsAre("top"));
  DCPP_ASSERT_OK(WriteSynced(store, "step_1/__0_0.distcp", "d"));
  DCPP_ASSERT_OK(store.SyncDir("step_1"));
  store.DropUnsyncedData();
  DCPP_ASSERT_OK_AND_ASSIGN(keys, store.List());
  EXPECT_THAT(keys, ElementsAre("step_1/__0_0.distcp", "top"));
}

TEST(MemoryStoreCrashTest, OpenReadersKeepTheirBytes) {
  MemoryStore store;
  DCPP_ASSERT_OK(store.WriteAll("a", "unsynced", /*sync=*/false));
  DCPP_ASSERT_OK_AND_ASSIGN(auto reader, store.OpenRead("a"));
  store.DropUnsyncedData();
  std::string buf(8, '\0');
  DCPP_ASSERT_OK(reader->ReadAt(0, buf.data(), 8));
  EXPECT_EQ(buf, "unsynced");
  ASSERT_NE(reader->Peek(2, 3), nullptr);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(reader->Peek(2, 3)), 3), "syn");
  EXPECT_EQ(reader->Peek(7, 2), nullptr);
}

// ------------------------------------------------------------------ FaultStore

FaultStore::Fault MakeFault(StoreOp op, uint64_t nth, Status error, std::string key_substring = "",
                            bool sticky = false) {
  FaultStore::Fault f;
  f.op = op;
  f.nth = nth;
  f.error = std::move(error);
  f.key_substring = std::move(key_substring);
  f.sticky = sticky;
  return f;
}

TEST(FaultStoreTest, FailsTheNthAppend) {
  MemoryStore base;
  FaultStore store(base);
  store.AddFault(MakeFault(StoreOp::kAppend, 3, UnavailableError("No space left on device")));
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("__3_0.distcp"));
  DCPP_EXPECT_OK(file->Append("a", 1));
  DCPP_EXPECT_OK(file->Append("b", 1));
  EXPECT_THAT(file->Append("c", 1),
              StatusIs(StatusCode::kUnavailable,
                       HasSubstr("append memory:__3_0.distcp: No space left on device")));
  DCPP_EXPECT_OK(file->Append("d", 1));  // not sticky
  DCPP_ASSERT_OK(file->Close());
  EXPECT_EQ(ReadOr(base, "__3_0.distcp", ""), "abd");  // the failed append never reached base
  EXPECT_EQ(store.count(StoreOp::kAppend), 4u);
  EXPECT_EQ(store.failures(StoreOp::kAppend), 1u);
  EXPECT_EQ(store.count(StoreOp::kOpenWrite), 1u);
  EXPECT_EQ(store.count(StoreOp::kClose), 1u);
  store.ResetCounts();
  EXPECT_EQ(store.count(StoreOp::kAppend), 0u);
}

TEST(FaultStoreTest, KeyFilterAndStickyFaults) {
  MemoryStore base;
  FaultStore store(base);
  store.AddFault(
      MakeFault(StoreOp::kOpenWrite, 2, DataLossError("bad disk"), "distcp", /*sticky=*/true));
  DCPP_EXPECT_OK(store.WriteAll("__0_0.distcp", "1"));
  DCPP_EXPECT_OK(store.WriteAll(".metadata", "m"));  // does not match, does not count
  EXPECT_THAT(store.WriteAll("__1_0.distcp", "2"),
              StatusIs(StatusCode::kDataLoss, HasSubstr("bad disk")));
  EXPECT_THAT(store.WriteAll("__2_0.distcp", "3"), StatusIs(StatusCode::kDataLoss, _));
  store.ClearFaults();
  DCPP_EXPECT_OK(store.WriteAll("__2_0.distcp", "3"));
}

TEST(FaultStoreTest, FailedCommitLeavesOldMetadataAndNoTemporary) {
  for (StoreOp op :
       {StoreOp::kOpenWrite, StoreOp::kAppend, StoreOp::kSync, StoreOp::kClose, StoreOp::kRename}) {
    SCOPED_TRACE(std::string(StoreOpName(op)));
    MemoryStore base;
    FaultStore store(base);
    DCPP_ASSERT_OK(store.WriteAtomic(".metadata", "old"));
    store.AddFault(MakeFault(op, 1, UnavailableError("injected")));
    EXPECT_THAT(store.WriteAtomic(".metadata", "new"),
                StatusIs(StatusCode::kUnavailable, HasSubstr(".metadata")));
    EXPECT_EQ(ReadOr(base, ".metadata", ""), "old");
    DCPP_ASSERT_OK_AND_ASSIGN(auto keys, base.List());
    EXPECT_THAT(keys, ElementsAre(".metadata"));
  }
}

TEST(FaultStoreTest, FailedSyncDirCommitIsLostInACrash) {
  MemoryStore base;
  FaultStore store(base);
  DCPP_ASSERT_OK(store.WriteAtomic(".metadata", "old"));
  store.AddFault(MakeFault(StoreOp::kSyncDir, 1, UnavailableError("EIO")));
  EXPECT_THAT(store.WriteAtomic(".metadata", "new"),
              StatusIs(StatusCode::kUnavailable, HasSubstr("committing")));
  EXPECT_EQ(ReadOr(store, ".metadata", ""), "new");  // visible now ...
  DCPP_ASSERT_OK(store.DropUnsyncedData());
  EXPECT_EQ(ReadOr(store, ".metadata", ""), "old");  // ... but not durable
}

TEST(FaultStoreTest, FailedSyncLeavesDataUnsynced) {
  MemoryStore base;
  FaultStore store(base);
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("d"));
  DCPP_ASSERT_OK(file->Append("abc", 3));
  DCPP_ASSERT_OK(file->Sync());
  DCPP_ASSERT_OK(store.SyncDir());
  DCPP_ASSERT_OK(file->Append("def", 3));
  store.AddFault(MakeFault(StoreOp::kSync, 1, UnavailableError("EIO")));
  EXPECT_FALSE(file->Sync().ok());
  DCPP_ASSERT_OK_AND_ASSIGN(uint64_t synced, base.SyncedSize("d"));
  EXPECT_EQ(synced, 3u);
  DCPP_ASSERT_OK(store.DropUnsyncedData());
  EXPECT_EQ(ReadOr(store, "d", ""), "abc");
}

TEST(FaultStoreTest, ReadFaultsAndNoPeekBypass) {
  MemoryStore base;
  FaultStore store(base);
  DCPP_ASSERT_OK(store.WriteAll("r", "0123456789"));
  store.AddFault(MakeFault(StoreOp::kRead, 2, DataLossError("bit rot")));
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenRead("r"));
  EXPECT_EQ(file->Peek(0, 4), nullptr);  // every read must pass the fault check
  char buf[4];
  DCPP_EXPECT_OK(file->ReadAt(0, buf, 4));
  EXPECT_THAT(file->ReadAt(0, buf, 4),
              StatusIs(StatusCode::kDataLoss, HasSubstr("read memory:r: bit rot")));
  DCPP_EXPECT_OK(file->ReadAt(4, buf, 4));
  EXPECT_EQ(std::string(buf, 4), "4567");
  EXPECT_EQ(store.count(StoreOp::kRead), 3u);
  store.AddFault(MakeFault(StoreOp::kOpenRead, 1, NotFoundError("gone")));
  EXPECT_THAT(store.OpenRead("r").status(), StatusIs(StatusCode::kNotFound, HasSubstr("gone")));
}

TEST(FaultStoreTest, OtherOperationsAreCountedAndFailable) {
  MemoryStore base;
  FaultStore store(base);
  DCPP_ASSERT_OK(store.WriteAll("a", "A"));
  store.AddFault(MakeFault(StoreOp::kRemove, 1, UnavailableError("x")));
  store.AddFault(MakeFault(StoreOp::kList, 1, UnavailableError("x")));
  store.AddFault(MakeFault(StoreOp::kStat, 1, UnavailableError("x")));
  store.AddFault(MakeFault(StoreOp::kCreateDir, 1, UnavailableError("x")));
  EXPECT_FALSE(store.Remove("a").ok());
  EXPECT_FALSE(store.List().ok());
  EXPECT_FALSE(store.Exists("a").ok());
  EXPECT_FALSE(store.CreateDir().ok());
  DCPP_EXPECT_OK(store.Size("a"));
  DCPP_EXPECT_OK(store.Remove("a"));
  EXPECT_EQ(store.count(StoreOp::kStat), 2u);
  EXPECT_EQ(store.count(StoreOp::kRemove), 2u);
  EXPECT_EQ(store.failures(StoreOp::kRemove), 1u);
}

TEST(FaultStoreTest, InactiveStoreFailsEverything) {
  MemoryStore base;
  FaultStore store(base);
  DCPP_ASSERT_OK_AND_ASSIGN(auto file, store.OpenWrite("a"));
  store.SetActive(false, AbortedError("process died"));
  EXPECT_THAT(file->Append("x", 1), StatusIs(StatusCode::kAborted, HasSubstr("process died")));
  EXPECT_THAT(store.OpenRead("a").status(), StatusIs(StatusCode::kAborted, _));
  EXPECT_THAT(store.SyncDir(), StatusIs(StatusCode::kAborted, _));
  store.SetActive(true);
  DCPP_EXPECT_OK(file->Append("x", 1));
}

TEST(FaultStoreTest, CrashNeedsMemoryBase) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto local, OpenLocalStore(dir.Join("root"), true));
  FaultStore store(*local);
  EXPECT_THAT(store.DropUnsyncedData(), StatusIs(StatusCode::kUnimplemented, _));
}

TEST(StoreOpNameTest, NamesEveryOp) {
  for (int i = 0; i < kNumStoreOps; ++i) {
    EXPECT_NE(StoreOpName(static_cast<StoreOp>(i)), "unknown operation") << i;
  }
}

}  // namespace
}  // namespace dcpp::testing

namespace dcpp {
namespace {

using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

TEST(OpenStoreTest, PlainPathAndFileUrlOpenTheSameDirectory) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto a, OpenStore(dir.Join("ck"), {.create = true}));
  DCPP_ASSERT_OK(a->WriteAll("x", "hello"));
  DCPP_ASSERT_OK_AND_ASSIGN(auto b, OpenStore("file://" + dir.Join("ck")));
  DCPP_ASSERT_OK_AND_ASSIGN(std::string got, b->ReadAll("x"));
  EXPECT_EQ(got, "hello");
  EXPECT_THAT(OpenStore(dir.Join("absent")), StatusIs(StatusCode::kNotFound, HasSubstr("absent")));
}

TEST(OpenStoreTest, UnknownAndMalformedSchemesAreInvalidArgument) {
  EXPECT_THAT(
      OpenStore("gopher://host/x"),
      StatusIs(StatusCode::kInvalidArgument, HasSubstr("no store for scheme \"gopher://\"")));
  EXPECT_THAT(OpenStore("Bad Scheme://x"),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("scheme")));
  EXPECT_THAT(OpenStore("file://relative/dir"),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("absolute path")));
  EXPECT_THAT(OpenStore(""), StatusIs(StatusCode::kInvalidArgument, HasSubstr("empty")));
}

TEST(OpenStoreTest, RegisteredSchemeReceivesTheWholeUrl) {
  std::string seen;
  RegisterStoreScheme(
      "mem-test",
      [&](std::string_view url, const StoreOpenOptions& o) -> Result<std::unique_ptr<Store>> {
        seen = std::string(url);
        return std::unique_ptr<Store>(new MemoryStore("mem"));
      });
  DCPP_ASSERT_OK_AND_ASSIGN(auto s, OpenStore("mem-test://bucket/prefix"));
  EXPECT_EQ(seen, "mem-test://bucket/prefix");
  DCPP_ASSERT_OK_AND_ASSIGN(StoreFile f, OpenStoreFile("mem-test://bucket/prefix/model.pt"));
  EXPECT_EQ(seen, "mem-test://bucket/prefix");
  EXPECT_EQ(f.key, "model.pt");
}

TEST(OpenStoreTest, StoreFileSplitsParentAndKey) {
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(auto s, OpenStore(dir.Join("d"), {.create = true}));
  DCPP_ASSERT_OK(s->WriteAll("m.pt", "abc"));
  for (std::string url : {dir.Join("d/m.pt"), "file://" + dir.Join("d/m.pt")}) {
    DCPP_ASSERT_OK_AND_ASSIGN(StoreFile f, OpenStoreFile(url));
    EXPECT_EQ(f.key, "m.pt");
    DCPP_ASSERT_OK_AND_ASSIGN(std::string got, f.store->ReadAll(f.key));
    EXPECT_EQ(got, "abc");
  }
  EXPECT_THAT(OpenStoreFile(dir.Join("d") + "/"),
              StatusIs(StatusCode::kInvalidArgument, ::testing::_));
  EXPECT_THAT(OpenStoreFile("mem-test://"), StatusIs(StatusCode::kInvalidArgument, ::testing::_));
}

}  // namespace
}  // namespace dcpp
