// Hugging Face safetensors layout: HuggingFaceStorageWriter/Reader and consolidation.
//
// Steps of a save (through dcpp::Save):
//   1. PrepareLocalPlan: refuse non-tensor items (safetensors holds tensors only).
//   2. PrepareGlobalPlan (coordinator): distributed saves give rank i the file prefix
//      "shard-{i+1:05d}-"; whole-tensor saves check that no two ranks write the same file and
//      that every item is a whole tensor.
//   3. WriteData: items grouped by output file (fqn_to_index_mapping); each file is written front
//      to back: header (with DCP_SHARDING_INFO, DCP_VERSION, format, as PyTorch writes), then the
//      tensor bytes streamed from the caller's memory; fsync'ed.
//   4. Finish (coordinator): whole-tensor saves write model.safetensors.index.json atomically
//      (the commit point); distributed saves write nothing, or consolidate sharded/ into whole
//      files and the index.
// A load rebuilds Metadata from the headers (chunk offsets from DCP_SHARDING_INFO, else zeros),
// then reads each requested box straight from its stored tensor's byte range.
//
// Consolidation is a pipeline per output file: the file's bytes are cut into windows of at most
// window_bytes (row-major boxes of one tensor); worker threads assemble windows from the shards'
// byte ranges into one of 2 x threads slots, and the calling thread appends them in order.
#include "dcpp/hf_storage.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "codec/safetensors.h"
#include "core/thread_pool.h"
#include "dcpp/chunk.h"
#include "dcpp/storage.h"

namespace dcpp {

namespace st = safetensors;
using Json = nlohmann::json;

namespace {

constexpr const char* kShardingInfoKey = "DCP_SHARDING_INFO";
constexpr const char* kDcpVersionKey = "DCP_VERSION";
constexpr const char* kDcpVersion = "1.0";
constexpr const char* kSuffix = ".safetensors";

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string Quote(std::string_view s) { return "\"" + std::string(s) + "\""; }

// fn(0..n-1) on the shared pool, at most `threads` at once; the first error by index.
Status ParallelFor(size_t n, int threads, const std::function<Status(size_t)>& fn) {
  return internal::FirstError(
      internal::ParallelFor(n, static_cast<size_t>(std::max(threads, 1)), fn));
}

int FileCount(const std::map<std::string, int>& mapping) {
  int n = 1;
  for (const auto& [fqn, i] : mapping) n = std::max(n, i);
  return n;
}

int FileIndex(const std::map<std::string, int>& mapping, const std::string& fqn) {
  auto it = mapping.find(fqn);
  return it == mapping.end() ? 1 : it->second;
}

// DCP_SHARDING_INFO as PyTorch's json.dumps writes it.
std::string ShardingInfo(const std::vector<std::pair<std::string, Shape>>& entries) {
  std::string s = "{";
  for (size_t i = 0; i < entries.size(); ++i) {
    if (i) s += ", ";
    s += st::PythonJsonString(entries[i].first) + ": {\"saved_offsets\": [";
    for (size_t d = 0; d < entries[i].second.size(); ++d) {
      if (d) s += ", ";
      s += std::to_string(entries[i].second[d]);
    }
    s += "]}";
  }
  return s + "}";
}

// fqn -> saved offsets from a header's DCP_SHARDING_INFO (empty map when absent).
Result<std::map<std::string, Shape>> ParseShardingInfo(const st::Header& h,
                                                       const std::string& what) {
  std::map<std::string, Shape> out;
  const std::string* info = h.FindMetadata(kShardingInfoKey);
  if (!info) return out;
  Json j;
  try {
    j = Json::parse(*info);
  } catch (const Json::exception& e) {
    return DataLossError(what + ": DCP_SHARDING_INFO is not JSON: " + e.what());
  }
  if (!j.is_object()) return DataLossError(what + ": DCP_SHARDING_INFO is not an object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const Json& v = it.value();
    auto so = v.is_object() ? v.find("saved_offsets") : v.end();
    if (!v.is_object() || so == v.end() || !so->is_array()) {
      return DataLossError(what + ": DCP_SHARDING_INFO of " + Quote(it.key()) +
                           " has no saved_offsets list");
    }
    Shape offsets;
    for (const Json& d : *so) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 62)) {
        return DataLossError(what + ": DCP_SHARDING_INFO of " + Quote(it.key()) +
                             " has a bad offset " + d.dump());
      }
      offsets.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    }
    out[it.key()] = std::move(offsets);
  }
  return out;
}

