// Store: key validation and the operations every backend shares (WriteAtomic, ReadAll, WriteAll).
//
// WriteAtomic, the commit primitive, in steps (after tensorstore's file kvstore):
//   0. remove temporaries of this key left by writers of this host that are gone;
//   1. write the bytes to a temporary unique to this call (TemporaryName);
//   2. Sync the temporary, so its bytes are durable before any name points at them;
//   3. Rename it over key: readers see the old or the new file, never a partial one;
//   4. SyncDir the key's directory, so the rename itself survives a crash.
// A crash before step 4 leaves key with its old bytes or its new bytes, both complete.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <string>

#include "dcpp/storage.h"

namespace dcpp {
namespace {

// The key as it appears in an error message: quoted, non-printable bytes escaped.
std::string QuoteKey(std::string_view key) {
  std::string out = "\"";
  for (unsigned char c : key) {
    if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += '"';
  return out;
}

const std::string& HostName() {
  static const std::string host = [] {
    char buf[256] = {};
    if (::gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return std::string("host");
    std::string h(buf);
    // The name is one field of a file name: no separators.
    for (char& c : h) {
      if (c == '/' || c == '.' || static_cast<unsigned char>(c) < 0x20) c = '-';
    }
    return h;
  }();
  return host;
}

// Whether process `pid` of this host is alive (EPERM: alive, owned by someone else).
bool ProcessAlive(int64_t pid) {
  if (pid <= 0 || pid > INT32_MAX) return false;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

bool ParseDecimal(std::string_view s, int64_t* out) {
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size() && *out >= 0;
}

}  // namespace

std::string TemporaryName(std::string_view key) {
  static std::atomic<uint64_t> counter{0};
  return std::string(key) + ".tmp." + HostName() + "." + std::to_string(::getpid()) + "." +
         std::to_string(counter.fetch_add(1));
}

bool ParseTemporaryName(std::string_view name, TemporaryNameParts* parts) {
  // key ".tmp." host "." pid "." n, where host has no '.'.
  size_t last = name.rfind('.');
  if (last == std::string_view::npos || last == 0) return false;
  size_t mid = name.rfind('.', last - 1);
  if (mid == std::string_view::npos || mid == 0) return false;
  size_t host_dot = name.rfind('.', mid - 1);
  if (host_dot == std::string_view::npos || host_dot < 4) return false;
  if (name.substr(host_dot - 4, 4) != ".tmp") return false;
  int64_t pid = 0, n = 0;
  if (!ParseDecimal(name.substr(mid + 1, last - mid - 1), &pid) ||
      !ParseDecimal(name.substr(last + 1), &n)) {
    return false;
  }
  std::string_view host = name.substr(host_dot + 1, mid - host_dot - 1);
  if (host.empty() || host_dot - 4 == 0) return false;
  parts->key = std::string(name.substr(0, host_dot - 4));
  parts->host = std::string(host);
  parts->pid = pid;
  return true;
}

Result<std::unique_ptr<StoreLock>> Store::TryLock(std::string_view key, LockMode /*mode*/) {
  return UnimplementedError("locking " + Describe(key) + ": this store cannot lock");
}

Result<std::vector<std::string>> Store::ListDirectory(std::string_view dir) {
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> all, List());
  std::vector<std::string> out;
  for (auto& k : all) {
    if (KeyDirectory(k) == dir) out.push_back(std::move(k));
  }
  return out;
}

Status ValidateKey(std::string_view key) {
  auto bad = [&](std::string_view why) {
    return InvalidArgumentError("invalid store key " + QuoteKey(key) + ": " + std::string(why));
  };
  if (key.empty()) return bad("empty");
  if (key.find('\0') != std::string_view::npos) return bad("contains a NUL byte");
  if (key.front() == '/') return bad("absolute path");
  size_t start = 0;
  while (true) {
    size_t end = key.find('/', start);
    std::string_view part =
        key.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
    if (part.empty()) return bad("empty path component");
    if (part == "." || part == "..") return bad("'.' or '..' component");
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return Status::Ok();
}

std::string_view KeyDirectory(std::string_view key) {
  size_t slash = key.rfind('/');
  return slash == std::string_view::npos ? std::string_view() : key.substr(0, slash);
}

Status Store::WriteAtomic(std::string_view key, std::string_view bytes) {
  return WriteAtomic(key,
                     [bytes](ByteSink& sink) { return sink.Write(bytes.data(), bytes.size()); });
}

Status Store::WriteAtomic(std::string_view key, const std::function<Status(ByteSink&)>& fill) {
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  // Temporaries of this key whose writer (a process of this host) is gone are removed; those of
  // live writers and of other hosts are left alone. Best effort: a failure here is not the
  // caller's.
  if (auto siblings = ListDirectory(KeyDirectory(key)); siblings.ok()) {
    for (const std::string& name : *siblings) {
      TemporaryNameParts parts;
      if (ParseTemporaryName(name, &parts) && parts.key == key && parts.host == HostName() &&
          !ProcessAlive(parts.pid)) {
        (void)Remove(name);
      }
    }
  }
  const std::string tmp = TemporaryName(key);
  Status st = [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, OpenWrite(tmp));
    DCPP_RETURN_IF_ERROR(fill(*file));
    DCPP_RETURN_IF_ERROR(file->Sync());
    return file->Close();
  }();
  if (st.ok()) st = Rename(tmp, key);
  if (!st.ok()) {
    (void)Remove(tmp);  // best effort; a stale temporary is removed by the next attempt
    return st.WithContext("writing " + Describe(key) + " atomically");
  }
  return SyncDir(KeyDirectory(key)).WithContext("committing " + Describe(key));
}

Result<std::string> Store::ReadAll(std::string_view key) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, OpenRead(key));
  std::string out(file->size(), '\0');
  DCPP_RETURN_IF_ERROR(file->ReadAt(0, out.data(), out.size()));
  return out;
}

Status Store::WriteAll(std::string_view key, std::string_view bytes, bool sync) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, OpenWrite(key));
  DCPP_RETURN_IF_ERROR(file->Append(bytes.data(), bytes.size()));
  if (sync) DCPP_RETURN_IF_ERROR(file->Sync());
  return file->Close();
}

}  // namespace dcpp
