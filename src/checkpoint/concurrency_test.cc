// Two saves to one destination, foreign directories, leftovers of failed saves and full disks
// (threads as ranks): a save holds the destination's lock from SetUp to EndSave, so a second
// save fails at once on every rank and never mixes its data into the first; a directory that is
// not a checkpoint is refused untouched; the next save and CollectGarbage remove what failed
// saves left; a full disk on one rank gives every rank the same error and keeps the previous
// checkpoint bit-exact.
#include <sys/mount.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <set>
#include <thread>

#include "checkpoint/steps.h"
#include "dcpp/async_save.h"
#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/layout.h"
#include "dcpp/storage.h"
#include "layout/leftovers.h"
#include "layout/manifest.h"
#include "testing/fault_store.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

namespace fs = std::filesystem;
using ::dcpp::testing::IsOk;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int kWorld = 3;
constexpr int64_t kCols = 256;

// Rank `rank`'s part of checkpoint `seed`: rows [rank * rows, (rank + 1) * rows) of "w" (each
// rank's rows a pattern of its own), a tensor only this rank has, and the step.
Value RankState(int rank, uint64_t seed, int64_t rows, int world = kWorld) {
  Value sd = Value::MakeDict();
  Tensor piece = PatternTensor(DType::kFloat32, {rows, kCols}, seed * 100 + rank);
  sd.Set("w",
         Value::FromSharded({DType::kFloat32, {world * rows, kCols}, {{{rank * rows, 0}, piece}}}));
  sd.Set("step", Value::Int(static_cast<int64_t>(seed)));
  return sd;
}

// A one-rank state of the whole `world`-rank checkpoint: "w" holds every rank's rows.
Value WholeState(int64_t rows, int world = kWorld) {
  Value sd = Value::MakeDict();
  ShardedTensor w{DType::kFloat32, {world * rows, kCols}, {}};
  for (int r = 0; r < world; ++r) {
    w.shards.push_back({{r * rows, 0}, Tensor::Zeros(DType::kFloat32, {rows, kCols})});
  }
  sd.Set("w", Value::FromSharded(std::move(w)));
  sd.Set("step", Value::Int(0));
  return sd;
}

// The seed of the checkpoint at `dir` if it loads and equals it bit for bit, else -1.
int64_t LoadedSeed(const std::string& dir, int64_t rows, int world = kWorld) {
  Value sd = WholeState(rows, world);
  if (!Load(sd, dir).ok()) return -1;
  const int64_t seed = sd.Find("step")->as_int();
  const auto& shards = sd.Find("w")->sharded().shards;
  for (int r = 0; r < world; ++r) {
    Tensor want = PatternTensor(DType::kFloat32, {rows, kCols}, seed * 100 + r);
    if (!shards[r].tensor.BitwiseEqual(want)) return -1;
  }
  return seed;
}

