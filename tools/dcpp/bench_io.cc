// `dcpp bench --case io`: dcpp's save or load of one kind of state dict, in this process.
//   large    8 float32 tensors of [rows, 4096] (whole tensors), `bytes` in all;
//   small    float32 vectors of 4..64 KiB, cycling, `bytes` in all (20 000 for 496 MB);
//   reshard  8 row-sharded [rows, 4096] tensors saved by 4 thread ranks, loaded by 3 thread
//            ranks whose row blocks cut across the saved ones.
// save: `saves` saves into fresh directories; the first is reported apart from the later ones.
// load: loads the last save's checkpoint into pre-allocated tensors, its files first read into
// the page cache (untimed) or, --cold, dropped from it; reports the bytes this process read
// (rchar) against the bytes the state needs.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "dcpp/checkpoint.h"
#include "dcpp/comm.h"
#include "tools/dcpp/bench.h"

namespace dcpp::cli {
namespace {

constexpr int64_t kCols = 4096;

std::vector<Shape> Shapes(const std::string& kind, int64_t total) {
  std::vector<Shape> out;
  if (kind == "small") {
    // 4, 8, 16, 32, 64 KiB, cycling (24.8 KiB on average: 20 000 tensors in 496 MB).
    int64_t used = 0;
    for (int i = 0;; ++i) {
      const int64_t n = int64_t{1024} << (i % 5);
      if (used + 4 * n > total && i >= 5) break;
      out.push_back({n});
      used += 4 * n;
    }
    return out;
  }
  const int64_t rows = total / 8 / kCols / 4;
  return std::vector<Shape>(8, Shape{rows, kCols});
}

Tensor Make(const Shape& s, int i, bool fill) {
  Tensor t = Tensor::Zeros(DType::kFloat32, s);
  if (fill) {
    float* p = reinterpret_cast<float*>(t.data());
    const float v = 0.5f + static_cast<float>(i);
    std::fill(p, p + t.numel(), v);
  } else {
    std::memset(t.data(), 0, t.nbytes());  // touched, as a training job's buffers are
  }
  return t;
}

Value WholeState(const std::vector<Shape>& shapes, bool fill) {
  // Keys are distinct, so they are appended directly (Value::Set looks for each one first).
  Value::Dict d;
  d.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    d.emplace_back(Value::Str("t" + std::to_string(i)),
                   Value::FromTensor(Make(shapes[i], static_cast<int>(i), fill)));
  }
  return Value::MakeDict(std::move(d));
}

// Rank `r` of `world`: its row block of every tensor.
Value RowShards(const std::vector<Shape>& shapes, int r, int world, bool fill) {
  Value sd = Value::MakeDict();
  for (size_t i = 0; i < shapes.size(); ++i) {
    const int64_t rows = shapes[i][0];
    const int64_t lo = rows * r / world, hi = rows * (r + 1) / world;
    ShardedTensor st{DType::kFloat32, shapes[i], {}};
    st.shards.push_back({{lo, 0}, Make({hi - lo, kCols}, static_cast<int>(i), fill)});
    sd.Set("t" + std::to_string(i), Value::FromSharded(std::move(st)));
  }
  return sd;
}

// Drops a checkpoint's clean pages from the page cache (the save fsynced them), as a new job on
// another machine would find it.
void DropFromPageCache(const std::string& dir) {
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Reads a checkpoint's files through the page cache, so a warm load finds them there as it
// finds a buffered writer's files (PyTorch's): dcpp's saves write past the page cache. The
// buffer is small: the load's peak RSS (VmHWM) must not count it.
void ReadIntoPageCache(const std::string& dir) {
  std::vector<char> buf(64 << 10);
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const int fd = ::open(e.path().c_str(), O_RDONLY);
    if (fd < 0) continue;
    while (::read(fd, buf.data(), buf.size()) > 0) {
    }
    ::close(fd);
  }
}

int64_t ReadChars() {
  std::ifstream in("/proc/self/io");
  std::string key;
  int64_t v = 0;
  while (in >> key >> v) {
    if (key == "rchar:") return v;
  }
  return 0;
}

std::string CheckpointDir(const IoCaseArgs& a, int n) {
  return a.dir + "/dcpp_" + a.kind + "_t" + std::to_string(a.threads) + "_" + std::to_string(n);
}

Status SaveOnce(const IoCaseArgs& a, const Value& sd, const std::vector<Value>& shards,
                const std::string& path) {
  if (a.kind != "reshard") {
    SaveOptions o;
    o.writer.thread_count = a.threads;
    o.writer.write_parallelism = a.write_parallelism;
    return Save(sd, path, o).status();
  }
  std::vector<Status> st(4);
  RunOnThreads(4, [&](Communicator& comm) {
    SaveOptions o;
    o.comm = &comm;
    o.writer.thread_count = a.threads;
    o.writer.write_parallelism = a.write_parallelism;
    st[comm.rank()] = Save(shards[comm.rank()], path, o).status();
  });
  for (const auto& s : st) DCPP_RETURN_IF_ERROR(s);
  return Status::Ok();
}

}  // namespace