std::string IndexJson(const std::map<std::string, std::string>& weight_map, int64_t total) {
  nlohmann::ordered_json j;
  j["metadata"]["total_size"] = total;
  j["weight_map"] = nlohmann::ordered_json::object();
  for (const auto& [fqn, file] : weight_map) j["weight_map"][fqn] = file;
  return j.dump(2, ' ', /*ensure_ascii=*/true);
}

// A tensor's stored chunk in a set of safetensors files.
struct StoredChunk {
  size_t file = 0;  // index into the file list
  uint64_t at = 0;  // absolute byte offset of its data
  Shape offsets;    // global offsets
  Shape shape;
};

struct StoredTensor {
  st::Dtype dtype = st::Dtype::kF32;
  Shape size;
  std::vector<StoredChunk> chunks;
};

// Headers of `files` in `store`, grouped by tensor. Chunk offsets from DCP_SHARDING_INFO
// (required when `require_sharding_info`), else zeros. Tensor order: first appearance.
Status CollectTensors(Store& store, const std::vector<std::string>& files,
                      bool require_sharding_info,
                      std::vector<std::pair<std::string, StoredTensor>>& out,
                      std::vector<std::unique_ptr<ReadableFile>>* opened) {
  std::map<std::string, size_t> index;
  std::set<std::pair<std::string, Shape>> seen;
  for (size_t f = 0; f < files.size(); ++f) {
    const std::string what = store.Describe(files[f]);
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, store.OpenRead(files[f]));
    auto header = st::ReadHeader(*file);
    if (!header.ok()) return header.status();
    DCPP_ASSIGN_OR_RETURN(auto sharding, ParseShardingInfo(*header, what));
    if (require_sharding_info && !header->FindMetadata(kShardingInfoKey)) {
      return InvalidArgumentError(what +
                                  ": no DCP_SHARDING_INFO in its __metadata__ (not a "
                                  "file of a distributed save)");
    }
    // Header order is data order; keep it for the first-appearance order.
    for (const auto& t : header->tensors) {
      StoredChunk c{f, header->data_start() + t.begin, Shape(t.shape.size(), 0), t.shape};
      if (auto it = sharding.find(t.name); it != sharding.end()) {
        if (it->second.size() != t.shape.size()) {
          return DataLossError(what + ": tensor " + Quote(t.name) + " has saved_offsets " +
                               ShapeToString(it->second) + " for shape " + ShapeToString(t.shape));
        }
        c.offsets = it->second;
      }
      if (!seen.insert({t.name, c.offsets}).second) {
        return DataLossError(what + ": tensor " + Quote(t.name) + " chunk at " +
                             ShapeToString(c.offsets) + " is stored twice");
      }
      auto [it, inserted] = index.emplace(t.name, out.size());
      if (inserted) {
        out.emplace_back(t.name, StoredTensor{t.dtype, Shape(t.shape.size(), 0), {}});
      }
      StoredTensor& s = out[it->second].second;
      if (s.dtype != t.dtype || s.size.size() != t.shape.size()) {
        return DataLossError(what + ": tensor " + Quote(t.name) + " chunk is " +
                             std::string(st::DtypeName(t.dtype)) + " " + ShapeToString(t.shape) +
                             ", unlike its other chunks (" + std::string(st::DtypeName(s.dtype)) +
                             ", rank " + std::to_string(s.size.size()) + ")");
      }
      for (size_t d = 0; d < t.shape.size(); ++d) {
        s.size[d] = std::max(s.size[d], c.offsets[d] + c.shape[d]);
      }
      s.chunks.push_back(std::move(c));
    }
    if (opened) opened->push_back(std::move(file));
  }
  return Status::Ok();
}

