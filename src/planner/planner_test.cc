#include <random>
#include <set>

#include "dcpp/planner.h"
#include "dcpp/state_dict.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IotaTensor;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

Value Nested() {
  Value sd = Value::MakeDict();
  Value model = Value::MakeDict();
  Value layers = Value::MakeList();
  for (int i = 0; i < 2; ++i) {
    Value layer = Value::MakeDict();
    layer.Set("weight", Value::FromTensor(IotaTensor(DType::kFloat32, {2, 3})));
    layers.items().push_back(layer);
  }
  model.Set("layers", layers);
  sd.Set("model", model);
  sd.Set("step", Value::Int(7));
  sd.Set("lrs", Value::MakeList({Value::Float(0.1), Value::Float(0.2)}));
  sd.Set("pair", Value::MakeTuple({Value::FromTensor(IotaTensor(DType::kInt64, {2}))}));
  sd.Set("empty", Value::MakeDict());
  return sd;
}

TEST(FlattenTest, FollowsPyTorchTraversal) {
  Value sd = Nested();
  DCPP_ASSERT_OK_AND_ASSIGN(auto flat, FlattenStateDict(sd));
  std::vector<std::string> fqns;
  for (const auto& e : flat) fqns.push_back(e.fqn);
  // The list of dicts is descended; the list of floats and the tuple are leaves; the empty dict
  // vanishes.
  EXPECT_THAT(fqns, ::testing::ElementsAre("model.layers.0.weight", "model.layers.1.weight", "step",
                                           "lrs", "pair"));
  EXPECT_EQ(PathToString(flat[1].path), "('model', 'layers', 1, 'weight')");
  EXPECT_TRUE(flat[3].value->is_list());
}

TEST(FlattenTest, DuplicateFqnIsAnError) {
  Value sd = Value::MakeDict();
  sd.Set("a.b", Value::Int(1));
  Value a = Value::MakeDict();
  a.Set("b", Value::Int(2));
  sd.Set("a", a);
  EXPECT_THAT(FlattenStateDict(sd), StatusIs(StatusCode::kInvalidArgument, HasSubstr("\"a.b\"")));
}

TEST(FlattenTest, SetElementRebuildsNesting) {
  Value root = Value::MakeDict();
  DCPP_ASSERT_OK(SetElement(root, {std::string("m"), int64_t{2}, std::string("w")}, Value::Int(5)));
  EXPECT_EQ(root.DebugString(), "{'m': [None, None, {'w': 5}]}");
  DCPP_ASSERT_OK(SetElement(root, {std::string("m"), int64_t{0}}, Value::Int(1)));
  EXPECT_EQ(root.DebugString(), "{'m': [1, None, {'w': 5}]}");
  EXPECT_THAT(SetElement(root, {std::string("m"), std::string("x")}, Value::Int(1)),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("not a dict")));
}

SavePlan PlanFor(const Value& sd) {
  DefaultSavePlanner p;
  EXPECT_TRUE(p.SetUp(sd, true).ok());
  return *p.CreateLocalPlan();
}

Value ShardedRows(int rank, int world, int64_t rows, int64_t cols) {
  ShardedTensor st{DType::kFloat32, {rows, cols}, {}};
  int64_t per = (rows + world - 1) / world;
  int64_t lo = std::min(rows, rank * per), hi = std::min(rows, lo + per);
  st.shards.push_back({{lo, 0}, IotaTensor(DType::kFloat32, {hi - lo, cols})});
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromSharded(st));
  sd.Set("bias", Value::FromTensor(IotaTensor(DType::kFloat32, {cols})));  // replicated
  sd.Set("step", Value::Int(3));                                           // replicated
  return sd;
}

