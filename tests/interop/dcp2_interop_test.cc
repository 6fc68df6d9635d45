// DCP checkpoints exchanged with PyTorch 2.x (the venv's torch 2.13, run across gloo ranks by
// tests/interop/dcp2_peer.py), in both directions, with resharding on each side. The peer also
// writes a torch.save file of the expected values (expected.pt); every comparison is bitwise.
#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/convert.h"
#include "testing/expected_state.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::ExpectedState;
using ::dcpp::testing::LoadAndCompare;
using ::dcpp::testing::ReadExpectedState;
using ::dcpp::testing::SourceDir;
using ::dcpp::testing::TempDir;
using ::testing::IsEmpty;

// Bounds every peer run (a hung gloo rank must not hang the suite).
constexpr int kPeerTimeoutSeconds = 240;

int RunPeer(const std::string& args) {
  const std::string py = ::dcpp::testing::Torch2PythonPath();
  EXPECT_TRUE(std::filesystem::exists(py))
      << py << " is missing: scripts/setup creates the venv with PyTorch 2.x";
  std::string cmd = "timeout " + std::to_string(kPeerTimeoutSeconds) + " " + py + " " +
                    SourceDir() + "/tests/interop/dcp2_peer.py " + args + " 2>&1";
  return std::system(cmd.c_str());
}

int RunCli(const std::string& args) {
  std::string cmd = "timeout 120 " + ::dcpp::testing::CliPath() + " " + args + " 2>&1";
  return std::system(cmd.c_str());
}

// Loads `dir` on 1, 2 and 4 thread ranks (2: split on the last dimension, 4: on rows, so the
// pieces never line up with the saver's) and compares with `expected`.
void ExpectLoadsOnThreads(const std::string& dir, const ExpectedState& expected) {
  EXPECT_THAT(LoadAndCompare(dir, expected, nullptr, 0), IsEmpty()) << dir << " on 1 rank";
  for (auto [world, dim] : {std::pair{2, 9}, std::pair{4, 0}}) {
    std::mutex mu;
    std::vector<std::string> bad;
    RunOnThreads(world, [&](Communicator& comm) {
      auto b = LoadAndCompare(dir, expected, &comm, dim);
      std::lock_guard<std::mutex> lock(mu);
      bad.insert(bad.end(), b.begin(), b.end());
    });
    EXPECT_THAT(bad, IsEmpty()) << dir << " on " << world << " ranks";
  }
}

// PyTorch saves with `world` gloo ranks (DTensors on 1-D and 2-D meshes, every dtype, a model
// and its AdamW state, plain values) through dcp.save, dcp.async_save, dcp.save without
// collectives and format_utils.torch_save_to_dcp; dcpp loads each with 1, 2 and 4 ranks, and
// `dcpp convert --to torch` of each gives a file torch.load reads as the full values.
void TorchSavesDcppLoads(int world) {
  TempDir tmp;
  const std::string out = tmp.Join("torch");
  ASSERT_EQ(RunPeer("save " + out + " " + std::to_string(world)), 0);
  DCPP_ASSERT_OK_AND_ASSIGN(ExpectedState expected, ReadExpectedState(out + "/expected.pt"));
  ASSERT_GT(expected.size(), 50u);
  std::string converted;
  for (const char* kind : {"sync", "async", "nocoll", "ts2dcp"}) {
    SCOPED_TRACE(kind);
    const std::string dir = out + "/" + kind;
    ExpectLoadsOnThreads(dir, expected);
    const std::string pt = tmp.Join(std::string(kind) + ".pt");
    EXPECT_EQ(RunCli("convert " + dir + " " + pt + " --to torch"), 0);
    converted += (converted.empty() ? "" : ",") + pt;
  }
  EXPECT_EQ(RunPeer("check-torch " + converted + " " + out + "/expected.pt"), 0);
}

