// Collective Save and Load over MPI processes, in separate mpiexec runs that share a directory.
//
//   mpiexec -np 4 dcpp_mpi_checkpoint_test --dir=D --gtest_filter=MpiCheckpointTest.Save
//   mpiexec -np K dcpp_mpi_checkpoint_test --dir=D --gtest_filter=MpiCheckpointTest.Load  (K=1..)
//   mpiexec -np 4 dcpp_mpi_checkpoint_test --dir=D --gtest_filter=MpiCheckpointFailureTest.*
//   mpiexec -np 4 dcpp_mpi_checkpoint_test --dir=D --save-failing-rank=2
//
// Save writes tensors sharded by rows, columns, 2-D blocks and round-robin stripes (uneven, one
// rank holding nothing of one tensor), a replicated tensor, optimizer-like state and plain
// values. Load reads them back under a sharding that depends on the world size and checks every
// element. The failure tests make one rank fail and check that every rank returns the same error
// naming it and that nothing is committed. --save-failing-rank is the same failure outside gtest:
// every rank prints its outcome and exits non-zero, for a driver script that checks exit codes.
// Under gtest the exit status is the worst over all ranks.
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/steps.h"
#include "dcpp/checkpoint.h"
#include "dcpp/layout.h"
#include "dcpp/mpi_comm.h"
#include "dcpp/storage.h"
#include "testing/fault_store.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

std::string g_dir;  // --dir: where the checkpoints live

// ------------------------------------------------------------------ geometry

// How a tensor is cut over the ranks. The explicit-cut modes give uneven pieces on purpose.
enum class Mode {
  kRowCuts,    // dim 0 at fixed cuts (one piece per rank)
  kColCuts,    // dim 1 at fixed cuts
  kBlockCuts,  // a 2 x 2 grid of blocks at fixed cuts (4 ranks)
  kRows,       // dim 0 in `world` near-equal pieces
  kCols,       // dim 1 in `world` near-equal pieces
  kGrid,       // dim 0 in halves, dim 1 in `world` pieces: two chunks per rank
  kStripes,    // round-robin stripes of 3 rows (4 for kSaveStripes): several chunks per rank
  kSaveStripes,
  kWhole,  // a plain tensor on every rank
};

struct Spec {
  const char* fqn;  // where it lives (for messages)
  DType dtype;
  Shape shape;
  uint64_t seed;
  Mode save_mode;
  std::vector<int64_t> cuts;   // for the *Cuts modes: world+1 boundaries (rows or columns)
  std::vector<int64_t> cuts2;  // kBlockCuts: column boundaries (3)
};

const std::vector<Spec>& Specs() {
  static const std::vector<Spec> specs = {
      {"model.row", DType::kFloat32, {37, 11}, 1, Mode::kRowCuts, {0, 5, 17, 30, 37}, {}},
      {"model.col", DType::kInt64, {9, 23}, 2, Mode::kColCuts, {0, 2, 10, 11, 23}, {}},
      {"model.block", DType::kFloat64, {20, 18}, 3, Mode::kBlockCuts, {0, 7, 20}, {0, 12, 18}},
      {"model.striped", DType::kBFloat16, {50, 3}, 4, Mode::kSaveStripes, {}, {}},
      // Rank 3 holds nothing of it.
      {"model.cube", DType::kInt32, {4, 6, 5}, 5, Mode::kColCuts, {0, 1, 3, 6, 6}, {}},
      {"model.replicated", DType::kFloat16, {6, 5}, 6, Mode::kWhole, {}, {}},
      {"optim.state.row.exp_avg",
       DType::kFloat32,
       {37, 11},
       7,
       Mode::kRowCuts,
       {0, 5, 17, 30, 37},
       {}},
      {"optim.state.row.exp_avg_sq",
       DType::kFloat32,
       {37, 11},
       8,
       Mode::kRowCuts,
       {0, 5, 17, 30, 37},
       {}},
  };
  return specs;
}

std::pair<int64_t, int64_t> Even(int64_t n, int parts, int i) {
  return {n * i / parts, n * (i + 1) / parts};
}

ChunkBox Box(const Shape& shape, int dim, int64_t lo, int64_t hi) {
  Shape offsets(shape.size(), 0), sizes = shape;
  offsets[dim] = lo;
  sizes[dim] = hi - lo;
  return {offsets, sizes};
}

