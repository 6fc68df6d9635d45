// Every fallible step of save and load, failed on every rank in turn (threads as ranks): every
// rank must return the same error naming the failed rank, within the group's timeout (a rank
// that skipped a collective would leave its peers to time out with another error), and a failed
// save must leave the previous checkpoint as it was.
#include "checkpoint/steps.h"

#include <filesystem>
#include <mutex>
#include <regex>
#include <set>

#include "dcpp/comm.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::TempDir;

constexpr int kWorld = 3;
const Shape kShape = {12, 5};

// Rank r's state: a row-sharded tensor, a replicated tensor, a plain value.
Value State(int rank, uint64_t seed, bool fill) {
  Tensor full = PatternTensor(DType::kFloat32, kShape, seed);
  const int64_t lo = kShape[0] * rank / kWorld, hi = kShape[0] * (rank + 1) / kWorld;
  Tensor piece = Tensor::Zeros(DType::kFloat32, {hi - lo, kShape[1]});
  if (fill) {
    EXPECT_TRUE(CopyRegion(piece.view(), {0, 0}, full.view(), {lo, 0}, piece.shape()).ok());
  }
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromSharded({DType::kFloat32, kShape, {{{lo, 0}, piece}}}));
  sd.Set("bias", Value::FromTensor(fill ? PatternTensor(DType::kFloat64, {7}, seed + 1)
                                        : Tensor::Zeros(DType::kFloat64, {7})));
  sd.Set("step", Value::Int(fill ? static_cast<int64_t>(seed) : 0));
  return sd;
}

// What every rank loads whole: the full tensors, so replicated reads are broadcast.
Value WholeState(uint64_t seed, bool fill) {
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(fill ? PatternTensor(DType::kFloat32, kShape, seed)
                                     : Tensor::Zeros(DType::kFloat32, kShape)));
  sd.Set("bias", Value::FromTensor(fill ? PatternTensor(DType::kFloat64, {7}, seed + 1)
                                        : Tensor::Zeros(DType::kFloat64, {7})));
  sd.Set("step", Value::Int(fill ? static_cast<int64_t>(seed) : 0));
  return sd;
}

struct Scenario {
  std::string name;
  // Runs the operation on one rank; `dir` holds a committed checkpoint of seed 1.
  std::function<Status(Communicator&, const std::string& dir)> run;
  bool is_save;
};

std::vector<Scenario> Scenarios() {
  return {
      {"save",
       [](Communicator& c, const std::string& dir) {
         return Save(State(c.rank(), 2, true), dir, {.comm = &c}).status();
       },
       true},
      {"save_rank_local",
       [](Communicator& c, const std::string& dir) {
         return Save(State(c.rank(), 2, true), dir + "_local",
                     {.comm = &c, .use_collectives = false})
             .status();
       },
       true},
      {"load",
       [](Communicator& c, const std::string& dir) {
         Value sd = State(kWorld - 1 - c.rank(), 1, false);  // another sharding
         return Load(sd, dir, {.comm = &c});
       },
       false},
      {"load_broadcast_replicated",
       [](Communicator& c, const std::string& dir) {
         Value sd = WholeState(1, false);
         return Load(sd, dir, {.comm = &c, .broadcast_replicated = true});
       },
       false},
  };
}

// (point, rank) pairs a hook saw, in order of first sight.
class Recorder {
 public:
  Status Record(std::string_view point, int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    if (seen_.insert({std::string(point), rank}).second)
      order_.push_back({std::string(point), rank});
    return Status::Ok();
  }
  std::vector<std::pair<std::string, int>> order() const { return order_; }

 private:
  std::mutex mu_;
  std::set<std::pair<std::string, int>> seen_;
  std::vector<std::pair<std::string, int>> order_;
};

std::vector<Status> OnRanks(const std::function<Status(Communicator&)>& fn) {
  std::vector<Status> out(kWorld);
  RunOnThreads(kWorld, [&](Communicator& comm) { out[comm.rank()] = fn(comm); },
               {.timeout = std::chrono::milliseconds(10000)});
  return out;
}

// The error without this rank's "rank N: saving "...": " context.
std::string Shared(const Status& s) {
  static const std::regex prefix("^rank [0-9]+: (saving|loading) \"[^\"]*\": ");
  return std::regex_replace(std::string(s.message()), prefix, "");
}

void MakeFirstCheckpoint(const std::string& dir) {
  auto st = OnRanks(
      [&](Communicator& c) { return Save(State(c.rank(), 1, true), dir, {.comm = &c}).status(); });
  for (const auto& s : st) ASSERT_TRUE(s.ok()) << s.ToString();
  st = OnRanks([&](Communicator& c) {
    return Save(State(c.rank(), 1, true), dir + "_local", {.comm = &c, .use_collectives = false})
        .status();
  });
  for (const auto& s : st) ASSERT_TRUE(s.ok()) << s.ToString();
}

