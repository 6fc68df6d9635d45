// MemoryStore: an in-memory Store that models POSIX durability for crash tests.
//
// A Node is an inode: its bytes, of which the first synced_size are durable. Names map to nodes
// twice: `live` is what callers see now, `durable` is what each directory held at its last
// SyncDir. Since appends only extend a file and Sync makes all of it durable, the durable bytes
// are always a prefix of the live bytes, so a crash just truncates every node to synced_size and
// swaps `durable` in for `live`.
#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "testing/memory_store.h"

namespace dcpp {

struct MemoryStore::Node {
  std::string data;
  uint64_t synced_size = 0;
  // Immutable copy of data handed to readers; reset on every change.
  std::shared_ptr<const std::string> snapshot;
};

struct MemoryStore::State {
  std::mutex mu;
  std::string label;
  std::map<std::string, std::shared_ptr<Node>, std::less<>> live;
  std::map<std::string, std::shared_ptr<Node>, std::less<>> durable;
  uint64_t epoch = 0;  // bumped by each crash; writers opened before it are dead
  // Held locks by key: the number of shared holders, or -1 for an exclusive one.
  std::map<std::string, int, std::less<>> locks;

  std::string Describe(std::string_view key) const { return label + ":" + std::string(key); }

  // FailedPrecondition if `key` cannot name a file: a live file is one of its directories, or
  // `key` is itself a directory of live files. Caller holds mu.
  Status CheckPlaceable(std::string_view key) const {
    for (std::string_view dir = KeyDirectory(key); !dir.empty(); dir = KeyDirectory(dir)) {
      if (live.find(dir) != live.end()) {
        return FailedPreconditionError(Describe(key) + ": " + Describe(dir) + " is a file");
      }
    }
    std::string prefix = std::string(key) + "/";
    auto it = live.lower_bound(prefix);
    if (it != live.end() && it->first.compare(0, prefix.size(), prefix) == 0) {
      return FailedPreconditionError(Describe(key) + " is a directory");
    }
    return Status::Ok();
  }
};

class MemoryStore::Writer final : public WritableFile {
 public:
  Writer(std::shared_ptr<State> state, std::shared_ptr<Node> node, std::string name, uint64_t epoch)
      : state_(std::move(state)), node_(std::move(node)), name_(std::move(name)), epoch_(epoch) {}

  Status Append(const void* data, size_t n) override {
    std::lock_guard<std::mutex> lock(state_->mu);
    DCPP_RETURN_IF_ERROR(CheckUsable());
    node_->data.append(static_cast<const char*>(data), n);
    node_->snapshot.reset();
    position_ += n;
    return Status::Ok();
  }

  Status Sync() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    DCPP_RETURN_IF_ERROR(CheckUsable());
    node_->synced_size = node_->data.size();
    return Status::Ok();
  }

  Status Close() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    DCPP_RETURN_IF_ERROR(CheckUsable());
    closed_ = true;
    return Status::Ok();
  }

  uint64_t position() const override { return position_; }
  std::string name() const override { return name_; }

 private:
  Status CheckUsable() const {
    if (closed_) return FailedPreconditionError(name_ + ": file is closed");
    if (epoch_ != state_->epoch) return AbortedError(name_ + ": the store crashed while open");
    return Status::Ok();
  }

  std::shared_ptr<State> state_;
  std::shared_ptr<Node> node_;
  std::string name_;
  uint64_t epoch_;
  uint64_t position_ = 0;
  bool closed_ = false;
};

class MemoryStore::Reader final : public ReadableFile {
 public:
  Reader(std::shared_ptr<const std::string> bytes, std::string name)
      : bytes_(std::move(bytes)), name_(std::move(name)) {}

