// The collective protocol with threads as ranks: resharding across world sizes, replicated and
// optimizer-like state, errors injected on one rank, rank-local mode, sub-groups.
#include <mutex>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/convert.h"
#include "dcpp/storage.h"
#include "testing/fault_store.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::dcpp::testing::TempDir;
using ::testing::HasSubstr;

enum class Split { kRows, kCols, kBlocks };

// This rank's piece(s) of `full` under `split` over `world` ranks; uneven by construction.
std::vector<ChunkBox> Pieces(const Shape& shape, Split split, int rank, int world) {
  auto range = [](int64_t n, int parts, int i) {
    return std::pair<int64_t, int64_t>{n * i / parts, n * (i + 1) / parts};
  };
  if (split == Split::kRows) {
    auto [lo, hi] = range(shape[0], world, rank);
    return {{{lo, 0}, {hi - lo, shape[1]}}};
  }
  if (split == Split::kCols) {
    auto [lo, hi] = range(shape[1], world, rank);
    return {{{0, lo}, {shape[0], hi - lo}}};
  }
  // Blocks: a 2 x world grid; rank r holds column r of both block rows (two chunks).
  std::vector<ChunkBox> out;
  auto [c0, c1] = range(shape[1], world, rank);
  for (int br = 0; br < 2; ++br) {
    auto [r0, r1] = range(shape[0], 2, br);
    out.push_back({{r0, c0}, {r1 - r0, c1 - c0}});
  }
  return out;
}

ShardedTensor Cut(const Tensor& full, const std::vector<ChunkBox>& boxes, bool fill) {
  ShardedTensor st{full.dtype(), full.shape(), {}};
  for (const auto& b : boxes) {
    Tensor t = Tensor::Zeros(full.dtype(), b.sizes);
    if (fill) {
      EXPECT_TRUE(CopyRegion(t.view(), Shape(b.dim(), 0), full.view(), b.offsets, b.sizes).ok());
    }
    st.shards.push_back({b.offsets, t});
  }
  return st;
}

struct Model {
  Tensor w = PatternTensor(DType::kFloat32, {23, 17}, 1);
  Tensor emb = PatternTensor(DType::kBFloat16, {31, 8}, 2);
  Tensor blocks = PatternTensor(DType::kInt64, {9, 13}, 3);
  Tensor bias = PatternTensor(DType::kFloat64, {17}, 4);
  Tensor exp_avg = PatternTensor(DType::kFloat32, {23, 17}, 5);
  Tensor exp_avg_sq = PatternTensor(DType::kFloat32, {23, 17}, 6);
};

// A training state: parameters sharded three ways, a replicated bias, per-parameter optimizer
// moments sharded like their parameter, a step counter and plain values.
Value State(const Model& m, int rank, int world, bool fill) {
  Value sd = Value::MakeDict();
  Value model = Value::MakeDict();
  model.Set("w",
            Value::FromSharded(Cut(m.w, Pieces(m.w.shape(), Split::kRows, rank, world), fill)));
  model.Set("emb",
            Value::FromSharded(Cut(m.emb, Pieces(m.emb.shape(), Split::kCols, rank, world), fill)));
  model.Set("blocks", Value::FromSharded(Cut(
                          m.blocks, Pieces(m.blocks.shape(), Split::kBlocks, rank, world), fill)));
  model.Set("bias",
            Value::FromTensor(fill ? m.bias.Clone() : Tensor::Zeros(DType::kFloat64, {17})));
  sd.Set("model", model);
  Value optim = Value::MakeDict();
  Value state = Value::MakeDict();
  Value w = Value::MakeDict();
  w.Set("exp_avg",
        Value::FromSharded(Cut(m.exp_avg, Pieces(m.w.shape(), Split::kRows, rank, world), fill)));
  w.Set("exp_avg_sq", Value::FromSharded(
                          Cut(m.exp_avg_sq, Pieces(m.w.shape(), Split::kRows, rank, world), fill)));
  w.Set("step", Value::FromTensor(fill ? Tensor::FromBytes(DType::kFloat32, {}, "\0\0\x20\x41")
                                       : Tensor::Zeros(DType::kFloat32, {})));  // 10.0f
  state.Set("model.w", w);
  optim.Set("state", state);
  optim.Set(
      "param_groups",
      Value::MakeList({Value::MakeDict(
          {{Value::Str("lr"), Value::Float(fill ? 0.01 : 0)},
           {Value::Str("betas"), Value::MakeTuple({Value::Float(0.9), Value::Float(0.999)})}})}));
  sd.Set("optim", optim);
  sd.Set("epoch", Value::Int(fill ? 7 : 0));
  return sd;
}