// The chunks of every tensor must tile it exactly (else a load would read garbage).
Status CheckTiling(const std::vector<std::pair<std::string, StoredTensor>>& tensors,
                   const std::string& what) {
  Metadata md;
  for (const auto& [fqn, t] : tensors) {
    TensorStorageMetadata m;
    m.size = t.size;
    for (const auto& c : t.chunks) m.chunks.push_back({c.offsets, c.shape});
    md.state_dict_metadata[fqn] = std::move(m);
  }
  Status s = ValidateGlobalPlan(md, /*require_full_coverage=*/true);
  if (!s.ok()) return DataLossError(what + ": " + std::string(s.message()));
  return Status::Ok();
}

// Safetensors keys a reader of `store` should use: the index's files when there is an index,
// else every top-level *.safetensors, else those under sharded/.
Result<std::vector<std::string>> FindFiles(Store& store, const std::string& id) {
  DCPP_ASSIGN_OR_RETURN(bool has_index, store.Exists(kHfIndexFileName));
  std::set<std::string> files;
  if (has_index) {
    DCPP_ASSIGN_OR_RETURN(std::string bytes, store.ReadAll(kHfIndexFileName));
    const std::string what = store.Describe(kHfIndexFileName);
    Json j;
    try {
      j = Json::parse(bytes);
    } catch (const Json::exception& e) {
      return DataLossError(what + ": not JSON: " + e.what());
    }
    auto wm = j.is_object() ? j.find("weight_map") : j.end();
    if (wm == j.end() || !wm->is_object()) return DataLossError(what + ": no \"weight_map\"");
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return DataLossError(what + ": weight_map entry of " + Quote(it.key()) +
                             " is not a file name");
      }
      const std::string& f = it.value().get_ref<const std::string&>();
      Status valid = ValidateKey(f);
      if (!valid.ok()) return DataLossError(what + ": " + std::string(valid.message()));
      files.insert(f);
    }
    return std::vector<std::string>(files.begin(), files.end());
  }
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> keys, store.List());
  std::vector<std::string> top, sharded;
  const std::string prefix = std::string(kHfShardedDirName) + "/";
  for (const auto& k : keys) {
    if (!EndsWith(k, kSuffix)) continue;
    if (k.find('/') == std::string::npos) {
      top.push_back(k);
    } else if (k.rfind(prefix, 0) == 0 && k.find('/', prefix.size()) == std::string::npos) {
      sharded.push_back(k);
    }
  }
  if (top.empty()) top = std::move(sharded);
  if (top.empty()) return NotFoundError("no safetensors files in \"" + id + "\"");
  return top;
}

}  // namespace

std::string HfFileName(int index, int count, int shard_index) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", index, count);
  if (shard_index <= 0) return buf;
  char shard[32];
  std::snprintf(shard, sizeof shard, "shard-%05d-", shard_index);
  return std::string(shard) + buf;
}

// ------------------------------------------------------------------ writer

Result<std::unique_ptr<HuggingFaceStorageWriter>> HuggingFaceStorageWriter::Open(
    const std::string& path, HuggingFaceWriterOptions options) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, OpenStore(path, {.create = true}));
  auto w = std::make_unique<HuggingFaceStorageWriter>(store.get(), path, std::move(options));
  w->owned_store_ = std::move(store);
  return w;
}

HuggingFaceStorageWriter::HuggingFaceStorageWriter(Store* store, std::string checkpoint_id,
                                                   HuggingFaceWriterOptions options)
    : store_(store), checkpoint_id_(std::move(checkpoint_id)), options_(std::move(options)) {}

HuggingFaceStorageWriter::~HuggingFaceStorageWriter() = default;

