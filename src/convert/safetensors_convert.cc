// Conversions between safetensors (Hugging Face) and DCP / torch.save.
//
// To safetensors: tensors are assigned to files in source order (a new file when max_shard_size
// would be exceeded), then each file is written front to back: header, then each tensor read from
// the source and streamed out (one tensor in memory at a time). The index json is written last,
// atomically, as the commit mark.
// From safetensors to DCP: every file is memory-mapped read-only and its tensors (or, for DCP's
// sharded output, their chunks as a sharded tensor) are saved straight from the mapping.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "codec/safetensors.h"
#include "convert/torch_file.h"
#include "dcpp/checkpoint.h"
#include "dcpp/convert.h"
#include "dcpp/hf_storage.h"
#include "dcpp/storage.h"

namespace dcpp {

namespace st = safetensors;

namespace {

// The store and the files a safetensors path or URL names (one ".safetensors" file, or a
// directory's files).
struct HfPath {
  std::unique_ptr<Store> store;
  std::vector<std::string> files;  // empty: let the reader find them
};

Result<HfPath> SplitPath(const std::string& path) {
  HfPath p;
  if (path.size() > 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0) {
    DCPP_ASSIGN_OR_RETURN(StoreFile file, OpenStoreFile(path));
    p.store = std::move(file.store);
    p.files.push_back(std::move(file.key));
  } else {
    DCPP_ASSIGN_OR_RETURN(p.store, OpenStore(path));
  }
  return p;
}

class SafetensorsSource final : public CheckpointSource {
 public:
  static Result<std::unique_ptr<CheckpointSource>> Open(const std::string& path) {
    auto s = std::unique_ptr<SafetensorsSource>(new SafetensorsSource());
    DCPP_ASSIGN_OR_RETURN(HfPath p, SplitPath(path));
    s->store_ = std::move(p.store);
    s->reader_ = std::make_unique<HuggingFaceStorageReader>(s->store_.get(), path,
                                                            HuggingFaceReaderOptions{}, p.files);
    DCPP_ASSIGN_OR_RETURN(s->metadata_, s->reader_->ReadMetadata());
    DCPP_RETURN_IF_ERROR(s->reader_->SetUp(s->metadata_, true, 0));
    for (const auto& [fqn, m] : s->metadata_.state_dict_metadata) {
      const auto& t = std::get<TensorStorageMetadata>(m);
      EntryInfo e;
      e.fqn = fqn;
      e.path = {fqn};
      e.is_tensor = true;
      e.dtype = t.properties.dtype;
      e.shape = t.size;
      e.nbytes = NumElements(t.size) * static_cast<int64_t>(ElementSize(e.dtype));
      s->entries_.push_back(std::move(e));
    }
    return std::unique_ptr<CheckpointSource>(std::move(s));
  }

  CheckpointFormat format() const override { return CheckpointFormat::kSafetensors; }
  const std::vector<EntryInfo>& entries() const override { return entries_; }

  Result<Value> Read(const EntryInfo& entry) override {
    Value sd = Value::MakeDict();
    sd.Set(entry.fqn, Value::FromTensor(Tensor::Zeros(entry.dtype, entry.shape)));
    DefaultLoadPlanner planner({.flatten_state_dict = false});
    DCPP_RETURN_IF_ERROR(planner.SetUp(&sd, metadata_, true));
    DCPP_ASSIGN_OR_RETURN(LoadPlan plan, planner.CreateLocalPlan());
    DCPP_RETURN_IF_ERROR(reader_->ReadData(plan, planner));
    return std::move(*sd.Find(entry.fqn));
  }

 private:
  SafetensorsSource() = default;
  std::unique_ptr<Store> store_;
  std::unique_ptr<HuggingFaceStorageReader> reader_;
  Metadata metadata_;
  std::vector<EntryInfo> entries_;
};

// A read-only mapping of a whole file, unmapped when the last tensor over it goes.
struct Mapping {
  void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data && size) ::munmap(data, size);
  }
};

Result<std::shared_ptr<Mapping>> MapFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, "opening \"" + path + "\"");
  struct stat sb;
  if (::fstat(fd, &sb) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoToStatus(err, "stat \"" + path + "\"");
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<size_t>(sb.st_size);
  if (m->size > 0) {
    void* p = ::mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return ErrnoToStatus(err, "mapping \"" + path + "\"");
    }
    ::madvise(p, m->size, MADV_SEQUENTIAL);
    m->data = p;
  }
  ::close(fd);
  return m;
}

// Reads boxes of a DCP checkpoint's tensors into a reused window buffer.
struct DcpWindows {
  static constexpr uint64_t kWindow = 16 << 20;
  std::unique_ptr<FileSystemReader> reader;
  Metadata metadata;
  std::shared_ptr<Storage> buffer;

