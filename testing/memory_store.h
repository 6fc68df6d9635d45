// MemoryStore: an in-memory Store for tests (see the class comment).
// Thread-safety: as every Store, its methods may be called from any thread.
#pragma once

#include <memory>
#include <string>

#include "dcpp/storage.h"

namespace dcpp {

// An in-memory store for tests. It models durability exactly as documented above: each file
// has a live content and a synced content, each directory a live and a synced set of names.
// DropUnsyncedData() simulates a power loss: names revert to the last SyncDir of their directory
// and every file reverts to its content at its last Sync (OpenWrite's truncation counts as
// synced, the pessimistic choice). Files open for writing at the crash fail every later call.
class MemoryStore final : public Store {
 public:
  explicit MemoryStore(std::string label = "memory");
  ~MemoryStore() override;

  Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) override;
  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override;
  Result<bool> Exists(std::string_view key) override;
  Result<uint64_t> Size(std::string_view key) override;
  Result<std::vector<std::string>> List() override;
  Status Remove(std::string_view key) override;
  Status Rename(std::string_view from, std::string_view to) override;
  Status SyncDir(std::string_view dir = {}) override;
  Status CreateDir() override { return Status::Ok(); }
  // Locks held in this process's memory; the lock file is created (and synced) as on disk.
  Result<std::unique_ptr<StoreLock>> TryLock(std::string_view key, LockMode mode) override;
  bool CanLock() const override { return true; }
  std::string Describe(std::string_view key) const override;

  // Bytes of `key` that would survive a crash now (NotFound if the live name is absent).
  Result<uint64_t> SyncedSize(std::string_view key);
  // Total appended-but-unsynced bytes over all live files.
  uint64_t UnsyncedBytes();
  // Simulates a crash; see the class comment.
  void DropUnsyncedData();

 private:
  struct Node;
  class Writer;
  class Reader;
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace dcpp
