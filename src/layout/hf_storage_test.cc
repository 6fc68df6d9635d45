#include "dcpp/hf_storage.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <mutex>
#include <nlohmann/json.hpp>

#include "codec/safetensors.h"
#include "dcpp/checkpoint.h"
#include "dcpp/chunk.h"
#include "dcpp/comm.h"
#include "dcpp/storage.h"
#include "testing/memory_store.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::IsOk;
using ::dcpp::testing::PatternTensor;
using ::dcpp::testing::StatusIs;
using ::testing::HasSubstr;

// The truth: whole tensors of several dtypes and ranks.
std::map<std::string, Tensor> Truth() {
  return {{"model.w", PatternTensor(DType::kFloat32, {12, 10}, 1)},
          {"model.b", PatternTensor(DType::kBFloat16, {10}, 2)},
          {"ids", PatternTensor(DType::kInt64, {9, 4}, 3)},
          {"grid", PatternTensor(DType::kFloat16, {8, 6}, 4)},
          {"flag", PatternTensor(DType::kBool, {5}, 5)},
          {"scalar", PatternTensor(DType::kFloat64, {}, 6)},
          {"empty", PatternTensor(DType::kFloat32, {0, 3}, 7)}};
}

Value WholeStateDict() {
  Value sd = Value::MakeDict();
  for (auto& [k, t] : Truth()) sd.Set(k, Value::FromTensor(t));
  return sd;
}

// Rank r's part of tensor t along dim `dim` of `world` (or a 2x2 grid when dim < 0).
Shard Piece(const Tensor& t, int dim, int rank, int world, bool fill = true) {
  Shape off(t.dim(), 0), size = t.shape();
  if (t.dim() == 0) {
    // A 0-d tensor is replicated.
  } else if (dim < 0 && t.dim() == 2) {
    const int r0 = rank / 2, r1 = rank % 2;
    off = {t.shape()[0] * r0 / 2, t.shape()[1] * r1 / 2};
    size = {t.shape()[0] * (r0 + 1) / 2 - off[0], t.shape()[1] * (r1 + 1) / 2 - off[1]};
  } else {
    const int d = dim < 0 ? 0 : std::min(dim, t.dim() - 1);
    off[d] = t.shape()[d] * rank / world;
    size[d] = t.shape()[d] * (rank + 1) / world - off[d];
  }
  Tensor piece = Tensor::Zeros(t.dtype(), size);
  if (fill && NumElements(size) > 0) {
    EXPECT_THAT(CopyRegion(piece.view(), Shape(t.dim(), 0), t.view(), off, size), IsOk());
  }
  return {off, piece};
}

Value ShardedStateDict(int rank, int world, bool fill) {
  Value sd = Value::MakeDict();
  for (auto& [k, t] : Truth()) {
    const int dim = k == "grid" && world == 4 ? -1 : (k == "model.w" ? 1 : 0);
    sd.Set(k, Value::FromSharded({t.dtype(), t.shape(), {Piece(t, dim, rank, world, fill)}}));
  }
  return sd;
}

void ExpectWholeEqualsTruth(const Value& sd) {
  for (auto& [k, t] : Truth()) {
    const Value* v = sd.Find(k);
    ASSERT_NE(v, nullptr) << k;
    ASSERT_TRUE(v->is_tensor()) << k;
    EXPECT_TRUE(v->tensor().BitwiseEqual(t)) << k;
  }
}

void ExpectShardedEqualsTruth(const Value& sd) {
  for (auto& [k, t] : Truth()) {
    const Value* v = sd.Find(k);
    ASSERT_NE(v, nullptr) << k;
    for (const auto& s : v->sharded().shards) {
      Tensor want = Tensor::Zeros(t.dtype(), s.tensor.shape());
      if (want.numel() > 0) {
        ASSERT_THAT(
            CopyRegion(want.view(), Shape(t.dim(), 0), t.view(), s.offsets, s.tensor.shape()),
            IsOk());
      }
      EXPECT_TRUE(want.BitwiseEqual(s.tensor)) << k << " " << s.box().ToString();
    }
  }
}

