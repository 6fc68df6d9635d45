// Wire encoding of the pieces that plans and write results share (core/wire.h's format), so the
// planner's plan messages and the layout's write-result messages encode a MetadataIndex alike.
#pragma once

#include "core/wire.h"
#include "dcpp/metadata.h"

namespace dcpp::internal {

inline void PutIndex(WireWriter& w, const MetadataIndex& index) {
  w.Str(index.fqn);
  w.U64(index.offset ? 1 : 0);
  if (index.offset) w.Dims(*index.offset);
  w.U64(index.index ? static_cast<uint64_t>(*index.index) + 1 : 0);
}

inline Status GetIndex(WireReader& r, MetadataIndex* index) {
  DCPP_ASSIGN_OR_RETURN(index->fqn, r.Str());
  DCPP_ASSIGN_OR_RETURN(uint64_t has_offset, r.U64());
  if (has_offset) {
    DCPP_ASSIGN_OR_RETURN(index->offset, r.Dims());
  }
  DCPP_ASSIGN_OR_RETURN(uint64_t i, r.U64());
  if (i) index->index = static_cast<int64_t>(i - 1);
  return Status::Ok();
}

}  // namespace dcpp::internal
