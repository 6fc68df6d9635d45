#include "dcpp/async_save.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "checkpoint/steps.h"
#include "dcpp/comm.h"
#include "testing/sanitizers.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

StateDict MakeState(uint64_t seed, int64_t rows = 64) {
  StateDict sd = Value::MakeDict();
  StateDict model = Value::MakeDict();
  model.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {rows, 256}, seed)));
  model.Set("b", Value::FromTensor(PatternTensor(DType::kBFloat16, {256}, seed + 1)));
  sd.Set("model", std::move(model));
  sd.Set("step", Value::Int(static_cast<int64_t>(seed)));
  return sd;
}

StateDict Loaded(const std::string& dir, const StateDict& like) {
  StateDict sd = Value::MakeDict();
  StateDict model = Value::MakeDict();
  const Value* m = like.Find("model");
  for (const char* k : {"w", "b"}) {
    const Tensor& t = m->Find(k)->tensor();
    model.Set(k, Value::FromTensor(Tensor::Zeros(t.dtype(), t.shape())));
  }
  sd.Set("model", std::move(model));
  sd.Set("step", Value::Int(-1));
  Status s = Load(sd, dir);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return sd;
}

int64_t RssBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

TEST(AsyncSaveTest, FuturesResolveInOrderAndTheCheckpointLoads) {
  TempDir tmp;
  StateDict sd = MakeState(3);
  AsyncSaveHandle h = AsyncSave(sd, tmp.Join("ckpt"));
  // Without a budget staging is done when AsyncSave returns.
  ASSERT_EQ(h.staged.wait_for(std::chrono::seconds(0)), std::future_status::ready);
  DCPP_ASSERT_OK(h.staged.get());
  Result<Metadata> md = h.committed.get();
  DCPP_ASSERT_OK(md.status());
  EXPECT_TRUE(std::filesystem::exists(tmp.Join("ckpt/.metadata")));
  EXPECT_EQ(Loaded(tmp.Join("ckpt"), sd), sd);
  EXPECT_GT(h.stats.staged_bytes, 64 * 256 * 4);
  EXPECT_EQ(h.stats.unstaged_bytes, 0);
}

TEST(AsyncSaveTest, TensorsChangedAfterStagedDoNotChangeWhatIsWritten) {
  TempDir tmp;
  StateDict sd = MakeState(5);
  StateDict original = MakeState(5);
  AsyncSaveHandle h = AsyncSave(sd, tmp.Join("ckpt"));
  DCPP_ASSERT_OK(h.staged.get());
  // The training step overwrites the state in place while the save is in the background.
  Tensor& w = sd.Find("model")->Find("w")->tensor();
  std::memset(w.data(), 0x7f, w.nbytes());
  DCPP_ASSERT_OK(h.committed.get().status());
  EXPECT_EQ(Loaded(tmp.Join("ckpt"), original), original);
}

TEST(AsyncSaveTest, SecondSaveOfTheSameShapesAllocatesNothingAndTakesNoFaults) {
  TempDir tmp;
  StateDict a = MakeState(1, 1024);  // 1 MiB of float32
  AsyncSaveHandle first = AsyncSave(a, tmp.Join("a"));
  DCPP_ASSERT_OK(first.committed.get().status());
  const int64_t arenas = StagingArenaAllocations();
  StateDict b = MakeState(2, 1024);
  // Every later save reuses the arena. The kernel may still migrate one of its pages at any
  // time (compaction, frequent on a VM that hands free 2 MiB blocks back to its host), and the
  // next touch of such a page faults: so one of three saves must take no fault at all.
  int64_t fewest_faults = -1;
  for (int attempt = 0; attempt < 3 && fewest_faults != 0; ++attempt) {
    AsyncSaveHandle second = AsyncSave(b, tmp.Join("b"));
    DCPP_ASSERT_OK(second.committed.get().status());
    EXPECT_EQ(second.stats.arena_allocations, 0);
    EXPECT_EQ(StagingArenaAllocations(), arenas);
    if (fewest_faults < 0 || second.stats.page_faults < fewest_faults) {
      fewest_faults = second.stats.page_faults;
    }
  }
  if (!::dcpp::testing::kSanitizer) {
    EXPECT_EQ(fewest_faults, 0);  // sanitizers fault in shadow pages
  }
  EXPECT_EQ(Loaded(tmp.Join("b"), b), b);
}

