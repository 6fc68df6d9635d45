// Save/load throughput against the raw limits of the same machine.
//
//   bench/run.sh BUILD_DIR [MB]  runs each benchmark in its own process and prints a table;
//   dcpp_bench [--benchmark_filter=...]   (env DCPP_BENCH_DIR, DCPP_BENCH_MB; default /tmp, 512)
//
// Every benchmark moves the same bytes and reports bytes_per_second and the process's peak RSS:
//   Raw/Write    one file per writer thread, 8 MiB writes, fsync: what the disk takes;
//   Raw/Read     pread of those files (page cache warm, as right after a save);
//   Raw/Memcpy   copying the bytes once in memory;
//   Save/ranks/threads  dcpp::Save of a row-sharded state dict by N thread ranks with T writer
//                       threads each, fsync included;
//   Load/ranks/threads  dcpp::Load of it by N thread ranks into column shards (resharding), T
//                       reader threads each.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"

namespace {

using namespace dcpp;

std::string Dir() {
  const char* d = std::getenv("DCPP_BENCH_DIR");
  return std::string(d ? d : "/tmp") + "/dcpp_bench";
}
int64_t TotalBytes() {
  const char* m = std::getenv("DCPP_BENCH_MB");
  return (m ? std::atoll(m) : 512) << 20;
}

// Peak RSS of the process (VmHWM). bench/run.sh runs each benchmark in its own process so the
// figure belongs to that benchmark alone.
void PeakRss(benchmark::State& state) {
  double kib = 0;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f)) {
      if (std::sscanf(line, "VmHWM: %lf kB", &kib) == 1) break;
    }
    std::fclose(f);
  }
  state.counters["peak_rss_MiB"] = kib / 1024.0;
  state.counters["state_MiB"] = static_cast<double>(TotalBytes() >> 20);
}

constexpr int64_t kCols = 4096;
constexpr int kTensors = 8;

Value Sharded(int rank, int world, bool rows, bool fill) {
  const int64_t total_rows = TotalBytes() / kTensors / kCols / 4;
  Value sd = Value::MakeDict();
  for (int t = 0; t < kTensors; ++t) {
    ShardedTensor st{DType::kFloat32, {total_rows, kCols}, {}};
    ChunkBox b;
    if (rows) {
      int64_t lo = total_rows * rank / world, hi = total_rows * (rank + 1) / world;
      b = {{lo, 0}, {hi - lo, kCols}};
    } else {
      int64_t lo = kCols * rank / world, hi = kCols * (rank + 1) / world;
      b = {{0, lo}, {total_rows, hi - lo}};
    }
    Tensor x = Tensor::Zeros(DType::kFloat32, b.sizes);
    if (fill) std::memset(x.data(), 0x3f, x.nbytes());
    st.shards.push_back({b.offsets, x});
    sd.Set("t" + std::to_string(t), Value::FromSharded(std::move(st)));
  }
  return sd;
}

// Writes TotalBytes() over `threads` files with fsync, one thread per file.
void WriteRawFiles(int threads) {
  std::filesystem::create_directories(Dir());
  const int64_t per = TotalBytes() / threads;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<char> buf(8 << 20, 0x3f);
      int fd =
          ::open((Dir() + "/raw" + std::to_string(t)).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      for (int64_t done = 0; done < per; done += static_cast<int64_t>(buf.size())) {
        if (::write(fd, buf.data(), buf.size()) < 0) std::abort();
      }
      ::fsync(fd);
      ::close(fd);
    });
  }
  for (auto& th : pool) th.join();
}

void BM_RawWrite(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) WriteRawFiles(threads);
  state.SetBytesProcessed(state.iterations() * TotalBytes());
  PeakRss(state);
}

void BM_RawRead(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const int64_t per = TotalBytes() / threads;
  WriteRawFiles(threads);
  for (auto _ : state) {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        std::vector<char> buf(8 << 20);
        int fd = ::open((Dir() + "/raw" + std::to_string(t)).c_str(), O_RDONLY);
        for (int64_t done = 0; done < per; done += static_cast<int64_t>(buf.size())) {
          if (::pread(fd, buf.data(), buf.size(), done) < 0) std::abort();
        }
        ::close(fd);
      });
    }
    for (auto& th : pool) th.join();
  }
  state.SetBytesProcessed(state.iterations() * TotalBytes());
  PeakRss(state);
}

void BM_RawMemcpy(benchmark::State& state) {
  std::vector<char> a(TotalBytes(), 1), b(TotalBytes());
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), a.size());
    benchmark::DoNotOptimize(b.data());
  }
  state.SetBytesProcessed(state.iterations() * TotalBytes());
  PeakRss(state);
}

void BM_Save(benchmark::State& state) {
  const int world = static_cast<int>(state.range(0));
  std::vector<Value> sds;
  for (int r = 0; r < world; ++r) sds.push_back(Sharded(r, world, true, true));
  for (auto _ : state) {
    RunOnThreads(world, [&](Communicator& comm) {
      SaveOptions so;
      so.comm = &comm;
      so.writer.overwrite = true;
      so.writer.thread_count = static_cast<int>(state.range(1));
      if (!Save(sds[comm.rank()], Dir() + "/ck", so).ok()) std::abort();
    });
  }
  state.SetBytesProcessed(state.iterations() * TotalBytes());
  PeakRss(state);
}

void BM_Load(benchmark::State& state) {
  const int world = static_cast<int>(state.range(0));
  std::vector<Value> sds;
  for (int r = 0; r < world; ++r) sds.push_back(Sharded(r, world, false, false));
  for (auto _ : state) {
    RunOnThreads(world, [&](Communicator& comm) {
      LoadOptions lo;
      lo.comm = &comm;
      lo.reader.thread_count = static_cast<int>(state.range(1));
      if (!Load(sds[comm.rank()], Dir() + "/ck", lo).ok()) std::abort();
    });
  }
  state.SetBytesProcessed(state.iterations() * TotalBytes());
  PeakRss(state);
}

// Save and load first: peak RSS is a process-wide maximum, and the memcpy baseline holds two
// full copies.
BENCHMARK(BM_Save)
    ->Name("Save/ranks/threads")
    ->Args({1, 1})
    ->Args({1, 4})
    ->Args({4, 1})
    ->Args({4, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);
BENCHMARK(BM_Load)
    ->Name("Load/ranks/threads")
    ->Args({1, 1})
    ->Args({1, 4})
    ->Args({4, 1})
    ->Args({4, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);
BENCHMARK(BM_RawWrite)
    ->Name("Raw/Write/threads")
    ->Arg(1)
    ->Arg(4)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);
BENCHMARK(BM_RawRead)
    ->Name("Raw/Read/threads")
    ->Arg(1)
    ->Arg(4)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);
BENCHMARK(BM_RawMemcpy)
    ->Name("Raw/Memcpy")
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