// Loads `store` on 4 thread ranks with a sharding unlike any saved one (columns / rows of 3).
void LoadReshardedOnThreads(Store& store, int world) {
  std::mutex mu;
  RunOnThreads(world, [&](Communicator& comm) {
    Value sd = Value::MakeDict();
    for (auto& [k, t] : Truth()) {
      const int dim = k == "model.w" ? 0 : (t.dim() >= 2 ? 1 : 0);
      sd.Set(k, Value::FromSharded(
                    {t.dtype(), t.shape(), {Piece(t, dim, comm.rank(), world, false)}}));
    }
    HuggingFaceStorageReader reader(&store, "mem", {.thread_count = 2});
    LoadOptions lo;
    lo.comm = &comm;
    Status s = Load(sd, reader, lo);
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_THAT(s, IsOk());
    ExpectShardedEqualsTruth(sd);
  });
}

TEST(HuggingFaceStorageTest, WholeTensorSaveWritesPyTorchLayoutAndLoads) {
  MemoryStore store;
  HuggingFaceWriterOptions options;
  options.fqn_to_index_mapping = {{"model.w", 1}, {"model.b", 2}, {"ids", 2}};
  options.thread_count = 2;
  HuggingFaceStorageWriter writer(&store, "mem", options);
  ASSERT_THAT(Save(WholeStateDict(), writer).status(), IsOk());
  auto keys = store.List();
  ASSERT_THAT(keys.status(), IsOk());
  EXPECT_THAT(*keys, ::testing::ElementsAre("model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors",
                                            "model.safetensors.index.json"));
  auto index = nlohmann::json::parse(*store.ReadAll("model.safetensors.index.json"));
  EXPECT_EQ(index["weight_map"]["ids"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(index["weight_map"]["grid"], "model-00001-of-00002.safetensors");
  int64_t total = 0;
  for (auto& [k, t] : Truth()) total += static_cast<int64_t>(t.nbytes());
  EXPECT_EQ(index["metadata"]["total_size"], total);
  // The header carries PyTorch's __metadata__.
  auto file = store.OpenRead("model-00002-of-00002.safetensors");
  ASSERT_THAT(file.status(), IsOk());
  auto header = safetensors::ReadHeader(**file);
  ASSERT_THAT(header.status(), IsOk());
  EXPECT_EQ(*header->FindMetadata("DCP_VERSION"), "1.0");
  EXPECT_EQ(*header->FindMetadata("format"), "pt");
  EXPECT_EQ(*header->FindMetadata("DCP_SHARDING_INFO"),
            "{\"ids\": {\"saved_offsets\": [0, 0]}, \"model.b\": {\"saved_offsets\": [0]}}");

  Value all = Value::MakeDict();
  HuggingFaceStorageReader reader(&store, "mem", {});
  ASSERT_THAT(Load(all, reader), IsOk());
  ExpectWholeEqualsTruth(all);
  LoadReshardedOnThreads(store, 3);
}

TEST(HuggingFaceStorageTest, DistributedSaveConsolidatesToTheTruth) {
  for (bool consolidate : {false, true}) {
    MemoryStore store;
    RunOnThreads(4, [&](Communicator& comm) {
      HuggingFaceWriterOptions options;
      options.save_distributed = true;
      options.enable_consolidation = consolidate;
      options.thread_count_consolidation = 3;
      options.fqn_to_index_mapping = {{"ids", 2}, {"flag", 2}};
      HuggingFaceStorageWriter writer(&store, "mem", options);
      SaveOptions so;
      so.comm = &comm;
      EXPECT_THAT(Save(ShardedStateDict(comm.rank(), 4, true), writer, so).status(), IsOk());
    });
    auto keys = store.List();
    ASSERT_THAT(keys.status(), IsOk());
    const std::string dir = consolidate ? "sharded/" : "";
    EXPECT_THAT(*keys, ::testing::Contains(dir + "shard-00004-model-00002-of-00002.safetensors"));
    if (consolidate) {
      EXPECT_THAT(*keys, ::testing::Contains("model-00001-of-00002.safetensors"));
      EXPECT_THAT(*keys, ::testing::Contains("model.safetensors.index.json"));
      // The consolidated files hold whole tensors (no sharding info needed).
      auto file = store.OpenRead("model-00002-of-00002.safetensors");
      auto header = safetensors::ReadHeader(**file);
      ASSERT_THAT(header.status(), IsOk());
      EXPECT_EQ(header->Find("ids")->shape, Shape({9, 4}));
    } else {
      EXPECT_THAT(*keys, ::testing::Not(::testing::Contains("model.safetensors.index.json")));
    }
    Value all = Value::MakeDict();
    HuggingFaceStorageReader reader(&store, "mem", {});
    ASSERT_THAT(Load(all, reader), IsOk());
    ExpectWholeEqualsTruth(all);
    LoadReshardedOnThreads(store, 4);
  }
}

TEST(HuggingFaceStorageTest, ConsolidationWithTinyWindowsIsExact) {
  MemoryStore shards, out;
  RunOnThreads(4, [&](Communicator& comm) {
    HuggingFaceWriterOptions options;
    options.save_distributed = true;
    HuggingFaceStorageWriter writer(&shards, "mem", options);
    SaveOptions so;
    so.comm = &comm;
    EXPECT_THAT(Save(ShardedStateDict(comm.rank(), 4, true), writer, so).status(), IsOk());
  });
  for (uint64_t window : {1, 24, 100, 1 << 20}) {
    ConsolidateOptions c;
    c.thread_count = 3;
    c.window_bytes = window;
    auto report = ConsolidateSafetensors(shards, out, c);
    ASSERT_THAT(report.status(), IsOk());
    EXPECT_EQ(report->tensors, 7);
    EXPECT_EQ(report->files, 1);
    EXPECT_LE(report->buffer_bound_bytes, 6 * std::max<uint64_t>(window, 64) + 3 * (8 << 20));
    Value all = Value::MakeDict();
    HuggingFaceStorageReader reader(&out, "out", {});
    ASSERT_THAT(Load(all, reader), IsOk());
    ExpectWholeEqualsTruth(all);
  }
}

TEST(HuggingFaceStorageTest, RefusesWhatSafetensorsCannotHold) {
  MemoryStore store;
  Value sd = WholeStateDict();
  sd.Set("step", Value::Int(3));
  HuggingFaceStorageWriter writer(&store, "mem", {});
  EXPECT_THAT(Save(sd, writer).status(),
              StatusIs(StatusCode::kInvalidArgument, HasSubstr("\"step\" is not a tensor")));
  // Chunks of a sharded tensor need a distributed save.
  std::mutex mu;
  RunOnThreads(2, [&](Communicator& comm) {
    HuggingFaceStorageWriter w(&store, "mem", {});
    SaveOptions so;
    so.comm = &comm;
    Status s = Save(ShardedStateDict(comm.rank(), 2, true), w, so).status();
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_FALSE(s.ok());
    EXPECT_THAT(std::string(s.message()), HasSubstr("save_distributed"));
  });
  // Consolidation needs DCP's sharding info.
  MemoryStore plain, out;
  HuggingFaceStorageWriter pw(&plain, "plain", {});
  ASSERT_THAT(Save(WholeStateDict(), pw).status(), IsOk());
  ASSERT_THAT(plain.Remove("model-00001-of-00001.safetensors"), IsOk());
  EXPECT_THAT(ConsolidateSafetensors(plain, out).status(),
              StatusIs(StatusCode::kNotFound, ::testing::_));
}

TEST(HuggingFaceStorageTest, ReaderRefusesChunksThatDoNotTile) {
  MemoryStore store;
  RunOnThreads(2, [&](Communicator& comm) {
    HuggingFaceWriterOptions options;
    options.save_distributed = true;
    HuggingFaceStorageWriter writer(&store, "mem", options);
    SaveOptions so;
    so.comm = &comm;
    EXPECT_THAT(Save(ShardedStateDict(comm.rank(), 2, true), writer, so).status(), IsOk());
  });
  // Without the first rank's chunks the rest cannot tile anything. (A missing last shard is
  // not detectable: safetensors records no global shape, in PyTorch's layout either.)
  ASSERT_THAT(store.Remove("shard-00001-model-00001-of-00001.safetensors"), IsOk());
  HuggingFaceStorageReader reader(&store, "mem", {});
  EXPECT_THAT(reader.ReadMetadata().status(), StatusIs(StatusCode::kDataLoss, HasSubstr("cover")));
}

}  // namespace
}  // namespace dcpp
