#include "dcpp/convert.h"

#include <cmath>
#include <cstring>
#include <map>
#include <sstream>

#include "convert/torch_file.h"
#include "dcpp/checkpoint.h"
#include "dcpp/layout.h"
#include "dcpp/storage.h"

namespace dcpp {

std::string_view FormatName(CheckpointFormat format) {
  return format == CheckpointFormat::kDcp ? "dcp" : "torch";
}

Result<CheckpointFormat> DetectFormat(const std::string& path) {
  // A location with DCP metadata is a DCP checkpoint; otherwise the path names one file.
  auto dir = OpenStore(path);
  if (dir.ok()) {
    for (const char* name : {kMetadataFileName, "__0.metadata"}) {
      DCPP_ASSIGN_OR_RETURN(bool found, (*dir)->Exists(name));
      if (found) return CheckpointFormat::kDcp;
    }
  }
  auto file = OpenStoreFile(path);
  auto source = file.ok() ? file->store->OpenRead(file->key)
                          : Result<std::unique_ptr<ReadableFile>>(file.status());
  if (!source.ok()) {
    if (dir.ok() && source.status().code() != StatusCode::kInvalidArgument) {
      return InvalidArgumentError("\"" + path +
                                  "\" is a directory without DCP metadata (.metadata)");
    }
    if (source.status().code() == StatusCode::kNotFound) {
      return NotFoundError("\"" + path + "\" does not exist");
    }
    return source.status();
  }
  char magic[4] = {};
  if ((*source)->size() >= 4) DCPP_RETURN_IF_ERROR((*source)->ReadAt(0, magic, 4));
  if (std::memcmp(magic, "PK\3\4", 4) == 0) return CheckpointFormat::kTorchSave;
  return InvalidArgumentError("\"" + path + "\" is neither a DCP directory nor a torch.save file");
}

namespace {

class DcpSource final : public CheckpointSource {
 public:
  static Result<std::unique_ptr<CheckpointSource>> Open(const std::string& path) {
    auto s = std::unique_ptr<DcpSource>(new DcpSource());
    DCPP_ASSIGN_OR_RETURN(s->reader_, FileSystemReader::Open(path));
    auto md = s->reader_->ReadMetadata();
    if (!md.ok() && md.status().code() == StatusCode::kNotFound) {
      auto own = s->reader_->ReadMetadata(0);
      if (own.ok()) md = std::move(own);
    }
    DCPP_ASSIGN_OR_RETURN(s->metadata_, std::move(md));
    DCPP_RETURN_IF_ERROR(s->reader_->SetUp(s->metadata_, true, 0));
    for (const auto& [fqn, m] : s->metadata_.state_dict_metadata) {
      EntryInfo e;
      e.fqn = fqn;
      e.path = {fqn};
      if (s->metadata_.planner_data) {
        auto it = s->metadata_.planner_data->find(fqn);
        if (it != s->metadata_.planner_data->end()) e.path = it->second;
      }
      if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
        e.is_tensor = true;
        e.dtype = t->properties.dtype;
        e.shape = t->size;
        e.nbytes = NumElements(t->size) * static_cast<int64_t>(ElementSize(e.dtype));
      } else {
        auto info = s->metadata_.FindStorage({fqn, std::nullopt, std::nullopt});
        if (info.ok()) e.nbytes = (*info)->length;
      }
      s->entries_.push_back(std::move(e));
    }
    return std::unique_ptr<CheckpointSource>(std::move(s));
  }

  CheckpointFormat format() const override { return CheckpointFormat::kDcp; }
  const std::vector<EntryInfo>& entries() const override { return entries_; }

  Result<Value> Read(const EntryInfo& entry) override {
    Value sd = Value::MakeDict();
    Value leaf;
    if (entry.is_tensor) {
      DCPP_ASSIGN_OR_RETURN(Tensor t, Tensor::TryZeros(entry.dtype, entry.shape));
      leaf = Value::FromTensor(std::move(t));
    }
    sd.Set(entry.fqn, std::move(leaf));
    DefaultLoadPlanner planner({.flatten_state_dict = false});
    DCPP_RETURN_IF_ERROR(planner.SetUp(&sd, metadata_, true));
    DCPP_ASSIGN_OR_RETURN(LoadPlan plan, planner.CreateLocalPlan());
    DCPP_RETURN_IF_ERROR(reader_->ReadData(plan, planner));
    return std::move(*sd.Find(entry.fqn));
  }