  uint64_t size() const override { return bytes_->size(); }
  std::string name() const override { return name_; }

  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    if (!InRange(offset, n)) {
      return DataLossError(name_ + ": read of " + std::to_string(n) + " bytes at offset " +
                           std::to_string(offset) + " is past the end (" +
                           std::to_string(bytes_->size()) + " bytes)");
    }
    if (n) std::memcpy(dst, bytes_->data() + offset, n);
    return Status::Ok();
  }

  const std::byte* Peek(uint64_t offset, size_t n) const override {
    if (!InRange(offset, n)) return nullptr;
    return reinterpret_cast<const std::byte*>(bytes_->data()) + offset;
  }

 private:
  bool InRange(uint64_t offset, size_t n) const {
    return offset <= bytes_->size() && n <= bytes_->size() - offset;
  }
  std::shared_ptr<const std::string> bytes_;  // immutable: concurrent reads need no lock
  std::string name_;
};

MemoryStore::MemoryStore(std::string label) : state_(std::make_shared<State>()) {
  state_->label = std::move(label);
}

MemoryStore::~MemoryStore() = default;

std::string MemoryStore::Describe(std::string_view key) const { return state_->Describe(key); }

Result<std::unique_ptr<WritableFile>> MemoryStore::OpenWrite(std::string_view key) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  std::lock_guard<std::mutex> lock(state_->mu);
  DCPP_RETURN_IF_ERROR(state_->CheckPlaceable(key).WithContext("opening for writing"));
  std::shared_ptr<Node>& node = state_->live[std::string(key)];
  if (node) {
    // O_TRUNC on the existing inode: other names of it, durable ones included, see the
    // truncation too. Treated as durable at once (ext4's "zero-length file after a crash").
    node->data.clear();
    node->synced_size = 0;
    node->snapshot.reset();
  } else {
    node = std::make_shared<Node>();
  }
  return std::unique_ptr<WritableFile>(
      new Writer(state_, node, state_->Describe(key), state_->epoch));
}

Result<std::unique_ptr<ReadableFile>> MemoryStore::OpenRead(std::string_view key) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  std::lock_guard<std::mutex> lock(state_->mu);
  auto it = state_->live.find(key);
  if (it == state_->live.end()) {
    return NotFoundError("opening " + state_->Describe(key) + ": no such file");
  }
  Node& node = *it->second;
  if (!node.snapshot) node.snapshot = std::make_shared<const std::string>(node.data);
  return std::unique_ptr<ReadableFile>(new Reader(node.snapshot, state_->Describe(key)));
}

Result<bool> MemoryStore::Exists(std::string_view key) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->live.find(key) != state_->live.end();
}

Result<uint64_t> MemoryStore::Size(std::string_view key) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  std::lock_guard<std::mutex> lock(state_->mu);
  auto it = state_->live.find(key);
  if (it == state_->live.end()) return NotFoundError(state_->Describe(key) + ": no such file");
  return static_cast<uint64_t>(it->second->data.size());
}

namespace {

class MemoryLock final : public StoreLock {
 public:
  MemoryLock(std::shared_ptr<void> state, std::function<void()> release)
      : state_(std::move(state)), release_(std::move(release)) {}
  ~MemoryLock() override { release_(); }

 private:
  std::shared_ptr<void> state_;  // keeps the store's state alive
  std::function<void()> release_;
};

}  // namespace

Result<std::unique_ptr<StoreLock>> MemoryStore::TryLock(std::string_view key, LockMode mode) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  DCPP_ASSIGN_OR_RETURN(bool exists, Exists(key));
  if (!exists) {
    DCPP_RETURN_IF_ERROR(WriteAll(key, "", /*sync=*/true));
    DCPP_RETURN_IF_ERROR(SyncDir(KeyDirectory(key)));
  }
  std::lock_guard<std::mutex> lock(state_->mu);
  int& held = state_->locks[std::string(key)];
  const bool exclusive = mode == LockMode::kExclusive;
  if (held < 0 || (exclusive && held > 0)) {
    return UnavailableError(state_->Describe(key) +
                            " is locked by another save or clean-up; two saves to one checkpoint "
                            "directory cannot run at once");
  }
  held = exclusive ? -1 : held + 1;
  std::shared_ptr<State> state = state_;
  std::string k(key);
  return std::unique_ptr<StoreLock>(new MemoryLock(state, [state, k, exclusive] {
    std::lock_guard<std::mutex> l(state->mu);
    auto it = state->locks.find(k);
    if (it == state->locks.end()) return;
    if (exclusive || --it->second <= 0) state->locks.erase(it);
  }));
}

