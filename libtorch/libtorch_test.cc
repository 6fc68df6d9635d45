#include "dcpp/libtorch.h"

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <sys/wait.h>

#include <cstdlib>
#include <set>

#include "dcpp/comm.h"
#include "dcpp/metadata.h"
#include "testing/testing.h"

namespace dcpp::libtorch {
namespace {

using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(3, 5))),
        bn(register_module("bn", torch::nn::BatchNorm1d(5))),
        fc2(register_module("fc2", torch::nn::Linear(5, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(bn(fc1(x)))); }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d bn;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Net);

void Train(Net& net, torch::optim::Optimizer& optim, int steps) {
  torch::manual_seed(7);
  const torch::Tensor x = torch::randn({16, 3});
  const torch::Tensor y = torch::randn({16, 2});
  for (int i = 0; i < steps; ++i) {
    optim.zero_grad();
    torch::nn::functional::mse_loss(net->forward(x), y).backward();
    optim.step();
  }
}

void ExpectSameModule(Net& a, Net& b) {
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  auto ba = a->named_buffers(), bb = b->named_buffers();
  for (const auto& item : ba) EXPECT_TRUE(torch::equal(item.value(), bb[item.key()])) << item.key();
}

TEST(LibtorchAdapterTest, FromAtenSharesMemoryAndStrides) {
  at::Tensor a = torch::arange(12, torch::kFloat32).reshape({3, 4});
  at::Tensor t = a.t();  // strides [1, 4]
  DCPP_ASSERT_OK_AND_ASSIGN(Tensor v, FromAten(t));
  EXPECT_EQ(v.dtype(), DType::kFloat32);
  EXPECT_THAT(v.shape(), ElementsAre(4, 3));
  EXPECT_THAT(v.strides(), ElementsAre(1, 4));
  EXPECT_EQ(v.data(), static_cast<std::byte*>(t.data_ptr()));
  a.index_put_({1, 2}, 100.0f);
  EXPECT_EQ(v.data_as<float>()[1 * 4 + 2], 100.0f);
  // The dcpp tensor keeps the memory alive after the at::Tensors go.
  a = at::Tensor();
  t = at::Tensor();
  EXPECT_EQ(v.data_as<float>()[11], 11.0f);
}

TEST(LibtorchAdapterTest, ToAtenSharesMemory) {
  Tensor d = Tensor::Zeros(DType::kInt64, {2, 3});
  DCPP_ASSERT_OK_AND_ASSIGN(at::Tensor a, ToAten(d));
  EXPECT_EQ(a.scalar_type(), at::kLong);
  EXPECT_EQ(a.data_ptr(), static_cast<void*>(d.data()));
  a.fill_(5);
  EXPECT_EQ(d.data_as<int64_t>()[5], 5);
  d = Tensor();  // the at::Tensor keeps the storage
  EXPECT_EQ(a.sum().item<int64_t>(), 30);
}

TEST(LibtorchAdapterTest, DTypesMapBothWays) {
  for (auto st : {at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong, at::kHalf,
                  at::kBFloat16, at::kFloat, at::kDouble, at::kComplexFloat, at::kComplexDouble}) {
    DCPP_ASSERT_OK_AND_ASSIGN(DType d, FromScalarType(st));
    DCPP_ASSERT_OK_AND_ASSIGN(c10::ScalarType back, ToScalarType(d));
    EXPECT_EQ(back, st);
  }
  EXPECT_THAT(ToScalarType(DType::kFloat8_e5m2).status(),
              StatusIs(StatusCode::kUnimplemented, HasSubstr("float8_e5m2")));
}

TEST(LibtorchAdapterTest, KeysAreWhatPythonUses) {
  torch::manual_seed(0);
  Net net;
  torch::optim::Adam optim(net->parameters(), torch::optim::AdamOptions(1e-3));
  TempDir dir;
  DCPP_ASSERT_OK_AND_ASSIGN(Metadata md, Save(*net, &optim, dir.Join("ckpt")));
  std::set<std::string> keys;
  for (const auto& [fqn, m] : md.state_dict_metadata) keys.insert(fqn);
  std::set<std::string> want = {"model.fc1.weight",
                                "model.fc1.bias",
                                "model.bn.weight",
                                "model.bn.bias",
                                "model.bn.running_mean",
                                "model.bn.running_var",
                                "model.bn.num_batches_tracked",
                                "model.fc2.weight",
                                "model.fc2.bias"};
  for (const char* p :
       {"fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"}) {
    for (const char* s : {"step", "exp_avg", "exp_avg_sq"}) {
      want.insert(std::string("optim.state.") + p + "." + s);
    }
  }
  for (const char* o :
       {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
        "differentiable", "fused", "decoupled_weight_decay", "params"}) {
    want.insert(std::string("optim.param_groups.0.") + o);
  }
  EXPECT_EQ(keys, want);
}

