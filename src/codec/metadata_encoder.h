// The `.metadata` encoding and its checks in two steps, so a save can do the part that depends
// only on its global plan (state_dict_metadata and planner_data, most of the file) while it
// writes, and the rest (storage_data, storage_meta, version) when it commits.
//
// MetadataEncoder::Begin writes the pickle up to storage_data; Finish writes the rest and gives
// bytes identical to EncodeMetadata's for the Metadata it is given, provided that Metadata's
// state_dict_metadata and planner_data are those Begin saw (the caller's contract; a writer that
// cannot promise it uses EncodeMetadata). ValidateMetadata(md) is exactly
// ValidatePlannedMetadata(md) and ValidateStorageData(md) together.
//
// Thread-safety: an encoder is used by one thread at a time; the checks only read.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "dcpp/metadata.h"

namespace dcpp::internal {

class MetadataEncoder {
 public:
  explicit MetadataEncoder(const MetadataEncodeOptions& options = {});
  ~MetadataEncoder();
  MetadataEncoder(const MetadataEncoder&) = delete;
  MetadataEncoder& operator=(const MetadataEncoder&) = delete;

  // Encodes md's root object up to storage_data. Once only; a no-op after the first call.
  void Begin(const Metadata& md);
  // The whole file's bytes (Begin first if it was not called). Once only.
  Result<std::string> Finish(const Metadata& md);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Status status_;
  bool begun_ = false;
};

// The checks of ValidateMetadata on state_dict_metadata and planner_data alone: sizes, chunks
// inside their tensors, list holes of the planner data.
Status ValidatePlannedMetadata(const Metadata& md, std::string_view what);
// The rest: each storage entry's key is known and its file inside the checkpoint, and each
// untransformed chunk's blob is large enough for it.
Status ValidateStorageData(const Metadata& md, std::string_view what);

}  // namespace dcpp::internal
