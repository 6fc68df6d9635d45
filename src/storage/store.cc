// Store: key validation and the operations every backend shares (WriteAtomic, ReadAll, WriteAll).
//
// WriteAtomic, the commit primitive, in steps (after tensorstore's file kvstore):
//   1. write the bytes to key + ".tmp" (truncating any stale temporary);
//   2. Sync the temporary, so its bytes are durable before any name points at them;
//   3. Rename it over key: readers see the old or the new file, never a partial one;
//   4. SyncDir the key's directory, so the rename itself survives a crash.
// A crash before step 4 leaves key with its old bytes or its new bytes, both complete.
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

}  // namespace

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
  const std::string tmp = std::string(key) + ".tmp";
  Status st = [&]() -> Status {
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, OpenWrite(tmp));
    DCPP_RETURN_IF_ERROR(fill(*file));
    DCPP_RETURN_IF_ERROR(file->Sync());
    return file->Close();
  }();
  if (st.ok()) st = Rename(tmp, key);
  if (!st.ok()) {
    (void)Remove(tmp);  // best effort; a stale temporary is overwritten by the next attempt
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
