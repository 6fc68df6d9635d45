// `dcpp inspect PATH [--json | --svg OUT]`: what a checkpoint holds, without reading tensor bytes.
// A directory is a DCP checkpoint (inspect_dcp.cc); a file is a torch.save archive: every leaf's
// key path, dtype, shape, layout, size and storage record, plain values inline, and totals.
// The JSON schema is in docs/cli.md.
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>

#include "codec/torch_save.h"
#include "dcpp/convert.h"
#include "dcpp/storage.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {
namespace {

using json = nlohmann::ordered_json;  // keys in insertion order

std::string Hex(const std::string& bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

// Plain values as JSON: None → null, lists and tuples → arrays, dicts with str keys → objects
// (others → arrays of [key, value] pairs), bytes → {"bytes": hex}, non-finite floats → strings,
// uninterpreted objects → {"object": "module.name"}.
json ValueToJson(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNone:
      return nullptr;
    case Value::Kind::kBool:
      return v.as_bool();
    case Value::Kind::kInt:
      return v.as_int();
    case Value::Kind::kFloat: {
      const double d = v.as_float();
      if (std::isnan(d)) return "nan";
      if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
      return d;
    }
    case Value::Kind::kStr:
      return v.as_str();
    case Value::Kind::kBytes:
      return json{{"bytes", Hex(v.as_bytes())}};
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      json a = json::array();
      for (const Value& x : v.items()) a.push_back(ValueToJson(x));
      return a;
    }
    case Value::Kind::kDict: {
      bool str_keys = true;
      for (const auto& [k, x] : v.dict()) str_keys = str_keys && k.is_str();
      if (str_keys) {
        json o = json::object();
        for (const auto& [k, x] : v.dict()) o[k.as_str()] = ValueToJson(x);
        return o;
      }
      json a = json::array();
      for (const auto& [k, x] : v.dict())
        a.push_back(json::array({ValueToJson(k), ValueToJson(x)}));
      return a;
    }
    case Value::Kind::kOpaque:
      return json{{"object", v.opaque().type_name}};
    case Value::Kind::kTensor:
    case Value::Kind::kShardedTensor:
      return json{{"object", std::string(KindName(v.kind()))}};
  }
  return nullptr;
}

std::string Display(const std::string& key) { return key.empty() ? "(root)" : key; }

