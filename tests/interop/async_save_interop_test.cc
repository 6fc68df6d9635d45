// A checkpoint written by AsyncSave on four thread ranks (row shards of one tensor, a replicated
// tensor, a plain value) loads in PyTorch 2.x (the venv's torch 2.13) through dcp.load, exactly.
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "dcpp/async_save.h"
#include "dcpp/comm.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::SourceDir;
using ::dcpp::testing::TempDir;

int RunPeer(const std::string& args) {
  const std::string py = ::dcpp::testing::Torch2PythonPath();
  EXPECT_TRUE(std::filesystem::exists(py))
      << py << " is missing: scripts/setup creates the venv with PyTorch 2.x";
  // Bounded: a hung peer must not hang the suite.
  std::string cmd =
      "timeout 240 " + py + " " + SourceDir() + "/tests/interop/async_peer.py " + args + " 2>&1";
  return std::system(cmd.c_str());
}

TEST(AsyncSaveInteropTest, TorchLoadsWhatAsyncSaveWrote) {
  TempDir tmp;
  const std::string dir = tmp.Join("ckpt");
  const Tensor w = IotaTensor(DType::kFloat32, {8, 16});
  Tensor b = Tensor::Zeros(DType::kInt64, {16});
  for (int i = 0; i < 16; ++i) b.data_as<int64_t>()[i] = 3 * i;
  RunOnThreads(4, [&](Communicator& comm) {
    ShardedTensor st;
    st.dtype = DType::kFloat32;
    st.global_shape = {8, 16};
    st.shards.push_back(
        {{2 * comm.rank(), 0},
         Tensor::FromBytes(DType::kFloat32, {2, 16}, w.data_as<float>() + 32 * comm.rank())});
    StateDict model = Value::MakeDict();
    model.Set("w", Value::FromSharded(st));
    model.Set("b", Value::FromTensor(b.Clone()));
    StateDict sd = Value::MakeDict();
    sd.Set("model", std::move(model));
    sd.Set("step", Value::Int(42));
    AsyncSaveOptions options;
    options.save.comm = &comm;
    AsyncSaveHandle h = AsyncSave(sd, dir, options);
    EXPECT_TRUE(h.staged.get().ok());
    // The caller's tensors change at once; the checkpoint must not.
    std::memset(sd.Find("model")->Find("b")->tensor().data(), 0xff, 16 * 8);
    Result<Metadata> md = h.committed.get();
    EXPECT_TRUE(md.ok()) << md.status().ToString();
  });
  EXPECT_EQ(RunPeer("load " + dir), 0);
}

}  // namespace
}  // namespace dcpp
