#include "core/thread_pool.h"

#include <atomic>
#include <thread>

#include "testing/testing.h"

namespace dcpp::internal {
namespace {

using ::dcpp::testing::StatusIs;

TEST(ThreadPoolTest, RunsEveryIndexOnceAndKeepsEachStatus) {
  std::vector<std::atomic<int>> runs(100);
  auto statuses = ParallelFor(100, 4, [&](size_t i) -> Status {
    runs[i].fetch_add(1);
    if (i % 7 == 3) return DataLossError("bad " + std::to_string(i));
    return Status::Ok();
  });
  ASSERT_EQ(statuses.size(), 100u);
  for (size_t i = 0; i < 100; ++i) {
    EXPECT_EQ(runs[i].load(), 1) << i;
    EXPECT_EQ(statuses[i].ok(), i % 7 != 3) << i;
  }
  EXPECT_THAT(FirstError(statuses), StatusIs(StatusCode::kDataLoss, ::testing::HasSubstr("bad 3")));
  EXPECT_TRUE(FirstError(ParallelFor(0, 4, [](size_t) { return Status::Ok(); })).ok());
}

TEST(ThreadPoolTest, NeverRunsMoreThanTheParallelismAtOnce) {
  std::atomic<int> now{0}, peak{0};
  ParallelFor(64, 3, [&](size_t) {
    int n = now.fetch_add(1) + 1;
    int p = peak.load();
    while (n > p && !peak.compare_exchange_weak(p, n)) {
    }
    std::this_thread::yield();
    now.fetch_sub(1);
    return Status::Ok();
  });
  EXPECT_LE(peak.load(), 3);
  EXPECT_GE(PoolThreadCount(), 2u);  // workers are kept for later calls
}

TEST(ThreadPoolTest, NestedCallsFinishEvenWhenEveryWorkerIsBusy) {
  std::atomic<int> inner{0};
  auto statuses = ParallelFor(8, 8, [&](size_t) {
    return FirstError(ParallelFor(8, 8, [&](size_t) {
      inner.fetch_add(1);
      return Status::Ok();
    }));
  });
  EXPECT_TRUE(FirstError(statuses).ok());
  EXPECT_EQ(inner.load(), 64);
}

// Bound processes keep their mask; free ones share the machine with their launcher's other
// local processes, never below one core.
TEST(ThreadPoolTest, CoresShareFollowsBindingAndLocalProcesses) {
  EXPECT_EQ(CoresShare(2, 2, 0), 2u);  // no launcher
  EXPECT_EQ(CoresShare(2, 2, 1), 2u);
  EXPECT_EQ(CoresShare(16, 16, 4), 4u);  // four unbound ranks on a 16-core machine
  EXPECT_EQ(CoresShare(2, 2, 4), 1u);    // oversubscribed
  EXPECT_EQ(CoresShare(4, 16, 4), 4u);   // bound to four cores
  EXPECT_EQ(CoresShare(1, 16, 8), 1u);
  EXPECT_EQ(CoresShare(0, 16, 2), 1u);  // an empty mask reads as one core
  EXPECT_GE(CoresForThisProcess(), 1u);
}

}  // namespace
}  // namespace dcpp::internal