TEST(SavePlannerTest, GlobalPlanDedupsReplicatedItemsAndSpreadsThem) {
  std::vector<SavePlan> plans;
  for (int r = 0; r < 4; ++r) plans.push_back(PlanFor(ShardedRows(r, 4, 10, 3)));
  DefaultSavePlanner coordinator;
  DCPP_ASSERT_OK_AND_ASSIGN(auto global, coordinator.CreateGlobalPlan(plans));
  auto& [out, md] = global;
  ASSERT_EQ(out.size(), 4u);
  int bias = 0, step = 0;
  for (const auto& p : out) {
    for (const auto& item : p.items) {
      bias += item.index.fqn == "bias";
      step += item.index.fqn == "step";
    }
  }
  EXPECT_EQ(bias, 1);
  EXPECT_EQ(step, 1);
  const auto& w = std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("w"));
  EXPECT_EQ(w.size, (Shape{10, 3}));
  ASSERT_EQ(w.chunks.size(), 4u);
  EXPECT_EQ(w.chunks[3], (ChunkBox{{9, 0}, {1, 3}}));
  // Index hints are positions in the chunk list.
  EXPECT_EQ(out[2].items[0].index.index, 2);
  ASSERT_TRUE(md.planner_data.has_value());
  EXPECT_EQ(PathToFqn(md.planner_data->at("w")), "w");
}

TEST(SavePlannerTest, PlanCacheAnswersTheSameStructureWithoutReplanning) {
  std::vector<SavePlan> plans;
  for (int r = 0; r < 4; ++r) plans.push_back(PlanFor(ShardedRows(r, 4, 10, 3)));
  DefaultSavePlanner fresh;
  DCPP_ASSERT_OK_AND_ASSIGN(auto expected, fresh.CreateGlobalPlan(plans));
  SavePlannerOptions options;
  options.enable_plan_caching = true;
  DefaultSavePlanner caching(options);
  DCPP_ASSERT_OK_AND_ASSIGN(auto first, caching.CreateGlobalPlan(plans));
  EXPECT_FALSE(caching.last_plan_cached());
  DCPP_ASSERT_OK_AND_ASSIGN(auto second, caching.CreateGlobalPlan(plans));
  EXPECT_TRUE(caching.last_plan_cached());
  for (const auto* got : {&first, &second}) {
    ASSERT_EQ(got->first.size(), expected.first.size());
    for (size_t p = 0; p < expected.first.size(); ++p) {
      EXPECT_EQ(EncodeSavePlan(got->first[p]), EncodeSavePlan(expected.first[p])) << p;
    }
    DCPP_ASSERT_OK_AND_ASSIGN(std::string a, EncodeMetadata(got->second));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string b, EncodeMetadata(expected.second));
    EXPECT_EQ(a, b);
  }
  // Another structure (one rank's chunk moved) is planned afresh.
  plans[3].items[0].tensor_data->chunk.sizes[0] = 0;
  EXPECT_THAT(caching.CreateGlobalPlan(plans),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("\"w\"")));
  EXPECT_FALSE(caching.last_plan_cached());
}

TEST(SavePlannerTest, GlobalPlanScalesToManyRanks) {
  // 512 ranks x (row shards of 20 tensors + 5 replicated): every replicated item written once,
  // writers spread, chunk index hints consistent with the metadata.
  std::vector<SavePlan> plans(512);
  for (int r = 0; r < 512; ++r) {
    for (int t = 0; t < 25; ++t) {
      WriteItem w;
      if (t < 20) {
        w.index = {"w" + std::to_string(t), Shape{r * 2, 0}, std::nullopt};
        w.type = WriteItemType::kShard;
        w.tensor_data = TensorWriteData{{{r * 2, 0}, {2, 4}}, {DType::kFloat32}, {1024, 4}};
      } else {
        w.index = {"b" + std::to_string(t), Shape{0}, std::nullopt};
        w.tensor_data = TensorWriteData{{{0}, {4}}, {DType::kFloat32}, {4}};
      }
      plans[r].items.push_back(w);
    }
  }
  DefaultSavePlanner coordinator;
  DCPP_ASSERT_OK_AND_ASSIGN(auto global, coordinator.CreateGlobalPlan(plans));
  int64_t items = 0;
  std::set<size_t> replicated_writers;
  for (size_t p = 0; p < global.first.size(); ++p) {
    for (const auto& item : global.first[p].items) {
      ++items;
      const auto& t =
          std::get<TensorStorageMetadata>(*global.second.state_dict_metadata.Find(item.index.fqn));
      ASSERT_TRUE(item.index.index.has_value());
      EXPECT_EQ(t.chunks.at(*item.index.index).offsets, *item.index.offset);
      if (item.index.fqn[0] == 'b') replicated_writers.insert(p);
    }
  }
  EXPECT_EQ(items, 512 * 20 + 5);
  EXPECT_EQ(replicated_writers.size(), 5u);
}