TEST(Dcp2InteropTest, TorchSavesWithTwoRanksDcppLoads) { TorchSavesDcppLoads(2); }
TEST(Dcp2InteropTest, TorchSavesWithThreeRanksDcppLoads) { TorchSavesDcppLoads(3); }

// How dcpp's 4 ranks hold the entry at position `i` of the state.
enum class Layout { kRows, kColumns, kBlocks2d, kReplicated };

Value Place(const Tensor& full, Layout layout, int rank) {
  const Shape& shape = full.shape();
  if (shape.empty() || layout == Layout::kReplicated) return Value::FromTensor(full);
  Shape off(shape.size(), 0), size = shape;
  auto cut = [&](size_t dim, int part, int parts) {
    auto [b, n] = ::dcpp::testing::Slab(shape[dim], part, parts);
    off[dim] = b;
    size[dim] = n;
  };
  const size_t last = shape.size() - 1;
  switch (layout) {
    case Layout::kRows:
      cut(0, rank, 4);
      break;
    case Layout::kColumns:
      cut(last, rank, 4);
      break;
    default:  // a 2 x 2 grid of blocks (rows x last dimension); 1-D tensors by rows
      if (last == 0) {
        cut(0, rank, 4);
      } else {
        cut(0, rank / 2, 2);
        cut(last, rank % 2, 2);
      }
  }
  ShardedTensor st{full.dtype(), shape, {}};
  if (NumElements(size) > 0) {
    Tensor piece = Tensor::Zeros(full.dtype(), size);
    EXPECT_TRUE(CopyRegion(piece.view(), Shape(size.size(), 0), full.view(), off, size).ok());
    st.shards.push_back({off, std::move(piece)});
  }
  return Value::FromSharded(std::move(st));
}

// dcpp saves with 4 ranks (tensors by rows, by columns, in 2-D blocks and replicated, in turn;
// plain values as bytes items) the state a PyTorch save described (the golden expected.pt);
// PyTorch 2.13 loads it with 2 and 3 ranks into DTensors on other meshes and placements, into a
// real model + AdamW through set_state_dict, and through format_utils.dcp_to_torch_save.
TEST(Dcp2InteropTest, DcppSavesTorchLoads) {
  const std::string expected_pt = SourceDir() + "/tests/data/dcp_213_2ranks/expected.pt";
  DCPP_ASSERT_OK_AND_ASSIGN(ExpectedState expected, ReadExpectedState(expected_pt));
  TempDir tmp;
  std::string dirs;
  for (MetadataFlavor flavor : {MetadataFlavor::kTorch2, MetadataFlavor::kTorch2Portable}) {
    const std::string dir = tmp.Join(flavor == MetadataFlavor::kTorch2 ? "torch2" : "portable");
    std::mutex mu;
    RunOnThreads(4, [&](Communicator& comm) {
      Value sd = Value::MakeDict();
      int i = 0;
      Status nest;
      for (const auto& e : expected) {
        // Nested as PyTorch's state was, so dcp_to_torch_save rebuilds the same tree.
        Status set = SetElement(
            sd, e.path,
            e.value.is_tensor() ? Place(e.value.tensor(), static_cast<Layout>(i++ % 4), comm.rank())
                                : e.value);
        if (nest.ok()) nest = set;
      }
      SaveOptions so;
      so.comm = &comm;
      so.writer.metadata.flavor = flavor;
      auto md = Save(sd, dir, so);
      std::lock_guard<std::mutex> lock(mu);
      DCPP_EXPECT_OK(nest);
      DCPP_EXPECT_OK(md.status());
    });
    // dcpp reads back what it wrote, resharded, before PyTorch does.
    ExpectLoadsOnThreads(dir, expected);
    dirs += (dirs.empty() ? "" : ",") + dir;
  }
  EXPECT_EQ(RunPeer("load " + dirs + " 2 " + expected_pt), 0);
  EXPECT_EQ(RunPeer("load " + tmp.Join("torch2") + " 3 " + expected_pt), 0);
}

}  // namespace
}  // namespace dcpp
