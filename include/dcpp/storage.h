// Byte stores: where checkpoint files live, addressed by relative keys within a root.
//
// A Store holds files named by keys such as "__0_0.distcp" or ".metadata" (a key may have
// several '/'-separated components; parent directories are created on demand). Keys come from
// untrusted metadata, so every entry point validates them: a key is relative, has no empty, "."
// or ".." components and no NUL byte, and therefore can never leave the root.
//
// Durability contract (POSIX semantics; docs/storage_comm.md has the details):
//   - Data appended to a WritableFile is durable only after WritableFile::Sync() returns OK.
//   - A name created, removed or renamed in a directory is durable only after SyncDir() of that
//     directory returns OK.
//   - Rename(from, to) atomically replaces `to`: a reader sees the old or the new file, never a
//     mixture. WriteAtomic() combines these into the commit primitive: write key + ".tmp", Sync,
//     Rename over key, SyncDir. After a crash the key holds either its old or its new bytes.
//   - Files are written in place: OpenWrite truncates an existing key.
//
// Backends: OpenLocalStore (POSIX files), MemoryStore (tests; models crashes exactly), FaultStore
// (wraps another store, fails chosen operations and counts them).
//
// Thread-safety: Store methods may be called concurrently from any thread. A WritableFile is used
// by one thread at a time. ReadableFile::ReadAt may be called from several threads at once.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "dcpp/io.h"
#include "dcpp/status.h"

namespace dcpp {

// OK if `key` is a valid store key (see above), else InvalidArgument naming the key.
Status ValidateKey(std::string_view key);

// The directory part of a key: "" for "a", "a/b" for "a/b/c".
std::string_view KeyDirectory(std::string_view key);

// An append-only file being written. Also a ByteSink, so codecs can write into it directly.
class WritableFile : public ByteSink {
 public:
  // Appends n bytes. May buffer small writes; large writes go straight to the backend.
  virtual Status Append(const void* data, size_t n) = 0;
  // Makes every appended byte durable (fsync).
  virtual Status Sync() = 0;
  // Flushes buffers and releases the file. Does not sync. Further calls fail.
  virtual Status Close() = 0;

  Status Write(const void* data, size_t n) final { return Append(data, n); }
  // position() (bytes appended so far) and name() come from ByteSink.
};

// A file opened for reading: a fixed-size ByteSource whose name() is the key's path.
class ReadableFile : public ByteSource {};

class Store {
 public:
  Store() = default;
  virtual ~Store() = default;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // Creates (or truncates) `key` for writing.
  virtual Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) = 0;
  // Opens `key` for reading; its size is fixed at open. NotFound if absent.
  virtual Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) = 0;

  virtual Result<bool> Exists(std::string_view key) = 0;
  // Size in bytes; NotFound if absent.
  virtual Result<uint64_t> Size(std::string_view key) = 0;
  // Every key in the store (files only, recursively), sorted.
  virtual Result<std::vector<std::string>> List() = 0;
  // Removes `key`; NotFound if absent.
  virtual Status Remove(std::string_view key) = 0;
  // Atomically renames `from` to `to`, replacing `to` if present. NotFound if `from` is absent.
  virtual Status Rename(std::string_view from, std::string_view to) = 0;
  // Makes the names in directory `dir` ("" = the root, else a key prefix such as "a/b") durable.
  virtual Status SyncDir(std::string_view dir = {}) = 0;
  // Creates the root directory (and its parents) if absent.
  virtual Status CreateDir() = 0;

  // Name of `key` for error messages, e.g. "/ckpt/step_1/.metadata".
  virtual std::string Describe(std::string_view key) const = 0;

  // The commit primitive: writes `bytes` to key + ".tmp", syncs it, renames it over `key` and
  // syncs the key's directory. On failure the temporary is removed (best effort) and `key` is
  // left as it was. Two concurrent WriteAtomic calls for one key are not supported.
  virtual Status WriteAtomic(std::string_view key, std::string_view bytes);

  // Reads a whole file. The allocation equals the file's size.
  Result<std::string> ReadAll(std::string_view key);
  // Writes a whole file (OpenWrite, Append, optionally Sync, Close); not atomic.
  Status WriteAll(std::string_view key, std::string_view bytes, bool sync = true);
};

// A store over the directory `path`. With create, the directory (and its parents) is created;
// without, NotFound if it does not exist and FailedPrecondition if it is not a directory.
Result<std::unique_ptr<Store>> OpenLocalStore(const std::string& path, bool create);

// ---- stores by URL ----
//
// Every layer reaches bytes through OpenStore, so a backend plugs in by registering its scheme.
// A plain path ("/ckpt/step_1", "rel/dir") or a file URL ("file:///ckpt/step_1") opens a local
// store; "scheme://..." opens the store registered for that scheme; anything else is
// InvalidArgument naming the URL and the known schemes.

struct StoreOpenOptions {
  // Create the location (directory, prefix) if it does not exist; otherwise NotFound.
  bool create = false;
};

Result<std::unique_ptr<Store>> OpenStore(std::string_view url,
                                         const StoreOpenOptions& options = {});

// A backend's constructor: gets the whole URL (scheme included).
using StoreFactory = std::function<Result<std::unique_ptr<Store>>(std::string_view url,
                                                                  const StoreOpenOptions& options)>;
// Makes OpenStore send "scheme://..." URLs to `factory` (replacing an earlier registration).
// Thread-safe; register before the first OpenStore of that scheme.
void RegisterStoreScheme(std::string scheme, StoreFactory factory);

// One file named by a URL ("/dir/model.pt", "s3://bucket/x/model.pt"): the store of its parent
// location and the file's key in it. For single-file formats (torch.save, safetensors).
struct StoreFile {
  std::unique_ptr<Store> store;
  std::string key;
};
Result<StoreFile> OpenStoreFile(std::string_view url, const StoreOpenOptions& options = {});

// "" for a plain path, else the scheme before "://" ("file", "s3"); InvalidArgument if malformed.
Result<std::string_view> UrlScheme(std::string_view url);
// The local path of a plain path or file:// URL; InvalidArgument for other schemes.
Result<std::string> LocalPathOfUrl(std::string_view url);

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
};
inline constexpr int kNumStoreOps = 12;
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