// The checkpoint at `dir` still holds seed 1, bit for bit, loaded whole on one process.
void ExpectFirstCheckpoint(const std::string& dir, const std::string& what) {
  Value sd = WholeState(1, false);
  Status s = Load(sd, dir);
  ASSERT_TRUE(s.ok()) << what << ": " << s.ToString();
  EXPECT_TRUE(sd.Find("w")->tensor().BitwiseEqual(PatternTensor(DType::kFloat32, kShape, 1)))
      << what;
  EXPECT_EQ(sd.Find("step")->as_int(), 1) << what;
}

// In rank-local mode each rank commits its own `__{rank}.metadata` alone: the failed rank's
// shards must still be its previous ones, bit for bit.
void ExpectFailedRankKeptItsCheckpoint(const std::string& dir, int failed,
                                       const std::string& what) {
  std::vector<Value> loaded(kWorld);
  auto st = OnRanks([&](Communicator& c) {
    loaded[c.rank()] = State(c.rank(), 1, false);
    return Load(loaded[c.rank()], dir, {.comm = &c});
  });
  for (const auto& s : st) ASSERT_TRUE(s.ok()) << what << ": " << s.ToString();
  const Value want = State(failed, 1, true);
  EXPECT_TRUE(loaded[failed].Find("w")->sharded().shards[0].tensor.BitwiseEqual(
      want.Find("w")->sharded().shards[0].tensor))
      << what;
  // Replicated plain values come from the lowest rank's file in the merged rank-local metadata,
  // so only the failed rank's own shards are checked.
}

TEST(StepsFaultTest, EveryStepFailedOnEveryRankFailsEveryRankAlike) {
  int cases = 0;
  std::set<std::string> points;
  for (const Scenario& sc : Scenarios()) {
    SCOPED_TRACE(sc.name);
    TempDir base;
    const std::string clean_dir = base.Join("clean");
    MakeFirstCheckpoint(clean_dir);
    // A clean run finds the fault points this scenario passes on each rank.
    Recorder recorder;
    internal::SetFaultHookForTesting(
        [&](std::string_view p, int r) { return recorder.Record(p, r); });
    auto clean = OnRanks([&](Communicator& c) { return sc.run(c, clean_dir); });
    internal::SetFaultHookForTesting(nullptr);
    for (const auto& s : clean) ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_GE(recorder.order().size(), static_cast<size_t>(kWorld * 4));

    for (const auto& step : recorder.order()) {
      // Named copies: clang before 16 cannot capture structured bindings in the hook below.
      const std::string point = step.first;
      const int rank = step.second;
      const std::string what = sc.name + " " + point + " on rank " + std::to_string(rank);
      SCOPED_TRACE(what);
      points.insert(point);
      TempDir run;
      const std::string dir = run.Join("ck");
      MakeFirstCheckpoint(dir);
      std::mutex mu;
      bool fired = false;
      internal::SetFaultHookForTesting([&](std::string_view p, int r) -> Status {
        std::lock_guard<std::mutex> lock(mu);
        if (fired || p != point || r != rank) return Status::Ok();
        fired = true;
        return UnavailableError("injected at " + point);
      });
      auto got = OnRanks([&](Communicator& c) { return sc.run(c, dir); });
      internal::SetFaultHookForTesting(nullptr);
      ASSERT_TRUE(fired);
      const std::regex names_rank("rank " + std::to_string(rank) + "([^0-9]|$)");
      for (int r = 0; r < kWorld; ++r) {
        EXPECT_EQ(got[r].code(), StatusCode::kUnavailable)
            << "rank " << r << ": " << got[r].ToString();
        EXPECT_EQ(Shared(got[r]), Shared(got[0])) << "rank " << r;
        EXPECT_NE(Shared(got[r]).find("injected at " + point), std::string::npos)
            << got[r].ToString();
        EXPECT_TRUE(std::regex_search(Shared(got[r]), names_rank)) << got[r].ToString();
      }
      if (sc.is_save) {
        ExpectFirstCheckpoint(dir, what);
        ExpectFailedRankKeptItsCheckpoint(dir + "_local", rank, what);
      }
      ++cases;
    }
  }
  // Every phase of both protocols was reached, the replicated-read broadcast included.
  for (const char* p :
       {"save.writer.set_up", "save.planner.create_local_plan", "save.planner.create_global_plan",
        "save.writer.prepare_global_plan", "save.planner.finish_plan", "save.writer.write_data",
        "save.writer.finish", "save.local.commit", "load.reader.read_metadata",
        "load.planner.create_local_plan", "load.planner.resolve_tensor", "load.reader.read_data",
        "load.broadcast.pack", "load.broadcast.unpack"}) {
    EXPECT_TRUE(points.count(p)) << p;
  }
  EXPECT_GE(cases, 60);
  std::cout << "fault points failed: " << cases << " (" << points.size() << " distinct)\n";
}

}  // namespace
}  // namespace dcpp