void Check(const Model& m, const Value& sd) {
  auto piece = [](const Tensor& full, const ShardedTensor& st) {
    for (const auto& s : st.shards) {
      Tensor want = Tensor::Zeros(full.dtype(), s.tensor.shape());
      ASSERT_TRUE(
          CopyRegion(want.view(), Shape(full.dim(), 0), full.view(), s.offsets, s.tensor.shape())
              .ok());
      EXPECT_TRUE(want.BitwiseEqual(s.tensor)) << s.box().ToString();
    }
  };
  const Value& model = *sd.Find("model");
  piece(m.w, model.Find("w")->sharded());
  piece(m.emb, model.Find("emb")->sharded());
  piece(m.blocks, model.Find("blocks")->sharded());
  EXPECT_TRUE(model.Find("bias")->tensor().BitwiseEqual(m.bias));
  const Value& w = *sd.Find("optim")->Find("state")->Find("model.w");
  piece(m.exp_avg, w.Find("exp_avg")->sharded());
  piece(m.exp_avg_sq, w.Find("exp_avg_sq")->sharded());
  EXPECT_EQ(w.Find("step")->tensor().data_as<float>()[0], 10.0f);
  EXPECT_EQ(sd.Find("epoch")->as_int(), 7);
  EXPECT_EQ(sd.Find("optim")->Find("param_groups")->DebugString(),
            "[{'lr': 0.01, 'betas': (0.90000000000000002, 0.999)}]");
}

// Runs fn on `world` thread ranks and returns each rank's status.
std::vector<Status> OnRanks(int world, const std::function<Status(Communicator&)>& fn) {
  std::vector<Status> out(world);
  RunOnThreads(world, [&](Communicator& comm) { out[comm.rank()] = fn(comm); });
  return out;
}

TEST(CollectiveTest, SaveWithFourLoadWithOneTwoThreeAndEight) {
  TempDir dir;
  Model m;
  const std::string path = dir.Join("ck");
  for (const auto& s : OnRanks(4, [&](Communicator& comm) {
         SaveOptions so;
         so.comm = &comm;
         return Save(State(m, comm.rank(), 4, true), path, so).status();
       })) {
    DCPP_ASSERT_OK(s);
  }
  for (int world : {1, 2, 3, 8}) {
    for (bool broadcast : {false, true}) {
      std::mutex mu;
      auto statuses = OnRanks(world, [&](Communicator& comm) {
        Value sd = State(m, comm.rank(), world, false);
        LoadOptions lo;
        lo.comm = &comm;
        lo.broadcast_replicated = broadcast;
        Status s = Load(sd, path, lo);
        std::lock_guard<std::mutex> lock(mu);
        if (s.ok()) Check(m, sd);
        return s;
      });
      for (const auto& s : statuses) DCPP_EXPECT_OK(s) << "world " << world;
    }
  }
}

// Every rank's Save returns the committed metadata: the coordinator its own, the others what it
// sent them (the committed bytes, not encoded a second time). Encoded again, each is exactly
// the committed `.metadata`.
TEST(CollectiveTest, EveryRankGetsTheCommittedMetadata) {
  TempDir dir;
  Model m;
  const std::string path = dir.Join("ck");
  std::vector<Metadata> got(3);
  for (const auto& s : OnRanks(3, [&](Communicator& comm) {
         SaveOptions so;
         so.comm = &comm;
         so.coordinator_rank = 1;
         auto md = Save(State(m, comm.rank(), 3, true), path, so);
         if (md.ok()) got[comm.rank()] = *std::move(md);
         return md.status();
       })) {
    DCPP_ASSERT_OK(s);
  }
  DCPP_ASSERT_OK_AND_ASSIGN(std::string committed, testing::ReadFileBytes(path + "/.metadata"));
  for (int r = 0; r < 3; ++r) {
    DCPP_ASSERT_OK_AND_ASSIGN(std::string again, EncodeMetadata(got[r]));
    EXPECT_TRUE(again == committed) << "rank " << r;
  }
}