std::set<std::string> Files(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

// Every rank's status, each run on its own thread rank.
std::vector<Status> OnRanks(int world, const std::function<Status(Communicator&)>& fn) {
  std::vector<Status> out(world);
  RunOnThreads(world, [&](Communicator& comm) { out[comm.rank()] = fn(comm); });
  return out;
}

Status SaveOnRanks(const std::string& dir, uint64_t seed, int64_t rows, int world = kWorld) {
  for (const Status& s : OnRanks(world, [&](Communicator& comm) {
         return Save(RankState(comm.rank(), seed, rows), dir, {.comm = &comm}).status();
       })) {
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

// The message without its leading "rank N: ", which is all that differs between ranks.
std::string WithoutRank(const Status& s) {
  const std::string m(s.message());
  const size_t colon = m.find(": ");
  return m.rfind("rank ", 0) == 0 && colon != std::string::npos ? m.substr(colon + 2) : m;
}

void ExpectSameErrorEverywhere(const std::vector<Status>& statuses) {
  ASSERT_FALSE(statuses.empty());
  for (size_t r = 0; r < statuses.size(); ++r) {
    EXPECT_FALSE(statuses[r].ok()) << "rank " << r;
    EXPECT_EQ(statuses[r].code(), statuses[0].code()) << statuses[r].message();
    EXPECT_EQ(WithoutRank(statuses[r]), WithoutRank(statuses[0]));
    EXPECT_THAT(statuses[r].message(), HasSubstr("rank " + std::to_string(r) + ": saving"));
  }
}

// Blocks the save running on one thread at a fault point until released.
class Gate {
 public:
  explicit Gate(std::string point) : point_(std::move(point)) {
    internal::SetFaultHookForTesting([this](std::string_view point, int) {
      if (point == point_ && std::this_thread::get_id() == held_thread_.load()) {
        std::unique_lock<std::mutex> lock(mu_);
        reached_ = true;
        cv_.notify_all();
        cv_.wait(lock, [&] { return open_; });
      }
      return Status::Ok();
    });
  }
  ~Gate() { internal::SetFaultHookForTesting(nullptr); }
  void HoldThisThread() { held_thread_ = std::this_thread::get_id(); }
  // Also called by the holder when its save returns, so a save that fails early cannot leave
  // the test waiting.
  void MarkReached() {
    std::lock_guard<std::mutex> lock(mu_);
    reached_ = true;
    cv_.notify_all();
  }
  void WaitReached() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return reached_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::string point_;
  std::atomic<std::thread::id> held_thread_{};
  std::mutex mu_;
  std::condition_variable cv_;
  bool reached_ = false, open_ = false;
};

// ------------------------------------------------------------------ the save lock

TEST(SaveLockTest, ASecondSaveFailsAtOnceWhileTheFirstHoldsTheLock) {
  TempDir tmp;
  const std::string dir = tmp.Join("ck");
  // A step the saving thread runs itself: the data write may run on a pool thread (it runs beside
  // the commit's preparation), where the gate would not hold it.
  Gate gate("save.planner.finish_plan");
  Result<Metadata> first = InternalError("not run");
  std::thread holder([&] {
    gate.HoldThisThread();
    first = Save(RankState(0, 1, 8, 1), dir);
    gate.MarkReached();
  });
  gate.WaitReached();  // the first save holds the lock and is about to write
  // A one-rank save, a three-rank save, a rank-local save and an async save all fail at once.
  EXPECT_THAT(Save(RankState(0, 2, 8, 1), dir),
              StatusIs(StatusCode::kUnavailable,
                       AllOf(HasSubstr(dir + "/.dcpp.lock"), HasSubstr("locked by another save"),
                             HasSubstr("pid "))));
  std::vector<Status> three = OnRanks(kWorld, [&](Communicator& comm) {
    return Save(RankState(comm.rank(), 3, 8), dir, {.comm = &comm}).status();
  });
  ExpectSameErrorEverywhere(three);
  EXPECT_THAT(three[2], StatusIs(StatusCode::kUnavailable, HasSubstr("failed on rank 0")));
  std::vector<Status> local = OnRanks(2, [&](Communicator& comm) {
    return Save(RankState(comm.rank(), 4, 8, 2), dir, {.comm = &comm, .use_collectives = false})
        .status();
  });
  for (const Status& s : local)
    EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable, HasSubstr("locked")));
  EXPECT_THAT(AsyncSave(RankState(0, 5, 8, 1), dir).committed.get(),
              StatusIs(StatusCode::kUnavailable, HasSubstr("locked")));
  gate.Open();
  holder.join();
  DCPP_ASSERT_OK(first.status());
  EXPECT_EQ(LoadedSeed(dir, 8, 1), 1);
  // Released at the end of the save: the next one runs.
  DCPP_ASSERT_OK(Save(RankState(0, 6, 8, 1), dir).status());
  EXPECT_EQ(LoadedSeed(dir, 8, 1), 6);
}

TEST(SaveLockTest, TwoRacingSavesNeverMixAndTheWinnerIsOnDisk) {
  constexpr int kTrials = 20;
  constexpr int64_t kRows = 512;  // 512 KiB per save, in 4 files
  int both_ok = 0, one_refused = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    TempDir tmp;
    const std::string dir = tmp.Join("ck");  // new: both saves race to create it
    std::atomic<int> ready{0};
    std::vector<Result<Metadata>> results(2, InternalError("not run"));
    std::vector<std::thread> threads;
    for (int i = 0; i < 2; ++i) {
      threads.emplace_back([&, i] {
        Value sd = RankState(0, 10 + static_cast<uint64_t>(i), kRows, 1);
        sd.Set("extra", Value::FromTensor(PatternTensor(DType::kInt64, {1000}, 10 + i)));
        SaveOptions so;
        so.writer.thread_count = 2;
        so.writer.single_file_per_rank = false;
        ready.fetch_add(1);
        while (ready.load() < 2) std::this_thread::yield();
        results[i] = Save(sd, dir, so);
      });
    }
    for (auto& t : threads) t.join();
    std::set<std::string> winners;
    for (int i = 0; i < 2; ++i) {
      if (results[i].ok()) {
        winners.insert(*results[i]->storage_meta->save_id);
      } else {
        EXPECT_THAT(results[i], StatusIs(StatusCode::kUnavailable, HasSubstr("locked")));
      }
    }
    ASSERT_FALSE(winners.empty()) << "both saves failed";
    if (winners.size() == 2)
      ++both_ok;
    else
      ++one_refused;
    // The committed checkpoint is exactly one source, and one whose save reported success.
    auto store = OpenStore(dir).value();
    FileSystemReader on_disk(store.get(), dir, {});
    DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, on_disk.ReadMetadata());
    ASSERT_TRUE(winners.count(*md.storage_meta->save_id)) << "the committed save reported failure";
    const int64_t seed = LoadedSeed(dir, kRows, 1);
    ASSERT_TRUE(seed == 10 || seed == 11) << "mixed or corrupt checkpoint: " << seed;
    const int i = static_cast<int>(seed - 10);
    ASSERT_TRUE(results[i].ok());
    EXPECT_EQ(*results[i]->storage_meta->save_id, *md.storage_meta->save_id);
    Value extra = Value::MakeDict();
    extra.Set("extra", Value::FromTensor(Tensor::Zeros(DType::kInt64, {1000})));
    DCPP_ASSERT_OK(Load(extra, dir, {.planner_options = {.allow_partial_load = true}}));
    EXPECT_TRUE(
        extra.Find("extra")->tensor().BitwiseEqual(PatternTensor(DType::kInt64, {1000}, seed)));
    // Nothing of the other save is left behind.
    for (const std::string& f : Files(dir)) {
      if (f.size() > 7 && f.substr(f.size() - 7) == ".distcp") {
        bool referenced = false;
        for (const auto& [index, info] : md.storage_data) referenced |= info.relative_path == f;
        EXPECT_TRUE(referenced) << f;
      }
    }
  }
  std::cout << kTrials << " trials: " << one_refused << " with one save refused by the lock, "
            << both_ok << " with the saves one after the other; none mixed\n";
}