// This rank's chunks of `spec` under `mode`; empty when it holds nothing.
std::vector<ChunkBox> Boxes(const Spec& spec, Mode mode, int rank, int world) {
  const Shape& shape = spec.shape;
  std::vector<ChunkBox> out;
  auto keep = [&](ChunkBox b) {
    if (NumElements(b.sizes) > 0) out.push_back(std::move(b));
  };
  switch (mode) {
    case Mode::kRowCuts:
      keep(Box(shape, 0, spec.cuts[rank], spec.cuts[rank + 1]));
      break;
    case Mode::kColCuts:
      keep(Box(shape, 1, spec.cuts[rank], spec.cuts[rank + 1]));
      break;
    case Mode::kBlockCuts: {
      const int br = rank / 2, bc = rank % 2;
      ChunkBox b = Box(shape, 0, spec.cuts[br], spec.cuts[br + 1]);
      b.offsets[1] = spec.cuts2[bc];
      b.sizes[1] = spec.cuts2[bc + 1] - spec.cuts2[bc];
      keep(b);
      break;
    }
    case Mode::kRows: {
      auto [lo, hi] = Even(shape[0], world, rank);
      keep(Box(shape, 0, lo, hi));
      break;
    }
    case Mode::kCols: {
      auto [lo, hi] = Even(shape[1], world, rank);
      keep(Box(shape, 1, lo, hi));
      break;
    }
    case Mode::kGrid: {
      auto [c0, c1] = Even(shape[1], world, rank);
      for (int half = 0; half < 2; ++half) {
        auto [r0, r1] = Even(shape[0], 2, half);
        ChunkBox b = Box(shape, 0, r0, r1);
        b.offsets[1] = c0;
        b.sizes[1] = c1 - c0;
        keep(b);
      }
      break;
    }
    case Mode::kStripes:
    case Mode::kSaveStripes: {
      const int64_t stripe = mode == Mode::kStripes ? 3 : 4;
      for (int64_t k = 0; k * stripe < shape[0]; ++k) {
        if (k % world != rank) continue;
        keep(Box(shape, 0, k * stripe, std::min(shape[0], (k + 1) * stripe)));
      }
      break;
    }
    case Mode::kWhole:
      keep({Shape(shape.size(), 0), shape});
      break;
  }
  return out;
}

Tensor Full(const Spec& spec) { return PatternTensor(spec.dtype, spec.shape, spec.seed); }

Value Leaf(const Spec& spec, Mode mode, int rank, int world, bool fill) {
  if (mode == Mode::kWhole) {
    return Value::FromTensor(fill ? Full(spec) : Tensor::Zeros(spec.dtype, spec.shape));
  }
  const Tensor full = Full(spec);
  ShardedTensor st{spec.dtype, spec.shape, {}};
  for (const ChunkBox& b : Boxes(spec, mode, rank, world)) {
    Tensor t = Tensor::Zeros(spec.dtype, b.sizes);
    if (fill) {
      Status s = CopyRegion(t.view(), Shape(b.dim(), 0), full.view(), b.offsets, b.sizes);
      EXPECT_THAT(s, IsOk());
    }
    st.shards.push_back({b.offsets, t});
  }
  return Value::FromSharded(std::move(st));
}

