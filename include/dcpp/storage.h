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
//     mixture. WriteAtomic() combines these into the commit primitive: write a temporary of its
//     own (TemporaryName), Sync, Rename over key, SyncDir. After a crash the key holds either its
//     old or its new bytes.
//   - Files are written in place: OpenWrite truncates an existing key.
//
// Locking: TryLock takes an advisory lock named by a key, so that two saves to one destination
// cannot interleave. A local store uses flock(2) on that file: the kernel releases it when the
// holder's process dies (kill -9 cannot wedge a directory), and it works across hosts where the
// file system supports flock (NFSv4, Lustre with flock mounts). Stores that cannot lock
// (object stores: S3) return Unimplemented and report CanLock() false; writers then give every
// save unique file names instead, so concurrent saves cannot mix data, but the last `.metadata`
// upload wins and both writers report success.
//
// Backends: OpenLocalStore (POSIX files) and whatever OpenStore finds for a URL's scheme. The
// test doubles MemoryStore (models crashes exactly) and FaultStore (fails chosen operations)
// live in testing/, outside the installed surface.
//
// Thread-safety: Store methods may be called concurrently from any thread. A WritableFile is used
// by one thread at a time. ReadableFile::ReadAt may be called from several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dcpp/io.h"
#include "dcpp/status.h"

namespace dcpp {

// The temporary WriteAtomic writes `key` through: key + ".tmp." + host + "." + pid + "." + n,
// unique to this call.
std::string TemporaryName(std::string_view key);
// If `name` is a temporary of TemporaryName's form, its key, host and pid.
struct TemporaryNameParts {
  std::string key;
  std::string host;
  int64_t pid = 0;
};
bool ParseTemporaryName(std::string_view name, TemporaryNameParts* parts);

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
class ReadableFile : public ByteSource {
 public:
  // A hint that [offset, offset + n) will be read soon: a backend may start fetching it while
  // the caller works on what it has. Never fails; the default does nothing.
  virtual void Prefetch(uint64_t /*offset*/, uint64_t /*n*/) const {}
};

// How a lock is held: many shared holders, or one exclusive holder.
enum class LockMode { kShared, kExclusive };

// A lock taken by Store::TryLock; destroying it releases the lock. Not copyable; any thread may
// destroy it.
class StoreLock {
 public:
  StoreLock() = default;
  virtual ~StoreLock() = default;
  StoreLock(const StoreLock&) = delete;
  StoreLock& operator=(const StoreLock&) = delete;
};

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
  // The keys of the files directly in directory `dir` ("" = the root), sorted. The default
  // filters List(); backends override it to avoid listing everything.
  virtual Result<std::vector<std::string>> ListDirectory(std::string_view dir);
  // Removes `key`; NotFound if absent.
  virtual Status Remove(std::string_view key) = 0;
  // Atomically renames `from` to `to`, replacing `to` if present. NotFound if `from` is absent.
  virtual Status Rename(std::string_view from, std::string_view to) = 0;
  // Makes the names in directory `dir` ("" = the root, else a key prefix such as "a/b") durable.
  virtual Status SyncDir(std::string_view dir = {}) = 0;
  // Creates the root directory (and its parents) if absent.
  virtual Status CreateDir() = 0;

  // Takes the lock file `key` (created if absent; never removed) in `mode` without waiting.
  // Unavailable naming the file (and the holder recorded in it, if any) when another holder
  // conflicts, also one in this process. An exclusive holder records "pid P on host H" in the
  // file. The default: Unimplemented (see "Locking" above).
  virtual Result<std::unique_ptr<StoreLock>> TryLock(std::string_view key, LockMode mode);
  // Whether TryLock can succeed on this backend (false: writers must use unique names).
  virtual bool CanLock() const { return false; }

  // Name of `key` for error messages, e.g. "/ckpt/step_1/.metadata".
  virtual std::string Describe(std::string_view key) const = 0;

  // The commit primitive: writes `bytes` to a temporary named TemporaryName(key), syncs it,
  // renames it over `key` and syncs the key's directory. On failure the temporary is removed
  // (best effort) and `key` is left as it was. Concurrent WriteAtomic calls for one key each
  // use their own temporary; the last rename wins. Temporaries left by writers of this host
  // that are gone (killed) are removed by the next WriteAtomic of the same key.
  virtual Status WriteAtomic(std::string_view key, std::string_view bytes);
  // The same, with the content streamed by `fill` into the temporary (a codec writing a large
  // file). The default implementation follows the steps above; backends with atomic whole-object
  // writes may override both.
  virtual Status WriteAtomic(std::string_view key, const std::function<Status(ByteSink&)>& fill);

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

}  // namespace dcpp