Status HuggingFaceStorageWriter::SetUp(bool /*is_coordinator*/, int rank, bool use_collectives) {
  rank_ = rank;
  if (!use_collectives && !options_.save_distributed) {
    return InvalidArgumentError("a rank-local safetensors save must be distributed");
  }
  for (const auto& [fqn, i] : options_.fqn_to_index_mapping) {
    if (i < 1) {
      return InvalidArgumentError("fqn_to_index_mapping of \"" + fqn + "\" is " +
                                  std::to_string(i) + " (file indexes start at 1)");
    }
  }
  return store_->CreateDir();
}

Result<SavePlan> HuggingFaceStorageWriter::PrepareLocalPlan(SavePlan plan) {
  for (const auto& item : plan.items) {
    if (item.type == WriteItemType::kByteIO) {
      return InvalidArgumentError("safetensors holds tensors only, but \"" + item.index.fqn +
                                  "\" is not a tensor");
    }
  }
  if (options_.save_distributed) plan.storage_prefix = HfFileName(0, 0, rank_ + 1).substr(0, 12);
  return plan;
}

Result<std::vector<SavePlan>> HuggingFaceStorageWriter::PrepareGlobalPlan(
    std::vector<SavePlan> plans) {
  std::map<int, size_t> writer_of_file;
  for (size_t r = 0; r < plans.size(); ++r) {
    if (options_.save_distributed) {
      plans[r].storage_prefix = HfFileName(0, 0, static_cast<int>(r) + 1).substr(0, 12);
      continue;
    }
    plans[r].storage_prefix = "model-";
    for (const auto& item : plans[r].items) {
      const auto& td = item.tensor_data;
      if (td && td->chunk.sizes != td->size) {
        return InvalidArgumentError("\"" + item.index.fqn + "\" is saved in chunks (" +
                                    td->chunk.ToString() +
                                    "); whole-tensor safetensors files need save_distributed");
      }
      const int f = FileIndex(options_.fqn_to_index_mapping, item.index.fqn);
      auto [it, inserted] = writer_of_file.emplace(f, r);
      if (!inserted && it->second != r) {
        return InvalidArgumentError(
            "ranks " + std::to_string(it->second) + " and " + std::to_string(r) +
            " would both write " + HfFileName(f, FileCount(options_.fqn_to_index_mapping)) +
            "; use save_distributed or an fqn_to_index_mapping that gives each rank its files");
      }
    }
  }
  return plans;
}

