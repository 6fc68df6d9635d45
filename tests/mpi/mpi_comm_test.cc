// MpiCommunicator under mpiexec: every process runs every test; a test's collectives are issued
// in the same order everywhere. The exit status is the worst over all ranks.
#include <mpi.h>
#include <sched.h>
#include <unistd.h>

#include <cstdio>

#include "core/thread_pool.h"
#include "dcpp/mpi_comm.h"
#include "testing/comm_conformance.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

std::unique_ptr<MpiCommunicator> World(MpiOptions options = {}) {
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD, options);
  EXPECT_THAT(comm.status(), IsOk());
  return comm.ok() ? std::move(*comm) : nullptr;
}

TEST(MpiCommunicatorTest, MatchesWorld) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(comm->rank(), rank);
  EXPECT_EQ(comm->size(), size);
  EXPECT_GE(size, 2) << "run under mpiexec -np 4";
  int result;
  MPI_Comm_compare(comm->comm(), MPI_COMM_WORLD, &result);
  EXPECT_EQ(result, MPI_CONGRUENT) << "the communicator must be a duplicate";
}

// The launcher's count of ranks on this machine (what sizes each rank's share of the cores for
// its writers) is the number MPI itself reports for the machine.
TEST(MpiCommunicatorTest, RanksOnOneMachineShareItsCores) {
  MPI_Comm node;
  ASSERT_EQ(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
            MPI_SUCCESS);
  int local = 0;
  MPI_Comm_size(node, &local);
  MPI_Comm_free(&node);
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
  const size_t allowed = static_cast<size_t>(CPU_COUNT(&set));
  const size_t machine = static_cast<size_t>(sysconf(_SC_NPROCESSORS_ONLN));
  EXPECT_EQ(internal::CoresForThisProcess(),
            internal::CoresShare(allowed, machine, static_cast<size_t>(local)))
      << local << " ranks here, " << allowed << " of " << machine << " cores allowed";
  if (allowed == machine && machine >= static_cast<size_t>(local)) {
    EXPECT_EQ(internal::CoresForThisProcess(), machine / static_cast<size_t>(local));
  }
}

TEST(MpiCommunicatorTest, Collectives) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  testing::ExpectCollectivesWork(*comm);
}

// A tiny message limit sends every payload over the split path (chunked Bcast, Send/Recv).
TEST(MpiCommunicatorTest, CollectivesInSmallMessages) {
  MpiOptions options;
  options.max_message_bytes = 7;
  auto comm = World(options);
  ASSERT_NE(comm, nullptr);
  testing::ExpectCollectivesWork(*comm);
}

TEST(MpiCommunicatorTest, SubGroups) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  testing::ExpectSubGroupsWork(*comm);
}

TEST(MpiCommunicatorTest, LargeBuffers) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  testing::ExpectLargeCollectivesWork(*comm, size_t{64} << 20);
}

TEST(MpiCommunicatorTest, LargeBuffersInChunks) {
  MpiOptions options;
  options.max_message_bytes = (size_t{1} << 20) + 3;  // odd, so the last chunk is short
  auto comm = World(options);
  ASSERT_NE(comm, nullptr);
  testing::ExpectLargeCollectivesWork(*comm, size_t{16} << 20);
}

TEST(MpiCommunicatorTest, RejectsBadOptions) {
  MpiOptions options;
  options.max_message_bytes = 0;
  EXPECT_THAT(MpiCommunicator::Create(MPI_COMM_WORLD, options).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_message_bytes")));
  options.max_message_bytes = size_t{1} << 31;
  EXPECT_THAT(MpiCommunicator::Create(MPI_COMM_WORLD, options).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("max_message_bytes")));
}

TEST(MpiCommunicatorTest, ErrorsReturnOnDcppCommunicator) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  // A negative count is an MPI error; with MPI_ERRORS_RETURN set by Create it comes back as a
  // return code instead of aborting the job.
  EXPECT_NE(MPI_Bcast(nullptr, -1, MPI_BYTE, 0, comm->comm()), MPI_SUCCESS);
  DCPP_EXPECT_OK(comm->Barrier());  // the communicator is still usable
}

}  // namespace
}  // namespace dcpp

int main(int argc, char** argv) {
  auto session = dcpp::MpiSession::Init(&argc, &argv);
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", session.status().ToString().c_str());
    return 1;
  }
  EXPECT_GE((*session)->thread_level(), MPI_THREAD_SERIALIZED);
  ::testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS();
  int worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  session->reset();
  return worst;
}
