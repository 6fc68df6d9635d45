// dcpp Save/Load throughput against an S3 endpoint (run by bench/s3_rows.py, which starts the
// server and compares with PyTorch's fsspec path in the same run).
//
//   dcpp_s3_bench URL MB RANKS THREADS     endpoint and credentials from AWS_* variables
//
// Saves MB MiB of state (8 float32 tensors [rows, 4096], row-sharded over RANKS thread ranks,
// THREADS writer threads each) to URL, loads it back with the same sharding, and prints one JSON
// line: {"bytes": ..., "save_s": ..., "load_s": ..., "raw_put_s": ..., "raw_get_s": ...}, where
// the raw figures are the S3 store alone moving the same bytes as RANKS*THREADS objects in
// parallel (no checkpoint format): what the endpoint takes through this client.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "dcpp/storage.h"

namespace {

using namespace dcpp;

constexpr int64_t kCols = 4096;
constexpr int kTensors = 8;

Value State(int64_t rows, int rank, int world, bool fill) {
  Value sd = Value::MakeDict();
  const int64_t lo = rows * rank / world, hi = rows * (rank + 1) / world;
  for (int i = 0; i < kTensors; ++i) {
    Tensor t = Tensor::Zeros(DType::kFloat32, {hi - lo, kCols});
    if (fill) {
      float* p = t.data_as<float>();
      for (int64_t j = 0; j < t.numel(); ++j) p[j] = static_cast<float>((j + i) % 1000);
    }
    sd.Set("t" + std::to_string(i),
           Value::FromSharded({DType::kFloat32, {rows, kCols}, {{{lo, 0}, t}}}));
  }
  return sd;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int Fail(const Status& s) {
  std::fprintf(stderr, "dcpp_s3_bench: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: dcpp_s3_bench URL MB RANKS THREADS\n");
    return 2;
  }
  const std::string url = argv[1];
  const int64_t bytes = std::atoll(argv[2]) << 20;
  const int ranks = std::atoi(argv[3]);
  const int threads = std::atoi(argv[4]);
  const int64_t rows = bytes / (kTensors * kCols * 4);

  std::vector<Value> states;
  for (int r = 0; r < ranks; ++r) states.push_back(State(rows, r, ranks, true));
  std::vector<Status> st(ranks);
  auto t0 = std::chrono::steady_clock::now();
  RunOnThreads(ranks, [&](Communicator& comm) {
    SaveOptions so;
    so.comm = &comm;
    so.writer.thread_count = threads;
    st[comm.rank()] = Save(states[comm.rank()], url, so).status();
  });
  const double save_s = Seconds(t0);
  for (const Status& s : st) {
    if (!s.ok()) return Fail(s);
  }
  std::vector<Value> dst;
  for (int r = 0; r < ranks; ++r) dst.push_back(State(rows, r, ranks, false));
  t0 = std::chrono::steady_clock::now();
  RunOnThreads(ranks, [&](Communicator& comm) {
    LoadOptions lo;
    lo.comm = &comm;
    lo.reader.thread_count = threads;
    st[comm.rank()] = Load(dst[comm.rank()], url, lo);
  });
  const double load_s = Seconds(t0);
  for (const Status& s : st) {
    if (!s.ok()) return Fail(s);
  }
  for (int r = 0; r < ranks; ++r) {
    for (int i = 0; i < kTensors; ++i) {
      const std::string k = "t" + std::to_string(i);
      const Tensor& a = states[r].Find(k)->sharded().shards[0].tensor;
      const Tensor& b = dst[r].Find(k)->sharded().shards[0].tensor;
      if (!a.BitwiseEqual(b)) return Fail(DataLossError("loaded values differ"));
    }
  }

  // The store alone: the same bytes as ranks*threads objects, written and read in parallel.
  auto store = OpenStore(url + "_raw", {.create = true});
  if (!store.ok()) return Fail(store.status());
  const int n = ranks * threads;
  std::string blob(static_cast<size_t>(bytes / n), 'x');
  std::vector<Status> raw(n);
  auto parallel = [&](const std::function<Status(int)>& fn) {
    std::vector<std::thread> pool;
    for (int i = 0; i < n; ++i) pool.emplace_back([&, i] { raw[i] = fn(i); });
    for (auto& t : pool) t.join();
    for (const Status& s : raw) {
      if (!s.ok()) return s;
    }
    return Status::Ok();
  };
  t0 = std::chrono::steady_clock::now();
  Status s = parallel(
      [&](int i) { return (*store)->WriteAll("blob_" + std::to_string(i), blob, /*sync=*/false); });
  const double raw_put_s = Seconds(t0);
  if (!s.ok()) return Fail(s);
  t0 = std::chrono::steady_clock::now();
  s = parallel([&](int i) {
    std::string key = "blob_" + std::to_string(i);
    auto f = (*store)->OpenRead(key);
    if (!f.ok()) return f.status();
    std::string back((*f)->size(), '\0');
    return (*f)->ReadAt(0, back.data(), back.size());
  });
  const double raw_get_s = Seconds(t0);
  if (!s.ok()) return Fail(s);
  std::printf(
      "{\"bytes\": %lld, \"save_s\": %.4f, \"load_s\": %.4f, \"raw_put_s\": %.4f, "
      "\"raw_get_s\": %.4f}\n",
      static_cast<long long>(rows * kTensors * kCols * 4), save_s, load_s, raw_put_s, raw_get_s);
  return 0;
}