  static Result<std::unique_ptr<DcpWindows>> Open(const std::string& path) {
    auto w = std::make_unique<DcpWindows>();
    DCPP_ASSIGN_OR_RETURN(w->reader, FileSystemReader::Open(path));
    auto md = w->reader->ReadMetadata();
    if (!md.ok() && md.status().code() == StatusCode::kNotFound) md = w->reader->ReadMetadata(0);
    DCPP_ASSIGN_OR_RETURN(w->metadata, std::move(md));
    DCPP_RETURN_IF_ERROR(w->reader->SetUp(w->metadata, true, 0));
    w->buffer = Storage::AllocateUninitialized(kWindow);
    return w;
  }
};

// Appends tensor `e` of a DCP checkpoint to `sink` in row-major windows.
Status StreamDcpTensor(DcpWindows& w, const EntryInfo& e, ByteSink& sink,
                       const ProgressFn& progress, int64_t& done, int64_t total) {
  const size_t elem = ElementSize(e.dtype);
  return st::ForEachContiguousBox(
      e.shape, elem, DcpWindows::kWindow, [&](const Shape& off, const Shape& size) -> Status {
        DCPP_ASSIGN_OR_RETURN(Tensor window, Tensor::FromStorage(w.buffer, e.dtype, size));
        Value sd = Value::MakeDict();
        sd.Set(e.fqn, Value::FromSharded({e.dtype, e.shape, {{off, window}}}));
        DefaultLoadPlanner planner({.flatten_state_dict = false});
        DCPP_RETURN_IF_ERROR(planner.SetUp(&sd, w.metadata, true));
        DCPP_ASSIGN_OR_RETURN(LoadPlan plan, planner.CreateLocalPlan());
        DCPP_RETURN_IF_ERROR(w.reader->ReadData(plan, planner));
        const uint64_t n = static_cast<uint64_t>(NumElements(size)) * elem;
        DCPP_RETURN_IF_ERROR(sink.Write(w.buffer->data(), n));
        done += static_cast<int64_t>(n);
        if (progress) progress(done, total);
        return Status::Ok();
      });
}

}  // namespace

Result<std::unique_ptr<CheckpointSource>> OpenSafetensorsCheckpoint(const std::string& path) {
  return SafetensorsSource::Open(path);
}

Status ConvertToSafetensors(const std::string& src, const std::string& dst_dir,
                            const SafetensorsConvertOptions& options, const ProgressFn& progress) {
  DCPP_ASSIGN_OR_RETURN(auto source, OpenCheckpoint(src));
  // Files in source order, split at max_shard_size.
  std::vector<std::vector<const EntryInfo*>> files(1);
  uint64_t in_file = 0;
  int64_t total = 0;
  for (const auto& e : source->entries()) {
    if (!e.is_tensor) {
      if (options.skipped) options.skipped->push_back(e.fqn);
      continue;
    }
    const uint64_t n = static_cast<uint64_t>(e.nbytes);
    if (!files.back().empty() && in_file + n > options.max_shard_size) {
      files.emplace_back();
      in_file = 0;
    }
    files.back().push_back(&e);
    in_file += n;
    total += e.nbytes;
  }
  // A DCP source is read window by window straight into one reused buffer.
  std::unique_ptr<DcpWindows> dcp;
  if (source->format() == CheckpointFormat::kDcp) {
    DCPP_ASSIGN_OR_RETURN(dcp, DcpWindows::Open(src));
  }
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> out, OpenStore(dst_dir, {.create = true}));
  const int count = static_cast<int>(files.size());
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  int64_t done = 0;
  for (int f = 0; f < count; ++f) {
    const std::string name = HfFileName(f + 1, count);
    std::vector<st::TensorSpec> specs;
    std::map<std::string, const EntryInfo*> by_name;
    for (const EntryInfo* e : files[f]) {
      auto dtype = st::FromTorchDType(e->dtype);
      if (!dtype.ok()) return dtype.status().WithContext("converting \"" + e->fqn + "\"");
      specs.push_back({e->fqn, *dtype, e->shape});
      by_name[e->fqn] = e;
    }
    DCPP_ASSIGN_OR_RETURN(st::Header header,
                          st::LayoutHeader(std::move(specs), {{"format", "pt"}}));
    const std::string head = st::EncodeHeader(header);
    DCPP_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file, out->OpenWrite(name));
    DCPP_RETURN_IF_ERROR(file->Append(head.data(), head.size()));
    for (const auto& t : header.tensors) {
      const EntryInfo& e = *by_name.at(t.name);
      const std::string what = "converting \"" + src + "\" key \"" + e.fqn + "\"";
      if (dcp) {
        DCPP_RETURN_IF_ERROR(StreamDcpTensor(*dcp, e, *file, progress, done, total)
                                 .WithContext(what + " into \"" + out->Describe(name) + "\""));
      } else {
        auto v = source->Read(e);
        if (!v.ok()) return v.status().WithContext(what);
        DCPP_RETURN_IF_ERROR(st::WriteTensorData(*file, v->tensor().view())
                                 .WithContext("writing \"" + out->Describe(name) + "\""));
        done += e.nbytes;
        if (progress) progress(done, total);
      }
      weight_map[t.name] = name;
    }
    if (options.sync_files) DCPP_RETURN_IF_ERROR(file->Sync());
    DCPP_RETURN_IF_ERROR(file->Close());
  }
  nlohmann::ordered_json index;
  index["metadata"]["total_size"] = total;
  index["weight_map"] = std::move(weight_map);
  return out->WriteAtomic(kHfIndexFileName, index.dump(2, ' ', /*ensure_ascii=*/true));
}