Result<std::vector<std::string>> MemoryStore::List() {
  std::lock_guard<std::mutex> lock(state_->mu);
  std::vector<std::string> keys;
  keys.reserve(state_->live.size());
  for (const auto& [key, node] : state_->live) keys.push_back(key);
  return keys;
}

Status MemoryStore::Remove(std::string_view key) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  std::lock_guard<std::mutex> lock(state_->mu);
  auto it = state_->live.find(key);
  if (it == state_->live.end()) {
    return NotFoundError("removing " + state_->Describe(key) + ": no such file");
  }
  state_->live.erase(it);
  return Status::Ok();
}

Status MemoryStore::Rename(std::string_view from, std::string_view to) {
  DCPP_RETURN_IF_ERROR(ValidateKey(from));
  DCPP_RETURN_IF_ERROR(ValidateKey(to));
  std::lock_guard<std::mutex> lock(state_->mu);
  const std::string context = "renaming " + state_->Describe(from) + " to " + state_->Describe(to);
  auto it = state_->live.find(from);
  if (it == state_->live.end()) return NotFoundError(context + ": no such file");
  if (from == to) return Status::Ok();
  std::shared_ptr<Node> node = it->second;
  state_->live.erase(it);
  Status placeable = state_->CheckPlaceable(to);
  if (!placeable.ok()) {
    state_->live.emplace(std::string(from), std::move(node));
    return placeable.WithContext(context);
  }
  state_->live[std::string(to)] = std::move(node);
  return Status::Ok();
}

Status MemoryStore::SyncDir(std::string_view dir) {
  if (!dir.empty()) DCPP_RETURN_IF_ERROR(ValidateKey(dir));
  std::lock_guard<std::mutex> lock(state_->mu);
  auto in_dir = [&](const std::string& key) { return KeyDirectory(key) == dir; };
  if (!dir.empty()) {
    // Directories are implicit: one exists while a live or durable name lies under it.
    const std::string prefix = std::string(dir) + "/";
    auto has_prefix = [&](const auto& names) {
      auto it = names.lower_bound(prefix);
      return it != names.end() && it->first.compare(0, prefix.size(), prefix) == 0;
    };
    if (!has_prefix(state_->live) && !has_prefix(state_->durable)) {
      return NotFoundError("syncing directory " + state_->Describe(dir) + ": no such directory");
    }
  }
  std::erase_if(state_->durable, [&](const auto& entry) { return in_dir(entry.first); });
  for (const auto& [key, node] : state_->live) {
    if (in_dir(key)) state_->durable.emplace(key, node);
  }
  return Status::Ok();
}

Result<uint64_t> MemoryStore::SyncedSize(std::string_view key) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  std::lock_guard<std::mutex> lock(state_->mu);
  auto it = state_->live.find(key);
  if (it == state_->live.end()) return NotFoundError(state_->Describe(key) + ": no such file");
  return it->second->synced_size;
}

uint64_t MemoryStore::UnsyncedBytes() {
  std::lock_guard<std::mutex> lock(state_->mu);
  uint64_t total = 0;
  for (const auto& [key, node] : state_->live) total += node->data.size() - node->synced_size;
  return total;
}

void MemoryStore::DropUnsyncedData() {
  std::lock_guard<std::mutex> lock(state_->mu);
  ++state_->epoch;
  state_->live = state_->durable;
  for (const auto& [key, node] : state_->live) {
    if (node->data.size() != node->synced_size) {
      node->data.resize(node->synced_size);
      node->snapshot.reset();
    }
  }
}

}  // namespace dcpp