TEST(AsyncSaveTest, MemoryDoesNotGrowOverAHundredBackToBackSaves) {
  if (::dcpp::testing::kSanitizer) {
    GTEST_SKIP() << "RSS includes the sanitizer's quarantine; LeakSanitizer checks leaks here";
  }
  TempDir tmp;
  int64_t rss_after_warmup = 0;
  for (int i = 0; i < 100; ++i) {
    StateDict sd = MakeState(static_cast<uint64_t>(i), 512);
    AsyncSaveHandle h = AsyncSave(sd, tmp.Join(i % 2 ? "odd" : "even"));
    DCPP_ASSERT_OK(h.staged.get());
    if (i == 99) {
      DCPP_ASSERT_OK(h.committed.get().status());
      EXPECT_EQ(Loaded(tmp.Join("odd"), sd), sd);
    }
    if (i == 9) {
      WaitForAsyncSaves();
      rss_after_warmup = RssBytes();
    }
  }
  WaitForAsyncSaves();
  // The state is 512 KiB: keeping even a fifth of it per save would grow by ~9 MiB over the 90
  // saves after warm-up. The bound leaves room for allocator and page-cache bookkeeping noise,
  // which reached 2 MiB on a loaded machine.
  EXPECT_LT(RssBytes() - rss_after_warmup, 6 << 20);
}

// Blocks WriteData until released, to hold a save in flight.
class GatedWriter final : public StorageWriter {
 public:
  GatedWriter(StorageWriter& inner) : inner_(inner) {}
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  Status SetUp(bool c, int r, bool u) override { return inner_.SetUp(c, r, u); }
  Result<SavePlan> PrepareLocalPlan(SavePlan p) override {
    return inner_.PrepareLocalPlan(std::move(p));
  }
  Result<std::vector<SavePlan>> PrepareGlobalPlan(std::vector<SavePlan> p) override {
    return inner_.PrepareGlobalPlan(std::move(p));
  }
  Result<std::vector<WriteResult>> WriteData(const SavePlan& p, SavePlanner& pl) override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
    lock.unlock();
    return inner_.WriteData(p, pl);
  }
  Status Finish(Metadata& m, const std::vector<std::vector<WriteResult>>& r) override {
    return inner_.Finish(m, r);
  }
  Status CleanUp() override { return inner_.CleanUp(); }
  void EndSave() override { inner_.EndSave(); }
  std::string checkpoint_id() const override { return inner_.checkpoint_id(); }

 private:
  StorageWriter& inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST(AsyncSaveTest, ASecondSaveWhileOneRunsFailsClearlyUnderKFail) {
  TempDir tmp;
  DCPP_ASSERT_OK_AND_ASSIGN(auto inner, FileSystemWriter::Open(tmp.Join("slow")));
  GatedWriter gated(*inner);
  StateDict sd = MakeState(7);
  AsyncSaveHandle slow = AsyncSave(sd, gated);
  AsyncSaveOptions fail;
  fail.in_flight = InFlightPolicy::kFail;
  AsyncSaveHandle refused = AsyncSave(sd, tmp.Join("other"), fail);
  EXPECT_THAT(refused.committed.get().status(),
              StatusIs(StatusCode::kFailedPrecondition, HasSubstr("in flight")));
  EXPECT_FALSE(std::filesystem::exists(tmp.Join("other/.metadata")));
  gated.Open();
  DCPP_ASSERT_OK(slow.committed.get().status());
  // Once committed, the next save starts at once, even under kFail.
  AsyncSaveHandle next = AsyncSave(sd, tmp.Join("other"), fail);
  DCPP_ASSERT_OK(next.committed.get().status());
}