// Past 65 536 items the metadata is collected in parts by fqn on two threads: the result and
// the error reported must be those of one pass in plan order.
TEST(SavePlannerTest, ManyItemsAreCollectedInPartsLikeOnePass) {
  constexpr int kRanks = 128, kShards = 512, kReplicated = 8;
  auto make_plans = [&] {
    std::vector<SavePlan> plans(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      for (int t = 0; t < kShards + kReplicated; ++t) {
        WriteItem w;
        if (t < kShards) {
          w.index = {"w" + std::to_string(t), Shape{r * 2, 0}, std::nullopt};
          w.type = WriteItemType::kShard;
          w.tensor_data = TensorWriteData{{{r * 2, 0}, {2, 4}}, {DType::kFloat32}, {kRanks * 2, 4}};
        } else {
          w.index = {"b" + std::to_string(t), Shape{0}, std::nullopt};
          w.tensor_data = TensorWriteData{{{0}, {4}}, {DType::kFloat32}, {4}};
        }
        plans[r].items.push_back(w);
      }
    }
    return plans;
  };
  DefaultSavePlanner coordinator;
  DCPP_ASSERT_OK_AND_ASSIGN(auto global, coordinator.CreateGlobalPlan(make_plans()));
  const auto& md = global.second.state_dict_metadata;
  ASSERT_EQ(md.size(), size_t{kShards + kReplicated});
  for (int t = 0; t < kShards; ++t) {
    const auto& m = std::get<TensorStorageMetadata>(*md.Find("w" + std::to_string(t)));
    ASSERT_EQ(m.chunks.size(), size_t{kRanks});
    for (int r = 0; r < kRanks; ++r) EXPECT_EQ(m.chunks[r].offsets, (Shape{r * 2, 0}));
  }
  for (size_t p = 0; p < global.first.size(); ++p) {
    for (const auto& item : global.first[p].items) {
      const auto& m = std::get<TensorStorageMetadata>(*md.Find(item.index.fqn));
      ASSERT_TRUE(item.index.index.has_value());
      EXPECT_EQ(m.chunks.at(*item.index.index).offsets, *item.index.offset);
    }
  }

  // Two bad items of fqns in different parts: the one earlier in plan order is reported,
  // whichever part finds its own first.
  for (const auto& [early, late] : {std::pair{5, 0}, std::pair{0, 5}}) {
    std::vector<SavePlan> plans = make_plans();
    plans[50].items[early].tensor_data->properties.dtype = DType::kInt32;
    plans[60].items[late].tensor_data->size = {kRanks * 2, 8};
    EXPECT_THAT(coordinator.CreateGlobalPlan(std::move(plans)).status(),
                StatusIs(StatusCode::kInvalidArgument,
                         HasSubstr("rank 50: key \"w" + std::to_string(early) + "\" is int32")));
  }
}

TEST(SavePlannerTest, DedupBalancesBytes) {
  // Three equal replicated tensors held by both ranks: rank 0 gets one, rank 1 the next, ...
  std::vector<SavePlan> plans(2);
  for (auto& p : plans) {
    for (int i = 0; i < 4; ++i) {
      WriteItem w;
      w.index = {"t" + std::to_string(i), Shape{0}, std::nullopt};
      w.tensor_data = TensorWriteData{{{0}, {8}}, {DType::kFloat32}, {8}};
      p.items.push_back(w);
    }
  }
  auto out = DedupSavePlans(plans, false);
  EXPECT_EQ(out[0].items.size(), 2u);
  EXPECT_EQ(out[1].items.size(), 2u);
  auto lowest = DedupSavePlans(plans, true);
  EXPECT_EQ(lowest[0].items.size(), 4u);
  EXPECT_EQ(lowest[1].items.size(), 0u);
}

