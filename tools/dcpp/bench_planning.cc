// `dcpp bench --case planning`: the coordinator's work for many simulated ranks (no processes):
// dedup, global plan and metadata, validation, the commit's metadata encoding, and one rank's
// load plan for another world size. Peak RSS is measured above the simulated input plans, which
// a real coordinator holds too (they arrive from the gather).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <optional>

#include "dcpp/layout.h"
#include "dcpp/planner.h"
#include "tools/dcpp/bench.h"

namespace dcpp::cli {
namespace {

constexpr int64_t kCols = 1024;
constexpr int64_t kRowsPerRank = 4;

// Rank `r` of `ranks`: 90% row shards of [ranks * 4, 1024] tensors, 10% replicated [1024]
// tensors every rank holds. Rank 0's plan is built once; the others are copies with their row
// offsets patched (copying is several times faster than building names and mappings again).
std::vector<SavePlan> SimulatedPlans(int ranks, int items) {
  SavePlan plan;
  const int replicated = std::max(1, items / 10);
  plan.items.reserve(items);
  for (int i = 0; i < items; ++i) {
    WriteItem w;
    if (i < items - replicated) {
      w.index = {"model.layers." + std::to_string(i) + ".weight", Shape{0, 0}, std::nullopt};
      w.type = WriteItemType::kShard;
      w.tensor_data = TensorWriteData{{{0, 0}, {kRowsPerRank, kCols}},
                                      TensorProperties{DType::kFloat32},
                                      {ranks * kRowsPerRank, kCols}};
    } else {
      w.index = {"model.norms." + std::to_string(i) + ".bias", Shape{0}, std::nullopt};
      w.type = WriteItemType::kTensor;
      w.tensor_data = TensorWriteData{{{0}, {kCols}}, TensorProperties{DType::kFloat32}, {kCols}};
    }
    plan.mappings[w.index.fqn] = ObjectPath{w.index.fqn};
    plan.items.push_back(std::move(w));
  }
  std::vector<SavePlan> plans;
  plans.reserve(ranks);
  for (int r = 0; r < ranks; ++r) {
    plans.push_back(plan);
    for (auto& w : plans.back().items) {
      if (w.type != WriteItemType::kShard) continue;
      (*w.index.offset)[0] = int64_t{r} * kRowsPerRank;
      w.tensor_data->chunk.offsets[0] = int64_t{r} * kRowsPerRank;
    }
  }
  return plans;
}

// The state dict of load rank `q` of `world`: its row block of every sharded tensor, replicated
// tensors whole. Tensors are zero-filled lazily (untouched pages cost nothing).
Value LoadStateDict(const Metadata& md, int q, int world) {
  Value sd = Value::MakeDict();
  for (const auto& [fqn, m] : md.state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (!t) continue;
    if (t->size.size() == 1) {
      sd.Set(fqn, Value::FromTensor(Tensor::Zeros(t->properties.dtype, t->size)));
      continue;
    }
    const int64_t rows = t->size[0];
    const int64_t lo = rows * q / world, hi = rows * (q + 1) / world;
    ShardedTensor st{t->properties.dtype, t->size, {}};
    st.shards.push_back({{lo, 0}, Tensor::Zeros(t->properties.dtype, {hi - lo, t->size[1]})});
    sd.Set(fqn, Value::FromSharded(std::move(st)));
  }
  return sd;
}

void Emit(const nlohmann::json& row) { std::cout << row.dump() << std::endl; }

}  // namespace

int RunPlanningCase(int ranks, int items, int load_ranks) {
  nlohmann::json f;
  f["ranks"] = ranks;
  f["items_per_rank"] = items;
  std::vector<SavePlan> plans = SimulatedPlans(ranks, items);
  const int64_t base_rss = CurrentRssBytes();
  f["input_plans_MiB"] = static_cast<double>(base_rss) / (1 << 20);

  // The coordinator's save planning as Save runs it: the median of kPlanRounds plans, each of
  // new copies of the inputs (one plan's time moved 1.7-3.8 s between processes on one VM).
  // The peak RSS is the first round's; the last round's plan is kept for the steps below.
  constexpr int kPlanRounds = 3;
  double t0 = 0, t1 = 0;
  std::vector<double> wall, cpu;
  std::optional<std::pair<std::vector<SavePlan>, Metadata>> global;
  for (int round = 0; round < kPlanRounds; ++round) {
    if (round > 0) {
      global.reset();
      plans = SimulatedPlans(ranks, items);
    }
    t0 = NowSeconds();
    const double c0 = CpuSeconds();
    DefaultSavePlanner planner;
    auto planned = planner.CreateGlobalPlan(std::move(plans));
    t1 = NowSeconds();
    if (!planned.ok()) {
      std::cerr << "planning: " << planned.status().ToString() << "\n";
      return 2;
    }
    wall.push_back(t1 - t0);
    cpu.push_back(CpuSeconds() - c0);
    if (round == 0) {
      f["planning_rss_MiB"] = static_cast<double>(PeakRssBytes() - base_rss) / (1 << 20);
    }
    global = *std::move(planned);
  }
  for (double w : wall) f["global_plan_rounds_s"].push_back(std::round(w * 1000) / 1000);
  f["global_plan_s"] = Median(wall);
  f["global_plan_cpu_s"] = Median(cpu);
  f["chunks"] = [&] {
    int64_t n = 0;
    for (const auto& [fqn, m] : global->second.state_dict_metadata) {
      if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) n += t->chunks.size();
    }
    return n;
  }();

