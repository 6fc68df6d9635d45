// Links dcpp::mpi from the installed package and saves through an MpiCommunicator (one rank,
// run without mpiexec).
#include <cstdio>

#include "dcpp/checkpoint.h"
#include "dcpp/mpi_comm.h"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  auto session = dcpp::MpiSession::Init(&argc, &argv);
  if (!session.ok()) return 1;
  int rc = 1;
  {
    auto comm = dcpp::MpiCommunicator::Create();
    if (!comm.ok()) return 1;
    dcpp::Value sd = dcpp::Value::MakeDict();
    sd.Set("step", dcpp::Value::Int(7));
    auto md = dcpp::Save(sd, argv[1], {.comm = comm->get()});
    if (md.ok()) {
      std::printf("consumer_mpi: saved with %d rank(s)\n", (*comm)->size());
      rc = 0;
    } else {
      std::fprintf(stderr, "%s\n", md.status().ToString().c_str());
    }
  }
  return rc;
}
