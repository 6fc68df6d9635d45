// dcpp_train: resumable data-parallel training over MPI, checkpointed with dcpp.
//
//   mpirun -np W dcpp_train --dir DIR [--steps N] [--every K] [--keep C] [--sleep-ms M]
//                           [--log FILE] [--seed S] [--hidden H] [--async off|thread|process]
//
// A two-layer MLP (tanh hidden layer, float32) learns a fixed synthetic teacher, y = sin(T x),
// from a dataset generated from --seed. Parameters and their Adam moments are sharded ZeRO-style:
// rank r of W owns rows [R*r/W, R*(r+1)/W) of every parameter (R = its first dimension).
// Training step s (1-based), on every rank:
//   1. all-gather the parameter shards, so every rank holds the whole model;
//   2. draw the global batch of step s from the replicated RNG (the same indices whatever the
//      world size); rank r takes its contiguous slice [B*r/W, B*(r+1)/W) of it;
//   3. forward and backward per sample, in sample order, summing the gradient in double;
//   4. all-gather the partial gradient sums and losses; each rank adds them up in rank order for
//      the rows it owns (rank 0 does the same for the loss and prints it);
//   5. Adam updates the owned rows of parameters and moments;
//   6. every K steps the state is saved collectively to DIR/step_<s>; after a successful save,
//      rank 0 deletes committed checkpoints beyond the newest C, and incomplete ones older than
//      the newest. With --async the save is dcpp::AsyncSave: training continues as soon as the
//      state is staged, the save commits in the background on a communicator of its own (MPI is
//      then initialized at MPI_THREAD_MULTIPLE), and the next save first waits for it.
// On start, the newest committed checkpoint (DIR/step_<n>/.metadata exists) is loaded under this
// run's sharding, which may differ from the saver's, and training continues at step n+1.
//
// Determinism: the data and the batch depend on (seed, step) only, and every sum runs in a fixed
// order, so a run resumed with the same world size prints the same bits as an uninterrupted one.
// Another world size regroups the double-precision sums, which moves the losses by rounding only.
#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dcpp/async_save.h"
#include "dcpp/checkpoint.h"
#include "dcpp/mpi_comm.h"

namespace {

using dcpp::Communicator;
using dcpp::DType;
using dcpp::Result;
using dcpp::Shape;
using dcpp::Status;
using dcpp::Tensor;
using dcpp::Value;
namespace fs = std::filesystem;

constexpr int64_t kInputs = 16;
constexpr int64_t kOutputs = 4;
constexpr int64_t kDatasetSize = 4096;
constexpr int64_t kGlobalBatch = 32;
constexpr double kLearningRate = 1e-2;
constexpr double kBeta1 = 0.9;
constexpr double kBeta2 = 0.999;
constexpr double kEps = 1e-8;

struct Flags {
  std::string dir;
  int64_t steps = 100;
  int64_t every = 10;
  int64_t keep = 2;
  int64_t sleep_ms = 0;
  std::string log;
  int64_t seed = 1;
  int64_t hidden = 48;
  std::string async = "off";  // off | thread | process: dcpp::AsyncSave with that executor
};

constexpr char kUsage[] =
    "usage: dcpp_train --dir DIR [--steps N] [--every K] [--keep C] [--sleep-ms M] [--log FILE]\n"
    "                  [--seed S] [--hidden H] [--async off|thread|process]\n";

Result<Flags> ParseFlags(int argc, char** argv) {
  Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string name = argv[i];
    if (i + 1 >= argc) return dcpp::InvalidArgumentError("flag " + name + " needs a value");
    std::string value = argv[++i];
    auto number = [&](int64_t& out, int64_t min) -> Status {
      char* end = nullptr;
      errno = 0;
      long long v = std::strtoll(value.c_str(), &end, 10);
      if (errno != 0 || end == value.c_str() || *end != '\0' || v < min) {
        return dcpp::InvalidArgumentError("flag " + name + ": \"" + value +
                                          "\" is not an integer >= " + std::to_string(min));
      }
      out = v;
      return Status::Ok();
    };
    if (name == "--dir") {
      f.dir = value;
    } else if (name == "--log") {
      f.log = value;
    } else if (name == "--steps") {
      DCPP_RETURN_IF_ERROR(number(f.steps, 0));
    } else if (name == "--every") {
      DCPP_RETURN_IF_ERROR(number(f.every, 1));
    } else if (name == "--keep") {
      DCPP_RETURN_IF_ERROR(number(f.keep, 1));
    } else if (name == "--sleep-ms") {
      DCPP_RETURN_IF_ERROR(number(f.sleep_ms, 0));
    } else if (name == "--seed") {
      DCPP_RETURN_IF_ERROR(number(f.seed, 0));
    } else if (name == "--hidden") {
      DCPP_RETURN_IF_ERROR(number(f.hidden, 1));
    } else if (name == "--async") {
      if (value != "off" && value != "thread" && value != "process") {
        return dcpp::InvalidArgumentError("flag --async: \"" + value +
                                          "\" is not off, thread or process");
      }
      f.async = value;
    } else {
      return dcpp::InvalidArgumentError("unknown flag " + name);
    }
  }
  if (f.dir.empty()) return dcpp::InvalidArgumentError("--dir is required");
  return f;
}