  // The plan cache: a caching planner's first plan (fingerprint included), then a second save
  // of the same structure. Inputs are copies of the same simulated plans.
  {
    SavePlannerOptions options;
    options.enable_plan_caching = true;
    DefaultSavePlanner caching(options);
    plans = SimulatedPlans(ranks, items);
    t0 = NowSeconds();
    auto first = caching.CreateGlobalPlan(std::move(plans));
    t1 = NowSeconds();
    if (!first.ok()) return 2;
    f["caching_first_plan_s"] = t1 - t0;
    first = Status::Ok();
    plans = SimulatedPlans(ranks, items);
    t0 = NowSeconds();
    auto again = caching.CreateGlobalPlan(std::move(plans));
    t1 = NowSeconds();
    if (!again.ok()) return 2;
    f["cached_plan_s"] = t1 - t0;
    f["plan_cache_hit"] = caching.last_plan_cached();
  }

  const bool commit = std::getenv("DCPP_BENCH_NO_COMMIT") == nullptr;
  Metadata& md = global->second;
  if (commit) {
    // The commit: storage data from every rank's write results, then the .metadata pickle.
    t0 = NowSeconds();
    std::vector<std::vector<WriteResult>> results(ranks);
    for (int r = 0; r < ranks; ++r) {
      const SavePlan& p = global->first[r];
      const std::string file = p.storage_prefix.empty() ? "__" + std::to_string(r) + "_0.distcp"
                                                        : p.storage_prefix + "0.distcp";
      int64_t offset = 0;
      results[r].reserve(p.items.size());
      for (const auto& item : p.items) {
        const int64_t len = item.StorageSize() + 1024;
        results[r].push_back({item.index, len, StorageInfo{file, offset, len, {}}});
        offset += len;
      }
    }
    for (const auto& rr : results) {
      for (const auto& r : rr) md.storage_data[r.index] = r.storage_data;
    }
    results.clear();
    results.shrink_to_fit();
    auto bytes = EncodeMetadata(md);
    t1 = NowSeconds();
    if (!bytes.ok()) return 2;
    f["commit_metadata_s"] = t1 - t0;
    f["metadata_MiB"] = static_cast<double>(bytes->size()) / (1 << 20);
    bytes = std::string();
  }
  // Load planning for `load_ranks` ranks: every rank plans alone; a few sampled ranks.
  if (load_ranks > 0) {
    std::vector<double> times;
    int64_t read_items = 0;
    for (int s = 0; s < 4; ++s) {
      const int q = static_cast<int>(static_cast<int64_t>(load_ranks - 1) * s / 3);
      Value sd = LoadStateDict(md, q, load_ranks);
      t0 = NowSeconds();
      DefaultLoadPlanner lp;
      if (!lp.SetUp(&sd, md, q == 0).ok()) return 2;
      auto lplan = lp.CreateLocalPlan();
      t1 = NowSeconds();
      if (!lplan.ok()) return 2;
      times.push_back(t1 - t0);
      read_items += lplan->items.size();
    }
    f["load_ranks"] = load_ranks;
    f["load_plan_per_rank_s"] = Median(times);
    f["load_read_items_sampled"] = read_items;
  }
  const int64_t peak = PeakRssBytes();
  f["peak_rss_MiB"] = static_cast<double>(peak) / (1 << 20);
  f["with_commit_rss_MiB"] = static_cast<double>(peak - base_rss) / (1 << 20);
  Emit({{"case", "planning/" + std::to_string(ranks) + "x" + std::to_string(items)},
        {"figures", f}});
  return 0;
}

}  // namespace dcpp::cli