TEST(CollectiveTest, ReplicatedTensorsAreWrittenOnceAndSpreadOverRanks) {
  TempDir dir;
  std::vector<Metadata> md(4);
  OnRanks(4, [&](Communicator& comm) {
    Value sd = Value::MakeDict();
    for (int i = 0; i < 8; ++i) {
      sd.Set("r" + std::to_string(i), Value::FromTensor(PatternTensor(DType::kFloat32, {64}, i)));
    }
    SaveOptions so;
    so.comm = &comm;
    auto r = Save(sd, dir.Join("ck"), so);
    if (r.ok()) md[comm.rank()] = *r;
    return r.status();
  });
  std::map<std::string, int> per_file;
  for (const auto& [idx, info] : md[0].storage_data) ++per_file[info.relative_path];
  EXPECT_EQ(md[0].storage_data.size(), 8u);
  EXPECT_EQ(per_file.size(), 4u);  // two tensors from each rank
  for (const auto& [f, n] : per_file) EXPECT_EQ(n, 2) << f;
  // Every rank returns the same committed metadata.
  EXPECT_EQ(md[3].storage_data.size(), 8u);
}

TEST(CollectiveTest, WriteFailureOnOneRankFailsEveryRankAndCommitsNothing) {
  MemoryStore mem;
  FaultStore faulty(mem);
  faulty.AddFault({StoreOp::kAppend, 1, UnavailableError("No space left on device"), "", true});
  Model m;
  auto statuses = OnRanks(4, [&](Communicator& comm) {
    FileSystemWriter w(comm.rank() == 2 ? static_cast<Store*>(&faulty) : &mem, "mem", {});
    SaveOptions so;
    so.comm = &comm;
    return Save(State(m, comm.rank(), 4, true), w, so).status();
  });
  for (int r = 0; r < 4; ++r) {
    EXPECT_THAT(statuses[r],
                StatusIs(StatusCode::kUnavailable, HasSubstr("writing failed on rank 2")));
    EXPECT_THAT(statuses[r],
                StatusIs(StatusCode::kUnavailable, HasSubstr("No space left on device")));
    EXPECT_EQ(statuses[r].message().substr(statuses[r].message().find(':')),
              statuses[0].message().substr(statuses[0].message().find(':')));
  }
  EXPECT_FALSE(*mem.Exists(".metadata"));
}

TEST(CollectiveTest, PlanningAndCommitFailuresReachEveryRank) {
  Model m;
  {
    TempDir dir;
    auto statuses = OnRanks(3, [&](Communicator& comm) {
      Value sd = State(m, comm.rank(), 3, true);
      if (comm.rank() == 1) {  // rank 1 disagrees about a tensor's shape
        sd.Find("model")->Set("bias", Value::FromTensor(Tensor::Zeros(DType::kFloat64, {5})));
      }
      SaveOptions so;
      so.comm = &comm;
      return Save(sd, dir.Join("ck"), so).status();
    });
    for (const auto& s : statuses) {
      EXPECT_THAT(s, StatusIs(StatusCode::kInvalidArgument, HasSubstr("model.bias")));
    }
  }
  {
    MemoryStore mem;
    FaultStore faulty(mem);
    faulty.AddFault({StoreOp::kRename, 1, UnavailableError("rename refused")});
    auto statuses = OnRanks(3, [&](Communicator& comm) {
      FileSystemWriter w(comm.rank() == 0 ? static_cast<Store*>(&faulty) : &mem, "mem", {});
      SaveOptions so;
      so.comm = &comm;
      return Save(State(m, comm.rank(), 3, true), w, so).status();
    });
    for (const auto& s : statuses) {
      EXPECT_THAT(s, StatusIs(StatusCode::kUnavailable, HasSubstr("rename refused")));
    }
    EXPECT_FALSE(*mem.Exists(".metadata"));
  }
}

TEST(CollectiveTest, ReadFailureOnOneRankFailsEveryRank) {
  MemoryStore mem;
  Model m;
  OnRanks(2, [&](Communicator& comm) {
    FileSystemWriter w(&mem, "mem", {});
    SaveOptions so;
    so.comm = &comm;
    return Save(State(m, comm.rank(), 2, true), w, so).status();
  });
  FaultStore faulty(mem);
  faulty.AddFault({StoreOp::kRead, 3, DataLossError("bad sector"), "", true});
  auto statuses = OnRanks(3, [&](Communicator& comm) {
    FileSystemReader r(comm.rank() == 1 ? static_cast<Store*>(&faulty) : &mem, "mem", {});
    Value sd = State(m, comm.rank(), 3, false);
    LoadOptions lo;
    lo.comm = &comm;
    return Load(sd, r, lo);
  });
  for (const auto& s : statuses) {
    EXPECT_THAT(s, StatusIs(StatusCode::kDataLoss, HasSubstr("reading failed on rank 1")));
  }
}