TEST(SavePlannerTest, ValidationFindsOverlapAndGaps) {
  Metadata md;
  md.state_dict_metadata["x"] =
      TensorStorageMetadata{{DType::kFloat32}, {4, 4}, {{{0, 0}, {2, 4}}, {{1, 0}, {3, 4}}}};
  EXPECT_THAT(ValidateGlobalPlan(md, true),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
  md.state_dict_metadata["x"] =
      TensorStorageMetadata{{DType::kFloat32}, {4, 4}, {{{0, 0}, {2, 4}}, {{3, 0}, {1, 4}}}};
  EXPECT_THAT(ValidateGlobalPlan(md, true),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("cover 12 of its 16")));
  DCPP_EXPECT_OK(ValidateGlobalPlan(md, false));
  md.state_dict_metadata["x"] =
      TensorStorageMetadata{{DType::kFloat32}, {4, 4}, {{{0, 0}, {5, 4}}}};
  EXPECT_THAT(ValidateGlobalPlan(md, false),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("outside")));
}

TEST(SavePlannerTest, ValidationScalesToManyChunks) {
  // 200k column chunks and a 400x500 grid: an O(n^2) check would take minutes.
  for (int layout = 0; layout < 2; ++layout) {
    Metadata md;
    TensorStorageMetadata t{{DType::kFloat32}, {}, {}};
    if (layout == 0) {
      t.size = {4, 200000};
      for (int64_t c = 0; c < 200000; ++c) t.chunks.push_back({{0, c}, {4, 1}});
    } else {
      t.size = {400, 500};
      for (int64_t r = 0; r < 400; ++r) {
        for (int64_t c = 0; c < 500; ++c) t.chunks.push_back({{r, c}, {1, 1}});
      }
    }
    std::shuffle(t.chunks.begin(), t.chunks.end(), std::mt19937(7));
    t.chunks.push_back(t.chunks[12345]);  // one duplicate must be found
    md.state_dict_metadata["x"] = t;
    EXPECT_THAT(ValidateGlobalPlan(md, false),
                StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
    std::get<TensorStorageMetadata>(*md.state_dict_metadata.Find("x")).chunks.pop_back();
    DCPP_EXPECT_OK(ValidateGlobalPlan(md, true));
  }
}

// Random row/column/block layouts, some with overlapping, missing, outside or out-of-order
// chunks: the planner's validation (which reuses what the metadata pass learnt) must give the
// same answer, and the same message, as dedup + global plan + ValidateGlobalPlan.
TEST(SavePlannerTest, GlobalPlanValidationAgreesWithValidateGlobalPlan) {
  std::mt19937_64 rng(11);
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  int failures = 0;
  for (int round = 0; round < 300; ++round) {
    const int ranks = static_cast<int>(pick(1, 6));
    const int64_t rows = ranks * 4, cols = 6;
    std::vector<SavePlan> plans(ranks);
    for (int r = 0; r < ranks; ++r) {
      // Row shards, sometimes cut along columns too; a few are perturbed.
      const bool split_cols = round % 3 == 1;
      for (int part = 0; part < (split_cols ? 2 : 1); ++part) {
        ChunkBox c{{r * 4, split_cols ? part * 3 : 0}, {4, split_cols ? 3 : cols}};
        switch (pick(0, 14)) {
          case 0:
            c.sizes[0] += 1;  // overlaps the next rank's rows (or leaves the tensor)
            break;
          case 1:
            c.sizes[0] -= 1;  // a gap
            break;
          case 2:
            c.offsets[1] = cols;  // outside
            break;
          default:
            break;
        }
        WriteItem w;
        w.index = {"w", c.offsets, std::nullopt};
        w.type = WriteItemType::kShard;
        w.tensor_data = TensorWriteData{c, {DType::kFloat32}, {rows, cols}};
        plans[r].items.push_back(w);
      }
      WriteItem b;  // replicated
      b.index = {"b", Shape{0}, std::nullopt};
      b.tensor_data = TensorWriteData{{{0}, {cols}}, {DType::kFloat32}, {cols}};
      plans[r].items.push_back(b);
    }
    if (pick(0, 1)) std::shuffle(plans.begin(), plans.end(), rng);  // chunks out of row order
    const bool full = pick(0, 1);
    Status reference = [&] {
      auto deduped = DedupSavePlans(plans, false);
      auto global = CreateDefaultGlobalSavePlan(deduped);
      if (!global.ok()) return global.status();
      return ValidateGlobalPlan(global->second, full);
    }();
    SavePlannerOptions options;
    options.require_full_coverage = full;
    DefaultSavePlanner planner(options);
    auto got = planner.CreateGlobalPlan(plans);
    EXPECT_EQ(got.status().ToString(), reference.ToString()) << "round " << round;
    failures += !reference.ok();
  }
  EXPECT_GT(failures, 30);  // the perturbations do produce invalid layouts
  EXPECT_LT(failures, 270);
}

// A larger structure with bytes, replicated and sharded items whose dedup moves items: the plan
// cache's answer (metadata rebuilt from the kept items) equals a fresh plan's.
TEST(SavePlannerTest, PlanCacheHitEqualsFreshPlanForMixedItems) {
  std::vector<SavePlan> plans;
  for (int r = 0; r < 64; ++r) {
    Value sd = ShardedRows(r, 64, 256, 5);
    sd.Set("opt", Value::Int(r % 2));  // bytes, replicated by key
    for (int i = 0; i < 5; ++i) {
      sd.Set("norm" + std::to_string(i), Value::FromTensor(IotaTensor(DType::kFloat64, {7})));
    }
    plans.push_back(PlanFor(sd));
  }
  DefaultSavePlanner fresh;
  DCPP_ASSERT_OK_AND_ASSIGN(auto expected, fresh.CreateGlobalPlan(plans));
  SavePlannerOptions options;
  options.enable_plan_caching = true;
  DefaultSavePlanner caching(options);
  DCPP_ASSERT_OK(caching.CreateGlobalPlan(plans).status());
  for (int again = 0; again < 2; ++again) {
    DCPP_ASSERT_OK_AND_ASSIGN(auto hit, caching.CreateGlobalPlan(plans));
    EXPECT_TRUE(caching.last_plan_cached());
    ASSERT_EQ(hit.first.size(), expected.first.size());
    for (size_t p = 0; p < expected.first.size(); ++p) {
      EXPECT_EQ(EncodeSavePlan(hit.first[p]), EncodeSavePlan(expected.first[p])) << p;
    }
    DCPP_ASSERT_OK_AND_ASSIGN(std::string a, EncodeMetadata(hit.second));
    DCPP_ASSERT_OK_AND_ASSIGN(std::string b, EncodeMetadata(expected.second));
    EXPECT_EQ(a, b);
  }
}

TEST(SavePlannerTest, PlanEncodingRoundTrips) {
  SavePlan p = PlanFor(Nested());
  p.storage_prefix = "__1_";
  DCPP_ASSERT_OK_AND_ASSIGN(SavePlan q, DecodeSavePlan(EncodeSavePlan(p)));
  EXPECT_EQ(EncodeSavePlan(q), EncodeSavePlan(p));
  EXPECT_EQ(q.items.size(), p.items.size());
  EXPECT_EQ(q.mappings, p.mappings);
  std::string bytes = EncodeSavePlan(p);
  for (size_t cut = 0; cut < bytes.size(); cut += 7) {
    EXPECT_FALSE(DecodeSavePlan(std::string_view(bytes).substr(0, cut)).ok());
  }
}

TEST(LoadPlannerTest, ReadItemsReshardRowsToColumns) {
  std::vector<ChunkBox> saved = {{{0, 0}, {3, 6}}, {{3, 0}, {3, 6}}};
  std::vector<ChunkBox> local = {{{0, 2}, {6, 2}}};
  auto items = CreateReadItemsForChunks("w", local, saved);
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[0].storage_offsets, (Shape{0, 2}));
  EXPECT_EQ(items[0].dest_offsets, (Shape{0, 0}));
  EXPECT_EQ(items[0].lengths, (Shape{3, 2}));
  EXPECT_EQ(items[1].storage_offsets, (Shape{0, 2}));
  EXPECT_EQ(items[1].dest_offsets, (Shape{3, 0}));
  EXPECT_EQ(items[1].storage_index.index, 1);
  // 0-d tensors: every pair overlaps.
  EXPECT_EQ(CreateReadItemsForChunks("s", {ChunkBox{}}, {ChunkBox{}}).size(), 1u);
}

