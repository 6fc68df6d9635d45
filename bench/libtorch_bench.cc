// The libtorch adapter against libtorch's own serialization, one measurement per process so each
// peak RSS is its own; printed beside the peak before the timed call, which is the model's own
// memory (bench/run_libtorch.sh runs them all and prints the table).
//
//   dcpp_libtorch_bench MODE DIR [MB]
//     MODE: dcpp-save | dcpp-load | torch-save | torch-load
//
// The model is MB MiB of float32 parameters (Linear(4096, 1024) layers) with Adam state after one
// step (exp_avg and exp_avg_sq: the bytes saved are 3 x MB MiB). dcpp-* use dcpp::libtorch::Save
// and Load (one process, 4 writer/reader threads, files fsynced); torch-* use torch::save and
// torch::load of the module and the optimizer (libtorch's archive format), then fsync the files.
// Loads read what the matching save wrote into a fresh model and optimizer.
#include <fcntl.h>
#include <sys/resource.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "dcpp/libtorch.h"

namespace {

torch::nn::Sequential MakeModel(int64_t mb) {
  torch::nn::Sequential seq;
  const int64_t layers = std::max<int64_t>(1, mb / 16);  // 16 MiB of weight per layer
  for (int64_t i = 0; i < layers; ++i) seq->push_back(torch::nn::Linear(4096, 1024));
  return seq;
}

void InitState(torch::nn::Sequential& model, torch::optim::Adam& optim) {
  for (auto& p : model->parameters()) p.mutable_grad() = torch::ones_like(p);
  optim.step();
  for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();  // as after zero_grad
}

int64_t StateBytes(torch::nn::Sequential& model) {
  int64_t n = 0;
  for (auto& p : model->parameters()) n += static_cast<int64_t>(p.nbytes()) * 3;
  return n;
}

void Fsync(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s dcpp-save|dcpp-load|torch-save|torch-load DIR [MB]\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1], dir = argv[2];
  const int64_t mb = argc > 3 ? std::atoll(argv[3]) : 256;
  torch::manual_seed(0);
  auto model = MakeModel(mb);
  torch::optim::Adam optim(model->parameters(), torch::optim::AdamOptions(1e-3));
  const bool saving = mode.ends_with("save");
  if (saving) InitState(model, optim);
  const int64_t bytes = StateBytes(model);
  std::filesystem::create_directories(dir);

  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const double rss_before = static_cast<double>(ru.ru_maxrss) / 1024;  // the model and state
  const auto t0 = std::chrono::steady_clock::now();
  dcpp::Status status;
  if (mode == "dcpp-save") {
    dcpp::SaveOptions options;
    options.writer.thread_count = 4;
    status = dcpp::libtorch::Save(*model, &optim, dir + "/dcpp", options).status();
  } else if (mode == "dcpp-load") {
    dcpp::LoadOptions options;
    options.reader.thread_count = 4;
    status = dcpp::libtorch::Load(*model, &optim, dir + "/dcpp", options);
  } else if (mode == "torch-save") {
    torch::save(model, dir + "/model.pt");
    torch::save(optim, dir + "/optim.pt");
    Fsync(dir + "/model.pt");
    Fsync(dir + "/optim.pt");
  } else if (mode == "torch-load") {
    torch::load(model, dir + "/model.pt");
    torch::load(optim, dir + "/optim.pt");
  } else {
    std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
    return 2;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", mode.c_str(), status.ToString().c_str());
    return 1;
  }
  getrusage(RUSAGE_SELF, &ru);
  std::printf("%-12s %8.1f MiB %8.3f s %8.2f GB/s  peak RSS %6.0f MiB (%6.0f before)\n",
              mode.c_str(), static_cast<double>(bytes) / (1 << 20), s,
              static_cast<double>(bytes) / s / 1e9, static_cast<double>(ru.ru_maxrss) / 1024,
              rss_before);
  return 0;
}