// ------------------------------------------------------------------ foreign directories

TEST(DestinationTest, ADirectoryThatIsNotACheckpointIsRefusedUntouched) {
  TempDir tmp;
  const std::string dir = tmp.Join("mine");
  fs::create_directories(dir);
  DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/__0_0.distcp", "my own bytes"));
  DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/notes.txt", "notes"));
  EXPECT_THAT(Save(RankState(0, 1, 4, 1), dir),
              StatusIs(StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("\"" + dir + "\" is not empty and is not a checkpoint"),
                             HasSubstr("\"__0_0.distcp\""), HasSubstr("\"notes.txt\""))));
  ExpectSameErrorEverywhere(OnRanks(kWorld, [&](Communicator& comm) {
    return Save(RankState(comm.rank(), 1, 4), dir, {.comm = &comm}).status();
  }));
  ExpectSameErrorEverywhere(OnRanks(2, [&](Communicator& comm) {
    return Save(RankState(comm.rank(), 1, 4, 2), dir, {.comm = &comm, .use_collectives = false})
        .status();
  }));
  EXPECT_THAT(CollectGarbage(dir), StatusIs(StatusCode::kFailedPrecondition, HasSubstr(dir)));
  EXPECT_EQ(Files(dir), (std::set<std::string>{"__0_0.distcp", "notes.txt"}));
  EXPECT_EQ(testing::ReadFileBytes(dir + "/__0_0.distcp").value(), "my own bytes");
}

