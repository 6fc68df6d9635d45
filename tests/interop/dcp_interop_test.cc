// DCP checkpoints exchanged with PyTorch's own DCP (the 1.13 prototype, run across gloo ranks by
// tests/interop/dcp_peer.py), in both directions, with resharding on each side.
#include <cstdlib>
#include <mutex>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::SourceDir;
using ::dcpp::testing::TempDir;

std::string Python() { return ::dcpp::testing::PythonPath(); }

int RunPeer(const std::string& args) {
  std::string cmd = Python() + " " + SourceDir() + "/tests/interop/dcp_peer.py " + args + " 2>&1";
  return std::system(cmd.c_str());
}

// The values dcp_peer.py's expected() gives.
Tensor ExpectedW() {
  Tensor t = Tensor::Zeros(DType::kFloat32, {10, 6});
  for (int i = 0; i < 60; ++i) t.data_as<float>()[i] = static_cast<float>(i * 0.5 - 7);
  return t;
}
Tensor ExpectedIds() {
  Tensor t = Tensor::Zeros(DType::kInt64, {7, 4});
  for (int i = 0; i < 28; ++i) t.data_as<int64_t>()[i] = i * 3 + 100;
  return t;
}
Tensor ExpectedBias() {
  Tensor t = Tensor::Zeros(DType::kFloat64, {6});
  for (int i = 0; i < 6; ++i) t.data_as<double>()[i] = i * 0.25 + 1;
  return t;
}

ShardedTensor Split(const Tensor& full, int dim, int rank, int world, bool fill) {
  Shape off(2, 0), size = full.shape();
  int64_t n = full.shape()[dim];
  off[dim] = n * rank / world;
  size[dim] = n * (rank + 1) / world - off[dim];
  Tensor piece = Tensor::Zeros(full.dtype(), size);
  if (fill) {
    EXPECT_TRUE(CopyRegion(piece.view(), {0, 0}, full.view(), off, size).ok());
  }
  return ShardedTensor{full.dtype(), full.shape(), {{off, piece}}};
}

void ExpectPiece(const Tensor& full, const ShardedTensor& st) {
  for (const auto& s : st.shards) {
    Tensor want = Tensor::Zeros(full.dtype(), s.tensor.shape());
    ASSERT_TRUE(CopyRegion(want.view(), {0, 0}, full.view(), s.offsets, s.tensor.shape()).ok());
    EXPECT_TRUE(want.BitwiseEqual(s.tensor)) << s.box().ToString();
  }
}

void LoadAndCheck(const std::string& dir) {
  // Everything as stored, on one rank.
  Value all = Value::MakeDict();
  DCPP_ASSERT_OK(Load(all, dir));
  EXPECT_TRUE(all.Find("w")->tensor().BitwiseEqual(ExpectedW()));
  EXPECT_TRUE(all.Find("ids")->tensor().BitwiseEqual(ExpectedIds()));
  EXPECT_TRUE(all.Find("bias")->tensor().BitwiseEqual(ExpectedBias()));
  EXPECT_EQ(all.Find("step")->as_int(), 1234);
  // Resharded over 3 thread ranks: w by columns, ids by rows.
  std::mutex mu;
  RunOnThreads(3, [&](Communicator& comm) {
    Value sd = Value::MakeDict();
    sd.Set("w", Value::FromSharded(Split(ExpectedW(), 1, comm.rank(), 3, false)));
    sd.Set("ids", Value::FromSharded(Split(ExpectedIds(), 0, comm.rank(), 3, false)));
    LoadOptions lo;
    lo.comm = &comm;
    lo.planner_options.allow_partial_load = true;
    Status s = Load(sd, dir, lo);
    std::lock_guard<std::mutex> lock(mu);
    DCPP_EXPECT_OK(s);
    ExpectPiece(ExpectedW(), sd.Find("w")->sharded());
    ExpectPiece(ExpectedIds(), sd.Find("ids")->sharded());
  });
}

TEST(DcpInteropTest, GoldenPrototypeCheckpointLoads) {
  LoadAndCheck(SourceDir() + "/tests/data/dcp_113_2ranks_dim0");
}

TEST(DcpInteropTest, PrototypeSavedCheckpointsLoadInDcpp) {
  for (int dim : {0, 1}) {
    TempDir tmp;
    ASSERT_EQ(RunPeer("save " + tmp.Join("ck") + " 2 " + std::to_string(dim)), 0);
    LoadAndCheck(tmp.Join("ck"));
  }
}

// dcpp saves with 4 ranks (w by rows, ids by columns: uneven pieces), PyTorch loads with 2 and 3
// ranks sharded on either dimension.
TEST(DcpInteropTest, DcppSavedCheckpointsLoadInPrototype) {
  for (MetadataFlavor flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch113Prototype}) {
    TempDir tmp;
    const std::string dir = tmp.Join("ck");
    std::mutex mu;
    RunOnThreads(4, [&](Communicator& comm) {
      Value sd = Value::MakeDict();
      sd.Set("w", Value::FromSharded(Split(ExpectedW(), 0, comm.rank(), 4, true)));
      sd.Set("ids", Value::FromSharded(Split(ExpectedIds(), 1, comm.rank(), 4, true)));
      sd.Set("bias", Value::FromTensor(ExpectedBias()));
      sd.Set("step", Value::Int(1234));
      SaveOptions so;
      so.comm = &comm;
      so.writer.metadata.flavor = flavor;
      so.writer.thread_count = 2;
      auto md = Save(sd, dir, so);
      std::lock_guard<std::mutex> lock(mu);
      DCPP_EXPECT_OK(md.status());
    });
    const std::string alias = flavor == MetadataFlavor::kTorch2 ? " --alias" : "";
    EXPECT_EQ(RunPeer("load " + dir + " 2 1" + alias), 0);
    EXPECT_EQ(RunPeer("load " + dir + " 3 0" + alias), 0);
  }
}

}  // namespace
}  // namespace dcpp