// ---------------------------------------------------------------- deterministic numbers

uint64_t Mix(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// A uniform number in [-1, 1) that depends only on its arguments.
double Uniform(uint64_t seed, uint64_t stream, uint64_t i, uint64_t j = 0) {
  uint64_t h = Mix(Mix(Mix(seed * 0x9e3779b97f4a7c15ULL + stream) + i) + j);
  return static_cast<double>(h >> 11) * 0x1.0p-52 - 1.0;
}

// The replicated generator that draws batches: splitmix64, whose whole state is one integer.
struct Rng {
  uint64_t state;
  uint64_t Next() {
    state += 0x9e3779b97f4a7c15ULL;
    return Mix(state);
  }
};

// Independent streams of Uniform().
enum Stream : uint64_t { kStreamInit = 1, kStreamInputs = 2, kStreamTeacher = 3 };

// Sample i of the dataset: x in [-1, 1)^D, y = sin(T x) with a fixed random T.
void Sample(uint64_t seed, int64_t i, double* x, double* y) {
  for (int64_t d = 0; d < kInputs; ++d) x[d] = Uniform(seed, kStreamInputs, i, d);
  for (int64_t o = 0; o < kOutputs; ++o) {
    double z = 0;
    for (int64_t d = 0; d < kInputs; ++d) z += Uniform(seed, kStreamTeacher, o, d) * x[d];
    y[o] = std::sin(z);
  }
}

// ---------------------------------------------------------------- the sharded model

std::pair<int64_t, int64_t> Slice(int64_t n, int rank, int world) {
  return {n * rank / world, n * (rank + 1) / world};
}

struct Param {
  Param(std::string n, Shape s, int64_t f) : name(std::move(n)), shape(std::move(s)), fan_in(f) {}

  std::string name;
  Shape shape;                        // [rows] or [rows, cols]
  int64_t fan_in;                     // inputs per output unit, for the initialization bound
  std::vector<float> full;            // the whole parameter, refreshed by the all-gather of step 1
  int64_t lo = 0, hi = 0;             // owned rows
  Tensor value, exp_avg, exp_avg_sq;  // owned rows; shape [hi-lo(, cols)]

  int64_t cols() const { return shape.size() == 2 ? shape[1] : 1; }
  Shape ShardShape() const {
    Shape s = shape;
    s[0] = hi - lo;
    return s;
  }
  size_t shard_elements() const { return static_cast<size_t>((hi - lo) * cols()); }

  dcpp::ShardedTensor Sharded(const Tensor& t) const {
    dcpp::ShardedTensor st{DType::kFloat32, shape, {}};
    if (hi > lo) {
      Shape offsets(shape.size(), 0);
      offsets[0] = lo;
      st.shards.push_back({offsets, t});
    }
    return st;
  }
};

class Trainer {
 public:
  Trainer(const Flags& flags, Communicator& comm) : flags_(flags), comm_(comm) {
    const int64_t h = flags.hidden;
    params_.emplace_back("fc1.weight", Shape{h, kInputs}, kInputs);
    params_.emplace_back("fc1.bias", Shape{h}, kInputs);
    params_.emplace_back("fc2.weight", Shape{kOutputs, h}, h);
    params_.emplace_back("fc2.bias", Shape{kOutputs}, h);
    for (size_t p = 0; p < params_.size(); ++p) {
      Param& q = params_[p];
      std::tie(q.lo, q.hi) = Slice(q.shape[0], comm.rank(), comm.size());
      q.full.resize(static_cast<size_t>(dcpp::NumElements(q.shape)));
      q.value = Tensor::Zeros(DType::kFloat32, q.ShardShape());
      q.exp_avg = Tensor::Zeros(DType::kFloat32, q.ShardShape());
      q.exp_avg_sq = Tensor::Zeros(DType::kFloat32, q.ShardShape());
      // Initialized by global index, so every world size starts from the same model.
      const double bound = 1.0 / std::sqrt(static_cast<double>(q.fan_in));
      float* v = q.value.data_as<float>();
      const int64_t first = q.lo * q.cols();
      for (size_t e = 0; e < q.shard_elements(); ++e) {
        v[e] = static_cast<float>(bound * Uniform(flags.seed, kStreamInit, p, first + e));
      }
    }
    rng_.state = Mix(static_cast<uint64_t>(flags.seed) ^ 0x5eed);
  }

  int64_t step() const { return step_; }

  // The state dict over this rank's tensors (shared, so Load fills them in place).
  Value StateDict() const {
    Value model = Value::MakeDict();
    Value state = Value::MakeDict();
    for (const Param& q : params_) {
      model.Set(q.name, Value::FromSharded(q.Sharded(q.value)));
      Value moments = Value::MakeDict();
      moments.Set("exp_avg", Value::FromSharded(q.Sharded(q.exp_avg)));
      moments.Set("exp_avg_sq", Value::FromSharded(q.Sharded(q.exp_avg_sq)));
      state.Set(q.name, std::move(moments));
    }
    Value optim = Value::MakeDict();
    optim.Set("state", std::move(state));
    optim.Set("step", Value::Int(step_));
    Value rng = Value::MakeDict();
    rng.Set("state", Value::Int(std::bit_cast<int64_t>(rng_.state)));
    Value data = Value::MakeDict();
    data.Set("seed", Value::Int(flags_.seed));
    data.Set("dataset_size", Value::Int(kDatasetSize));
    data.Set("global_batch", Value::Int(kGlobalBatch));
    Value sd = Value::MakeDict();
    sd.Set("model", std::move(model));
    sd.Set("optim", std::move(optim));
    sd.Set("step", Value::Int(step_));
    sd.Set("rng", std::move(rng));
    sd.Set("data", std::move(data));
    return sd;
  }

  // Loads checkpoint `path` into this rank's shards and restores the counters.
  Status Restore(const std::string& path) {
    Value sd = StateDict();
    dcpp::LoadOptions options;
    options.comm = &comm_;
    DCPP_RETURN_IF_ERROR(dcpp::Load(sd, path, options));
    auto get = [&](std::initializer_list<const char*> keys) -> Result<int64_t> {
      const Value* v = &sd;
      std::string name;
      for (const char* k : keys) {
        name += (name.empty() ? "" : ".") + std::string(k);
        v = v->is_dict() ? v->Find(k) : nullptr;
        if (!v) return dcpp::NotFoundError(path + ": no \"" + name + "\"");
      }
      if (!v->is_int())
        return dcpp::InvalidArgumentError(path + ": \"" + name + "\" is not an int");
      return v->as_int();
    };
    DCPP_ASSIGN_OR_RETURN(int64_t seed, get({"data", "seed"}));
    DCPP_ASSIGN_OR_RETURN(int64_t n, get({"data", "dataset_size"}));
    DCPP_ASSIGN_OR_RETURN(int64_t b, get({"data", "global_batch"}));
    if (seed != flags_.seed || n != kDatasetSize || b != kGlobalBatch) {
      return dcpp::FailedPreconditionError(
          path + ": made with seed " + std::to_string(seed) + ", dataset " + std::to_string(n) +
          ", batch " + std::to_string(b) + "; this run has seed " + std::to_string(flags_.seed) +
          ", dataset " + std::to_string(kDatasetSize) + ", batch " + std::to_string(kGlobalBatch));
    }
    DCPP_ASSIGN_OR_RETURN(step_, get({"step"}));
    DCPP_ASSIGN_OR_RETURN(int64_t optim_step, get({"optim", "step"}));
    if (optim_step != step_) {
      return dcpp::DataLossError(path + ": optimizer step " + std::to_string(optim_step) +
                                 " differs from step " + std::to_string(step_));
    }
    DCPP_ASSIGN_OR_RETURN(int64_t rng_state, get({"rng", "state"}));
    rng_.state = std::bit_cast<uint64_t>(rng_state);
    return Status::Ok();
  }

  // One training step; returns the global mean loss (before the update).
  Result<double> Step() {
    DCPP_RETURN_IF_ERROR(GatherParams());

    // 2. The global batch of this step, then this rank's slice of it.
    std::vector<int64_t> batch(kGlobalBatch);
    for (auto& i : batch) i = static_cast<int64_t>(rng_.Next() % kDatasetSize);
    auto [first, last] = Slice(kGlobalBatch, comm_.rank(), comm_.size());

    // 3. Forward and backward, sample by sample, into one double buffer: every parameter's
    // gradient sum in param order, then the loss sum.
    size_t total = 0;
    std::vector<size_t> at;
    for (const Param& q : params_) {
      at.push_back(total);
      total += q.full.size();
    }
    std::vector<double> sums(total + 1, 0.0);
    const int64_t h = flags_.hidden;
    const float* w1 = params_[0].full.data();
    const float* b1 = params_[1].full.data();
    const float* w2 = params_[2].full.data();
    const float* b2 = params_[3].full.data();
    double* gw1 = &sums[at[0]];
    double* gb1 = &sums[at[1]];
    double* gw2 = &sums[at[2]];
    double* gb2 = &sums[at[3]];
    std::vector<double> hid(h), dhid(h);
    double x[kInputs], y[kOutputs], dy[kOutputs];
    for (int64_t s = first; s < last; ++s) {
      Sample(flags_.seed, batch[s], x, y);
      for (int64_t j = 0; j < h; ++j) {
        double z = b1[j];
        for (int64_t d = 0; d < kInputs; ++d) z += double{w1[j * kInputs + d]} * x[d];
        hid[j] = std::tanh(z);
      }
      for (int64_t o = 0; o < kOutputs; ++o) {
        double out = b2[o];
        for (int64_t j = 0; j < h; ++j) out += double{w2[o * h + j]} * hid[j];
        const double diff = out - y[o];
        sums[total] += diff * diff;
        dy[o] = 2.0 * diff;
      }
      for (int64_t j = 0; j < h; ++j) {
        double g = 0;
        for (int64_t o = 0; o < kOutputs; ++o) {
          gw2[o * h + j] += dy[o] * hid[j];
          g += double{w2[o * h + j]} * dy[o];
        }
        dhid[j] = g * (1.0 - hid[j] * hid[j]);
      }
      for (int64_t o = 0; o < kOutputs; ++o) gb2[o] += dy[o];
      for (int64_t j = 0; j < h; ++j) {
        for (int64_t d = 0; d < kInputs; ++d) gw1[j * kInputs + d] += dhid[j] * x[d];
        gb1[j] += dhid[j];
      }
    }

    // 4. Reduce in rank order: every rank sees every partial sum, and adds up its own rows.
    std::string mine(reinterpret_cast<const char*>(sums.data()), sums.size() * sizeof(double));
    DCPP_ASSIGN_OR_RETURN(std::vector<std::string> all, comm_.AllGather(mine));
    for (size_t r = 0; r < all.size(); ++r) {
      if (all[r].size() != mine.size()) {
        return dcpp::InternalError("gradient of rank " + std::to_string(r) + " has " +
                                   std::to_string(all[r].size()) + " bytes, expected " +
                                   std::to_string(mine.size()));
      }
    }
    auto partial = [&](size_t r, size_t index) {
      double v;
      std::memcpy(&v, all[r].data() + index * sizeof(double), sizeof(double));
      return v;
    };
    const double scale = 1.0 / static_cast<double>(kGlobalBatch * kOutputs);
    double loss = 0;
    for (size_t r = 0; r < all.size(); ++r) loss += partial(r, total);
    loss *= scale;

    // 5. Adam (PyTorch's formulation) on the owned rows.
    ++step_;
    const double bias1 = 1.0 - std::pow(kBeta1, static_cast<double>(step_));
    const double bias2 = 1.0 - std::pow(kBeta2, static_cast<double>(step_));
    const float step_size = static_cast<float>(kLearningRate / bias1);
    const float bias2_sqrt = static_cast<float>(std::sqrt(bias2));
    const float b1f = static_cast<float>(kBeta1), b2f = static_cast<float>(kBeta2);
    for (size_t p = 0; p < params_.size(); ++p) {
      Param& q = params_[p];
      float* v = q.value.data_as<float>();
      float* m = q.exp_avg.data_as<float>();
      float* s = q.exp_avg_sq.data_as<float>();
      const size_t first_element = at[p] + static_cast<size_t>(q.lo * q.cols());
      for (size_t e = 0; e < q.shard_elements(); ++e) {
        double g_sum = 0;
        for (size_t r = 0; r < all.size(); ++r) g_sum += partial(r, first_element + e);
        const float g = static_cast<float>(g_sum * scale);
        m[e] = b1f * m[e] + (1.0f - b1f) * g;
        s[e] = b2f * s[e] + (1.0f - b2f) * g * g;
        const float denom = std::sqrt(s[e]) / bias2_sqrt + static_cast<float>(kEps);
        v[e] -= step_size * m[e] / denom;
      }
    }
    return loss;
  }

 private:
  // 1. Every rank's owned rows of every parameter, assembled into Param::full.
  Status GatherParams() {
    std::string mine;
    for (const Param& q : params_) {
      mine.append(reinterpret_cast<const char*>(q.value.data()), q.value.nbytes());
    }
    DCPP_ASSIGN_OR_RETURN(std::vector<std::string> all, comm_.AllGather(mine));
    for (int r = 0; r < comm_.size(); ++r) {
      size_t offset = 0;
      for (Param& q : params_) {
        auto [lo, hi] = Slice(q.shape[0], r, comm_.size());
        const size_t n = static_cast<size_t>((hi - lo) * q.cols()) * sizeof(float);
        if (all[r].size() < offset + n) {
          return dcpp::InternalError("parameters of rank " + std::to_string(r) + " are short");
        }
        std::memcpy(q.full.data() + lo * q.cols(), all[r].data() + offset, n);
        offset += n;
      }
    }
    return Status::Ok();
  }

  const Flags& flags_;
  Communicator& comm_;
  std::vector<Param> params_;
  Rng rng_{};
  int64_t step_ = 0;
};

// ---------------------------------------------------------------- checkpoint directory

struct Found {
  std::vector<int64_t> committed;   // sorted ascending
  std::vector<int64_t> incomplete;  // step_<n> without .metadata
};

Found ScanCheckpoints(const std::string& dir) {
  Found found;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e1;
    if (!it->is_directory(e1)) continue;
    const std::string name = it->path().filename().string();
    if (name.rfind("step_", 0) != 0 || name.size() == 5 || name.size() > 23) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      continue;
    }
    const int64_t n = std::stoll(name.substr(5));
    std::error_code e2;
    (fs::exists(it->path() / ".metadata", e2) ? found.committed : found.incomplete).push_back(n);
  }
  std::sort(found.committed.begin(), found.committed.end());
  std::sort(found.incomplete.begin(), found.incomplete.end());
  return found;
}

