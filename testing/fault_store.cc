// FaultStore: counts every operation on a wrapped Store and fails the chosen ones.
//
// Each call first asks Check(op, key), which counts it and decides whether an injected fault
// fires; only calls that pass reach the base store. Files opened through the FaultStore are
// wrapped too, so appends, syncs, closes and reads are counted and can fail. Reads never expose
// Peek, so every byte read goes through ReadAt and its fault check.
#include <string>

#include "testing/fault_store.h"

namespace dcpp {

std::string_view StoreOpName(StoreOp op) {
  switch (op) {
    case StoreOp::kOpenWrite:
      return "open for writing";
    case StoreOp::kOpenRead:
      return "open for reading";
    case StoreOp::kAppend:
      return "append";
    case StoreOp::kSync:
      return "sync";
    case StoreOp::kClose:
      return "close";
    case StoreOp::kRead:
      return "read";
    case StoreOp::kRename:
      return "rename";
    case StoreOp::kRemove:
      return "remove";
    case StoreOp::kSyncDir:
      return "sync directory";
    case StoreOp::kList:
      return "list";
    case StoreOp::kStat:
      return "stat";
    case StoreOp::kCreateDir:
      return "create directory";
    case StoreOp::kLock:
      return "lock";
  }
  return "unknown operation";
}

class FaultStore::Writer final : public WritableFile {
 public:
  Writer(FaultStore* store, std::string key, std::unique_ptr<WritableFile> base)
      : store_(store), key_(std::move(key)), base_(std::move(base)) {}

  Status Append(const void* data, size_t n) override {
    DCPP_RETURN_IF_ERROR(store_->Check(StoreOp::kAppend, key_));
    return base_->Append(data, n);
  }
  Status Sync() override {
    DCPP_RETURN_IF_ERROR(store_->Check(StoreOp::kSync, key_));
    return base_->Sync();
  }
  Status Close() override {
    DCPP_RETURN_IF_ERROR(store_->Check(StoreOp::kClose, key_));
    return base_->Close();
  }
  uint64_t position() const override { return base_->position(); }
  std::string name() const override { return base_->name(); }

 private:
  FaultStore* store_;
  std::string key_;
  std::unique_ptr<WritableFile> base_;
};

class FaultStore::Reader final : public ReadableFile {
 public:
  Reader(FaultStore* store, std::string key, std::unique_ptr<ReadableFile> base)
      : store_(store), key_(std::move(key)), base_(std::move(base)) {}

  uint64_t size() const override { return base_->size(); }
  std::string name() const override { return base_->name(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    DCPP_RETURN_IF_ERROR(store_->Check(StoreOp::kRead, key_));
    return base_->ReadAt(offset, dst, n);
  }

 private:
  FaultStore* store_;
  std::string key_;
  std::unique_ptr<ReadableFile> base_;
};

FaultStore::FaultStore(Store& base) : base_(base) {}
FaultStore::~FaultStore() = default;

void FaultStore::AddFault(Fault fault) {
  std::lock_guard<std::mutex> lock(mu_);
  faults_.push_back(PendingFault{std::move(fault), 0});
}

void FaultStore::ClearFaults() {
  std::lock_guard<std::mutex> lock(mu_);
  faults_.clear();
}

void FaultStore::SetActive(bool active, Status error) {
  std::lock_guard<std::mutex> lock(mu_);
  active_ = active;
  inactive_error_ = error.ok() ? UnavailableError("store is inactive") : std::move(error);
}

uint64_t FaultStore::count(StoreOp op) const {
  std::lock_guard<std::mutex> lock(mu_);
  return counts_[static_cast<int>(op)];
}

uint64_t FaultStore::failures(StoreOp op) const {
  std::lock_guard<std::mutex> lock(mu_);
  return failures_[static_cast<int>(op)];
}

void FaultStore::ResetCounts() {
  std::lock_guard<std::mutex> lock(mu_);
  counts_.fill(0);
  failures_.fill(0);
}

Status FaultStore::DropUnsyncedData() {
  auto* memory = dynamic_cast<MemoryStore*>(&base_);
  if (memory == nullptr) {
    return UnimplementedError("FaultStore::DropUnsyncedData needs a MemoryStore base");
  }
  memory->DropUnsyncedData();
  return Status::Ok();
}

Status FaultStore::Check(StoreOp op, std::string_view key) {
  const int index = static_cast<int>(op);
  std::lock_guard<std::mutex> lock(mu_);
  ++counts_[index];
  auto fail = [&](const Status& error) {
    ++failures_[index];
    return error.WithContext(std::string(StoreOpName(op)) + " " + base_.Describe(key));
  };
  if (!active_) return fail(inactive_error_);
  // Every matching fault sees the operation, even when an earlier one fires.
  const Status* fired = nullptr;
  for (PendingFault& pending : faults_) {
    const Fault& f = pending.fault;
    if (f.op != op) continue;
    if (!f.key_substring.empty() && key.find(f.key_substring) == std::string_view::npos) continue;
    ++pending.seen;
    const bool fires = pending.seen == f.nth || (f.sticky && pending.seen > f.nth);
    if (fires && fired == nullptr) fired = &f.error;
  }
  if (fired != nullptr) return fail(*fired);
  return Status::Ok();
}

Result<std::unique_ptr<WritableFile>> FaultStore::OpenWrite(std::string_view key) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kOpenWrite, key));
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, base_.OpenWrite(key));
  return std::unique_ptr<WritableFile>(new Writer(this, std::string(key), std::move(file)));
}

Result<std::unique_ptr<ReadableFile>> FaultStore::OpenRead(std::string_view key) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kOpenRead, key));
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, base_.OpenRead(key));
  return std::unique_ptr<ReadableFile>(new Reader(this, std::string(key), std::move(file)));
}

Result<bool> FaultStore::Exists(std::string_view key) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kStat, key));
  return base_.Exists(key);
}

Result<uint64_t> FaultStore::Size(std::string_view key) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kStat, key));
  return base_.Size(key);
}

Result<std::vector<std::string>> FaultStore::List() {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kList, ""));
  return base_.List();
}

Status FaultStore::Remove(std::string_view key) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kRemove, key));
  return base_.Remove(key);
}

Status FaultStore::Rename(std::string_view from, std::string_view to) {
  // Matched against the destination: "fail the rename onto .metadata" is the usual question.
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kRename, to));
  return base_.Rename(from, to);
}

Status FaultStore::SyncDir(std::string_view dir) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kSyncDir, dir));
  return base_.SyncDir(dir);
}

Status FaultStore::CreateDir() {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kCreateDir, ""));
  return base_.CreateDir();
}

Result<std::unique_ptr<StoreLock>> FaultStore::TryLock(std::string_view key, LockMode mode) {
  DCPP_RETURN_IF_ERROR(Check(StoreOp::kLock, key));
  return base_.TryLock(key, mode);
}

}  // namespace dcpp