// The path parts of a dotted fqn ("optim.state.row.exp_avg" -> optim / state / row / exp_avg).
std::vector<std::string> Parts(const std::string& fqn) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= fqn.size(); ++i) {
    if (i == fqn.size() || fqn[i] == '.') {
      out.push_back(fqn.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

void Put(Value& root, const std::string& fqn, Value leaf) {
  auto parts = Parts(fqn);
  Value* node = &root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    if (!node->Find(parts[i])) node->Set(parts[i], Value::MakeDict());
    node = node->Find(parts[i]);
  }
  node->Set(parts.back(), std::move(leaf));
}

const Value* Get(const Value& root, const std::string& fqn) {
  const Value* node = &root;
  for (const auto& p : Parts(fqn)) {
    node = node->is_dict() ? node->Find(p) : nullptr;
    if (!node) return nullptr;
  }
  return node;
}

// Optimizer hyper-parameters. A list holding a dict is descended, so each entry is its own leaf
// ("optim.param_groups.0.lr"); the tuple is one bytes leaf.
Value ParamGroups(bool fill) {
  Value group = Value::MakeDict();
  group.Set("lr", Value::Float(fill ? 0.01 : 0.0));
  group.Set("betas",
            fill ? Value::MakeTuple({Value::Float(0.9), Value::Float(0.999)}) : Value::MakeTuple());
  group.Set("name", Value::Str(fill ? "all" : ""));
  return Value::MakeList({std::move(group)});
}

const std::string kBlob("\x00\x01 binary \xff", 11);

// The state the save run writes: every spec under its save mode, plus plain values.
Value SavedState(int rank, int world) {
  Value sd = Value::MakeDict();
  for (const Spec& s : Specs()) Put(sd, s.fqn, Leaf(s, s.save_mode, rank, world, true));
  Put(sd, "optim.step", Value::Int(1234));
  Put(sd, "optim.param_groups", ParamGroups(true));
  sd.Set("step", Value::Int(77));
  sd.Set("tag", Value::Str("dcpp-mpi"));
  sd.Set("blob", Value::Bytes(kBlob));
  return sd;
}

// The sharding a load with `world` ranks uses for spec i: a rotation over the load modes, so
// each world size reads each tensor differently from how it was saved.
Mode LoadMode(size_t i, int world) {
  static const Mode kModes[] = {Mode::kCols, Mode::kGrid, Mode::kStripes, Mode::kRows,
                                Mode::kWhole};
  return kModes[(i + static_cast<size_t>(world)) % std::size(kModes)];
}

// Every element of every chunk of `got` equals the pattern of `spec` at its global position.
void ExpectElements(const Spec& spec, const Value* got) {
  ASSERT_NE(got, nullptr) << spec.fqn;
  const Tensor full = Full(spec);
  if (got->is_tensor()) {
    EXPECT_TRUE(got->tensor().BitwiseEqual(full)) << spec.fqn;
    return;
  }
  ASSERT_TRUE(got->is_sharded()) << spec.fqn;
  for (const Shard& shard : got->sharded().shards) {
    Tensor want = Tensor::Zeros(spec.dtype, shard.tensor.shape());
    ASSERT_THAT(CopyRegion(want.view(), Shape(shard.offsets.size(), 0), full.view(), shard.offsets,
                           shard.tensor.shape()),
                IsOk());
    EXPECT_TRUE(shard.tensor.BitwiseEqual(want))
        << spec.fqn << " chunk at " << ShapeToString(shard.offsets);
  }
}

void ExpectPlainValues(const Value& sd) {
  ASSERT_NE(Get(sd, "optim.step"), nullptr);
  EXPECT_EQ(*Get(sd, "optim.step"), Value::Int(1234));
  const Value* groups = Get(sd, "optim.param_groups");
  ASSERT_NE(groups, nullptr);
  ASSERT_TRUE(groups->is_list()) << groups->DebugString();
  ASSERT_EQ(groups->items().size(), 1u) << groups->DebugString();
  // Compared key by key: a load into an empty dict rebuilds the keys in metadata order.
  const Value want = ParamGroups(true);
  for (const auto& [key, value] : want.items()[0].dict()) {
    const Value* got = groups->items()[0].Find(key.as_str());
    ASSERT_NE(got, nullptr) << key.as_str() << " in " << groups->DebugString();
    EXPECT_EQ(*got, value) << key.as_str() << ": " << got->DebugString();
  }
  ASSERT_NE(sd.Find("step"), nullptr);
  EXPECT_EQ(*sd.Find("step"), Value::Int(77));
  ASSERT_NE(sd.Find("tag"), nullptr);
  EXPECT_EQ(*sd.Find("tag"), Value::Str("dcpp-mpi"));
  ASSERT_NE(sd.Find("blob"), nullptr);
  EXPECT_EQ(*sd.Find("blob"), Value::Bytes(kBlob));
}

std::unique_ptr<MpiCommunicator> World() {
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD);
  EXPECT_THAT(comm.status(), IsOk());
  return comm.ok() ? std::move(*comm) : nullptr;
}

std::string CheckpointPath(const char* name) {
  return (std::filesystem::path(g_dir) / name).string();
}

// The message with this rank's own context ("rank R: saving "...": ") removed: what must be the
// same on every rank.
std::string SharedPart(const Status& s, int rank, const std::string& path) {
  const std::string own = "rank " + std::to_string(rank) + ": saving \"" + path + "\": ";
  std::string m(s.message());
  if (m.rfind(own, 0) == 0) m = m.substr(own.size());
  return std::string(StatusCodeName(s.code())) + ": " + m;
}

// Every rank's `text`, from every rank.
std::vector<std::string> AllTexts(Communicator& comm, const std::string& text) {
  auto all = comm.AllGather(text);
  EXPECT_THAT(all.status(), IsOk());
  return all.ok() ? *all : std::vector<std::string>{};
}

// Once every rank is done with `path`, rank 0 removes it.
void RemoveAfterEveryRank(Communicator& comm, const std::string& path) {
  EXPECT_THAT(comm.Barrier(), IsOk());
  std::error_code ec;
  if (comm.rank() == 0) std::filesystem::remove_all(path, ec);
}

// ------------------------------------------------------------------ tests

TEST(MpiCheckpointTest, Save) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  ASSERT_EQ(comm->size(), 4) << "the save run uses 4 ranks";
  ASSERT_FALSE(g_dir.empty()) << "pass --dir=DIR";
  const std::string path = CheckpointPath("ckpt");
  SaveOptions options;
  options.comm = comm.get();
  auto md = Save(SavedState(comm->rank(), comm->size()), path, options);
  ASSERT_THAT(md.status(), IsOk());
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(path) / ".metadata"));
  // Every rank returns the same committed metadata.
  size_t n = md->state_dict_metadata.size();
  for (const auto& t : AllTexts(*comm, std::to_string(n))) EXPECT_EQ(t, std::to_string(n));
  EXPECT_EQ(n, Specs().size() + 7);  // + optim.step, 3 param_groups leaves, step, tag, blob
}