TEST(LibtorchAdapterTest, AdamRoundTripContinuesTraining) {
  torch::manual_seed(0);
  Net a;
  torch::optim::Adam oa(a->parameters(), torch::optim::AdamOptions(1e-2).betas({0.8, 0.99}));
  Train(a, oa, 5);
  TempDir dir;
  DCPP_ASSERT_OK(Save(*a, &oa, dir.Join("ckpt")).status());

  torch::manual_seed(99);
  Net b;
  torch::optim::Adam ob(b->parameters(), torch::optim::AdamOptions(0.5));
  DCPP_ASSERT_OK(Load(*b, &ob, dir.Join("ckpt")));
  ExpectSameModule(a, b);
  const auto& opt = static_cast<const torch::optim::AdamOptions&>(ob.param_groups()[0].options());
  EXPECT_EQ(opt.lr(), 1e-2);
  EXPECT_EQ(std::get<0>(opt.betas()), 0.8);
  // Same state, same next steps.
  Train(a, oa, 3);
  Train(b, ob, 3);
  ExpectSameModule(a, b);
}

TEST(LibtorchAdapterTest, SgdMomentumRoundTrip) {
  torch::manual_seed(0);
  Net a;
  torch::optim::SGD oa(a->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  Train(a, oa, 4);
  TempDir dir;
  DCPP_ASSERT_OK(Save(*a, &oa, dir.Join("ckpt")).status());
  Net b;
  torch::optim::SGD ob(b->parameters(), torch::optim::SGDOptions(0.3));
  static_cast<torch::optim::SGDOptions&>(ob.param_groups()[0].options()).momentum(0.9);
  DCPP_ASSERT_OK(Load(*b, &ob, dir.Join("ckpt")));
  EXPECT_EQ(static_cast<torch::optim::SGDOptions&>(ob.param_groups()[0].options()).lr(), 0.1);
  Train(a, oa, 2);
  Train(b, ob, 2);
  ExpectSameModule(a, b);
}

TEST(LibtorchAdapterTest, ReplicasSavedByTwoRanksLoadInOne) {
  torch::manual_seed(0);
  Net a;
  torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
  Train(a, oa, 3);
  TempDir dir;
  RunOnThreads(2, [&](Communicator& comm) {
    // Each rank holds an identical replica (a copy of a's state).
    Net r;
    torch::optim::AdamW o(r->parameters(), torch::optim::AdamWOptions(1e-2));
    {
      torch::NoGradGuard no_grad;
      auto src = a->named_parameters();
      for (auto& item : r->named_parameters()) item.value().copy_(src[item.key()]);
      auto bsrc = a->named_buffers();
      for (auto& item : r->named_buffers()) item.value().copy_(bsrc[item.key()]);
    }
    SaveOptions so;
    so.comm = &comm;
    Status s = Save(*r, nullptr, dir.Join("ckpt"), so).status();
    EXPECT_TRUE(s.ok()) << s.ToString();
  });
  Net b;
  DCPP_ASSERT_OK(Load(*b, nullptr, dir.Join("ckpt")));
  ExpectSameModule(a, b);
}

TEST(LibtorchAdapterTest, OptimizerOverForeignTensorIsRejected) {
  Net net;
  torch::Tensor stray = torch::zeros({2}, torch::requires_grad());
  torch::optim::Adam optim(std::vector<torch::Tensor>{stray});
  EXPECT_THAT(OptimizerStateDict(*net, optim).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not a parameter of the module")));
}

// The architecture of tests/interop/libtorch_peer.py's Net.
struct PeerNetImpl : torch::nn::Module {
  PeerNetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(8, 16))),
        bn(register_module("bn", torch::nn::BatchNorm1d(16))),
        fc2(register_module("fc2", torch::nn::Linear(16, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(bn(fc1(x)))); }
  torch::nn::Linear fc1;
  torch::nn::BatchNorm1d bn;
  torch::nn::Linear fc2;
};
TORCH_MODULE(PeerNet);

// PyTorch 2.x saves a model and its Adam state with get_state_dict + dcp.save; libtorch loads
// them through the adapter, gives the same output and, after one more Adam step, the same result.
TEST(LibtorchAdapterTest, LoadsWhatPyTorchSaved) {
  TempDir dir;
  const std::string cmd = "timeout 240 " + ::dcpp::testing::Torch2PythonPath() + " " +
                          ::dcpp::testing::SourceDir() + "/tests/interop/libtorch_peer.py save " +
                          dir.path().string();
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd;

  torch::manual_seed(5);
  PeerNet net;
  torch::optim::Adam optim(net->parameters(), torch::optim::AdamOptions(0.5));
  DCPP_ASSERT_OK(Load(*net, &optim, dir.Join("ckpt")));
  const auto& o = static_cast<const torch::optim::AdamOptions&>(optim.param_groups()[0].options());
  EXPECT_DOUBLE_EQ(o.lr(), 2e-2);
  EXPECT_DOUBLE_EQ(std::get<0>(o.betas()), 0.85);
  EXPECT_DOUBLE_EQ(std::get<1>(o.betas()), 0.995);
  const auto& ps = static_cast<const torch::optim::AdamParamState&>(
      *optim.state().at(c10::guts::to_string(net->fc1->weight.unsafeGetTensorImpl())));
  EXPECT_EQ(ps.step(), 7);

  Value eval = Value::MakeDict();
  at::Tensor input = torch::zeros({32, 8}), target = torch::zeros({32, 4}),
             output = torch::zeros({32, 4}), after = torch::zeros({32, 4});
  for (const auto& [key, t] :
       {std::pair{"input", input}, std::pair{"target", target}, std::pair{"output", output},
        std::pair{"output_after_step", after}}) {
    DCPP_ASSERT_OK_AND_ASSIGN(Tensor v, FromAten(t));
    eval.Set(key, Value::FromTensor(v));
  }
  DCPP_ASSERT_OK(dcpp::Load(eval, dir.Join("eval")));

  net->eval();
  EXPECT_TRUE(torch::allclose(net->forward(input).detach(), output, 1e-5, 1e-5));
  optim.zero_grad();
  torch::nn::functional::mse_loss(net->forward(input), target).backward();
  optim.step();
  EXPECT_TRUE(torch::allclose(net->forward(input).detach(), after, 1e-5, 1e-5));
}

// One rank's optimizer is not mapped: both ranks return that error from the collective save (the
// failing rank still takes part), and nothing is committed.
TEST(LibtorchAdapterTest, OneRankFailingFailsTheSaveOnEveryRank) {
  TempDir dir;
  std::vector<Status> results(2);
  RunOnThreads(2, [&](Communicator& comm) {
    Net net;
    torch::optim::Adam adam(net->parameters());
    torch::optim::RMSprop rmsprop(net->parameters());
    torch::optim::Optimizer* optim =
        comm.rank() == 1 ? static_cast<torch::optim::Optimizer*>(&rmsprop) : &adam;
    SaveOptions so;
    so.comm = &comm;
    results[comm.rank()] = Save(*net, optim, dir.Join("ckpt"), so).status();
  });
  for (const Status& s : results) {
    EXPECT_THAT(s, StatusIs(StatusCode::kUnimplemented, HasSubstr("rank 1")));
    EXPECT_THAT(s, StatusIs(StatusCode::kUnimplemented, HasSubstr("only Adam, AdamW and SGD")));
  }
  EXPECT_FALSE(std::filesystem::exists(dir.Join("ckpt/.metadata")));
}

TEST(LibtorchAdapterTest, MissingCheckpointNamesThePath) {
  Net net;
  TempDir dir;
  EXPECT_THAT(Load(*net, nullptr, dir.Join("absent")),
              StatusIs(StatusCode::kNotFound, HasSubstr("absent")));
}

}  // namespace
}  // namespace dcpp::libtorch
