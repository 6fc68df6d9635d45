// A libtorch program that checkpoints with dcpp: data-parallel training of a small network over
// MPI, saved as a DCP checkpoint that Python PyTorch loads with get_state_dict + dcp.load.
//
//   mpiexec -np 4 dcpp_libtorch_train DIR [--steps N]
//
// 1. Every rank builds the same Net (fc1 -> bn -> relu -> fc2) and Adam optimizer; each step it
//    trains on its quarter of a fixed batch, gradients are averaged with MPI_Allreduce and rank
//    0's BatchNorm buffers are broadcast (what DDP does), so the replicas stay identical.
// 2. All ranks save {"model": ..., "optim": ...} to DIR/ckpt together (dcpp::libtorch::Save):
//    replicated tensors are written once, the writing spread over the ranks.
// 3. Rank 0 records, for a fixed evaluation batch, the network's output and its output after one
//    more Adam step, in DIR/eval (a one-process DCP checkpoint), for the Python side to compare.
#include <mpi.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "dcpp/checkpoint.h"
#include "dcpp/libtorch.h"
#include "dcpp/mpi_comm.h"

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(8, 16))),
        bn(register_module("bn", torch::nn::BatchNorm1d(16))),
        fc2(register_module("fc2", torch::nn::Linear(16, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(bn(fc1(x)))); }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d bn;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Net);

// The function the network learns.
torch::Tensor Target(const torch::Tensor& x) {
  return torch::stack(
      {x.sum(1).sin(), x.slice(1, 0, 4).prod(1), x.slice(1, 4, 8).mean(1), x.pow(2).sum(1).sqrt()},
      1);
}

void Fail(int rank, const std::string& what, const dcpp::Status& s) {
  std::fprintf(stderr, "rank %d: %s: %s\n", rank, what.c_str(), s.ToString().c_str());
  MPI_Abort(MPI_COMM_WORLD, 1);
}

}  // namespace

int main(int argc, char** argv) {
  auto session = dcpp::MpiSession::Init(&argc, &argv);
  if (!session.ok()) {
    std::fprintf(stderr, "%s\n", session.status().ToString().c_str());
    return 1;
  }
  int steps = 60;
  std::string dir;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else {
      dir = argv[i];
    }
  }
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (dir.empty()) {
    if (rank == 0) std::fprintf(stderr, "usage: %s DIR [--steps N]\n", argv[0]);
    return 2;
  }
  int rc = 0;
  {
    auto comm = dcpp::MpiCommunicator::Create();
    if (!comm.ok()) Fail(rank, "communicator", comm.status());
    torch::manual_seed(0);
    Net net;
    torch::optim::Adam optim(net->parameters(), torch::optim::AdamOptions(1e-2));
    const torch::Tensor x = torch::randn({64, 8});
    const torch::Tensor y = Target(x);
    const int64_t per_rank = 64 / world;
    const torch::Tensor my_x = x.slice(0, rank * per_rank, (rank + 1) * per_rank);
    const torch::Tensor my_y = y.slice(0, rank * per_rank, (rank + 1) * per_rank);
    net->train();
    for (int step = 0; step < steps; ++step) {
      for (auto& b : net->buffers()) {
        MPI_Bcast(b.data_ptr(), static_cast<int>(b.nbytes()), MPI_BYTE, 0, MPI_COMM_WORLD);
      }
      optim.zero_grad();
      torch::Tensor loss = torch::nn::functional::mse_loss(net->forward(my_x), my_y);
      loss.backward();
      for (auto& p : net->parameters()) {
        torch::Tensor g = p.grad();
        MPI_Allreduce(MPI_IN_PLACE, g.data_ptr<float>(), static_cast<int>(g.numel()), MPI_FLOAT,
                      MPI_SUM, MPI_COMM_WORLD);
        g.div_(world);
      }
      optim.step();
      if (rank == 0 && (step + 1) % 20 == 0) {
        std::printf("step %d: loss %.5f\n", step + 1, loss.item<float>());
      }
    }
    for (auto& b : net->buffers()) {
      MPI_Bcast(b.data_ptr(), static_cast<int>(b.nbytes()), MPI_BYTE, 0, MPI_COMM_WORLD);
    }

    dcpp::SaveOptions options;
    options.comm = comm->get();
    auto md = dcpp::libtorch::Save(*net, &optim, dir + "/ckpt", options);
    if (!md.ok()) Fail(rank, "save", md.status());
    if (rank == 0) {
      std::printf("saved %zu keys with %d ranks to %s/ckpt\n", md->state_dict_metadata.size(),
                  world, dir.c_str());
      // What Python must reproduce after loading: the output, and the output after one more step.
      net->eval();
      torch::manual_seed(1);
      const torch::Tensor ex = torch::randn({32, 8});
      const torch::Tensor ey = Target(ex);
      const torch::Tensor out = net->forward(ex).detach().clone();
      optim.zero_grad();
      torch::nn::functional::mse_loss(net->forward(ex), ey).backward();
      optim.step();
      const torch::Tensor after = net->forward(ex).detach().clone();
      dcpp::Value eval = dcpp::Value::MakeDict();
      for (const auto& [key, t] :
           {std::pair{"input", ex}, std::pair{"target", ey}, std::pair{"output", out},
            std::pair{"output_after_step", after}}) {
        eval.Set(key, dcpp::Value::FromTensor(dcpp::libtorch::FromAten(t).value()));
      }
      auto emd = dcpp::Save(eval, dir + "/eval");
      if (!emd.ok()) Fail(rank, "save eval", emd.status());
    }
  }
  return rc;
}