TEST(LoadPlannerTest, UnevenPiecesCoverEveryElementOnce) {
  std::vector<ChunkBox> saved, local;
  for (int64_t r = 0; r < 13; r += 5) saved.push_back({{r, 0}, {std::min<int64_t>(5, 13 - r), 7}});
  for (int64_t c = 0; c < 7; c += 3) local.push_back({{0, c}, {13, std::min<int64_t>(3, 7 - c)}});
  int64_t covered = 0;
  for (const auto& r : CreateReadItemsForChunks("w", local, saved))
    covered += NumElements(r.lengths);
  EXPECT_EQ(covered, 13 * 7);
}

TEST(LoadPlannerTest, MissingKeysAndShapeMismatch) {
  Metadata md;
  md.state_dict_metadata["w"] =
      TensorStorageMetadata{{DType::kFloat32}, {2, 3}, {{{0, 0}, {2, 3}}}};
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {3, 2})));
  DefaultLoadPlanner p;
  DCPP_ASSERT_OK(p.SetUp(&sd, md, true));
  EXPECT_THAT(p.CreateLocalPlan(), StatusIs(StatusCode::kInvalidArgument, HasSubstr("[2, 3]")));

  Value sd2 = Value::MakeDict();
  sd2.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {2, 3})));
  sd2.Set("extra", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {1})));
  DefaultLoadPlanner strict;
  DCPP_ASSERT_OK(strict.SetUp(&sd2, md, true));
  EXPECT_THAT(strict.CreateLocalPlan(),
              StatusIs(StatusCode::kNotFound, HasSubstr("\"extra\" is not in the checkpoint")));
  DefaultLoadPlanner partial({.allow_partial_load = true});
  DCPP_ASSERT_OK(partial.SetUp(&sd2, md, true));
  DCPP_ASSERT_OK_AND_ASSIGN(LoadPlan plan, partial.CreateLocalPlan());
  EXPECT_EQ(plan.items.size(), 1u);
}

