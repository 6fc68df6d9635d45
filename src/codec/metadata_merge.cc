// Merging the rank-local metadata of a checkpoint saved without collectives.
#include <algorithm>
#include <string>
#include <vector>

#include "dcpp/metadata.h"

namespace dcpp {

Result<Metadata> MergeRankLocalMetadata(const std::vector<Metadata>& per_rank, int first) {
  if (per_rank.empty()) return InvalidArgumentError("no rank-local metadata to merge");
  if (first < 0 || first >= static_cast<int>(per_rank.size())) first = 0;
  std::vector<size_t> order = {static_cast<size_t>(first)};
  for (size_t r = 0; r < per_rank.size(); ++r) {
    if (r != static_cast<size_t>(first)) order.push_back(r);
  }
  Metadata out;
  out.storage_meta = per_rank[first].storage_meta;
  out.version = per_rank[first].version;
  for (size_t r : order) {
    const Metadata& md = per_rank[r];
    const std::string who = "__" + std::to_string(r) + ".metadata";
    for (const auto& [fqn, m] : md.state_dict_metadata) {
      StorageMetadata* have = out.state_dict_metadata.Find(fqn);
      if (!have) {
        out.state_dict_metadata[fqn] = m;
        continue;
      }
      const auto* t = std::get_if<TensorStorageMetadata>(&m);
      auto* ht = std::get_if<TensorStorageMetadata>(have);
      if ((t == nullptr) != (ht == nullptr)) {
        return DataLossError(who + ": \"" + fqn + "\" is " + (t ? "a tensor" : "bytes") +
                             " here but not in another rank's metadata");
      }
      if (!t) continue;
      if (t->properties.dtype != ht->properties.dtype || t->size != ht->size) {
        return DataLossError(who + ": tensor \"" + fqn + "\" is " +
                             std::string(DTypeName(t->properties.dtype)) + ShapeToString(t->size) +
                             " here but " + std::string(DTypeName(ht->properties.dtype)) +
                             ShapeToString(ht->size) + " in another rank's metadata");
      }
      // Replicated data is saved by every rank: keep each chunk once.
      for (const ChunkBox& c : t->chunks) {
        if (std::find(ht->chunks.begin(), ht->chunks.end(), c) == ht->chunks.end()) {
          ht->chunks.push_back(c);
        }
      }
    }
    if (md.planner_data) {
      if (!out.planner_data) out.planner_data.emplace();
      for (const auto& [fqn, path] : *md.planner_data) out.planner_data->emplace(fqn, path);
    }
    for (const auto& [index, info] : md.storage_data) out.storage_data.emplace(index, info);
  }
  DCPP_RETURN_IF_ERROR(ValidateMetadata(out, "merged rank-local metadata"));
  return out;
}

}  // namespace dcpp