 private:
  DcpSource() = default;
  std::unique_ptr<FileSystemReader> reader_;
  Metadata metadata_;
  std::vector<EntryInfo> entries_;
};

class TorchSource final : public CheckpointSource {
 public:
  static Result<std::unique_ptr<CheckpointSource>> Open(const std::string& path) {
    auto s = std::unique_ptr<TorchSource>(new TorchSource());
    DCPP_ASSIGN_OR_RETURN(s->root_, LoadTorchFile(path));
    if (s->root_.is_dict()) {
      DCPP_ASSIGN_OR_RETURN(auto flat, FlattenStateDict(s->root_));
      for (const auto& f : flat) s->Add(f.fqn, f.path, *f.value);
    } else {
      s->Add("", {}, s->root_);
    }
    return std::unique_ptr<CheckpointSource>(std::move(s));
  }

  CheckpointFormat format() const override { return CheckpointFormat::kTorchSave; }
  const std::vector<EntryInfo>& entries() const override { return entries_; }
  Result<Value> Read(const EntryInfo& entry) override {
    const Value* v = entry.path.empty() ? &root_ : GetElement(root_, entry.path);
    if (!v) return NotFoundError("no entry \"" + entry.fqn + "\"");
    return *v;
  }
  const Value& root() const { return root_; }

 private:
  TorchSource() = default;
  void Add(const std::string& fqn, const ObjectPath& path, const Value& v) {
    EntryInfo e{fqn, path};
    if (v.is_tensor()) {
      e.is_tensor = true;
      e.dtype = v.tensor().dtype();
      e.shape = v.tensor().shape();
      e.nbytes = static_cast<int64_t>(v.tensor().nbytes());
    }
    entries_.push_back(std::move(e));
  }
  Value root_;
  std::vector<EntryInfo> entries_;
};

}  // namespace

Result<std::unique_ptr<CheckpointSource>> OpenCheckpoint(const std::string& path) {
  DCPP_ASSIGN_OR_RETURN(CheckpointFormat f, DetectFormat(path));
  if (f == CheckpointFormat::kDcp) return DcpSource::Open(path);
  return TorchSource::Open(path);
}

Status ConvertDcpToTorch(const std::string& dcp_dir, const std::string& torch_file,
                         const ProgressFn& progress) {
  DCPP_ASSIGN_OR_RETURN(auto src, DcpSource::Open(dcp_dir));
  int64_t total = 0, done = 0;
  for (const auto& e : src->entries()) total += e.nbytes;
  // The tree with placeholder tensors (no memory behind them); the torch.save writer asks for
  // each tensor's bytes just before writing its record, so one tensor is in memory at a time.
  Value root = Value::MakeDict();
  std::map<const Storage*, const EntryInfo*> by_storage;
  for (const auto& e : src->entries()) {
    Value leaf;
    if (e.is_tensor) {
      auto storage = Storage::Wrap(nullptr, static_cast<size_t>(e.nbytes), Device::CPU(), nullptr);
      by_storage[storage.get()] = &e;
      DCPP_ASSIGN_OR_RETURN(Tensor placeholder, Tensor::FromStorage(storage, e.dtype, e.shape));
      leaf = Value::FromTensor(std::move(placeholder));
    } else {
      auto v = src->Read(e);
      if (!v.ok())
        return v.status().WithContext("converting \"" + dcp_dir + "\" key \"" + e.fqn + "\"");
      if (v->is_opaque()) {
        return UnimplementedError("converting \"" + dcp_dir + "\": key \"" + e.fqn + "\" holds a " +
                                  v->opaque().type_name + " object that dcpp cannot re-encode");
      }
      leaf = std::move(*v);
      done += e.nbytes;
    }
    DCPP_RETURN_IF_ERROR(SetElement(root, e.path, std::move(leaf)));
  }
  TorchSaveWriteOptions options;
  options.materialize = [&](const Tensor& placeholder) -> Result<Tensor> {
    auto it = by_storage.find(placeholder.storage().get());
    if (it == by_storage.end()) return InternalError("unknown placeholder tensor");
    auto v = src->Read(*it->second);
    if (!v.ok()) {
      return v.status().WithContext("converting \"" + dcp_dir + "\" key \"" + it->second->fqn +
                                    "\"");
    }
    done += it->second->nbytes;
    if (progress) progress(done, total);
    return v->tensor();
  };
  return internal::SaveTorchFile(root, torch_file, std::move(options));
}

Status ConvertTorchToDcp(const std::string& torch_file, const std::string& dcp_dir,
                         const ProgressFn& progress) {
  DCPP_ASSIGN_OR_RETURN(Value root, LoadTorchFile(torch_file));
  if (!root.is_dict()) {
    return InvalidArgumentError("\"" + torch_file + "\" holds a " +
                                std::string(KindName(root.kind())) +
                                ", not a dict; DCP stores dicts");
  }
  DCPP_RETURN_IF_ERROR(Save(root, dcp_dir).status());
  if (progress) progress(1, 1);
  return Status::Ok();
}