TEST(DestinationTest, CheckpointsOfPyTorchAndDcppLeftoversAreAccepted) {
  TempDir tmp;
  // A PyTorch 2.x checkpoint (no lock file), with a user's file beside it.
  const std::string torch = tmp.Join("torch");
  fs::copy(testing::SourceDir() + "/tests/data/dcp_213_2ranks/sync", torch,
           fs::copy_options::recursive);
  ASSERT_TRUE(fs::exists(torch + "/.metadata"));
  DCPP_ASSERT_OK(testing::WriteFileBytes(torch + "/notes.txt", "keep me"));
  DCPP_ASSERT_OK(SaveOnRanks(torch, 7, 4));
  EXPECT_EQ(LoadedSeed(torch, 4), 7);
  EXPECT_EQ(testing::ReadFileBytes(torch + "/notes.txt").value(), "keep me");
  // Only dcpp's leftovers (a save killed before its first commit): its lock file marks it.
  const std::string killed = tmp.Join("killed");
  fs::create_directories(killed);
  DCPP_ASSERT_OK(testing::WriteFileBytes(killed + "/.dcpp.lock", ""));
  DCPP_ASSERT_OK(testing::WriteFileBytes(killed + "/__1_0.distcp", "partial"));
  DCPP_ASSERT_OK(SaveOnRanks(killed, 8, 4));
  EXPECT_EQ(LoadedSeed(killed, 4), 8);
  // An empty directory is fine, and so is a committed rank-local checkpoint.
  const std::string empty = tmp.Join("empty");
  fs::create_directories(empty);
  DCPP_ASSERT_OK(SaveOnRanks(empty, 9, 4));
  const std::string local = tmp.Join("local");
  for (const Status& s : OnRanks(2, [&](Communicator& comm) {
         return Save(RankState(comm.rank(), 3, 4, 2), local,
                     {.comm = &comm, .use_collectives = false})
             .status();
       })) {
    DCPP_ASSERT_OK(s);
  }
  fs::remove(local + "/.dcpp.lock");
  for (int r = 0; r < 2; ++r) fs::remove(local + "/.dcpp.rank" + std::to_string(r) + ".lock");
  DCPP_ASSERT_OK(SaveOnRanks(local, 4, 4));
}

// ------------------------------------------------------------------ leftovers

TEST(LeftoversTest, TheNextSaveAndCollectGarbageRemoveWhatFailedSavesLeft) {
  TempDir tmp;
  const std::string dir = tmp.Join("ck");
  DCPP_ASSERT_OK(SaveOnRanks(dir, 1, 16));
  const std::set<std::string> good = Files(dir);
  // A save failing on rank 1 while ranks 0 and 2 write: their files stay behind.
  internal::SetFaultHookForTesting([](std::string_view point, int rank) {
    return point == "save.writer.write_data" && rank == 1 ? UnavailableError("injected")
                                                          : Status::Ok();
  });
  std::vector<Status> failed = OnRanks(kWorld, [&](Communicator& comm) {
    return Save(RankState(comm.rank(), 2, 16), dir, {.comm = &comm}).status();
  });
  internal::SetFaultHookForTesting(nullptr);
  ExpectSameErrorEverywhere(failed);
  EXPECT_EQ(LoadedSeed(dir, 16), 1);
  std::set<std::string> after_failure = Files(dir);
  EXPECT_GT(after_failure.size(), good.size());
  // Temporaries of killed commits and a stray data file; and files that are not dcpp's.
  const std::set<std::string> planted = {
      ".metadata.tmp", ".metadata.tmp.h.99999999.0", "__1.metadata.tmp", "__7_0.distcp",
      // A manifest no committed metadata pairs with (a crash between its rename and the
      // metadata's), and a temporary of one.
      ".metadata.0123456789abcdef.manifest", ".metadata.0123456789abcdef.manifest.tmp.h.9.0"};
  const std::set<std::string> foreign = {"notes.txt", "__0_0.distcp.bak", "__x_0.distcp",
                                         "__0_0_nothex!.distcp"};
  for (const auto& f : planted) DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/" + f, "x"));
  for (const auto& f : foreign) DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/" + f, "x"));
  // gc --dry-run names them and removes nothing.
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> would, CollectGarbage(dir, true));
  std::set<std::string> expected = planted;
  for (const auto& f : after_failure) {
    if (!good.count(f)) expected.insert(f);
  }
  EXPECT_EQ(std::set<std::string>(would.begin(), would.end()), expected);
  EXPECT_EQ(Files(dir).size(), after_failure.size() + planted.size() + foreign.size());
  // gc waits for nobody: while a save holds the lock it refuses.
  {
    auto store = OpenStore(dir).value();
    DCPP_ASSERT_OK_AND_ASSIGN(auto held, store->TryLock(".dcpp.lock", LockMode::kExclusive));
    EXPECT_THAT(CollectGarbage(dir), StatusIs(StatusCode::kUnavailable, HasSubstr("locked")));
  }
  // The next save removes them (and the replaced checkpoint's files), nothing else.
  DCPP_ASSERT_OK(SaveOnRanks(dir, 3, 16));
  EXPECT_EQ(LoadedSeed(dir, 16), 3);
  std::set<std::string> now = Files(dir);
  for (const auto& f : expected) EXPECT_FALSE(now.count(f)) << f;
  for (const auto& f : foreign) EXPECT_TRUE(now.count(f)) << f;
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> none, CollectGarbage(dir));
  EXPECT_TRUE(none.empty());
  // gc removes what a later failure leaves, for real.
  DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/__9_9.distcp", "x"));
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> removed, CollectGarbage(dir));
  EXPECT_EQ(removed, std::vector<std::string>{"__9_9.distcp"});
  EXPECT_FALSE(fs::exists(dir + "/__9_9.distcp"));
  EXPECT_EQ(LoadedSeed(dir, 16), 3);
}