// Whole tensors saved as one chunk take a short path: their items must be what the general
// overlap rule gives, and an empty tensor still reads nothing.
TEST(LoadPlannerTest, WholeTensorItemsAreThoseOfTheGeneralRule) {
  const std::vector<Shape> shapes = {{}, {5}, {3, 4}, {2, 1, 6}, {0, 3}};
  Metadata md;
  Value sd = Value::MakeDict();
  for (size_t i = 0; i < shapes.size(); ++i) {
    const std::string key = "t" + std::to_string(i);
    md.state_dict_metadata[key] =
        TensorStorageMetadata{{DType::kFloat32}, shapes[i], {WholeBox(shapes[i])}};
    sd.Set(key, Value::FromTensor(Tensor::Zeros(DType::kFloat32, shapes[i])));
  }
  DefaultLoadPlanner p;
  DCPP_ASSERT_OK(p.SetUp(&sd, md, true));
  DCPP_ASSERT_OK_AND_ASSIGN(LoadPlan plan, p.CreateLocalPlan());
  std::vector<ReadItem> expected;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const ChunkBox whole = WholeBox(shapes[i]);
    for (auto& r : CreateReadItemsForChunks("t" + std::to_string(i), {whole}, {whole})) {
      expected.push_back(std::move(r));
    }
  }
  ASSERT_EQ(plan.items.size(), expected.size());
  ASSERT_EQ(plan.items.size(), 4u);  // none for the empty [0, 3]
  for (size_t i = 0; i < expected.size(); ++i) {
    const ReadItem& a = plan.items[i];
    const ReadItem& b = expected[i];
    EXPECT_EQ(a.type, b.type);
    EXPECT_EQ(a.dest_index, b.dest_index);
    EXPECT_EQ(a.dest_index.index, b.dest_index.index);
    EXPECT_EQ(a.storage_index, b.storage_index);
    EXPECT_EQ(a.storage_index.index, b.storage_index.index);
    EXPECT_EQ(a.dest_offsets, b.dest_offsets);
    EXPECT_EQ(a.storage_offsets, b.storage_offsets);
    EXPECT_EQ(a.lengths, b.lengths);
  }
  // A dtype that differs is still refused.
  Value other = Value::MakeDict();
  other.Set("t1", Value::FromTensor(Tensor::Zeros(DType::kInt32, {5})));
  DefaultLoadPlanner q({.allow_partial_load = true});
  DCPP_ASSERT_OK(q.SetUp(&other, md, true));
  EXPECT_THAT(q.CreateLocalPlan(), StatusIs(StatusCode::kInvalidArgument, HasSubstr("float32")));
}