TEST(AsyncSaveTest, UnderKWaitASecondSaveWaitsForTheFirst) {
  TempDir tmp;
  DCPP_ASSERT_OK_AND_ASSIGN(auto inner, FileSystemWriter::Open(tmp.Join("slow")));
  GatedWriter gated(*inner);
  StateDict sd = MakeState(8);
  AsyncSaveHandle slow = AsyncSave(sd, gated);
  std::atomic<bool> returned{false};
  std::thread second([&] {
    AsyncSaveHandle h = AsyncSave(sd, tmp.Join("second"));
    returned = true;
    EXPECT_TRUE(h.committed.get().ok());
  });
  // The second save cannot have started: the first holds the slot until the gate opens.
  EXPECT_FALSE(returned.load());
  gated.Open();
  second.join();
  DCPP_ASSERT_OK(slow.committed.get().status());
  EXPECT_TRUE(std::filesystem::exists(tmp.Join("second/.metadata")));
}

TEST(AsyncSaveTest, ABudgetStagesWhatFitsAndTheCallerWaitsForTheRest) {
  TempDir tmp;
  StateDict sd = MakeState(9, 256);  // w: 256 KiB, then b: 512 bytes
  StateDict original = MakeState(9, 256);
  AsyncSaveOptions options;
  options.staging.budget_bytes = 4096;
  AsyncSaveHandle h = AsyncSave(sd, tmp.Join("ckpt"), options);
  DCPP_ASSERT_OK(h.staged.get());
  EXPECT_GT(h.stats.unstaged_bytes, 0);
  // After staged, changes are safe even for the unstaged tensors.
  Tensor& w = sd.Find("model")->Find("w")->tensor();
  std::memset(w.data(), 0, w.nbytes());
  DCPP_ASSERT_OK(h.committed.get().status());
  EXPECT_EQ(Loaded(tmp.Join("ckpt"), original), original);
}

TEST(AsyncSaveTest, SharedMemoryArenaSavesTheSameBytes) {
  TempDir tmp;
  StateDict sd = MakeState(11);
  AsyncSaveOptions options;
  options.staging.use_shared_memory = true;
  AsyncSaveHandle h = AsyncSave(sd, tmp.Join("ckpt"), options);
  DCPP_ASSERT_OK(h.committed.get().status());
  EXPECT_EQ(Loaded(tmp.Join("ckpt"), sd), sd);
}

TEST(AsyncSaveTest, ARankFailingInTheBackgroundFailsEveryRankAndCommitsNothing) {
  TempDir tmp;
  const std::string dir = tmp.Join("ckpt");
  // A good checkpoint first: the failed save must leave it loadable.
  StateDict good = Value::MakeDict();
  good.Set("x", Value::FromTensor(IotaTensor(DType::kFloat32, {8})));
  DCPP_ASSERT_OK(Save(good, dir).status());
  internal::SetFaultHookForTesting([](std::string_view point, int rank) {
    if (point == "save.writer.write_data" && rank == 1) return UnavailableError("disk gone");
    return Status::Ok();
  });
  std::vector<Status> outcomes(3);
  RunOnThreads(3, [&](Communicator& comm) {
    StateDict sd = Value::MakeDict();
    sd.Set("x", Value::FromTensor(PatternTensor(DType::kFloat32, {8}, 40 + comm.rank())));
    AsyncSaveOptions options;
    options.save.comm = &comm;
    AsyncSaveHandle h = AsyncSave(sd, dir, options);
    // Staging succeeded on every rank; the failure is in the background write of rank 1.
    EXPECT_TRUE(h.staged.get().ok());
    outcomes[comm.rank()] = h.committed.get().status();
  });
  internal::SetFaultHookForTesting(nullptr);
  for (int r = 0; r < 3; ++r) {
    EXPECT_THAT(outcomes[r], StatusIs(StatusCode::kUnavailable, HasSubstr("disk gone")));
    EXPECT_THAT(outcomes[r].message(), HasSubstr("rank 1"));
    // The same error on every rank, apart from the rank that reports it.
    EXPECT_NE(outcomes[r].message().find("failed on rank 1"), std::string::npos);
  }
  StateDict back = Value::MakeDict();
  back.Set("x", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {8})));
  DCPP_ASSERT_OK(Load(back, dir));
  EXPECT_EQ(back, good);
}

