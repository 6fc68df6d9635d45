// FaultStore: a Store wrapper that counts and fails chosen operations, for fault tests.
// Thread-safety: as every Store, its methods may be called from any thread.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "dcpp/storage.h"
#include "testing/memory_store.h"

namespace dcpp {

// Operations a FaultStore counts and can fail.
enum class StoreOp : int {
  kOpenWrite = 0,
  kOpenRead,
  kAppend,
  kSync,
  kClose,
  kRead,  // ReadableFile::ReadAt
  kRename,
  kRemove,
  kSyncDir,
  kList,
  kStat,  // Exists, Size
  kCreateDir,
  kLock,  // TryLock
};
inline constexpr int kNumStoreOps = 13;
std::string_view StoreOpName(StoreOp op);

// Wraps another store (which must outlive it) in the manner of rocksdb's FaultInjectionTestFS:
// chosen operations fail with a chosen Status, and every operation is counted. A failed
// operation does not reach the base store, so a failed Sync leaves its data unsynced there.
// DropUnsyncedData() forwards to a MemoryStore base (Unimplemented for other bases). Files opened
// through a FaultStore must be destroyed before it.
class FaultStore final : public Store {
 public:
  struct Fault {
    StoreOp op = StoreOp::kAppend;
    // The nth (1-based) matching operation from when the fault is added fails.
    uint64_t nth = 1;
    // What it fails with; the operation and key are prepended to the message.
    Status error = UnavailableError("injected fault");
    // Only operations on keys containing this substring match ("" matches all). kRename matches
    // its destination; kSyncDir its directory; kList and kCreateDir the empty key.
    std::string key_substring;
    // Keep failing every matching operation from the nth on.
    bool sticky = false;
  };

  explicit FaultStore(Store& base);
  ~FaultStore() override;

  void AddFault(Fault fault);
  void ClearFaults();
  // While inactive every operation fails with `error` (a process that has died).
  void SetActive(bool active, Status error = UnavailableError("store is inactive"));
  // Operations of kind `op` attempted so far, failed ones included.
  uint64_t count(StoreOp op) const;
  // Operations of kind `op` that failed by injection.
  uint64_t failures(StoreOp op) const;
  void ResetCounts();
  Status DropUnsyncedData();

  Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) override;
  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override;
  Result<bool> Exists(std::string_view key) override;
  Result<uint64_t> Size(std::string_view key) override;
  Result<std::vector<std::string>> List() override;
  Status Remove(std::string_view key) override;
  Status Rename(std::string_view from, std::string_view to) override;
  Status SyncDir(std::string_view dir = {}) override;
  Status CreateDir() override;
  Result<std::unique_ptr<StoreLock>> TryLock(std::string_view key, LockMode mode) override;
  bool CanLock() const override { return base_.CanLock(); }
  std::string Describe(std::string_view key) const override { return base_.Describe(key); }

 private:
  // Counts an operation and returns its injected failure, if any.
  Status Check(StoreOp op, std::string_view key);

  class Writer;
  class Reader;
  struct PendingFault {
    Fault fault;
    uint64_t seen = 0;
  };

  Store& base_;
  mutable std::mutex mu_;
  std::vector<PendingFault> faults_;
  bool active_ = true;
  Status inactive_error_;
  std::array<uint64_t, kNumStoreOps> counts_{};
  std::array<uint64_t, kNumStoreOps> failures_{};
};

}  // namespace dcpp
