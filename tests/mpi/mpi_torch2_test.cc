// Checkpoints PyTorch 2.13 saved with 4 gloo ranks (dcp.save, dcp.async_save, dcp.save without
// collectives; tests/interop/dcp2_peer.py, run by the CTest fixture) loaded by K MPI ranks:
//   mpiexec -np K dcpp_mpi_torch2_test --dir=D
// Each rank loads its slab of every tensor (split on rows, or on the last dimension for odd K)
// and compares it bit for bit with the peer's torch.save file of the whole state, D/expected.pt.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "dcpp/mpi_comm.h"
#include "testing/expected_state.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::ExpectedState;
using ::dcpp::testing::IsOk;
using ::testing::IsEmpty;

std::string g_dir;  // --dir: the peer's output

TEST(MpiTorch2Test, TorchSavedCheckpointsLoad) {
  ASSERT_FALSE(g_dir.empty()) << "pass --dir=DIR";
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD);
  ASSERT_THAT(comm.status(), IsOk());
  DCPP_ASSERT_OK_AND_ASSIGN(ExpectedState expected,
                            ::dcpp::testing::ReadExpectedState(g_dir + "/expected.pt"));
  const int dim = (*comm)->size() % 2 == 0 ? 0 : 9;
  for (const char* kind : {"sync", "async", "nocoll"}) {
    EXPECT_THAT(::dcpp::testing::LoadAndCompare(g_dir + "/" + kind, expected, comm->get(), dim),
                IsEmpty())
        << kind << " on " << (*comm)->size() << " MPI ranks";
  }
}

}  // namespace
}  // namespace dcpp

int main(int argc, char** argv) {
  auto session = dcpp::MpiSession::Init(&argc, &argv);
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", session.status().ToString().c_str());
    return 1;
  }
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--dir=", 6) == 0) dcpp::g_dir = argv[i] + 6;
  }
  int rc = RUN_ALL_TESTS();
  int worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  session->reset();
  return worst;
}
