// A tiny program built against the installed dcpp: saves a sharded tensor with 2 ranks (threads)
// and loads it whole in one process. Exit status 0 when every element round-trips.
#include <cstdio>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  dcpp::RunOnThreads(2, [&](dcpp::Communicator& comm) {
    dcpp::Tensor rows = dcpp::Tensor::Zeros(dcpp::DType::kFloat32, {2, 3});
    for (int i = 0; i < 6; ++i) rows.data_as<float>()[i] = comm.rank() * 6 + i;
    dcpp::Value sd = dcpp::Value::MakeDict();
    sd.Set("w", dcpp::Value::FromSharded(
                    {dcpp::DType::kFloat32, {4, 3}, {{{comm.rank() * 2, 0}, rows}}}));
    auto md = dcpp::Save(sd, dir, {.comm = &comm});
    if (!md.ok()) std::fprintf(stderr, "%s\n", md.status().ToString().c_str());
  });
  dcpp::Value sd = dcpp::Value::MakeDict();
  dcpp::Tensor w = dcpp::Tensor::Zeros(dcpp::DType::kFloat32, {4, 3});
  sd.Set("w", dcpp::Value::FromTensor(w));
  dcpp::Status s = dcpp::Load(sd, dir);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  for (int i = 0; i < 12; ++i) {
    if (w.data_as<float>()[i] != i) return 1;
  }
  std::printf("consumer: 12 elements round-trip\n");
  return 0;
}
