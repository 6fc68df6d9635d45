// `dcpp inspect` of safetensors: one file, or a directory of them (Hugging Face shards with an
// index, or DCP's sharded output). Every header is validated; tensors are listed with dtype,
// shape, byte range and, for DCP shards, their global offsets. No tensor bytes are read.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string_view>

#include "codec/safetensors.h"
#include "dcpp/storage.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {

int InspectSafetensors(const std::string& path, bool as_json) {
  using json = nlohmann::ordered_json;
  auto fail = [](const Status& s) {
    std::cerr << "dcpp inspect: " << s.ToString() << "\n";
    return 1;
  };
  auto ends_with = [](const std::string& s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
  };
  // The store and the keys to show: one file, or the directory's (and its sharded/) files.
  std::unique_ptr<Store> store;
  std::vector<std::string> files;
  if (ends_with(path, ".safetensors")) {
    auto file = OpenStoreFile(path);
    if (!file.ok()) return fail(file.status());
    store = std::move(file->store);
    files.push_back(file->key);
  } else {
    auto dir = OpenStore(path);
    if (!dir.ok()) return fail(dir.status());
    store = *std::move(dir);
    auto keys = store->List();
    if (!keys.ok()) return fail(keys.status());
    for (const auto& k : *keys) {
      const bool top = k.find('/') == std::string::npos ||
                       (k.rfind("sharded/", 0) == 0 && k.find('/', 8) == std::string::npos);
      if (top && ends_with(k, ".safetensors")) files.push_back(k);
    }
  }
  json out;
  out["format"] = "safetensors";
  out["path"] = path;
  json jfiles = json::array();
  uint64_t total_bytes = 0, total_tensors = 0;
  for (const auto& f : files) {
    auto src = store->OpenRead(f);
    if (!src.ok()) return fail(src.status());
    auto h = safetensors::ReadHeader(**src);
    if (!h.ok()) return fail(h.status());
    json jf;
    jf["file"] = f;
    jf["header_bytes"] = h->header_size;
    jf["data_bytes"] = h->data_size;
    json meta = json::object();
    for (const auto& [k, v] : h->metadata) meta[k] = v;
    jf["metadata"] = meta;
    json offsets = json::object();
    if (const std::string* info = h->FindMetadata("DCP_SHARDING_INFO")) {
      offsets = json::parse(*info, nullptr, /*allow_exceptions=*/false);
    }
    json tensors = json::array();
    for (const auto& t : h->tensors) {
      json jt;
      jt["name"] = t.name;
      jt["dtype"] = std::string(safetensors::DtypeName(t.dtype));
      jt["shape"] = t.shape;
      jt["data_offsets"] = {t.begin, t.end};
      jt["nbytes"] = t.nbytes();
      if (offsets.is_object() && offsets.contains(t.name) && offsets[t.name].is_object()) {
        jt["saved_offsets"] = offsets[t.name].value("saved_offsets", json::array());
      }
      tensors.push_back(std::move(jt));
      total_bytes += t.nbytes();
      ++total_tensors;
    }
    jf["tensors"] = std::move(tensors);
    jfiles.push_back(std::move(jf));
  }
  out["files"] = std::move(jfiles);
  out["tensor_count"] = total_tensors;
  out["total_tensor_bytes"] = total_bytes;
  if (as_json) {
    std::cout << out.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    return 0;
  }
  std::cout << path << ": safetensors, " << files.size() << " file(s)\n";
  for (const auto& jf : out["files"]) {
    std::cout << "  " << jf["file"].get<std::string>() << "  (" << jf["data_bytes"]
              << " data bytes, header " << jf["header_bytes"] << ")";
    if (!jf["metadata"].empty()) std::cout << "  metadata " << jf["metadata"].dump();
    std::cout << "\n";
    for (const auto& t : jf["tensors"]) {
      std::cout << "    " << t["name"].get<std::string>() << "  " << t["dtype"].get<std::string>()
                << t["shape"].dump() << "  " << t["nbytes"] << " B";
      if (t.contains("saved_offsets")) std::cout << "  at " << t["saved_offsets"].dump();
      std::cout << "\n";
    }
  }
  std::cout << "total: " << total_tensors << " tensors, " << total_bytes << " bytes\n";
  return 0;
}

}  // namespace dcpp::cli
