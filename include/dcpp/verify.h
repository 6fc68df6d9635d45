// VerifyCheckpoint: reads every byte of a DCP checkpoint and reports what is damaged.
//
// Checked: the metadata (bounds, chunk overlap and coverage of every tensor), every file it
// references (present, each blob inside it), the manifest's xxHash3 of every blob segment, and
// inside each blob the torch.save archive: its zip structure, every record's CRC-32, and for a
// tensor chunk the stored dtype and shape against the metadata. Each problem names the item (its
// key), the file and the byte offset. A checkpoint written by PyTorch has no manifest: the report
// says so and everything else is still checked. A rank-local checkpoint (one `__{r}.metadata`
// per rank) is verified file by file, each against its own manifest.
//
// Works on any store OpenStore opens (a path, file://, s3://). Each blob is read once, in
// pieces, so memory stays bounded whatever the blob sizes.
//
// Thread-safety: reentrant; runs its reads on the shared thread pool.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dcpp/status.h"

namespace dcpp {

struct VerifyOptions {
  int thread_count = 4;  // files read in parallel
};

struct VerifyProblem {
  std::string key;      // the item ("w@[0, 0]"), or "" for the checkpoint as a whole
  std::string file;     // the file in the checkpoint ("__0_0.distcp", ".metadata")
  int64_t offset = -1;  // byte offset in that file where the damage starts, -1 if not known
  std::string message;
};

struct VerifyReport {
  std::string url;
  std::vector<std::string> metadata_files;  // ".metadata", or "__0.metadata", ...
  std::vector<std::string> manifests;       // the manifests found (empty: none)
  bool has_manifest = false;                // every metadata file had its manifest
  int64_t items = 0;                        // blobs checked
  int64_t files = 0;
  int64_t bytes_read = 0;
  int64_t segments_checked = 0;  // manifest hashes compared
  int64_t records_checked = 0;   // zip CRC-32s compared
  std::vector<VerifyProblem> problems;

  bool ok() const { return problems.empty(); }
  // Human-readable: one line per problem, then a summary line.
  std::string ToString() const;
  std::string ToJson() const;
};

// Errors only when nothing can be checked: the store cannot be opened, or there is no committed
// checkpoint at `url` (NotFound). A metadata file that cannot be parsed is a problem in the
// report, as is everything else found damaged.
Result<VerifyReport> VerifyCheckpoint(std::string_view url, const VerifyOptions& options = {});

}  // namespace dcpp
