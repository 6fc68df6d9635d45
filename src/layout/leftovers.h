// Which files of a checkpoint directory dcpp (or PyTorch's DCP) wrote, which of them a committed
// checkpoint still uses, and whether a directory is a checkpoint at all (internal to layout).
//
// Names dcpp recognises, all directly in the checkpoint directory:
//   .metadata, __{r}.metadata            committed metadata (collective / rank-local)
//   __{r}_{n}.distcp, __{r}_{n}_{tag}.distcp   data files (tag: 8 hex digits, dcpp's)
//   .metadata.tmp[.{host}.{pid}.{n}], __{r}.metadata.tmp[...]   temporaries of a commit
//   {metadata}.{16 hex}.manifest (and its temporaries)   checksum manifests (dcpp's)
//   .dcpp.lock, .dcpp.rank{r}.lock       lock files (dcpp's; they also mark the directory)
// Every other file (a user's notes.txt, a subdirectory) is never removed.
//
// Thread-safety: pure functions, plus reads of a store.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dcpp/status.h"
#include "dcpp/storage.h"

namespace dcpp::internal {

// The save lock of a checkpoint directory: exclusive for a collective save and `dcpp gc`,
// shared by the ranks of a rank-local save (each also holding RankLockFileName exclusively).
inline constexpr const char* kLockFileName = ".dcpp.lock";
std::string RankLockFileName(int rank);

enum class NameKind {
  kOther,         // not a checkpoint name: never touched
  kMetadata,      // .metadata
  kRankMetadata,  // __{r}.metadata
  kData,          // __{r}_{n}[_{tag}].distcp
  kTemporary,     // a temporary of a metadata or manifest commit
  kManifest,      // a checksum manifest (layout/manifest.h)
  kLock,          // a lock file
};
struct NameInfo {
  NameKind kind = NameKind::kOther;
  int rank = -1;           // the rank in the name, where there is one
  bool dcpp_only = false;  // a name only dcpp writes (tagged data, lock, unique temporary)
};
NameInfo ClassifyName(std::string_view key);

// OK if a save may write into a directory holding `keys` (Store::List): it is empty, or holds
// committed metadata, a lock file or another name only dcpp writes. Otherwise FailedPrecondition
// naming `where` and a few of its files.
Status CheckCheckpointDirectory(const std::vector<std::string>& keys, const std::string& where);

// The checkpoint-named files of `keys` that no committed metadata in the store references: data
// files, commit temporaries and manifests of no committed metadata. With rank >= 0 only that rank's
// files (a rank-local save holds only its own rank's lock). If some committed metadata cannot be
// read, no data file is a leftover (only temporaries), since it might be referenced.
// A metadata file whose references the caller already knows (the writer that just committed it):
// when the stored bytes still hash to `hash`, they are not parsed again; when every data file and
// manifest among `keys` is one it names, no metadata is read at all (such files are kept whatever
// the stored bytes say, so only temporaries can be leftovers).
struct KnownMetadata {
  std::string key;
  uint64_t hash = 0;                    // Xxh3 of the committed bytes
  std::vector<std::string> referenced;  // the data files its storage_data names, sorted
};
Result<std::vector<std::string>> FindLeftovers(Store& store, const std::vector<std::string>& keys,
                                               int rank = -1, const KnownMetadata* known = nullptr);

// Removes what FindLeftovers finds among the store's current keys (an already removed file is not
// an error) and returns their names. Only under the save lock: another save's files in flight
// would look the same.
Result<std::vector<std::string>> RemoveLeftovers(Store& store, int rank = -1,
                                                 const KnownMetadata* known = nullptr);

}  // namespace dcpp::internal