// ------------------------------------------------------------------ diff

namespace {

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float BFloat16ToFloat(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Element i of a contiguous floating tensor as double (complex: component i).
double Component(const Tensor& t, int64_t i) {
  const std::byte* p = t.data();
  switch (t.dtype()) {
    case DType::kFloat16:
    case DType::kComplex32: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return HalfToFloat(h);
    }
    case DType::kBFloat16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return BFloat16ToFloat(h);
    }
    case DType::kFloat32:
    case DType::kComplex64: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    default: {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      return d;
    }
  }
}

bool Tolerant(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32:
    case DType::kFloat64:
    case DType::kComplex32:
    case DType::kComplex64:
    case DType::kComplex128:
      return true;
    default:
      return false;
  }
}

std::string CompareTensors(const Tensor& a0, const Tensor& b0, const DiffOptions& opt) {
  if (a0.dtype() != b0.dtype()) {
    return std::string("dtype ") + std::string(DTypeName(a0.dtype())) + " vs " +
           std::string(DTypeName(b0.dtype()));
  }
  if (a0.shape() != b0.shape()) {
    return "shape " + ShapeToString(a0.shape()) + " vs " + ShapeToString(b0.shape());
  }
  Tensor a = a0.is_contiguous() ? a0 : a0.Clone();
  Tensor b = b0.is_contiguous() ? b0 : b0.Clone();
  int64_t bad = 0, first = -1;
  double worst = 0;
  std::string first_desc;
  if (Tolerant(a.dtype())) {
    const int64_t n = a.numel() * (IsComplex(a.dtype()) ? 2 : 1);
    for (int64_t i = 0; i < n; ++i) {
      double x = Component(a, i), y = Component(b, i);
      bool same = (std::isnan(x) && std::isnan(y)) || x == y ||
                  std::fabs(x - y) <= opt.atol + opt.rtol * std::fabs(y);
      if (!same) {
        ++bad;
        worst = std::max(worst, std::fabs(x - y));
        if (first < 0) {
          first = i;
          std::ostringstream os;
          os.precision(9);
          os << x << " vs " << y;
          first_desc = os.str();
        }
      }
    }
    if (bad) {
      std::ostringstream os;
      os << bad << " of " << n << " values differ (max abs diff " << worst
         << "), first at flat index " << first << ": " << first_desc;
      return os.str();
    }
    return "";
  }
  const size_t es = ElementSize(a.dtype());
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(a.data() + i * es, b.data() + i * es, es) != 0) {
      ++bad;
      if (first < 0) first = i;
    }
  }
  if (bad) {
    return std::to_string(bad) + " of " + std::to_string(a.numel()) +
           " values differ, first at flat index " + std::to_string(first);
  }
  return "";
}

}  // namespace

Result<DiffReport> DiffCheckpoints(const std::string& a, const std::string& b,
                                   const DiffOptions& options, const ProgressFn& progress) {
  DCPP_ASSIGN_OR_RETURN(auto sa, OpenCheckpoint(a));
  DCPP_ASSIGN_OR_RETURN(auto sb, OpenCheckpoint(b));
  std::map<std::string, const EntryInfo*> eb;
  for (const auto& e : sb->entries()) eb[e.fqn] = &e;
  DiffReport report;
  int64_t total = 0, done = 0;
  for (const auto& e : sa->entries()) total += e.nbytes;
  for (const auto& e : sa->entries()) {
    auto it = eb.find(e.fqn);
    if (it == eb.end()) {
      report.differences.push_back("\"" + e.fqn + "\": only in " + a);
      continue;
    }
    const EntryInfo& f = *it->second;
    eb.erase(it);
    ++report.compared;
    DCPP_ASSIGN_OR_RETURN(Value va, sa->Read(e));
    DCPP_ASSIGN_OR_RETURN(Value vb, sb->Read(f));
    std::string why;
    if (va.is_tensor() && vb.is_tensor()) {
      why = CompareTensors(va.tensor(), vb.tensor(), options);
    } else if (va.is_tensor() != vb.is_tensor()) {
      why = std::string(KindName(va.kind())) + " vs " + std::string(KindName(vb.kind()));
    } else if (!(va == vb)) {
      why = va.DebugString() + " vs " + vb.DebugString();
    }
    if (!why.empty()) report.differences.push_back("\"" + e.fqn + "\": " + why);
    done += e.nbytes;
    if (progress) progress(done, total);
  }
  for (const auto& [fqn, e] : eb) report.differences.push_back("\"" + fqn + "\": only in " + b);
  return report;
}

}  // namespace dcpp