TEST(AsyncSaveTest, FourRanksSaveShardsThatOneProcessLoadsWhole) {
  TempDir tmp;
  const std::string dir = tmp.Join("ckpt");
  Tensor full = IotaTensor(DType::kFloat32, {8, 16});
  RunOnThreads(4, [&](Communicator& comm) {
    ShardedTensor st;
    st.dtype = DType::kFloat32;
    st.global_shape = {8, 16};
    Tensor piece =
        Tensor::FromBytes(DType::kFloat32, {2, 16}, full.data_as<float>() + 32 * comm.rank());
    st.shards.push_back({{2 * comm.rank(), 0}, piece});
    StateDict sd = Value::MakeDict();
    sd.Set("w", Value::FromSharded(st));
    AsyncSaveOptions options;
    options.save.comm = &comm;
    AsyncSaveHandle h = AsyncSave(sd, dir, options);
    EXPECT_TRUE(h.committed.get().ok());
  });
  StateDict back = Value::MakeDict();
  back.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {8, 16})));
  DCPP_ASSERT_OK(Load(back, dir));
  EXPECT_TRUE(back.Find("w")->tensor().BitwiseEqual(full));
}

}  // namespace
}  // namespace dcpp

namespace dcpp {
namespace {

using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

StateDict ProcessState(uint64_t seed) {
  StateDict sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {128, 64}, seed)));
  sd.Set("h", Value::FromTensor(PatternTensor(DType::kFloat16, {33}, seed + 1)));
  sd.Set("note", Value::Str("epoch " + std::to_string(seed)));
  return sd;
}

StateDict LoadProcessState(const std::string& dir) {
  StateDict sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {128, 64})));
  sd.Set("h", Value::FromTensor(Tensor::Zeros(DType::kFloat16, {33})));
  sd.Set("note", Value::None());
  Status s = Load(sd, dir);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return sd;
}

AsyncSaveOptions ProcessOptions() {
  AsyncSaveOptions options;
  options.executor = AsyncExecutor::kProcess;
  return options;
}

TEST(AsyncSaveProcessTest, AWriterProcessWritesWhatWasStagedAndStaysForTheNextSave) {
  TempDir tmp;
  StateDict sd = ProcessState(1);
  StateDict original = ProcessState(1);
  AsyncSaveHandle h = AsyncSave(sd, tmp.Join("a"), ProcessOptions());
  DCPP_ASSERT_OK(h.staged.get());
  Tensor& w = sd.Find("w")->tensor();
  std::memset(w.data(), 0, w.nbytes());
  DCPP_ASSERT_OK(h.committed.get().status());
  EXPECT_EQ(LoadProcessState(tmp.Join("a")), original);
  const int pid = WriterProcessPid();
  EXPECT_GT(pid, 0);
  StateDict next = ProcessState(2);
  DCPP_ASSERT_OK(AsyncSave(next, tmp.Join("b"), ProcessOptions()).committed.get().status());
  EXPECT_EQ(WriterProcessPid(), pid);  // long-lived: the same process served both saves
  EXPECT_EQ(LoadProcessState(tmp.Join("b")), next);
}