Result<std::vector<WriteResult>> HuggingFaceStorageWriter::WriteData(const SavePlan& plan,
                                                                     SavePlanner& planner) {
  if (plan.storage_prefix.empty()) return InternalError("save plan without a file prefix");
  const int count = FileCount(options_.fqn_to_index_mapping);
  std::map<int, std::vector<size_t>> by_file;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    by_file[FileIndex(options_.fqn_to_index_mapping, plan.items[i].index.fqn)].push_back(i);
  }
  std::vector<dcpp::WriteData> data(plan.items.size());
  for (size_t i = 0; i < plan.items.size(); ++i) {
    DCPP_ASSIGN_OR_RETURN(data[i], planner.ResolveData(plan.items[i]));
  }
  std::vector<std::pair<int, std::vector<size_t>>> files(by_file.begin(), by_file.end());
  std::vector<std::vector<WriteResult>> results(files.size());
  const bool distributed = options_.save_distributed;
  const std::string dir =
      distributed && options_.enable_consolidation ? std::string(kHfShardedDirName) + "/" : "";

  Status s = ParallelFor(files.size(), options_.thread_count, [&](size_t f) -> Status {
    const auto& [index, items] = files[f];
    const std::string name =
        dir + (distributed ? plan.storage_prefix : "") + HfFileName(index, count);
    std::vector<st::TensorSpec> specs;
    std::vector<std::pair<std::string, Shape>> sharding;
    for (size_t i : items) {
      const WriteItem& item = plan.items[i];
      const TensorView& v = data[i].tensor;
      DCPP_ASSIGN_OR_RETURN(st::Dtype dtype, st::FromTorchDType(v.dtype()));
      specs.push_back({item.index.fqn, dtype, v.shape()});
      sharding.emplace_back(item.index.fqn, item.tensor_data ? item.tensor_data->chunk.offsets
                                                             : Shape(v.shape().size(), 0));
    }
    auto layout = st::LayoutHeader(std::move(specs), {{kShardingInfoKey, ShardingInfo(sharding)},
                                                      {kDcpVersionKey, kDcpVersion},
                                                      {"format", "pt"}});
    if (!layout.ok()) return layout.status().WithContext("writing \"" + name + "\"");
    st::Header header = *std::move(layout);
    const std::string head = st::EncodeHeader(header);
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, store_->OpenWrite(name));
    DCPP_RETURN_IF_ERROR(file->Append(head.data(), head.size()));
    std::map<std::string, size_t> item_of;
    for (size_t i : items) item_of[plan.items[i].index.fqn] = i;
    for (const auto& t : header.tensors) {
      const size_t i = item_of.at(t.name);
      Status w = st::WriteTensorData(*file, data[i].tensor);
      if (!w.ok()) return w.WithContext("writing \"" + name + "\" tensor \"" + t.name + "\"");
      results[f].push_back({plan.items[i].index, static_cast<int64_t>(t.nbytes()),
                            StorageInfo{name,
                                        static_cast<int64_t>(header.data_start() + t.begin),
                                        static_cast<int64_t>(t.nbytes()),
                                        {}}});
    }
    if (options_.sync_files) {
      DCPP_RETURN_IF_ERROR(file->Sync().WithContext("syncing \"" + name + "\""));
    }
    return file->Close().WithContext("closing \"" + name + "\"");
  });
  DCPP_RETURN_IF_ERROR(s);
  std::vector<WriteResult> all;
  for (auto& r : results) {
    for (auto& w : r) all.push_back(std::move(w));
  }
  return all;
}

Status HuggingFaceStorageWriter::Finish(Metadata& /*metadata*/,
                                        const std::vector<std::vector<WriteResult>>& results) {
  if (options_.save_distributed) {
    if (!options_.enable_consolidation) return Status::Ok();  // as PyTorch: no index
    ConsolidateOptions c;
    c.fqn_to_index_mapping = options_.fqn_to_index_mapping;
    c.thread_count = options_.thread_count_consolidation;
    c.sync_files = options_.sync_files;
    c.input_dir = kHfShardedDirName;
    return ConsolidateSafetensors(*store_, *store_, c).status();
  }
  std::map<std::string, std::string> weight_map;
  int64_t total = 0;
  for (const auto& rank_results : results) {
    for (const auto& r : rank_results) {
      weight_map[r.index.fqn] = r.storage_data.relative_path;
      total += r.size_in_bytes;
    }
  }
  return store_->WriteAtomic(kHfIndexFileName, IndexJson(weight_map, total))
      .WithContext("committing \"" + std::string(kHfIndexFileName) + "\"");
}

// ------------------------------------------------------------------ reader

struct HuggingFaceStorageReader::State {
  std::map<MetadataIndex, Piece> pieces;
  const Metadata* metadata = nullptr;
};

Result<std::unique_ptr<HuggingFaceStorageReader>> HuggingFaceStorageReader::Open(
    const std::string& path, HuggingFaceReaderOptions options) {
  std::vector<std::string> files;
  std::unique_ptr<Store> store;
  if (EndsWith(path, kSuffix)) {
    DCPP_ASSIGN_OR_RETURN(StoreFile file, OpenStoreFile(path));
    store = std::move(file.store);
    files.push_back(std::move(file.key));
  } else {
    DCPP_ASSIGN_OR_RETURN(store, OpenStore(path));
  }
  auto r = std::make_unique<HuggingFaceStorageReader>(store.get(), path, options, std::move(files));
  r->owned_store_ = std::move(store);
  return r;
}

