// Leftovers of failed or killed saves, and the rule that tells a checkpoint directory from a
// user's (leftovers.h lists the names).
#include "layout/leftovers.h"

#include <algorithm>
#include <set>

#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "layout/manifest.h"

namespace dcpp::internal {
namespace {

bool AllDigits(std::string_view s) {
  return !s.empty() && s.size() <= 9 &&
         std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

bool AllHex(std::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

bool Consume(std::string_view& s, std::string_view prefix) {
  if (s.substr(0, prefix.size()) != prefix) return false;
  s.remove_prefix(prefix.size());
  return true;
}

// "__{r}.metadata" -> r, else -1.
int RankOfMetadataName(std::string_view s) {
  if (!Consume(s, "__")) return -1;
  const size_t dot = s.find('.');
  if (dot == std::string_view::npos || s.substr(dot) != ".metadata") return -1;
  return AllDigits(s.substr(0, dot)) ? std::stoi(std::string(s.substr(0, dot))) : -1;
}

}  // namespace

std::string RankLockFileName(int rank) { return ".dcpp.rank" + std::to_string(rank) + ".lock"; }

NameInfo ClassifyName(std::string_view key) {
  NameInfo info;
  if (key.find('/') != std::string_view::npos) return info;
  if (key == kMetadataFileName) return {NameKind::kMetadata, -1, false};
  if (key == kLockFileName) return {NameKind::kLock, -1, true};
  {
    std::string_view s = key;
    if (Consume(s, ".dcpp.rank") && s.size() > 5 && s.substr(s.size() - 5) == ".lock" &&
        AllDigits(s.substr(0, s.size() - 5))) {
      return {NameKind::kLock, std::stoi(std::string(s.substr(0, s.size() - 5))), true};
    }
  }
  if (int r = RankOfMetadataName(key); r >= 0) return {NameKind::kRankMetadata, r, false};
  // "<metadata key>.<16 hex>.manifest": the rank is its metadata's.
  constexpr size_t kManifestTail = 1 + 16 + 9;
  if (IsManifestKey(key) && key.size() > kManifestTail) {
    return {NameKind::kManifest, RankOfMetadataName(key.substr(0, key.size() - kManifestTail)),
            true};
  }
  // A temporary of a metadata commit: the legacy "K.tmp" or TemporaryName(K).
  TemporaryNameParts parts;
  const bool unique = ParseTemporaryName(key, &parts);
  const std::string_view base = unique ? std::string_view(parts.key)
                                       : (key.size() > 4 && key.substr(key.size() - 4) == ".tmp"
                                              ? key.substr(0, key.size() - 4)
                                              : std::string_view());
  if (!base.empty()) {
    if (base == kMetadataFileName) return {NameKind::kTemporary, -1, unique};
    if (int r = RankOfMetadataName(base); r >= 0) return {NameKind::kTemporary, r, unique};
    NameInfo of = ClassifyName(base);
    if (of.kind == NameKind::kManifest) return {NameKind::kTemporary, of.rank, true};
    return info;
  }
  // __{r}_{n}.distcp or __{r}_{n}_{tag}.distcp
  std::string_view s = key;
  if (!Consume(s, "__") || s.size() < 7 || s.substr(s.size() - 7) != ".distcp") return info;
  s.remove_suffix(7);
  const size_t u1 = s.find('_');
  if (u1 == std::string_view::npos || !AllDigits(s.substr(0, u1))) return info;
  const int rank = std::stoi(std::string(s.substr(0, u1)));
  std::string_view rest = s.substr(u1 + 1);
  const size_t u2 = rest.find('_');
  if (u2 == std::string_view::npos) {
    if (!AllDigits(rest)) return info;
    return {NameKind::kData, rank, false};
  }
  std::string_view tag = rest.substr(u2 + 1);
  if (!AllDigits(rest.substr(0, u2)) || tag.size() != 8 || !AllHex(tag)) return info;
  return {NameKind::kData, rank, true};
}

Status CheckCheckpointDirectory(const std::vector<std::string>& keys, const std::string& where) {
  if (keys.empty()) return Status::Ok();
  for (const std::string& k : keys) {
    NameInfo n = ClassifyName(k);
    if (n.kind == NameKind::kMetadata || n.kind == NameKind::kRankMetadata || n.dcpp_only) {
      return Status::Ok();
    }
  }
  std::string shown;
  const size_t kShown = 5;
  for (size_t i = 0; i < keys.size() && i < kShown; ++i) {
    shown += (i ? ", \"" : "\"") + keys[i] + "\"";
  }
  if (keys.size() > kShown) shown += ", ... (" + std::to_string(keys.size()) + " files)";
  return FailedPreconditionError(
      "\"" + where +
      "\" is not empty and is not a checkpoint (no .metadata, no __{rank}.metadata, no " +
      kLockFileName +
      "); refusing to write into it, which could overwrite files dcpp did not "
      "write. It holds " +
      shown);
}

namespace {

// Whether what `known` references settles every key: no data file or manifest it does not name
// itself (only such a file can be a leftover, and only what the stored metadata says decides it).
// A key it names is kept either way, so the stored bytes need not be read, as after a save into
// a fresh directory (reading back a 6 MB `.metadata` cost a fifth of a 20 000-tensor save's
// commit).
bool KnownSettlesAll(const std::vector<std::string>& keys, int rank, const KnownMetadata& known) {
  const std::string manifest = ManifestKey(known.key, known.hash);
  const std::vector<std::string>& names = known.referenced;
  for (const std::string& k : keys) {
    const NameInfo n = ClassifyName(k);
    if (rank >= 0 && n.rank != rank) continue;
    if (n.kind == NameKind::kData && !std::binary_search(names.begin(), names.end(), k)) {
      return false;
    }
    if (n.kind == NameKind::kManifest && k != manifest) return false;
  }
  return true;
}

}  // namespace

Result<std::vector<std::string>> FindLeftovers(Store& store, const std::vector<std::string>& keys,
                                               int rank, const KnownMetadata* known) {
  if (known && KnownSettlesAll(keys, rank, *known)) {
    std::vector<std::string> out;
    for (const std::string& k : keys) {
      const NameInfo n = ClassifyName(k);
      if (n.kind == NameKind::kTemporary && (rank < 0 || n.rank == rank)) out.push_back(k);
    }
    return out;
  }
  std::set<std::string> referenced;
  std::set<std::string> manifests;  // those of the committed metadata
  bool all_read = true;
  for (const std::string& k : keys) {
    NameKind kind = ClassifyName(k).kind;
    if (kind != NameKind::kMetadata && kind != NameKind::kRankMetadata) continue;
    auto bytes = store.ReadAll(k);
    const uint64_t hash = bytes.ok() ? Xxh3(bytes->data(), bytes->size()) : 0;
    if (bytes.ok()) manifests.insert(ManifestKey(k, hash));
    if (bytes.ok() && known && known->key == k && known->hash == hash) {
      referenced.insert(known->referenced.begin(), known->referenced.end());
      continue;
    }
    auto md = bytes.ok() ? ParseMetadata(*bytes) : Result<Metadata>(bytes.status());
    if (!md.ok()) {
      all_read = false;
      continue;
    }
    for (const auto& [index, info] : md->storage_data) referenced.insert(info.relative_path);
  }
  std::vector<std::string> out;
  for (const std::string& k : keys) {
    NameInfo n = ClassifyName(k);
    if (rank >= 0 && n.rank != rank) continue;
    if (n.kind == NameKind::kTemporary) {
      out.push_back(k);
    } else if (n.kind == NameKind::kData && all_read && !referenced.count(k)) {
      out.push_back(k);
    } else if (n.kind == NameKind::kManifest && all_read && !manifests.count(k)) {
      out.push_back(k);
    }
  }
  return out;
}

Result<std::vector<std::string>> RemoveLeftovers(Store& store, int rank,
                                                 const KnownMetadata* known) {
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> keys, store.List());
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> leftovers,
                        FindLeftovers(store, keys, rank, known));
  for (const auto& f : leftovers) {
    Status s = store.Remove(f);
    if (!s.ok() && s.code() != StatusCode::kNotFound) return s;
  }
  return leftovers;
}

}  // namespace dcpp::internal