// The writer that just committed a metadata passes what it references, so the commit is not
// parsed again; the shortcut applies only while the stored bytes are the ones it committed.
TEST(LeftoversTest, KnownMetadataIsTrustedOnlyForTheBytesItWasMadeFrom) {
  TempDir tmp;
  const std::string dir = tmp.Join("ck");
  DCPP_ASSERT_OK(SaveOnRanks(dir, 1, 16));
  auto store = OpenStore(dir).value();
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> keys, store->List());
  DCPP_ASSERT_OK_AND_ASSIGN(std::string bytes, store->ReadAll(".metadata"));
  std::vector<std::string> data;
  for (const auto& k : keys) {
    if (internal::ClassifyName(k).kind == internal::NameKind::kData) data.push_back(k);
  }
  ASSERT_EQ(data.size(), static_cast<size_t>(kWorld));
  internal::KnownMetadata known;
  known.key = ".metadata";
  known.hash = internal::Xxh3(bytes.data(), bytes.size());
  known.referenced = {data[0]};  // deliberately incomplete: shows which source was used
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> trusted,
                            internal::FindLeftovers(*store, keys, -1, &known));
  EXPECT_EQ(trusted, std::vector<std::string>(data.begin() + 1, data.end()));
  known.hash ^= 1;  // other bytes than those committed: parsed, nothing is a leftover
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> parsed,
                            internal::FindLeftovers(*store, keys, -1, &known));
  EXPECT_TRUE(parsed.empty());
  // Naming every data file and the manifest settles them all: nothing is read, and only a
  // temporary is a leftover. One unnamed data file, and the metadata is read again.
  known.hash ^= 1;
  known.referenced = data;
  FaultStore counting(*store);
  std::vector<std::string> with_tmp = keys;
  with_tmp.push_back(".metadata.tmp");
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> settled,
                            internal::FindLeftovers(counting, with_tmp, -1, &known));
  EXPECT_EQ(settled, std::vector<std::string>{".metadata.tmp"});
  EXPECT_EQ(counting.count(StoreOp::kOpenRead), 0u);
  known.referenced.pop_back();
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> unsettled,
                            internal::FindLeftovers(counting, with_tmp, -1, &known));
  EXPECT_EQ(unsettled, (std::vector<std::string>{data.back(), ".metadata.tmp"}));
  EXPECT_GE(counting.count(StoreOp::kOpenRead), 1u);
}