std::string StepDir(const std::string& dir, int64_t step) {
  return (fs::path(dir) / ("step_" + std::to_string(step))).string();
}

// Removes a checkpoint so that no crash leaves it looking committed: `.metadata` goes first.
void RemoveCheckpoint(const std::string& path) {
  std::error_code ec;
  fs::remove(fs::path(path) / ".metadata", ec);
  fs::remove_all(path, ec);
  if (ec)
    std::fprintf(stderr, "dcpp_train: cannot remove %s: %s\n", path.c_str(), ec.message().c_str());
}

void Prune(const std::string& dir, int64_t keep) {
  Found found = ScanCheckpoints(dir);
  if (found.committed.empty()) return;
  const int64_t newest = found.committed.back();
  const size_t n = found.committed.size();
  for (size_t i = 0; i + static_cast<size_t>(keep) < n; ++i) {
    RemoveCheckpoint(StepDir(dir, found.committed[i]));
  }
  for (int64_t s : found.incomplete) {
    if (s < newest) RemoveCheckpoint(StepDir(dir, s));
  }
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int64_t StateBytes(const Flags& f) {
  const int64_t per_copy = f.hidden * kInputs + f.hidden + kOutputs * f.hidden + kOutputs;
  return 3 * per_copy * static_cast<int64_t>(sizeof(float));  // params and two moments
}

// An async save in flight: its committed future and what to report once it resolves.
struct Pending {
  dcpp::AsyncSaveHandle handle;
  std::string path;
  std::chrono::steady_clock::time_point start;
};

// Waits for the save in flight (the same outcome on every rank), then reports and prunes.
Status FinishPending(std::optional<Pending>& pending, const Flags& flags, bool lead) {
  if (!pending) return Status::Ok();
  Pending p = std::move(*pending);
  pending.reset();
  DCPP_RETURN_IF_ERROR(p.handle.committed.get().status());
  if (lead) {
    std::fprintf(stderr, "dcpp_train: committed %s (%.1f ms after the call)\n", p.path.c_str(),
                 Seconds(p.start) * 1e3);
    Prune(flags.dir, flags.keep);
  }
  return Status::Ok();
}

// `ckpt_comm` carries the checkpoints' collectives (the async saves' background thread issues
// them); `comm` the training's. With async saves they must differ (async_save.h).
Status Train(const Flags& flags, Communicator& comm, Communicator& ckpt_comm,
             bool wait_before_step) {
  const bool lead = comm.rank() == 0;
  std::error_code ec;
  // A directory that cannot be created fails the first Save, on every rank alike.
  if (lead) fs::create_directories(flags.dir, ec);

  // Rank 0 writes the log; if it cannot, every rank must stop, so the failure is broadcast.
  FILE* log = nullptr;
  std::string log_error;
  if (lead && !flags.log.empty()) {
    log = std::fopen(flags.log.c_str(), "a");
    if (!log) log_error = "cannot open log \"" + flags.log + "\": " + std::strerror(errno);
  }
  std::unique_ptr<FILE, int (*)(FILE*)> log_closer(log,
                                                   [](FILE* f) { return f ? std::fclose(f) : 0; });
  DCPP_RETURN_IF_ERROR(comm.Broadcast(log_error, 0));
  if (!log_error.empty()) return dcpp::InvalidArgumentError(log_error);

  // The newest committed checkpoint, as rank 0 sees it (one decision for every rank).
  std::string latest;
  if (lead) {
    Found found = ScanCheckpoints(flags.dir);
    if (!found.committed.empty()) latest = std::to_string(found.committed.back());
  }
  DCPP_RETURN_IF_ERROR(comm.Broadcast(latest, 0));

  Trainer trainer(flags, comm);
  if (!latest.empty()) {
    const std::string path = StepDir(flags.dir, std::stoll(latest));
    auto t0 = std::chrono::steady_clock::now();
    DCPP_RETURN_IF_ERROR(trainer.Restore(path));
    if (lead) {
      const double s = Seconds(t0);
      std::fprintf(stderr,
                   "dcpp_train: resumed from %s at step %lld with %d ranks (%.1f ms, %.3f GB/s)\n",
                   path.c_str(), static_cast<long long>(trainer.step()), comm.size(), s * 1e3,
                   static_cast<double>(StateBytes(flags)) / s / 1e9);
    }
  }

  std::optional<Pending> pending;
  while (trainer.step() < flags.steps) {
    DCPP_ASSIGN_OR_RETURN(double loss, trainer.Step());
    const int64_t step = trainer.step();
    if (lead) {
      char line[64];
      std::snprintf(line, sizeof line, "step %lld loss %.9g\n", static_cast<long long>(step), loss);
      std::fputs(line, stdout);
      std::fflush(stdout);
      if (log) {
        std::fputs(line, log);
        std::fflush(log);
      }
    }
    if (step % flags.every == 0 && flags.async != "off") {
      DCPP_RETURN_IF_ERROR(FinishPending(pending, flags, lead));
      dcpp::AsyncSaveOptions options;
      options.save.comm = &ckpt_comm;
      options.executor =
          flags.async == "process" ? dcpp::AsyncExecutor::kProcess : dcpp::AsyncExecutor::kThread;
      const std::string path = StepDir(flags.dir, step);
      auto t0 = std::chrono::steady_clock::now();
      pending = Pending{dcpp::AsyncSave(trainer.StateDict(), path, options), path, t0};
      DCPP_RETURN_IF_ERROR(pending->handle.staged.get());
      if (lead) {
        std::fprintf(stderr, "dcpp_train: staged %s (blocked %.1f ms)\n", path.c_str(),
                     pending->handle.stats.blocking_seconds * 1e3);
      }
      // Without MPI_THREAD_MULTIPLE the training's MPI calls must not overlap the save's.
      if (wait_before_step) DCPP_RETURN_IF_ERROR(FinishPending(pending, flags, lead));
    } else if (step % flags.every == 0) {
      const std::string path = StepDir(flags.dir, step);
      dcpp::SaveOptions options;
      options.comm = &comm;
      auto t0 = std::chrono::steady_clock::now();
      DCPP_RETURN_IF_ERROR(dcpp::Save(trainer.StateDict(), path, options).status());
      if (lead) {
        const double s = Seconds(t0);
        std::fprintf(stderr, "dcpp_train: saved %s (%.1f ms, %.3f GB/s)\n", path.c_str(), s * 1e3,
                     static_cast<double>(StateBytes(flags)) / s / 1e9);
        Prune(flags.dir, flags.keep);
      }
    }
    if (flags.sleep_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(flags.sleep_ms));
  }
  return FinishPending(pending, flags, lead);
}

}  // namespace