TEST(LoadPlannerTest, EmptyStateDictLoadsEverythingAsStored) {
  Metadata md;
  md.state_dict_metadata["m.0.w"] =
      TensorStorageMetadata{{DType::kInt32}, {4}, {{{0}, {2}}, {{2}, {2}}}};
  md.state_dict_metadata["step"] = BytesStorageMetadata{};
  md.planner_data = std::map<std::string, ObjectPath>{
      {"m.0.w", {std::string("m"), int64_t{0}, std::string("w")}}, {"step", {std::string("step")}}};
  Value sd = Value::MakeDict();
  DefaultLoadPlanner p;
  DCPP_ASSERT_OK(p.SetUp(&sd, md, true));
  DCPP_ASSERT_OK_AND_ASSIGN(LoadPlan plan, p.CreateLocalPlan());
  EXPECT_EQ(plan.items.size(), 3u);
  EXPECT_EQ(sd.DebugString(), "{'m': [{'w': tensor(int32[4])}], 'step': None}");
  for (const auto& item : plan.items) {
    if (item.type == LoadItemType::kByteIO) {
      DCPP_ASSERT_OK(p.LoadBytes(item, Value::Int(9)));
    }
  }
  EXPECT_EQ(sd.Find("step")->as_int(), 9);
}

}  // namespace
}  // namespace dcpp

namespace dcpp {
namespace {

// Stored chunks of "w" (a float32 [8, 4] tensor), and a destination of the whole tensor.
Status PlanWholeLoad(std::vector<ChunkBox> chunks, bool allow_partial = false) {
  Metadata md;
  TensorStorageMetadata t;
  t.size = {8, 4};
  t.chunks = std::move(chunks);
  md.state_dict_metadata["w"] = t;
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {8, 4})));
  DefaultLoadPlanner planner({.allow_partial_load = allow_partial});
  DCPP_RETURN_IF_ERROR(planner.SetUp(&sd, md, true));
  return planner.CreateLocalPlan().status();
}

TEST(LoadCoverageTest, GapsAndOverlapsAreErrorsUnlessAPartialLoadWasAsked) {
  using ::dcpp::testing::StatusIs;
  using ::testing::HasSubstr;
  EXPECT_TRUE(PlanWholeLoad({{{0, 0}, {4, 4}}, {{4, 0}, {4, 4}}}).ok());
  // Rows 4..5 are missing.
  EXPECT_THAT(PlanWholeLoad({{{0, 0}, {4, 4}}, {{6, 0}, {2, 4}}}),
              StatusIs(StatusCode::kDataLoss, HasSubstr("cover 24 of the 32 elements")));
  EXPECT_TRUE(PlanWholeLoad({{{0, 0}, {4, 4}}, {{6, 0}, {2, 4}}}, /*allow_partial=*/true).ok());
  // Half the tensor only.
  EXPECT_THAT(PlanWholeLoad({{{0, 0}, {8, 2}}}),
              StatusIs(StatusCode::kDataLoss, HasSubstr("16 of the 32")));
  // Rows 3..4 stored twice (and rows 7 missing, so the counts alone would agree).
  EXPECT_THAT(PlanWholeLoad({{{0, 0}, {5, 4}}, {{3, 0}, {4, 4}}}),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("overlap")));
}

}  // namespace
}  // namespace dcpp