Status ConvertSafetensorsToDcp(const std::string& src, const std::string& dcp_dir,
                               const ProgressFn& progress) {
  DCPP_ASSIGN_OR_RETURN(HfPath p, SplitPath(src));
  HuggingFaceStorageReader reader(p.store.get(), src, {}, p.files);
  DCPP_ASSIGN_OR_RETURN(Metadata md, reader.ReadMetadata());
  auto local = LocalPathOfUrl(src);
  if (!local.ok()) {
    // Not a local file system: no mapping; the tensors are read into memory.
    Value all = Value::MakeDict();
    DCPP_RETURN_IF_ERROR(Load(all, reader));
    DCPP_RETURN_IF_ERROR(Save(all, dcp_dir).status());
    if (progress) progress(1, 1);
    return Status::Ok();
  }
  const std::filesystem::path dir =
      p.files.empty() ? std::filesystem::path(*local) : std::filesystem::path(*local).parent_path();
  // One mapping per file; tensors are views into them.
  std::map<std::string, std::shared_ptr<Mapping>> maps;
  for (const auto& [index, info] : md.storage_data) {
    if (maps.count(info.relative_path)) continue;
    DCPP_ASSIGN_OR_RETURN(maps[info.relative_path], MapFile((dir / info.relative_path).string()));
  }
  Value sd = Value::MakeDict();
  for (const auto& [fqn, m] : md.state_dict_metadata) {
    const auto& t = std::get<TensorStorageMetadata>(m);
    ShardedTensor sharded{t.properties.dtype, t.size, {}};
    for (const auto& c : t.chunks) {
      DCPP_ASSIGN_OR_RETURN(const StorageInfo* info,
                            md.FindStorage(MetadataIndex{fqn, c.offsets, std::nullopt}));
      std::shared_ptr<Mapping> map = maps.at(info->relative_path);
      auto* at = static_cast<std::byte*>(map->data) + info->offset;
      auto storage = Storage::Wrap(at, static_cast<size_t>(info->length), Device::CPU(),
                                   [map] {});  // keeps the mapping alive
      DCPP_ASSIGN_OR_RETURN(Tensor tensor,
                            Tensor::FromStorage(std::move(storage), t.properties.dtype, c.sizes));
      sharded.shards.push_back({c.offsets, std::move(tensor)});
    }
    if (sharded.shards.size() == 1 && sharded.shards[0].tensor.shape() == t.size) {
      sd.Set(fqn, Value::FromTensor(std::move(sharded.shards[0].tensor)));
    } else {
      sd.Set(fqn, Value::FromSharded(std::move(sharded)));
    }
  }
  SaveOptions so;
  so.writer.thread_count = 1;
  DCPP_RETURN_IF_ERROR(Save(sd, dcp_dir, so).status());
  if (progress) progress(1, 1);
  return Status::Ok();
}

Status ConvertSafetensorsToTorch(const std::string& src, const std::string& torch_file,
                                 const ProgressFn& progress) {
  DCPP_ASSIGN_OR_RETURN(auto source, SafetensorsSource::Open(src));
  int64_t total = 0, done = 0;
  for (const auto& e : source->entries()) total += e.nbytes;
  // Placeholder tensors (no memory behind them); the torch.save writer asks for each tensor's
  // bytes just before writing its record.
  Value root = Value::MakeDict();
  std::map<const Storage*, const EntryInfo*> by_storage;
  for (const auto& e : source->entries()) {
    auto storage = Storage::Wrap(nullptr, static_cast<size_t>(e.nbytes), Device::CPU(), nullptr);
    by_storage[storage.get()] = &e;
    DCPP_ASSIGN_OR_RETURN(Tensor placeholder, Tensor::FromStorage(storage, e.dtype, e.shape));
    root.Set(e.fqn, Value::FromTensor(std::move(placeholder)));
  }
  TorchSaveWriteOptions options;
  options.materialize = [&](const Tensor& placeholder) -> Result<Tensor> {
    auto it = by_storage.find(placeholder.storage().get());
    if (it == by_storage.end()) return InternalError("unknown placeholder tensor");
    auto v = source->Read(*it->second);
    if (!v.ok()) {
      return v.status().WithContext("converting \"" + src + "\" key \"" + it->second->fqn + "\"");
    }
    done += it->second->nbytes;
    if (progress) progress(done, total);
    return v->tensor();
  };
  return internal::SaveTorchFile(root, torch_file, std::move(options));
}

}  // namespace dcpp