int InspectTorchSave(const std::string& path, bool as_json) {
  auto fail = [&](const Status& s) {
    std::cerr << "dcpp inspect: " << path << ": " << s.ToString() << "\n";
    return 1;
  };
  auto file = OpenStoreFile(path);
  if (!file.ok()) return fail(file.status());
  auto source = file->store->OpenRead(file->key);
  if (!source.ok()) return fail(source.status());
  auto archive = TorchSaveArchive::Open(**source);
  if (!archive.ok()) return fail(archive.status());
  auto leaves = archive->Leaves(/*opaque_objects=*/true);
  if (!leaves.ok()) return fail(leaves.status());

  uint64_t tensor_bytes = 0, tensor_count = 0, storage_bytes = 0;
  std::set<std::string> storages;
  for (const TorchSaveLeaf& l : *leaves) {
    if (!l.is_tensor) continue;
    ++tensor_count;
    tensor_bytes += l.tensor.nbytes();
    storages.insert(l.tensor.storage_key);
  }
  for (const std::string& key : storages)
    storage_bytes += archive->records().at("data/" + key).size;

  if (as_json) {
    json entries = json::array();
    for (const TorchSaveLeaf& l : *leaves) {
      json e;
      e["key"] = l.key;
      if (l.is_tensor) {
        const TorchSaveTensorRef& t = l.tensor;
        e["kind"] = "tensor";
        e["dtype"] = std::string(DTypeName(t.dtype));
        e["shape"] = t.shape;
        e["strides"] = t.strides;
        e["storage_offset"] = t.storage_offset;
        e["contiguous"] = t.is_contiguous();
        e["nbytes"] = t.nbytes();
        e["storage"] = t.storage_key;
        e["requires_grad"] = t.requires_grad;
      } else {
        e["kind"] = "value";
        e["value"] = ValueToJson(l.value);
      }
      entries.push_back(std::move(e));
    }
    json out;
    out["format"] = "torch_save";
    out["path"] = path;
    out["archive"] = archive->prefix();
    out["version"] = archive->version();
    out["byteorder"] = archive->big_endian() ? "big" : "little";
    out["records"] = archive->RecordNames();
    out["entries"] = std::move(entries);
    out["tensor_count"] = tensor_count;
    out["total_tensor_bytes"] = tensor_bytes;
    out["storage_count"] = storages.size();
    out["total_storage_bytes"] = storage_bytes;
    std::cout << out.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    return 0;
  }

  std::cout << path << ": torch.save archive \"" << archive->prefix() << "\", version "
            << archive->version() << (archive->big_endian() ? ", big-endian" : "") << ", "
            << archive->RecordNames().size() << " records\n";
  for (const TorchSaveLeaf& l : *leaves) {
    if (l.is_tensor) {
      const TorchSaveTensorRef& t = l.tensor;
      std::cout << "  " << Display(l.key) << "  " << DTypeName(t.dtype) << ShapeToString(t.shape)
                << "  " << t.nbytes() << " B  storage " << t.storage_key;
      if (!t.is_contiguous()) std::cout << "  strides " << ShapeToString(t.strides);
      if (t.storage_offset != 0) std::cout << "  offset " << t.storage_offset;
      if (t.requires_grad) std::cout << "  requires_grad";
      std::cout << "\n";
    } else {
      std::string text = ValueToJson(l.value).dump(-1, ' ', false, json::error_handler_t::replace);
      if (text.size() > 200) text = text.substr(0, 197) + "...";
      std::cout << "  " << Display(l.key) << " = " << text << "\n";
    }
  }
  std::cout << "total: " << tensor_count << " tensors, " << tensor_bytes << " bytes in "
            << storages.size() << " storages (" << storage_bytes << " bytes stored)\n";
  return 0;
}

}  // namespace

void RegisterInspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Show the contents of a checkpoint");
  auto path = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  auto svg = std::make_shared<std::string>();
  auto match = std::make_shared<std::string>();
  auto against = std::make_shared<std::string>();
  auto ranks = std::make_shared<int>(0);
  auto dim = std::make_shared<int>(0);
  cmd->add_option("path", *path, "torch.save file or DCP directory")->required();
  cmd->add_flag("--json", *as_json, "Print a JSON object (schema in docs/cli.md)");
  auto* svg_opt = cmd->add_option("--svg", *svg, "Draw the shard map of a DCP checkpoint as SVG");
  cmd->add_option("--match", *match, "With --svg: only keys matching this glob")->needs(svg_opt);
  cmd->add_option("--against", *against,
                  "With --svg: overlay the boxes a loader wants, ranks=N[,dim=D]")
      ->needs(svg_opt);
  cmd->add_option("--ranks", *ranks, "With --svg: shorthand for --against ranks=N")->needs(svg_opt);
  cmd->add_option("--dim", *dim, "With --ranks: the dim the loader shards along (default 0)");
  cmd->callback([=] {
    auto format = DetectFormat(*path);
    if (!format.ok()) {
      std::cerr << "dcpp inspect: " << format.status().ToString() << "\n";
      SetExitCode(1);
    } else if (!svg->empty()) {
      if (*format != CheckpointFormat::kDcp) {
        std::cerr << "dcpp inspect: --svg needs a DCP checkpoint directory\n";
        SetExitCode(2);
        return;
      }
      std::string spec = *against;
      if (spec.empty() && *ranks > 0) {
        spec = "ranks=" + std::to_string(*ranks) + ",dim=" + std::to_string(*dim);
      }
      SetExitCode(InspectSvg(*path, *svg, *match, spec));
    } else if (*format == CheckpointFormat::kDcp) {
      SetExitCode(InspectDcp(*path, *as_json));
    } else {
      SetExitCode(InspectTorchSave(*path, *as_json));
    }
  });
}

}  // namespace dcpp::cli