// The arena is mapped anew when the staging options change (here: a thread-executor save in
// between, which stages in private memory), and the new mapping tends to land at the old one's
// address with the same size. The long-lived writer must map the new shared memory, not keep
// writing the old one's bytes.
TEST(AsyncSaveProcessTest, AnArenaMappedAnewAtTheSameAddressReachesTheWriter) {
  TempDir tmp;
  StateDict first = ProcessState(6);
  DCPP_ASSERT_OK(AsyncSave(first, tmp.Join("a"), ProcessOptions()).committed.get().status());
  const int pid = WriterProcessPid();
  ASSERT_GT(pid, 0);
  StateDict between = ProcessState(7);
  DCPP_ASSERT_OK(AsyncSave(between, tmp.Join("b"), AsyncSaveOptions()).committed.get().status());
  StateDict second = ProcessState(8);
  DCPP_ASSERT_OK(AsyncSave(second, tmp.Join("c"), ProcessOptions()).committed.get().status());
  EXPECT_EQ(WriterProcessPid(), pid);  // the same writer, given the new arena
  EXPECT_EQ(LoadProcessState(tmp.Join("c")), second);
  EXPECT_EQ(LoadProcessState(tmp.Join("a")), first);
}

TEST(AsyncSaveProcessTest, AWriterKilledMidSaveFailsItKeepsTheLastCheckpointAndIsReplaced) {
  TempDir tmp;
  const std::string dir = tmp.Join("ckpt");
  StateDict good = ProcessState(3);
  DCPP_ASSERT_OK(AsyncSave(good, dir, ProcessOptions()).committed.get().status());
  // A fresh writer that holds its request unanswered, so it is surely mid-save when killed.
  StopWriterProcesses();
  setenv("DCPP_WRITER_STALL_FOR_TESTING", "1", 1);
  StateDict doomed = ProcessState(4);
  AsyncSaveHandle h = AsyncSave(doomed, dir, ProcessOptions());
  int pid = -1;
  for (int i = 0; i < 30000 && pid <= 0; ++i) {
    pid = WriterProcessPid();
    if (pid <= 0) usleep(1000);
  }
  unsetenv("DCPP_WRITER_STALL_FOR_TESTING");
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  Status s = h.committed.get().status();
  EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable, HasSubstr("killed by signal 9")));
  EXPECT_THAT(s.message(), HasSubstr("nothing was committed"));
  EXPECT_EQ(LoadProcessState(dir), good);  // the last good checkpoint is untouched
  StateDict after = ProcessState(5);
  DCPP_ASSERT_OK(AsyncSave(after, dir, ProcessOptions()).committed.get().status());
  EXPECT_GT(WriterProcessPid(), 0);
  EXPECT_NE(WriterProcessPid(), pid);
  EXPECT_EQ(LoadProcessState(dir), after);
}

}  // namespace
}  // namespace dcpp

namespace dcpp {
namespace {

// Pinned staging needs CUDA (and, to pin, a device): without either the save fails clearly on
// staging, with both it saves the same bytes.
TEST(AsyncSaveTest, PinnedStagingSavesOrFailsClearly) {
  ::dcpp::testing::TempDir tmp;
  StateDict sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(::dcpp::testing::PatternTensor(DType::kFloat32, {64, 64}, 21)));
  AsyncSaveOptions options;
  options.staging.use_pinned_memory = true;
  AsyncSaveHandle h = AsyncSave(sd, tmp.Join("ckpt"), options);
  Result<Metadata> md = h.committed.get();
  if (md.ok()) {
    StateDict back = Value::MakeDict();
    back.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {64, 64})));
    DCPP_ASSERT_OK(Load(back, tmp.Join("ckpt")));
    EXPECT_EQ(back, sd);
    return;
  }
  EXPECT_TRUE(md.status().code() == StatusCode::kUnimplemented ||
              md.status().code() == StatusCode::kUnavailable)
      << md.status().ToString();
  EXPECT_THAT(md.status().message(), ::testing::HasSubstr("staging"));
  EXPECT_FALSE(h.staged.get().ok());
  EXPECT_FALSE(std::filesystem::exists(tmp.Join("ckpt/.metadata")));
}

}  // namespace
}  // namespace dcpp
