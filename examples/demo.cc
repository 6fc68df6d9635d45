// The dcpp demo: a sharded state dict saved by 4 ranks and loaded by 3 ranks with another
// sharding, on the local filesystem. Ranks are threads here (the MPI demo is examples/train).
//
//   dcpp_demo DIR [--mb N]
//
// 1. Four ranks each hold row shards of the model's weights, replicated biases and a step
//    counter; they save one DCP checkpoint together (DIR/ckpt).
// 2. Three ranks load it column-sharded, and every loaded element is checked.
// 3. GB/s of both directions is printed.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"

using namespace dcpp;

namespace {

constexpr int kLayers = 8;

// Deterministic value of element (r, c) of layer l.
float ValueAt(int l, int64_t r, int64_t c) {
  return static_cast<float>((l * 131 + r * 7 + c) % 1000) * 0.5f;
}

ShardedTensor MakeShards(int l, int64_t rows, int64_t cols, const std::vector<ChunkBox>& boxes,
                         bool fill) {
  ShardedTensor st{DType::kFloat32, {rows, cols}, {}};
  for (const auto& b : boxes) {
    Tensor t = Tensor::Zeros(DType::kFloat32, b.sizes);
    if (fill) {
      float* p = t.data_as<float>();
      for (int64_t r = 0; r < b.sizes[0]; ++r) {
        for (int64_t c = 0; c < b.sizes[1]; ++c)
          p[r * b.sizes[1] + c] = ValueAt(l, b.offsets[0] + r, b.offsets[1] + c);
      }
    }
    st.shards.push_back({b.offsets, t});
  }
  return st;
}

std::vector<ChunkBox> Rows(int64_t rows, int64_t cols, int rank, int world) {
  int64_t lo = rows * rank / world, hi = rows * (rank + 1) / world;
  return {{{lo, 0}, {hi - lo, cols}}};
}

std::vector<ChunkBox> Cols(int64_t rows, int64_t cols, int rank, int world) {
  int64_t lo = cols * rank / world, hi = cols * (rank + 1) / world;
  return {{{0, lo}, {rows, hi - lo}}};
}

Value StateDictFor(int rank, int world, int64_t rows, int64_t cols, bool row_sharded, bool fill) {
  Value sd = Value::MakeDict();
  Value model = Value::MakeDict();
  for (int l = 0; l < kLayers; ++l) {
    auto boxes = row_sharded ? Rows(rows, cols, rank, world) : Cols(rows, cols, rank, world);
    Value layer = Value::MakeDict();
    layer.Set("weight", Value::FromSharded(MakeShards(l, rows, cols, boxes, fill)));
    Tensor bias = Tensor::Zeros(DType::kFloat32, {cols});
    if (fill) {
      for (int64_t c = 0; c < cols; ++c) bias.data_as<float>()[c] = static_cast<float>(l + c);
    }
    layer.Set("bias", Value::FromTensor(bias));  // replicated: written once
    model.Set("layer" + std::to_string(l), layer);
  }
  sd.Set("model", model);
  sd.Set("step", Value::Int(fill ? 1000 : 0));
  return sd;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s DIR [--mb N]\n", argv[0]);
    return 2;
  }
  const std::string dir = std::string(argv[1]) + "/ckpt";
  int64_t mb = 320;
  for (int i = 2; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--mb") == 0) mb = std::atoll(argv[i + 1]);
  }
  const int64_t cols = 2048;
  const int64_t rows = std::max<int64_t>(1, mb * (1 << 20) / kLayers / cols / 4);
  const double gb = static_cast<double>(kLayers * rows * cols * 4 + kLayers * cols * 4) / 1e9;
  std::filesystem::remove_all(dir);
  std::printf("state dict: %d layers of float32[%ld, %ld] + biases + step = %.3f GB\n", kLayers,
              static_cast<long>(rows), static_cast<long>(cols), gb);

  // Save with 4 ranks, row-sharded.
  std::mutex mu;
  Status first_error;
  auto record = [&](const Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    if (!s.ok() && first_error.ok()) first_error = s;
  };
  std::vector<Value> sds;
  for (int r = 0; r < 4; ++r) sds.push_back(StateDictFor(r, 4, rows, cols, true, true));
  auto t0 = std::chrono::steady_clock::now();
  RunOnThreads(4, [&](Communicator& comm) {
    SaveOptions so;
    so.comm = &comm;
    so.writer.thread_count = 2;
    record(Save(sds[comm.rank()], dir, so).status());
  });
  double save_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!first_error.ok()) {
    std::fprintf(stderr, "save failed: %s\n", first_error.ToString().c_str());
    return 1;
  }
  sds.clear();
  std::printf("saved by 4 ranks (row shards) to %s in %.3f s: %.2f GB/s\n", dir.c_str(), save_s,
              gb / save_s);

  // Load with 3 ranks, column-sharded.
  std::vector<Value> dst;
  for (int r = 0; r < 3; ++r) dst.push_back(StateDictFor(r, 3, rows, cols, false, false));
  t0 = std::chrono::steady_clock::now();
  RunOnThreads(3, [&](Communicator& comm) {
    LoadOptions lo;
    lo.comm = &comm;
    lo.reader.thread_count = 2;
    record(Load(dst[comm.rank()], dir, lo));
  });
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!first_error.ok()) {
    std::fprintf(stderr, "load failed: %s\n", first_error.ToString().c_str());
    return 1;
  }
  // Check every element.
  int64_t bad = 0;
  for (int r = 0; r < 3; ++r) {
    const Value& model = *dst[r].Find("model");
    for (int l = 0; l < kLayers; ++l) {
      const Value& layer = *model.Find("layer" + std::to_string(l));
      for (const Shard& s : layer.Find("weight")->sharded().shards) {
        const float* p = s.tensor.data_as<float>();
        for (int64_t i = 0; i < s.tensor.shape()[0]; ++i) {
          for (int64_t j = 0; j < s.tensor.shape()[1]; ++j) {
            bad += p[i * s.tensor.shape()[1] + j] != ValueAt(l, s.offsets[0] + i, s.offsets[1] + j);
          }
        }
      }
      const float* b = layer.Find("bias")->tensor().data_as<float>();
      for (int64_t c = 0; c < cols; ++c) bad += b[c] != static_cast<float>(l + c);
    }
    bad += dst[r].Find("step")->as_int() != 1000;
  }
  std::printf("loaded by 3 ranks (column shards) in %.3f s: %.2f GB/s; %s\n", load_s, gb / load_s,
              bad ? "MISMATCH" : "every element matches");
  return bad ? 1 : 0;
}