HuggingFaceStorageReader::HuggingFaceStorageReader(Store* store, std::string checkpoint_id,
                                                   HuggingFaceReaderOptions options,
                                                   std::vector<std::string> files)
    : store_(store),
      checkpoint_id_(std::move(checkpoint_id)),
      options_(options),
      files_(std::move(files)),
      state_(std::make_unique<State>()) {}

HuggingFaceStorageReader::~HuggingFaceStorageReader() = default;

const std::map<MetadataIndex, HuggingFaceStorageReader::Piece>& HuggingFaceStorageReader::pieces()
    const {
  return state_->pieces;
}

Result<Metadata> HuggingFaceStorageReader::ReadMetadata(int /*rank*/) {
  std::vector<std::string> files = files_;
  if (files.empty()) {
    DCPP_ASSIGN_OR_RETURN(files, FindFiles(*store_, checkpoint_id_));
  }
  std::vector<std::pair<std::string, StoredTensor>> tensors;
  DCPP_RETURN_IF_ERROR(CollectTensors(*store_, files, false, tensors, nullptr)
                           .WithContext("reading \"" + checkpoint_id_ + "\""));
  DCPP_RETURN_IF_ERROR(CheckTiling(tensors, "reading \"" + checkpoint_id_ + "\""));
  Metadata md;
  state_->pieces.clear();
  for (const auto& [fqn, t] : tensors) {
    auto dtype = st::ToTorchDType(t.dtype);
    if (!dtype) {
      return UnimplementedError("reading \"" + checkpoint_id_ + "\": tensor \"" + fqn + "\" is " +
                                std::string(st::DtypeName(t.dtype)) +
                                ", which has no torch dtype in dcpp");
    }
    TensorStorageMetadata m;
    m.properties.dtype = *dtype;
    m.size = t.size;
    for (size_t k = 0; k < t.chunks.size(); ++k) {
      const StoredChunk& c = t.chunks[k];
      m.chunks.push_back({c.offsets, c.shape});
      MetadataIndex index{fqn, c.offsets, static_cast<int64_t>(k)};
      const uint64_t n = *st::ByteLength(t.dtype, c.shape);
      md.storage_data[index] =
          StorageInfo{files[c.file], static_cast<int64_t>(c.at), static_cast<int64_t>(n), {}};
      state_->pieces[index] = Piece{files[c.file], c.at, c.shape, *dtype};
    }
    md.state_dict_metadata[fqn] = std::move(m);
  }
  return md;
}

Status HuggingFaceStorageReader::SetUp(const Metadata& metadata, bool /*is_coordinator*/,
                                       int /*rank*/) {
  state_->metadata = &metadata;
  if (state_->pieces.empty() && !metadata.storage_data.empty()) {
    return FailedPreconditionError("HuggingFaceStorageReader::SetUp before ReadMetadata");
  }
  return Status::Ok();
}

