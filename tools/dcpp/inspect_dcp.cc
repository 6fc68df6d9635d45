// `dcpp inspect DIR [--json]` for DCP checkpoints: keys, dtypes, global shapes, chunks with the
// file and byte range each one occupies, files, totals. The JSON schema is in docs/cli.md.
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {

int InspectDcp(const std::string& path, bool as_json) {
  auto reader = FileSystemReader::Open(path);
  Result<Metadata> md = reader.ok() ? (*reader)->ReadMetadata() : Result<Metadata>(reader.status());
  bool rank_local = false;
  if (!md.ok() && md.status().code() == StatusCode::kNotFound && reader.ok()) {
    auto own = (*reader)->ReadMetadata(0);
    if (own.ok()) {
      md = std::move(own);
      rank_local = true;
    }
  }
  // A save without collectives: ReadMetadata(0) merged every rank's __{r}.metadata.
  if (md.ok() && !std::filesystem::exists(std::filesystem::path(path) / kMetadataFileName)) {
    rank_local = true;
  }
  if (!md.ok()) {
    std::cerr << "dcpp inspect: " << md.status().message() << "\n";
    return 1;
  }
  using nlohmann::json;
  json out;
  out["format"] = "dcp";
  out["path"] = path;
  out["version"] = md->version ? json(*md->version) : json(nullptr);
  out["rank_local"] = rank_local;
  if (md->storage_meta) {
    out["storage_meta"] = {{"checkpoint_id", md->storage_meta->checkpoint_id.value_or("")},
                           {"save_id", md->storage_meta->save_id.value_or("")}};
  }
  std::map<std::string, int64_t> files;
  int64_t tensor_bytes = 0, stored_bytes = 0;
  json entries = json::array();
  for (const auto& [fqn, m] : md->state_dict_metadata) {
    json e;
    e["key"] = fqn;
    if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
      e["kind"] = "tensor";
      e["dtype"] = std::string(DTypeName(t->properties.dtype));
      e["shape"] = t->size;
      const int64_t nbytes =
          NumElements(t->size) * static_cast<int64_t>(ElementSize(t->properties.dtype));
      e["nbytes"] = nbytes;
      tensor_bytes += nbytes;
      json chunks = json::array();
      for (const auto& c : t->chunks) {
        json cj = {{"offsets", c.offsets}, {"sizes", c.sizes}};
        auto info = md->FindStorage({fqn, c.offsets, std::nullopt});
        if (info.ok()) {
          cj["file"] = (*info)->relative_path;
          cj["offset"] = (*info)->offset;
          cj["length"] = (*info)->length;
          files[(*info)->relative_path] += (*info)->length;
          stored_bytes += (*info)->length;
        }
        chunks.push_back(cj);
      }
      e["chunks"] = chunks;
    } else {
      e["kind"] = "bytes";
      auto info = md->FindStorage({fqn, std::nullopt, std::nullopt});
      if (info.ok()) {
        e["file"] = (*info)->relative_path;
        e["offset"] = (*info)->offset;
        e["length"] = (*info)->length;
        files[(*info)->relative_path] += (*info)->length;
        stored_bytes += (*info)->length;
      }
    }
    entries.push_back(e);
  }
  out["entries"] = entries;
  json fj = json::array();
  for (const auto& [name, bytes] : files) fj.push_back({{"name", name}, {"bytes", bytes}});
  out["files"] = fj;
  out["total_tensor_bytes"] = tensor_bytes;
  out["total_stored_bytes"] = stored_bytes;
  if (as_json) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << path << ": DCP checkpoint, version " << (md->version ? *md->version : "none")
            << (rank_local ? " (rank-local metadata)" : "") << "\n";
  for (const auto& e : out["entries"]) {
    if (e["kind"] == "tensor") {
      std::cout << "  " << e["key"].get<std::string>() << "  " << e["dtype"].get<std::string>()
                << ShapeToString(e["shape"].get<Shape>()) << "  " << e["nbytes"].get<int64_t>()
                << " bytes  " << e["chunks"].size() << " chunk(s)\n";
      for (const auto& c : e["chunks"]) {
        std::cout << "      offsets " << ShapeToString(c["offsets"].get<Shape>()) << " sizes "
                  << ShapeToString(c["sizes"].get<Shape>());
        if (c.contains("file")) {
          std::cout << "  " << c["file"].get<std::string>() << " [" << c["offset"].get<int64_t>()
                    << ", +" << c["length"].get<int64_t>() << "]";
        }
        std::cout << "\n";
      }
    } else {
      std::cout << "  " << e["key"].get<std::string>() << "  bytes";
      if (e.contains("file")) {
        std::cout << "  " << e["file"].get<std::string>() << " [" << e["offset"].get<int64_t>()
                  << ", +" << e["length"].get<int64_t>() << "]";
      }
      std::cout << "\n";
    }
  }
  std::cout << "files:\n";
  for (const auto& [name, bytes] : files) std::cout << "  " << name << "  " << bytes << " bytes\n";
  std::cout << "total: " << out["entries"].size() << " entries, " << tensor_bytes
            << " tensor bytes, " << stored_bytes << " stored bytes\n";
  return 0;
}

}  // namespace dcpp::cli
