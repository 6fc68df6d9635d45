// kill -9 of one rank in the middle of a save, checked across separate runs (driven by
// kill_mid_save.cmake):
//
//   mpiexec -np 4 dcpp_mpi_kill_test save  --dir=D --seed=S   a good checkpoint of seed S
//   mpiexec -np 4 dcpp_mpi_kill_test kill  --dir=D --seed=S --kill-rank=K --after-bytes=N
//        the same save of seed S, in which rank K sends itself SIGKILL once it has written N
//        bytes of its data files (mid-file); the job dies with it
//   dcpp_mpi_kill_test check --dir=D --seed=S   (one process) the checkpoint loads as seed S bit
//        for bit, `.metadata` is byte-identical to what the last good save committed, and the
//        killed save left files behind
//   dcpp_mpi_kill_test clean --dir=D --seed=S   after the next good save: seed S loads and no
//        leftover remains (every data file is referenced, no temporaries)
//
// Each process prints "rank R: <outcome>" and exits 0 on success.
#include <mpi.h>
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "dcpp/checkpoint.h"
#include "dcpp/layout.h"
#include "dcpp/mpi_comm.h"
#include "dcpp/storage.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

constexpr int kWorld = 4;
constexpr int64_t kRows = 1024, kCols = 256;  // 1 MiB per rank

Value RankState(int rank, uint64_t seed) {
  Value sd = Value::MakeDict();
  Tensor piece = testing::PatternTensor(DType::kFloat32, {kRows, kCols}, seed * 100 + rank);
  sd.Set("w", Value::FromSharded(
                  {DType::kFloat32, {kWorld * kRows, kCols}, {{{rank * kRows, 0}, piece}}}));
  sd.Set("b" + std::to_string(rank),
         Value::FromTensor(testing::PatternTensor(DType::kInt64, {333}, seed * 100 + 50 + rank)));
  sd.Set("step", Value::Int(static_cast<int64_t>(seed)));
  return sd;
}

// OK if `dir` loads (in this one process) as seed `seed`, every byte as saved.
Status CheckLoads(const std::string& dir, uint64_t seed) {
  Value sd = Value::MakeDict();
  ShardedTensor w{DType::kFloat32, {kWorld * kRows, kCols}, {}};
  for (int r = 0; r < kWorld; ++r) {
    w.shards.push_back({{r * kRows, 0}, Tensor::Zeros(DType::kFloat32, {kRows, kCols})});
    sd.Set("b" + std::to_string(r), Value::FromTensor(Tensor::Zeros(DType::kInt64, {333})));
  }
  sd.Set("w", Value::FromSharded(std::move(w)));
  sd.Set("step", Value::Int(0));
  DCPP_RETURN_IF_ERROR(Load(sd, dir));
  if (sd.Find("step")->as_int() != static_cast<int64_t>(seed)) {
    return DataLossError("step is " + std::to_string(sd.Find("step")->as_int()));
  }
  const auto& shards = sd.Find("w")->sharded().shards;
  for (int r = 0; r < kWorld; ++r) {
    if (!shards[r].tensor.BitwiseEqual(
            testing::PatternTensor(DType::kFloat32, {kRows, kCols}, seed * 100 + r)) ||
        !sd.Find("b" + std::to_string(r))
             ->tensor()
             .BitwiseEqual(testing::PatternTensor(DType::kInt64, {333}, seed * 100 + 50 + r))) {
      return DataLossError("rank " + std::to_string(r) + "'s data differs from seed " +
                           std::to_string(seed));
    }
  }
  return Status::Ok();
}

// A local store whose data files kill this process once `limit` bytes have been appended.
class KillingStore final : public Store {
 public:
  KillingStore(std::unique_ptr<Store> base, int64_t limit) : base_(std::move(base)), left_(limit) {}

  Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) override {
    DCPP_ASSIGN_OR_RETURN(auto f, base_->OpenWrite(key));
    if (key.find(".distcp") == std::string_view::npos) return f;
    return std::unique_ptr<WritableFile>(new File(std::move(f), &left_));
  }
  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override {
    return base_->OpenRead(key);
  }
  Result<bool> Exists(std::string_view key) override { return base_->Exists(key); }
  Result<uint64_t> Size(std::string_view key) override { return base_->Size(key); }
  Result<std::vector<std::string>> List() override { return base_->List(); }
  Result<std::vector<std::string>> ListDirectory(std::string_view dir) override {
    return base_->ListDirectory(dir);
  }
  Status Remove(std::string_view key) override { return base_->Remove(key); }
  Status Rename(std::string_view from, std::string_view to) override {
    return base_->Rename(from, to);
  }
  Status SyncDir(std::string_view dir) override { return base_->SyncDir(dir); }
  Status CreateDir() override { return base_->CreateDir(); }
  Result<std::unique_ptr<StoreLock>> TryLock(std::string_view key, LockMode mode) override {
    return base_->TryLock(key, mode);
  }
  bool CanLock() const override { return base_->CanLock(); }
  std::string Describe(std::string_view key) const override { return base_->Describe(key); }

 private:
  class File final : public WritableFile {
   public:
    File(std::unique_ptr<WritableFile> base, std::atomic<int64_t>* left)
        : base_(std::move(base)), left_(left) {}
    Status Append(const void* data, size_t n) override {
      const int64_t before = left_->fetch_sub(static_cast<int64_t>(n));
      if (before <= static_cast<int64_t>(n)) {
        // Write part of it first, so the file is cut in the middle of an item.
        (void)base_->Append(data, static_cast<size_t>(std::max<int64_t>(before, 0)) / 2);
        (void)base_->Close();
        std::printf("rank-killing itself after its write limit\n");
        std::fflush(stdout);
        ::raise(SIGKILL);
      }
      return base_->Append(data, n);
    }
    Status Sync() override { return base_->Sync(); }
    Status Close() override { return base_->Close(); }
    uint64_t position() const override { return base_->position(); }
    std::string name() const override { return base_->name(); }

   private:
    std::unique_ptr<WritableFile> base_;
    std::atomic<int64_t>* left_;
  };

  std::unique_ptr<Store> base_;
  std::atomic<int64_t> left_;
};