Status HuggingFaceStorageReader::ReadData(const LoadPlan& plan, LoadPlanner& planner) {
  std::map<std::string, std::vector<std::pair<const ReadItem*, const Piece*>>> by_file;
  for (const auto& item : plan.items) {
    if (item.type != LoadItemType::kTensor) {
      return InternalError("safetensors checkpoint asked for a bytes item \"" +
                           item.storage_index.ToString() + "\"");
    }
    auto it = state_->pieces.find(item.storage_index);
    if (it == state_->pieces.end()) {
      return NotFoundError("\"" + checkpoint_id_ + "\" has no chunk \"" +
                           item.storage_index.ToString() + "\"");
    }
    by_file[it->second.file].push_back({&item, &it->second});
  }
  std::vector<const decltype(by_file)::value_type*> work;
  for (const auto& e : by_file) work.push_back(&e);
  std::mutex planner_mu;  // planners are single-threaded
  DCPP_RETURN_IF_ERROR(ParallelFor(work.size(), options_.thread_count, [&](size_t w) -> Status {
    const std::string& name = work[w]->first;
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> file, store_->OpenRead(name));
    for (const auto& [item, piece] : work[w]->second) {
      TensorView dst;
      {
        std::lock_guard<std::mutex> lock(planner_mu);
        DCPP_ASSIGN_OR_RETURN(dst, planner.ResolveTensor(*item));
      }
      const std::string what =
          "reading \"" + store_->Describe(name) + "\" tensor \"" + item->storage_index.fqn + "\"";
      if (dst.dtype() != piece->dtype) {
        return InvalidArgumentError(what + ": stored " + std::string(DTypeName(piece->dtype)) +
                                    " but the destination is " +
                                    std::string(DTypeName(dst.dtype())));
      }
      Status s = st::ReadBoxInto(*file, piece->at, piece->dtype, piece->shape,
                                 item->storage_offsets, dst, item->dest_offsets, item->lengths);
      if (!s.ok()) return s.WithContext(what);
    }
    return Status::Ok();
  }));
  return planner.Finish();
}

// ------------------------------------------------------------------ consolidation