int RunIoCase(const IoCaseArgs& a) {
  const std::vector<Shape> shapes = Shapes(a.kind, a.bytes);
  int64_t state_bytes = 0;
  for (const auto& s : shapes) state_bytes += NumElements(s) * 4;
  nlohmann::json f;
  f["kind"] = a.kind;
  f["op"] = a.op;
  f["threads"] = a.threads;
  f["tensors"] = shapes.size();
  f["state_bytes"] = state_bytes;
  if (a.op == "save") {
    Value sd;
    std::vector<Value> shards;
    if (a.kind == "reshard") {
      for (int r = 0; r < 4; ++r) shards.push_back(RowShards(shapes, r, 4, true));
    } else {
      sd = WholeState(shapes, true);
    }
    f["state_rss_bytes"] = CurrentRssBytes();
    std::vector<double> secs, cpu;
    for (int n = 0; n < a.saves; ++n) {
      const std::string path = CheckpointDir(a, n);
      std::filesystem::remove_all(path);
      const double t0 = NowSeconds(), c0 = CpuSeconds();
      Status s = SaveOnce(a, sd, shards, path);
      secs.push_back(NowSeconds() - t0);
      cpu.push_back(CpuSeconds() - c0);
      if (!s.ok()) {
        std::cerr << "dcpp bench: " << s.ToString() << "\n";
        return 2;
      }
    }
    // Only the last checkpoint is kept (the load case reads it). Removing the others waits
    // until every save is timed: on a disk mounted with `discard`, freeing 1 GiB slows the
    // writes that follow.
    for (int n = 0; n + 1 < a.saves; ++n) std::filesystem::remove_all(CheckpointDir(a, n));
    if (a.saves > 1) {
      std::filesystem::rename(CheckpointDir(a, a.saves - 1), CheckpointDir(a, 0));
    }
    f["first_gbps"] = static_cast<double>(state_bytes) / secs[0] / 1e9;
    // CPU seconds beside the wall clock: on a shared or virtual machine the wall clock moves with
    // the host, the CPU the save itself spent much less.
    f["first_cpu_s"] = cpu[0];
    f["first_wall_s"] = secs[0];
    if (secs.size() > 1) {
      std::vector<double> later(secs.begin() + 1, secs.end());
      std::sort(later.begin(), later.end());
      f["later_gbps"] = static_cast<double>(state_bytes) / later[later.size() / 2] / 1e9;
    }
  } else {
    const std::string path = CheckpointDir(a, 0);
    Value sd;
    std::vector<Value> shards;
    if (a.kind == "reshard") {
      for (int r = 0; r < 3; ++r) shards.push_back(RowShards(shapes, r, 3, false));
    } else {
      sd = WholeState(shapes, false);
    }
    f["state_rss_bytes"] = CurrentRssBytes();
    if (a.cold) {
      DropFromPageCache(path);
    } else {
      ReadIntoPageCache(path);  // untimed
    }
    f["cold"] = a.cold;
    const int64_t rchar0 = ReadChars();
    const double t0 = NowSeconds(), c0 = CpuSeconds();
    Status s;
    if (a.kind == "reshard") {
      std::vector<Status> st(3);
      RunOnThreads(3, [&](Communicator& comm) {
        LoadOptions o;
        o.comm = &comm;
        o.reader.thread_count = a.threads;
        st[comm.rank()] = Load(shards[comm.rank()], path, o);
      });
      for (const auto& x : st) {
        if (s.ok() && !x.ok()) s = x;
      }
    } else {
      LoadOptions o;
      o.reader.thread_count = a.threads;
      s = Load(sd, path, o);
    }
    const double dt = NowSeconds() - t0;
    f["cpu_s"] = CpuSeconds() - c0;
    f["wall_s"] = dt;
    if (!s.ok()) {
      std::cerr << "dcpp bench: " << s.ToString() << "\n";
      return 2;
    }
    // Spot check: tensor 1 holds 1.5 (its last element, in the last rank's shard).
    const Value* t1 = (a.kind == "reshard" ? shards[2] : sd).Find("t1");
    const Tensor& t = t1->is_tensor() ? t1->tensor() : t1->sharded().shards[0].tensor;
    if (reinterpret_cast<const float*>(t.data())[t.numel() - 1] != 1.5f) {
      std::cerr << "dcpp bench: loaded values are wrong\n";
      return 2;
    }
    f["gbps"] = static_cast<double>(state_bytes) / dt / 1e9;
    f["bytes_read"] = ReadChars() - rchar0;
  }
  f["peak_rss_bytes"] = PeakRssBytes();
  std::cout << nlohmann::json{{"case", "io"}, {"figures", f}}.dump() << std::endl;
  return 0;
}

}  // namespace dcpp::cli