std::string Arg(int argc, char** argv, const char* name, const char* fallback = "") {
  const size_t n = std::strlen(name);
  for (int i = 2; i < argc; ++i) {
    if (std::strncmp(argv[i], name, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
  }
  return fallback;
}

int Report(int rank, const Status& s) {
  std::printf("rank %d: %s\n", rank, s.ok() ? "OK" : s.ToString().c_str());
  std::fflush(stdout);
  return s.ok() ? 0 : 3;
}

std::string CommittedCopy(const std::string& dir) { return dir + ".committed_metadata"; }

int RunMpi(const std::string& phase, const std::string& dir, uint64_t seed, int kill_rank,
           int64_t after_bytes) {
  auto comm = MpiCommunicator::Create(MPI_COMM_WORLD);
  if (!comm.ok()) return Report(-1, comm.status());
  const int rank = (*comm)->rank();
  if ((*comm)->size() != kWorld) return Report(rank, InvalidArgumentError("run with -np 4"));
  SaveOptions options;
  options.comm = comm->get();
  options.writer.thread_count = 2;
  Status s;
  if (phase == "save") {
    s = Save(RankState(rank, seed), dir, options).status();
    if (s.ok() && rank == 0) {
      // What a later run must still find committed after a killed save.
      auto bytes = testing::ReadFileBytes(dir + "/.metadata");
      s = bytes.ok() ? testing::WriteFileBytes(CommittedCopy(dir), *bytes) : bytes.status();
    }
  } else {
    auto base = OpenLocalStore(dir, /*create=*/true);
    if (!base.ok()) return Report(rank, base.status());
    KillingStore store(std::move(*base), rank == kill_rank ? after_bytes : INT64_MAX);
    FileSystemWriter writer(&store, dir, options.writer);
    s = Save(RankState(rank, seed), writer, options).status();
    // Reaching here means the job survived the kill: that is the failure.
    if (s.ok()) s = InternalError("the save with a killed rank reported success");
  }
  return Report(rank, s);
}

Status Check(const std::string& dir, uint64_t seed, bool expect_leftovers) {
  DCPP_RETURN_IF_ERROR(CheckLoads(dir, seed).WithContext("loading \"" + dir + "\""));
  DCPP_ASSIGN_OR_RETURN(std::string now, testing::ReadFileBytes(dir + "/.metadata"));
  DCPP_ASSIGN_OR_RETURN(std::string committed, testing::ReadFileBytes(CommittedCopy(dir)));
  if (now != committed) return DataLossError(".metadata is not the last good save's");
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> left, CollectGarbage(dir, /*dry_run=*/true));
  std::printf("%zu leftover files:", left.size());
  for (const auto& f : left) std::printf(" %s", f.c_str());
  std::printf("\n");
  if (expect_leftovers && left.empty()) {
    return FailedPreconditionError("the killed save left no files: it was not killed mid-write");
  }
  if (!expect_leftovers && !left.empty()) {
    return FailedPreconditionError("the next good save did not remove the leftovers");
  }
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp") != std::string::npos && !expect_leftovers) {
      return FailedPreconditionError("temporary left: " + name);
    }
  }
  return Status::Ok();
}

}  // namespace
}  // namespace dcpp

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s save|kill|check|clean --dir=D --seed=S ...\n", argv[0]);
    return 2;
  }
  const std::string phase = argv[1];
  const std::string dir = dcpp::Arg(argc, argv, "--dir");
  const uint64_t seed = std::stoull(dcpp::Arg(argc, argv, "--seed", "1"));
  if (phase == "check" || phase == "clean") {
    return dcpp::Report(0, dcpp::Check(dir, seed, phase == "check"));
  }
  auto session = dcpp::MpiSession::Init(&argc, &argv);
  if (!session.ok()) return dcpp::Report(-1, session.status());
  const int rc =
      dcpp::RunMpi(phase, dir, seed, std::atoi(dcpp::Arg(argc, argv, "--kill-rank", "-1").c_str()),
                   std::atoll(dcpp::Arg(argc, argv, "--after-bytes", "300000").c_str()));
  session->reset();
  return rc;
}