Result<ConsolidateReport> ConsolidateSafetensors(Store& input, Store& output,
                                                 const ConsolidateOptions& options) {
  const std::string prefix = options.input_dir.empty() ? "" : options.input_dir + "/";
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> keys, input.List());
  std::vector<std::string> files;
  for (const auto& k : keys) {
    if (k.rfind(prefix, 0) == 0 && EndsWith(k, kSuffix) &&
        k.find('/', prefix.size()) == std::string::npos) {
      files.push_back(k);
    }
  }
  const std::string where = "consolidating \"" + input.Describe(options.input_dir) + "\"";
  if (files.empty()) return NotFoundError(where + ": no safetensors files");
  std::vector<std::pair<std::string, StoredTensor>> tensors;
  std::vector<std::unique_ptr<ReadableFile>> opened;
  DCPP_RETURN_IF_ERROR(CollectTensors(input, files, true, tensors, &opened).WithContext(where));
  DCPP_RETURN_IF_ERROR(CheckTiling(tensors, where));

  const int count = FileCount(options.fqn_to_index_mapping);
  std::map<int, std::vector<const std::pair<std::string, StoredTensor>*>> by_file;
  for (const auto& t : tensors) {
    if (!st::ToTorchDType(t.second.dtype)) {
      return UnimplementedError(where + ": tensor \"" + t.first + "\" is " +
                                std::string(st::DtypeName(t.second.dtype)));
    }
    by_file[FileIndex(options.fqn_to_index_mapping, t.first)].push_back(&t);
  }
  const int threads = std::max(options.thread_count, 1);
  const size_t slots = 2 * static_cast<size_t>(threads);
  const uint64_t window = std::max<uint64_t>(options.window_bytes, 64);
  ConsolidateReport report;
  // Windows in flight, plus each worker's bounded read piece (ReadBoxInto's 8 MiB).
  report.buffer_bound_bytes = slots * window + static_cast<uint64_t>(threads) * (8 << 20);
  std::map<std::string, std::string> weight_map;

  for (const auto& [index, list] : by_file) {
    const std::string name = HfFileName(index, count);
    std::vector<st::TensorSpec> specs;
    std::map<std::string, const StoredTensor*> stored;
    for (const auto* t : list) {
      specs.push_back({t->first, t->second.dtype, t->second.size});
      stored[t->first] = &t->second;
    }
    DCPP_ASSIGN_OR_RETURN(st::Header header, st::LayoutHeader(std::move(specs), {}));
    const std::string head = st::EncodeHeader(header);

    // The windows of this file, in file order.
    struct Job {
      const StoredTensor* tensor;
      DType dtype;
      Shape offsets, sizes;
      uint64_t nbytes;
    };
    std::vector<Job> jobs;
    for (const auto& t : header.tensors) {
      const StoredTensor* s = stored.at(t.name);
      const DType dtype = *st::ToTorchDType(t.dtype);
      const size_t elem = ElementSize(dtype);
      DCPP_RETURN_IF_ERROR(
          st::ForEachContiguousBox(s->size, elem, window, [&](const Shape& off, const Shape& size) {
            jobs.push_back({s, dtype, off, size, static_cast<uint64_t>(NumElements(size)) * elem});
            return Status::Ok();
          }));
      weight_map[t.name] = name;
      report.bytes += static_cast<int64_t>(t.nbytes());
      ++report.tensors;
    }

    auto fill = [&](const Job& job, std::byte* buf) -> Status {
      const TensorView dst(buf, job.dtype, job.sizes);
      const ChunkBox box{job.offsets, job.sizes};
      for (const StoredChunk& c : job.tensor->chunks) {
        auto ov = job.sizes.empty() ? std::optional<ChunkBox>(box)
                                    : Intersect(box, ChunkBox{c.offsets, c.shape});
        if (!ov) continue;
        Shape src_off(ov->offsets.size()), dst_off(ov->offsets.size());
        for (size_t d = 0; d < src_off.size(); ++d) {
          src_off[d] = ov->offsets[d] - c.offsets[d];
          dst_off[d] = ov->offsets[d] - job.offsets[d];
        }
        DCPP_RETURN_IF_ERROR(st::ReadBoxInto(*opened[c.file], c.at, job.dtype, c.shape, src_off,
                                             dst, dst_off, ov->sizes));
      }
      return Status::Ok();
    };

    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> out, output.OpenWrite(name));
    DCPP_RETURN_IF_ERROR(out->Append(head.data(), head.size()));
    // Pipeline: workers fill slot j % slots for window j once window j - slots is written.
    std::vector<std::shared_ptr<Storage>> buffers(slots);
    std::vector<char> ready(slots, 0);
    std::vector<Status> slot_status(slots);
    std::mutex mu;
    std::condition_variable cv;
    size_t next = 0, written = 0;
    bool stop = false;
    auto worker = [&] {
      while (true) {
        size_t j;
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return stop || next >= jobs.size() || next < written + slots; });
          if (stop || next >= jobs.size()) return;
          j = next++;
        }
        const size_t s = j % slots;
        if (!buffers[s]) buffers[s] = Storage::AllocateUninitialized(window);
        Status st = fill(jobs[j], buffers[s]->data());
        {
          std::lock_guard<std::mutex> lock(mu);
          slot_status[s] = std::move(st);
          ready[s] = 1;
        }
        cv.notify_all();
      }
    };
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
    Status status;
    for (size_t j = 0; j < jobs.size() && status.ok(); ++j) {
      const size_t s = j % slots;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return ready[s] != 0; });
        status = slot_status[s];
      }
      if (status.ok()) status = out->Append(buffers[s]->data(), jobs[j].nbytes);
      {
        std::lock_guard<std::mutex> lock(mu);
        ready[s] = 0;
        ++written;
        if (!status.ok()) stop = true;
      }
      cv.notify_all();
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    for (auto& th : pool) th.join();
    DCPP_RETURN_IF_ERROR(status.WithContext(where + " into \"" + output.Describe(name) + "\""));
    if (options.sync_files) DCPP_RETURN_IF_ERROR(out->Sync());
    DCPP_RETURN_IF_ERROR(out->Close());
    ++report.files;
  }
  DCPP_RETURN_IF_ERROR(output.WriteAtomic(kHfIndexFileName, IndexJson(weight_map, report.bytes)));
  return report;
}

Result<ConsolidateReport> ConsolidateSafetensorsFiles(const std::string& input_dir,
                                                      const std::string& output_dir,
                                                      const ConsolidateOptions& options) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> in, OpenStore(input_dir));
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> out, OpenStore(output_dir, {.create = true}));
  ConsolidateOptions o = options;
  o.input_dir.clear();
  return ConsolidateSafetensors(*in, *out, o);
}

}  // namespace dcpp