TEST(MpiCheckpointTest, Load) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  ASSERT_FALSE(g_dir.empty()) << "pass --dir=DIR";
  const int rank = comm->rank(), world = comm->size();
  const std::string path = CheckpointPath("ckpt");

  Value sd = Value::MakeDict();
  for (size_t i = 0; i < Specs().size(); ++i) {
    Put(sd, Specs()[i].fqn, Leaf(Specs()[i], LoadMode(i, world), rank, world, false));
  }
  Put(sd, "optim.step", Value::Int(0));
  Put(sd, "optim.param_groups", ParamGroups(false));
  sd.Set("step", Value::Int(0));
  sd.Set("tag", Value::Str(""));
  sd.Set("blob", Value::Bytes(""));
  LoadOptions options;
  options.comm = comm.get();
  options.broadcast_replicated = world == 3;  // one world size reads replicated tensors once
  ASSERT_THAT(Load(sd, path, options), IsOk());
  for (const Spec& s : Specs()) ExpectElements(s, Get(sd, s.fqn));
  ExpectPlainValues(sd);

  // Everything as stored, into an empty dict: the nesting comes back from the metadata.
  Value all = Value::MakeDict();
  ASSERT_THAT(Load(all, path, options), IsOk());
  for (const Spec& s : Specs()) {
    const Value* v = Get(all, s.fqn);
    ASSERT_NE(v, nullptr) << s.fqn << " in " << all.DebugString();
    EXPECT_TRUE(v->is_tensor()) << s.fqn;
    ExpectElements(s, v);
  }
  ExpectPlainValues(all);
}

// Rank 2 claims another global shape for one tensor: planning fails on the coordinator, and the
// error, naming rank 2 and the key, reaches every rank.
TEST(MpiCheckpointFailureTest, ShapeDisagreementOnOneRank) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  ASSERT_EQ(comm->size(), 4);
  const std::string path = CheckpointPath("bad_shape");
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  ASSERT_THAT(comm->Barrier(), IsOk());
  Value sd = SavedState(comm->rank(), 4);
  if (comm->rank() == 2) {
    Value* row = sd.Find("model")->Find("row");
    ASSERT_TRUE(row != nullptr && row->is_sharded());
    row->sharded().global_shape = {38, 11};
  }
  SaveOptions options;
  options.comm = comm.get();
  Status s = Save(sd, path, options).status();
  EXPECT_THAT(s, StatusIs(StatusCode::kInvalidArgument, HasSubstr("rank 2: key \"model.row\"")));
  const std::string shared = SharedPart(s, comm->rank(), path);
  for (const auto& t : AllTexts(*comm, shared)) EXPECT_EQ(t, shared);
  ASSERT_THAT(comm->Barrier(), IsOk());
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(path) / ".metadata"));
  RemoveAfterEveryRank(*comm, path);
}

// Rank 2's storage fails while writing its data: every rank returns the same error naming rank 2
// and its cause, and `.metadata` is never committed.
TEST(MpiCheckpointFailureTest, WriteFailureOnOneRank) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  ASSERT_EQ(comm->size(), 4);
  const std::string path = CheckpointPath("bad_write");
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  ASSERT_THAT(comm->Barrier(), IsOk());
  DCPP_ASSERT_OK_AND_ASSIGN(auto base, OpenLocalStore(path, /*create=*/true));
  FaultStore faulty(*base);
  if (comm->rank() == 2) {
    faulty.AddFault({StoreOp::kAppend, 1, UnavailableError("No space left on device"), "", true});
  }
  FileSystemWriter writer(&faulty, path, {});
  SaveOptions options;
  options.comm = comm.get();
  Status s = Save(SavedState(comm->rank(), 4), writer, options).status();
  EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable, HasSubstr("writing failed on rank 2")));
  EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable, HasSubstr("No space left on device")));
  const std::string shared = SharedPart(s, comm->rank(), path);
  for (const auto& t : AllTexts(*comm, shared)) EXPECT_EQ(t, shared);
  ASSERT_THAT(comm->Barrier(), IsOk());
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(path) / ".metadata"));
  RemoveAfterEveryRank(*comm, path);
}