int main(int argc, char** argv) {
  // Async saves issue collectives from a background thread while training issues its own: ask
  // for MPI_THREAD_MULTIPLE before MpiSession, which then keeps MPI as it is.
  bool want_async = false;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--async" && std::string(argv[i + 1]) != "off") want_async = true;
  }
  int provided = MPI_THREAD_SINGLE;
  if (want_async) MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  auto session = dcpp::MpiSession::Init(&argc, &argv);
  if (!session.ok()) {
    std::fprintf(stderr, "dcpp_train: %s\n", session.status().ToString().c_str());
    return 1;
  }
  int rc = 0;
  {
    auto comm = dcpp::MpiCommunicator::Create();
    if (!comm.ok()) {
      std::fprintf(stderr, "dcpp_train: %s\n", comm.status().ToString().c_str());
      return 1;
    }
    auto flags = ParseFlags(argc, argv);
    if (!flags.ok()) {
      // Every rank sees the same argv, so every rank stops here; one message is enough.
      if ((*comm)->rank() == 0) {
        std::fprintf(stderr, "dcpp_train: %s\n%s", flags.status().ToString().c_str(), kUsage);
      }
      rc = 2;
    } else {
      // The checkpoints' own communicator (another duplicate of MPI_COMM_WORLD).
      auto ckpt_comm = dcpp::MpiCommunicator::Create();
      Status s = ckpt_comm.status();
      if (s.ok()) {
        s = Train(*flags, **comm, **ckpt_comm,
                  /*wait_before_step=*/provided < MPI_THREAD_MULTIPLE);
      }
      if (!s.ok()) {
        // Collective failures are identical on every rank; rank 0 reports them for the job.
        if ((*comm)->rank() == 0) std::fprintf(stderr, "dcpp_train: %s\n", s.ToString().c_str());
        rc = 1;
      }
    }
  }
  session->reset();
  if (want_async) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();  // initialized here, so finalized here
  }
  return rc;
}