TEST(LeftoversTest, ARankLocalSaveRemovesOnlyItsOwnRanksLeftovers) {
  TempDir tmp;
  const std::string dir = tmp.Join("ck");
  auto save_local = [&](uint64_t seed) {
    return OnRanks(2, [&](Communicator& comm) {
      return Save(RankState(comm.rank(), seed, 4, 2), dir,
                  {.comm = &comm, .use_collectives = false})
          .status();
    });
  };
  for (const Status& s : save_local(1)) DCPP_ASSERT_OK(s);
  DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/__0_5.distcp", "x"));
  DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/__3_0.distcp", "x"));
  DCPP_ASSERT_OK(testing::WriteFileBytes(dir + "/__0.metadata.tmp", "x"));
  for (const Status& s : save_local(2)) DCPP_ASSERT_OK(s);
  EXPECT_FALSE(fs::exists(dir + "/__0_5.distcp"));
  EXPECT_FALSE(fs::exists(dir + "/__0.metadata.tmp"));
  EXPECT_TRUE(fs::exists(dir + "/__3_0.distcp"));  // rank 3 is nobody's business here
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> removed, CollectGarbage(dir));
  EXPECT_EQ(removed, std::vector<std::string>{"__3_0.distcp"});
  Value sd = WholeState(4, 2);
  DCPP_ASSERT_OK(Load(sd, dir));
  EXPECT_EQ(sd.Find("step")->as_int(), 2);
}

// ------------------------------------------------------------------ full disks

TEST(DiskFullTest, NoSpaceOnOneRankGivesEveryRankTheSameErrorAndKeepsTheLastCheckpoint) {
  TempDir tmp;
  const std::string dir = tmp.Join("ck");
  DCPP_ASSERT_OK(SaveOnRanks(dir, 1, 64));
  for (StoreOp op : {StoreOp::kAppend, StoreOp::kSync, StoreOp::kClose}) {
    SCOPED_TRACE(std::string(StoreOpName(op)));
    std::vector<Status> statuses = OnRanks(kWorld, [&](Communicator& comm) {
      auto base = OpenLocalStore(dir, false).value();
      FaultStore faulty(*base);
      // What the local store's I/O stack returns for ENOSPC.
      if (comm.rank() == 1) {
        faulty.AddFault({op, 1, ErrnoToStatus(ENOSPC, "writing"), ".distcp"});
      }
      FileSystemWriter writer(&faulty, dir, {});
      return Save(RankState(comm.rank(), 2, 64), writer, {.comm = &comm}).status();
    });
    ExpectSameErrorEverywhere(statuses);
    EXPECT_THAT(statuses[0],
                StatusIs(StatusCode::kUnavailable,
                         AllOf(HasSubstr("writing failed on rank 1"),
                               HasSubstr("No space left on device"), HasSubstr(".distcp"))));
    EXPECT_EQ(LoadedSeed(dir, 64), 1);
  }
  DCPP_ASSERT_OK(SaveOnRanks(dir, 3, 64));
  EXPECT_EQ(LoadedSeed(dir, 64), 3);
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> left, CollectGarbage(dir, true));
  EXPECT_TRUE(left.empty());
}

// A real full file system: a tmpfs of 8 MiB that a three-rank save of 12 MiB overflows.
TEST(DiskFullTest, ASmallTmpfsThatOverflows) {
  TempDir tmp;
  const std::string mnt = tmp.Join("tmpfs");
  fs::create_directories(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=8m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here (" << std::strerror(errno)
                 << "); the fault-store test covers ENOSPC";
  }
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  const std::string dir = mnt + "/ck";
  constexpr int64_t kSmall = 256, kLarge = 4096;  // 256 KiB and 4 MiB per rank
  DCPP_ASSERT_OK(SaveOnRanks(dir, 1, kSmall));
  std::vector<Status> statuses = OnRanks(kWorld, [&](Communicator& comm) {
    return Save(RankState(comm.rank(), 2, kLarge), dir, {.comm = &comm}).status();
  });
  ExpectSameErrorEverywhere(statuses);
  EXPECT_THAT(statuses[0],
              StatusIs(StatusCode::kUnavailable, HasSubstr("No space left on device")));
  EXPECT_EQ(LoadedSeed(dir, kSmall), 1);
  DCPP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> left, CollectGarbage(dir, true));
  EXPECT_FALSE(left.empty()) << "the failed save left no partial files";
  std::cout << "the overflowing save left " << left.size() << " files\n";
  // The next save finds the space the failed one took: its leftovers go before it writes.
  DCPP_ASSERT_OK(SaveOnRanks(dir, 3, 2 * kSmall));
  EXPECT_EQ(LoadedSeed(dir, 2 * kSmall), 3);
  DCPP_ASSERT_OK_AND_ASSIGN(left, CollectGarbage(dir, true));
  EXPECT_TRUE(left.empty());
}

}  // namespace
}  // namespace dcpp
