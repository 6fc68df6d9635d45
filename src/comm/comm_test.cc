#include "dcpp/comm.h"

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>

#include "testing/comm_conformance.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::CommPayload;
using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

TEST(SingleCommunicatorTest, Collectives) {
  SingleCommunicator comm;
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  testing::ExpectCollectivesWork(comm);
}

TEST(SingleCommunicatorTest, SubGroups) {
  SingleCommunicator comm;
  testing::ExpectSubGroupsWork(comm);
}

TEST(SingleCommunicatorTest, LocalCopies) {
  SingleCommunicator comm;
  std::string buf = "unchanged";
  DCPP_EXPECT_OK(comm.Broadcast(buf, 0));
  EXPECT_EQ(buf, "unchanged");
  DCPP_ASSERT_OK_AND_ASSIGN(auto all, comm.AllGather("mine"));
  EXPECT_EQ(all, std::vector<std::string>{"mine"});
  DCPP_ASSERT_OK_AND_ASSIGN(auto part, comm.Scatter({"only"}, 0));
  EXPECT_EQ(part, "only");
  EXPECT_THAT(comm.Scatter({}, 0).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("0 parts")));
}

class ThreadCommSizeTest : public ::testing::TestWithParam<int> {};

TEST_P(ThreadCommSizeTest, Collectives) {
  const int n = GetParam();
  std::atomic<int> ran{0};
  RunOnThreads(n, [&](Communicator& comm) {
    EXPECT_EQ(comm.size(), n);
    testing::ExpectCollectivesWork(comm);
    ++ran;
  });
  EXPECT_EQ(ran.load(), n);
}

TEST_P(ThreadCommSizeTest, SubGroups) {
  RunOnThreads(GetParam(), [](Communicator& comm) { testing::ExpectSubGroupsWork(comm); });
}

INSTANTIATE_TEST_SUITE_P(Sizes, ThreadCommSizeTest, ::testing::Range(1, 9));

TEST(ThreadCommTest, LargeBuffers) {
  RunOnThreads(
      4, [](Communicator& comm) { testing::ExpectLargeCollectivesWork(comm, size_t{64} << 20); });
}

TEST(ThreadCommTest, RanksAreDistinctAndOrdered) {
  std::vector<std::atomic<int>> seen(6);
  RunOnThreads(6, [&](Communicator& comm) { seen[comm.rank()]++; });
  for (auto& s : seen) EXPECT_EQ(s.load(), 1);
}

TEST(ThreadCommTest, MakeRejectsEmptyGroup) {
  EXPECT_THAT(MakeThreadCommunicators(0).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("at least one")));
}

TEST(ThreadCommTest, BarrierWaitsForEveryRank) {
  std::atomic<int> before{0};
  RunOnThreads(5, [&](Communicator& comm) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10 * comm.rank()));
    ++before;
    DCPP_EXPECT_OK(comm.Barrier());
    EXPECT_EQ(before.load(), 5);
  });
}

TEST(ThreadCommTest, MissingRankTimesOutAndBreaksGroup) {
  ThreadCommOptions options;
  options.timeout = std::chrono::milliseconds(200);
  RunOnThreads(
      3,
      [](Communicator& comm) {
        if (comm.rank() == 2) {
          // Arrives only after the others gave up: the group is broken by then.
          std::this_thread::sleep_for(std::chrono::milliseconds(600));
          EXPECT_THAT(comm.Barrier(), StatusIs(StatusCode::kAborted, HasSubstr("timed out")));
          return;
        }
        const auto start = std::chrono::steady_clock::now();
        Status st = comm.AllGather("x").status();
        EXPECT_THAT(st, StatusIs(StatusCode::kAborted, HasSubstr("rank(s) 2")));
        EXPECT_THAT(st, StatusIs(StatusCode::kAborted, HasSubstr("AllGather")));
        EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
        // Broken for good: fails at once, without waiting for the timeout again.
        EXPECT_THAT(comm.Barrier(), StatusIs(StatusCode::kAborted, ::testing::_));
      },
      options);
}

TEST(ThreadCommTest, MismatchedCollectivesAreReportedOnEveryRank) {
  RunOnThreads(3, [](Communicator& comm) {
    Status st;
    if (comm.rank() == 1) {
      st = comm.Barrier();
    } else {
      st = comm.Gather("x", 0).status();
    }
    EXPECT_THAT(st, StatusIs(StatusCode::kInvalidArgument, HasSubstr("mismatched")));
    // Different roots are a mismatch too.
    std::string buf = "b";
    EXPECT_THAT(comm.Broadcast(buf, comm.rank() == 0 ? 0 : 1),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("root")));
    // The group survives a mismatch.
    DCPP_EXPECT_OK(comm.Barrier());
  });
}

TEST(ThreadCommTest, ExceptionOnOneRankReleasesThePeers) {
  const auto start = std::chrono::steady_clock::now();
  std::atomic<int> aborted{0};
  EXPECT_THROW(RunOnThreads(4,
                            [&](Communicator& comm) {
                              if (comm.rank() == 3) throw std::runtime_error("boom");
                              Status st = comm.Barrier();
                              if (st.code() == StatusCode::kAborted) ++aborted;
                            }),
               std::runtime_error);
  EXPECT_EQ(aborted.load(), 3);
  // The default timeout is 60 s; breaking the group must not wait for it.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(ThreadCommTest, ResultsAreDeterministic) {
  std::vector<std::string> first(4), second(4);
  for (auto* out : {&first, &second}) {
    RunOnThreads(4, [&](Communicator& comm) {
      auto all = comm.AllGather(CommPayload(comm.rank(), 5, 10 + comm.rank()));
      ASSERT_THAT(all.status(), IsOk());
      std::string joined;
      for (const auto& s : *all) joined += s;
      (*out)[comm.rank()] = joined;
    });
  }
  EXPECT_EQ(first, second);
  for (int r = 1; r < 4; ++r) EXPECT_EQ(first[r], first[0]);
}

TEST(ThreadCommTest, ManyRoundsBackToBack) {
  // Rounds reuse the group's state; no rank may run ahead into the next round's data.
  RunOnThreads(8, [](Communicator& comm) {
    for (int i = 0; i < 500; ++i) {
      std::string buf = comm.rank() == i % 8 ? std::to_string(i) : "";
      ASSERT_THAT(comm.Broadcast(buf, i % 8), IsOk());
      ASSERT_EQ(buf, std::to_string(i));
    }
  });
}

}  // namespace
}  // namespace dcpp