// Fault points of the protocol failed over MPI (the full sweep runs with threads as ranks in
// src/checkpoint/steps_test.cc): each failure, on one rank, reaches every rank as one error
// naming that rank, and a failed save commits nothing. A rank that skipped a collective would
// hang this test until CTest's timeout.
TEST(MpiCheckpointFailureTest, ProtocolFaultPointsOnOneRank) {
  auto comm = World();
  ASSERT_NE(comm, nullptr);
  ASSERT_EQ(comm->size(), 4);
  const int rank = comm->rank();
  const std::string good = CheckpointPath("fault_points_good");
  {
    SaveOptions options;
    options.comm = comm.get();
    ASSERT_THAT(Save(SavedState(rank, 4), good, options).status(), IsOk());
  }
  struct Case {
    const char* point;
    int rank;
    bool save;
  };
  for (const Case& c :
       {Case{"save.planner.create_local_plan", 3, true},
        Case{"save.planner.create_global_plan", 0, true}, Case{"save.writer.write_data", 1, true},
        Case{"save.writer.finish", 0, true}, Case{"load.reader.read_metadata", 2, false},
        Case{"load.reader.read_data", 1, false}, Case{"load.broadcast.unpack", 3, false}}) {
    SCOPED_TRACE(c.point);
    internal::SetFaultHookForTesting([&](std::string_view p, int r) -> Status {
      if (p == c.point && r == c.rank)
        return UnavailableError(std::string("injected at ") + c.point);
      return Status::Ok();
    });
    Status s;
    const std::string path = c.save ? CheckpointPath("fault_points_new") : good;
    if (c.save) {
      SaveOptions options;
      options.comm = comm.get();
      s = Save(SavedState(rank, 4), path, options).status();
    } else {
      Value sd = Value::MakeDict();
      LoadOptions options;
      options.comm = comm.get();
      options.broadcast_replicated = true;
      s = Load(sd, path, options);
    }
    internal::SetFaultHookForTesting(nullptr);
    EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable,
                            ::testing::AllOf(HasSubstr("rank " + std::to_string(c.rank)),
                                             HasSubstr(std::string("injected at ") + c.point))));
    std::string shared(s.message());
    shared = shared.substr(shared.find("\": ") + 3);  // without this rank's own context
    for (const auto& t : AllTexts(*comm, shared)) EXPECT_EQ(t, shared);
    ASSERT_THAT(comm->Barrier(), IsOk());
    if (c.save) {
      EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(path) / ".metadata"));
      RemoveAfterEveryRank(*comm, path);
    }
  }
  RemoveAfterEveryRank(*comm, good);
}

// The write failure outside gtest: prints "rank R: <shared error>" and returns 3 on failure, so
// a driver can check the exit status, the output of every rank and the directory.
int SaveWithFailingRank(int failing) {
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD);
  if (!comm.ok()) {
    std::fprintf(stderr, "%s\n", comm.status().ToString().c_str());
    return 1;
  }
  const int rank = (*comm)->rank();
  const std::string path = CheckpointPath("failing_rank");
  auto base = OpenLocalStore(path, /*create=*/true);
  if (!base.ok()) {
    std::fprintf(stderr, "%s\n", base.status().ToString().c_str());
    return 1;
  }
  FaultStore faulty(**base);
  if (rank == failing) {
    faulty.AddFault({StoreOp::kAppend, 1, UnavailableError("injected disk failure"), "", true});
  }
  FileSystemWriter writer(&faulty, path, {});
  SaveOptions options;
  options.comm = comm->get();
  Status s = Save(SavedState(rank, (*comm)->size()), writer, options).status();
  std::printf("rank %d: %s\n", rank, s.ok() ? "OK" : SharedPart(s, rank, path).c_str());
  std::fflush(stdout);
  return s.ok() ? 0 : 3;
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
  int failing = -1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--dir=", 6) == 0) dcpp::g_dir = argv[i] + 6;
    if (std::strncmp(argv[i], "--save-failing-rank=", 20) == 0) failing = std::atoi(argv[i] + 20);
  }
  int rc;
  if (failing >= 0) {
    rc = dcpp::SaveWithFailingRank(failing);
  } else {
    rc = RUN_ALL_TESTS();
    int worst = rc;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    rc = worst;
  }
  session->reset();
  return rc;
}