TEST(CollectiveTest, RankLocalModeWritesPerRankMetadataAndLoadDetectsIt) {
  TempDir dir;
  Model m;
  for (const auto& s : OnRanks(3, [&](Communicator& comm) {
         SaveOptions so;
         so.comm = &comm;
         so.use_collectives = false;
         return Save(State(m, comm.rank(), 3, true), dir.Join("ck"), so).status();
       })) {
    DCPP_ASSERT_OK(s);
  }
  EXPECT_FALSE(std::filesystem::exists(dir.Join("ck/.metadata")));
  EXPECT_TRUE(std::filesystem::exists(dir.Join("ck/__2.metadata")));
  std::mutex mu;
  for (const auto& s : OnRanks(3, [&](Communicator& comm) {
         Value sd = State(m, comm.rank(), 3, false);
         LoadOptions lo;
         lo.comm = &comm;
         Status st = Load(sd, dir.Join("ck"), lo);
         std::lock_guard<std::mutex> lock(mu);
         if (st.ok()) Check(m, sd);
         return st;
       })) {
    DCPP_EXPECT_OK(s);
  }
}

TEST(CollectiveTest, AnyCoordinatorAndSubGroups) {
  TempDir dir;
  Model m;
  // Ranks 1 and 3 of 4 save on their own, coordinated by their group's rank 1.
  auto statuses = OnRanks(4, [&](Communicator& comm) -> Status {
    DCPP_ASSIGN_OR_RETURN(auto sub, comm.SubGroup({1, 3}));
    if (!sub) return Status::Ok();
    SaveOptions so;
    so.comm = sub.get();
    so.coordinator_rank = 1;
    return Save(State(m, sub->rank(), 2, true), dir.Join("ck"), so).status();
  });
  for (const auto& s : statuses) DCPP_EXPECT_OK(s);
  Value sd = State(m, 0, 1, false);
  DCPP_ASSERT_OK(Load(sd, dir.Join("ck")));
  Check(m, sd);
}

TEST(CollectiveTest, TorchSaveFileReadOnceAndBroadcastToEveryRank) {
  TempDir dir;
  Model m;
  // The whole state, as one torch.save file.
  Value whole = State(m, 0, 1, true);
  whole.Find("model")->Set("w", Value::FromTensor(m.w));
  whole.Find("model")->Set("emb", Value::FromTensor(m.emb));
  whole.Find("model")->Set("blocks", Value::FromTensor(m.blocks));
  Value* w = whole.Find("optim")->Find("state")->Find("model.w");
  w->Set("exp_avg", Value::FromTensor(m.exp_avg));
  w->Set("exp_avg_sq", Value::FromTensor(m.exp_avg_sq));
  DCPP_ASSERT_OK(SaveTorchFile(whole, dir.Join("state.pt")));
  std::mutex mu;
  for (const auto& s : OnRanks(3, [&](Communicator& comm) {
         BroadcastingTorchSaveReader reader(dir.Join("state.pt"), &comm, 1);
         Value sd = State(m, comm.rank(), 3, false);
         LoadOptions lo;
         lo.comm = &comm;
         Status st = Load(sd, reader, lo);
         std::lock_guard<std::mutex> lock(mu);
         if (st.ok()) Check(m, sd);
         return st;
       })) {
    DCPP_EXPECT_OK(s);
  }
  // A missing file is reported on every rank.
  for (const auto& s : OnRanks(2, [&](Communicator& comm) {
         BroadcastingTorchSaveReader reader(dir.Join("missing.pt"), &comm, 0);
         Value sd = State(m, comm.rank(), 2, false);
         LoadOptions lo;
         lo.comm = &comm;
         return Load(sd, reader, lo);
       })) {
    EXPECT_THAT(s, StatusIs(StatusCode::kNotFound, HasSubstr("missing.pt")));
  }
}

}  // namespace
}  // namespace dcpp
