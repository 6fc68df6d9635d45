// dcpp._dcpp: the extension module behind the `dcpp` Python package.
//
// Two surfaces:
//   * checkpoints without torch: Checkpoint (open a DCP directory or torch.save file, list keys
//     with their chunks, read whole tensors or boxes of them, plain values, verify), save, convert;
//   * the byte engine behind dcpp.torch's StorageWriter/StorageReader: write item blobs into
//     `.distcp` files (tensors as torch.save archives straight from the caller's memory), fsync,
//     commit `.metadata` atomically, and read item blobs back, tensors straight into their
//     destination memory.
// Tensors cross the boundary as DLPack/buffer-protocol arrays (no copy in) and as owning uint8
// arrays with a dtype name and shape (no copy out); the Python layer gives them their dtype, so
// bfloat16/float8 work without numpy knowing them. Every call that touches storage releases the
// GIL. Errors become dcpp.Error subclasses (one per StatusCode) carrying dcpp's message.
//
// Thread-safety: a Checkpoint is used by one Python thread at a time (the GIL is released while
// it reads, so callers must not share one object between threads without a lock).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>
#include "core/thread_pool.h"

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "codec/torch_save.h"
#include "codec/zip.h"
#include "dcpp/checkpoint.h"
#include "dcpp/convert.h"
#include "dcpp/dlpack.h"
#include "dcpp/hf_storage.h"
#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "dcpp/status.h"
#include "dcpp/storage.h"
#include "dcpp/tensor.h"
#include "dcpp/value.h"
#include "dcpp/verify.h"
#include "layout/leftovers.h"
#include "layout/manifest.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace dcpp::python {
namespace {

// ---- errors ----

PyObject* g_error = nullptr;
std::map<StatusCode, PyObject*> g_errors;

[[noreturn]] void Throw(const Status& s) { throw StatusError(s); }
void Check(const Status& s) {
  if (!s.ok()) Throw(s);
}
template <typename T>
T Take(Result<T> r) {
  if (!r.ok()) Throw(r.status());
  return *std::move(r);
}

void MakeErrors(nb::module_& m) {
  g_error =
      PyErr_NewExceptionWithDoc("dcpp.Error", "A dcpp operation failed.", PyExc_Exception, nullptr);
  m.attr("Error") = nb::handle(g_error);
  struct Def {
    StatusCode code;
    const char* name;
    PyObject* builtin;  // a second base, so `except FileNotFoundError` works too
  };
  const Def defs[] = {
      {StatusCode::kInvalidArgument, "InvalidArgumentError", PyExc_ValueError},
      {StatusCode::kNotFound, "NotFoundError", PyExc_FileNotFoundError},
      {StatusCode::kFailedPrecondition, "FailedPreconditionError", nullptr},
      {StatusCode::kAborted, "AbortedError", nullptr},
      {StatusCode::kUnimplemented, "UnimplementedError", PyExc_NotImplementedError},
      {StatusCode::kInternal, "InternalError", nullptr},
      {StatusCode::kUnavailable, "UnavailableError", PyExc_OSError},
      {StatusCode::kDataLoss, "DataLossError", nullptr},
  };
  for (const Def& d : defs) {
    PyObject* bases = d.builtin ? PyTuple_Pack(2, g_error, d.builtin) : PyTuple_Pack(1, g_error);
    std::string qual = std::string("dcpp.") + d.name;
    PyObject* cls = PyErr_NewException(qual.c_str(), bases, nullptr);
    Py_DECREF(bases);
    if (cls == nullptr) throw nb::python_error();
    g_errors[d.code] = cls;
    m.attr(d.name) = nb::handle(cls);
  }
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      auto it = g_errors.find(e.status().code());
      PyObject* cls = it != g_errors.end() ? it->second : g_error;
      PyErr_SetString(cls, std::string(e.status().message()).c_str());
    }
  });
}

// ---- tensors across the boundary ----

// An owning tensor handed to Python: its bytes as a 1-d uint8 array (no copy), dtype and shape.
struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  Tensor tensor;  // contiguous
};

nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>> BytesOf(const RawTensor& t) {
  auto* keep = new Tensor(t.tensor);
  nb::capsule owner(keep, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  size_t n = keep->nbytes();
  return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(keep->data(), {n}, owner);
}

// A tensor the caller passes in: any DLPack or buffer-protocol CPU array, optionally with a dtype
// that overrides the array's own (ml_dtypes / float8 arrays arrive as same-size uint views).
struct TensorIn {
  nb::ndarray<nb::ro, nb::device::cpu> array;
  std::string dtype;  // "" = the array's own
};

Result<Tensor> ViewOf(const nb::ndarray<nb::ro, nb::device::cpu>& a, const std::string& dtype) {
  DType dt;
  if (dtype.empty()) {
    nb::dlpack::dtype d = a.dtype();
    DLDataType dl{d.code, d.bits, d.lanes};
    DCPP_ASSIGN_OR_RETURN(dt, FromDLDataType(dl));
  } else {
    DCPP_ASSIGN_OR_RETURN(dt, DTypeFromName(dtype));
    if (ElementSize(dt) * 8 != static_cast<size_t>(a.dtype().bits)) {
      return InvalidArgumentError("array of " + std::to_string(a.dtype().bits) +
                                  "-bit elements given as " + dtype);
    }
  }
  Shape shape(a.ndim()), strides(a.ndim());
  int64_t extent = a.ndim() == 0 ? 1 : 0;
  bool empty = false;
  for (size_t i = 0; i < a.ndim(); ++i) {
    shape[i] = a.shape(i);
    strides[i] = a.stride(i);
    if (strides[i] < 0) return UnimplementedError("arrays with negative strides");
    if (shape[i] == 0) empty = true;
  }
  if (a.ndim() > 0 && !empty) {
    extent = 1;
    for (size_t i = 0; i < a.ndim(); ++i) extent += (shape[i] - 1) * strides[i];
  }
  if (empty) extent = 0;
  size_t nbytes = static_cast<size_t>(extent) * ElementSize(dt);
  // Borrowed memory: the Python caller keeps the array alive for the whole call.
  auto storage = Storage::Wrap(const_cast<void*>(a.data()), nbytes, Device::CPU(), [] {});
  return Tensor::FromStorage(std::move(storage), dt, shape, strides, 0);
}

Result<Tensor> TensorFromObject(nb::handle obj) {
  if (nb::isinstance<TensorIn>(obj)) {
    auto& in = nb::cast<TensorIn&>(obj);
    return ViewOf(in.array, in.dtype);
  }
  nb::ndarray<nb::ro, nb::device::cpu> a;
  if (!nb::try_cast(obj, a)) {
    return InvalidArgumentError("cannot store an object of type " +
                                std::string(nb::type_name(obj.type()).c_str()) +
                                " (not an array, dict, list, tuple or plain value)");
  }
  return ViewOf(a, "");
}

// ---- Value <-> Python ----

std::string BytesToString(nb::handle obj) {
  auto b = nb::borrow<nb::bytes>(obj);
  return std::string(b.c_str(), b.size());
}

Result<Value> ToValue(nb::handle obj, const std::string& where) {
  if (obj.is_none()) return Value::None();
  if (PyBool_Check(obj.ptr())) return Value::Bool(obj.ptr() == Py_True);
  if (PyLong_Check(obj.ptr())) return Value::Int(nb::cast<int64_t>(obj));
  if (PyFloat_Check(obj.ptr())) return Value::Float(nb::cast<double>(obj));
  if (PyUnicode_Check(obj.ptr())) return Value::Str(nb::cast<std::string>(obj));
  if (PyBytes_Check(obj.ptr())) return Value::Bytes(BytesToString(obj));
  if (PyDict_Check(obj.ptr())) {
    Value::Dict items;
    for (auto [k, v] : nb::borrow<nb::dict>(obj)) {
      DCPP_ASSIGN_OR_RETURN(Value key, ToValue(k, where));
      std::string sub = where.empty() ? nb::str(k).c_str() : where + "." + nb::str(k).c_str();
      DCPP_ASSIGN_OR_RETURN(Value val, ToValue(v, sub));
      items.emplace_back(std::move(key), std::move(val));
    }
    return Value::MakeDict(std::move(items));
  }
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    Value::List items;
    size_t i = 0;
    for (nb::handle v : obj) {
      DCPP_ASSIGN_OR_RETURN(Value val, ToValue(v, where + "." + std::to_string(i++)));
      items.push_back(std::move(val));
    }
    return PyList_Check(obj.ptr()) ? Value::MakeList(std::move(items))
                                   : Value::MakeTuple(std::move(items));
  }
  auto t = TensorFromObject(obj);
  if (!t.ok()) return t.status().WithContext("\"" + where + "\"");
  return Value::FromTensor(*std::move(t));
}

nb::object FromValue(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kNone:
      return nb::none();
    case Value::Kind::kBool:
      return nb::bool_(v.as_bool());
    case Value::Kind::kInt:
      return nb::int_(v.as_int());
    case Value::Kind::kFloat:
      return nb::float_(v.as_float());
    case Value::Kind::kStr:
      return nb::str(v.as_str().data(), v.as_str().size());
    case Value::Kind::kBytes:
      return nb::bytes(v.as_bytes().data(), v.as_bytes().size());
    case Value::Kind::kList:
    case Value::Kind::kTuple: {
      nb::list out;
      for (const Value& x : v.items()) out.append(FromValue(x));
      if (v.is_tuple()) return nb::tuple(out);
      return out;
    }
    case Value::Kind::kDict: {
      nb::dict out;
      for (const auto& [k, x] : v.dict()) out[FromValue(k)] = FromValue(x);
      return out;
    }
    case Value::Kind::kTensor: {
      Tensor t = v.tensor().Compact();
      return nb::cast(RawTensor{std::string(DTypeName(t.dtype())), t.shape(), t});
    }
    case Value::Kind::kOpaque:
      return nb::make_tuple(
          "__dcpp_opaque__", v.opaque().type_name,
          nb::bytes(v.opaque().torch_save_bytes.data(), v.opaque().torch_save_bytes.size()));
    case Value::Kind::kShardedTensor:
      break;
  }
  Throw(InternalError("a sharded tensor cannot be returned to Python"));
}

// ---- a store that counts the bytes read through it (slice reads are tested by this count) ----

class CountingStore;

class CountingFile final : public ReadableFile {
 public:
  CountingFile(std::unique_ptr<ReadableFile> base, std::atomic<int64_t>* count)
      : base_(std::move(base)), count_(count) {}
  uint64_t size() const override { return base_->size(); }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override {
    count_->fetch_add(static_cast<int64_t>(n), std::memory_order_relaxed);
    return base_->ReadAt(offset, dst, n);
  }
  std::string name() const override { return base_->name(); }

 private:
  std::unique_ptr<ReadableFile> base_;
  std::atomic<int64_t>* count_;  // the store's counter of this key
};

class CountingStore final : public Store {
 public:
  explicit CountingStore(std::unique_ptr<Store> base) : base_(std::move(base)) {}
  Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) override {
    return base_->OpenWrite(key);
  }
  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override {
    DCPP_ASSIGN_OR_RETURN(auto f, base_->OpenRead(key));
    std::lock_guard<std::mutex> lock(mu_);
    auto& count = counts_[std::string(key)];
    if (!count) count = std::make_unique<std::atomic<int64_t>>(0);
    return std::unique_ptr<ReadableFile>(new CountingFile(std::move(f), count.get()));
  }
  Result<bool> Exists(std::string_view key) override { return base_->Exists(key); }
  Result<uint64_t> Size(std::string_view key) override { return base_->Size(key); }
  Result<std::vector<std::string>> List() override { return base_->List(); }
  Result<std::vector<std::string>> ListDirectory(std::string_view dir) override {
    return base_->ListDirectory(dir);
  }
  Result<std::unique_ptr<StoreLock>> TryLock(std::string_view key, LockMode mode) override {
    return base_->TryLock(key, mode);
  }
  bool CanLock() const override { return base_->CanLock(); }
  Status Remove(std::string_view key) override { return base_->Remove(key); }
  Status Rename(std::string_view from, std::string_view to) override {
    return base_->Rename(from, to);
  }
  Status SyncDir(std::string_view dir) override { return base_->SyncDir(dir); }
  Status CreateDir() override { return base_->CreateDir(); }
  std::string Describe(std::string_view key) const override { return base_->Describe(key); }
  Status WriteAtomic(std::string_view key, std::string_view bytes) override {
    return base_->WriteAtomic(key, bytes);
  }

  // Bytes read per key since the last reset (keys never read are absent or 0).
  std::map<std::string, int64_t> bytes_read() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::map<std::string, int64_t> out;
    for (const auto& [k, v] : counts_) {
      if (v->load() != 0) out[k] = v->load();
    }
    return out;
  }
  void reset() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [k, v] : counts_) *v = 0;
  }

 private:
  std::unique_ptr<Store> base_;
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<std::atomic<int64_t>>> counts_;
};

// ---- Checkpoint: one DCP directory or torch.save file, read without torch ----

// A reader that answers ReadMetadata with the metadata read at open, so reading one key does not
// re-read and re-parse the checkpoint's metadata (or safetensors headers) each time.
class OpenedReader final : public StorageReader {
 public:
  OpenedReader(StorageReader* base, const Metadata* metadata) : base_(base), metadata_(metadata) {}
  Result<Metadata> ReadMetadata(int /*rank*/) override { return *metadata_; }
  Status SetUp(const Metadata& metadata, bool is_coordinator, int rank) override {
    return base_->SetUp(metadata, is_coordinator, rank);
  }
  Status ReadData(const LoadPlan& plan, LoadPlanner& planner) override {
    return base_->ReadData(plan, planner);
  }
  std::string checkpoint_id() const override { return base_->checkpoint_id(); }

 private:
  StorageReader* base_;
  const Metadata* metadata_;
};

class Checkpoint {
 public:
  Checkpoint(const std::string& path, int thread_count) : path_(path) {
    nb::gil_scoped_release release;
    format_ = Take(DetectFormat(path));
    source_ = Take(OpenCheckpoint(path));
    if (format_ == CheckpointFormat::kDcp) {
      store_ = std::make_unique<CountingStore>(Take(OpenStore(path)));
      reader_ = std::make_unique<FileSystemReader>(store_.get(), path,
                                                   FileSystemReaderOptions{thread_count, true});
      auto md = reader_->ReadMetadata();
      if (!md.ok() && md.status().code() == StatusCode::kNotFound) {
        // A save without collectives: rank 0's view unites every __{r}.metadata.
        auto own = reader_->ReadMetadata(0);
        if (own.ok()) md = std::move(own);
      }
      metadata_ = Take(std::move(md));
      store_->reset();
    } else if (format_ == CheckpointFormat::kSafetensors) {
      // One ".safetensors" file, or a directory of them: read through the same load path as DCP,
      // so a box reads only the byte ranges it needs.
      std::vector<std::string> files;
      std::unique_ptr<Store> base;
      if (path.size() > 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0) {
        StoreFile file = Take(OpenStoreFile(path));
        base = std::move(file.store);
        files.push_back(std::move(file.key));
      } else {
        base = Take(OpenStore(path));
      }
      store_ = std::make_unique<CountingStore>(std::move(base));
      reader_ = std::make_unique<HuggingFaceStorageReader>(
          store_.get(), path, HuggingFaceReaderOptions{thread_count}, std::move(files));
      metadata_ = Take(reader_->ReadMetadata());
      store_->reset();
    }
    for (size_t i = 0; i < source_->entries().size(); ++i) index_[source_->entries()[i].fqn] = i;
  }

  std::string format() const { return std::string(FormatName(format_)); }
  std::string path() const { return path_; }
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    for (const auto& e : source_->entries()) out.push_back(e.fqn);
    return out;
  }
  bool contains(const std::string& key) const { return index_.count(key) != 0; }
  std::map<std::string, int64_t> bytes_read() const {
    return store_ ? store_->bytes_read() : std::map<std::string, int64_t>{};
  }
  void reset_bytes_read() {
    if (store_) store_->reset();
  }

  // {"is_tensor", "dtype", "shape", "nbytes", "chunks": [{"offsets", "sizes", "file", "offset",
  // "length"}]}; a torch.save file reports one chunk covering the tensor.
  nb::dict info(const std::string& key) const {
    const EntryInfo& e = Entry(key);
    nb::dict d;
    d["is_tensor"] = e.is_tensor;
    d["nbytes"] = e.nbytes;
    nb::list chunks;
    if (e.is_tensor) {
      d["dtype"] = std::string(DTypeName(e.dtype));
      d["shape"] = nb::tuple(nb::cast(e.shape));
    }
    if (format_ != CheckpointFormat::kTorchSave) {
      const StorageMetadata* sm = metadata_.state_dict_metadata.Find(key);
      if (sm != nullptr && std::holds_alternative<TensorStorageMetadata>(*sm)) {
        for (const ChunkBox& c : std::get<TensorStorageMetadata>(*sm).chunks) {
          nb::dict cd;
          cd["offsets"] = nb::tuple(nb::cast(c.offsets));
          cd["sizes"] = nb::tuple(nb::cast(c.sizes));
          auto si = metadata_.FindStorage(MetadataIndex{key, c.offsets, std::nullopt});
          if (si.ok()) {
            cd["file"] = (*si)->relative_path;
            cd["offset"] = (*si)->offset;
            cd["length"] = (*si)->length;
          }
          chunks.append(cd);
        }
      } else {
        auto si = metadata_.FindStorage(MetadataIndex{key, std::nullopt, std::nullopt});
        if (si.ok()) {
          nb::dict cd;
          cd["file"] = (*si)->relative_path;
          cd["offset"] = (*si)->offset;
          cd["length"] = (*si)->length;
          chunks.append(cd);
        }
      }
    } else if (e.is_tensor) {
      nb::dict cd;
      cd["offsets"] = nb::tuple(nb::cast(Shape(e.shape.size(), 0)));
      cd["sizes"] = nb::tuple(nb::cast(e.shape));
      cd["file"] = path_;
      chunks.append(cd);
    }
    d["chunks"] = chunks;
    return d;
  }

  // The box [offsets, offsets + sizes) of tensor `key`; only the bytes it needs are read from a
  // DCP checkpoint.
  RawTensor read(const std::string& key, std::optional<Shape> offsets, std::optional<Shape> sizes) {
    const EntryInfo& e = Entry(key);
    if (!e.is_tensor) Throw(InvalidArgumentError("\"" + key + "\" is not a tensor"));
    Shape off = offsets.value_or(Shape(e.shape.size(), 0));
    Shape sz = sizes ? *sizes : Shape();
    if (!sizes) {
      for (size_t i = 0; i < e.shape.size(); ++i) sz.push_back(e.shape[i] - off[i]);
    }
    if (off.size() != e.shape.size() || sz.size() != e.shape.size()) {
      Throw(InvalidArgumentError("\"" + key + "\" has " + std::to_string(e.shape.size()) +
                                 " dimensions; offsets/sizes have " + std::to_string(off.size()) +
                                 "/" + std::to_string(sz.size())));
    }
    for (size_t i = 0; i < off.size(); ++i) {
      if (off[i] < 0 || sz[i] < 0 || off[i] + sz[i] > e.shape[i]) {
        Throw(InvalidArgumentError("box " + ShapeToString(off) + " + " + ShapeToString(sz) +
                                   " is outside \"" + key + "\" of shape " +
                                   ShapeToString(e.shape)));
      }
    }
    Tensor out;
    {
      nb::gil_scoped_release release;
      if (format_ != CheckpointFormat::kTorchSave) {
        out = Tensor::Zeros(e.dtype, sz);
        Value sd = Value::MakeDict();
        sd.Set(key, Value::FromSharded(ShardedTensor{e.dtype, e.shape, {Shard{off, out}}}));
        OpenedReader reader(reader_.get(), &metadata_);
        Check(Load(sd, reader).WithContext("reading \"" + key + "\" from \"" + path_ + "\""));
      } else {
        // A torch.save file is read whole; the box is copied out of it.
        Value v = Take(source_->Read(e));
        const Tensor& whole = v.tensor();
        TensorView view = Take(whole.view().Narrow(off, sz));
        out = Take(Tensor::FromStorage(whole.storage(), e.dtype, view.shape(), view.strides(),
                                       view.storage_offset()))
                  .Clone();
      }
    }
    return RawTensor{std::string(DTypeName(e.dtype)), sz, out};
  }

  nb::object value(const std::string& key) {
    const EntryInfo& e = Entry(key);
    Value v;
    {
      nb::gil_scoped_release release;
      v = Take(source_->Read(e));
    }
    return FromValue(v);
  }

  // dcpp::VerifyCheckpoint of a DCP checkpoint (every byte: manifest checksums, zip CRCs,
  // structure), or the records' CRC-32s of a torch.save file. The report as a dict when sound;
  // DataLossError listing every problem otherwise.
  nb::object verify(int thread_count) {
    std::string json;
    {
      nb::gil_scoped_release release;
      if (format_ == CheckpointFormat::kTorchSave) {
        auto file = Take(OpenStoreFile(path_));
        auto src = Take(file.store->OpenRead(file.key));
        auto archive = Take(TorchSaveArchive::Open(*src));
        Check(archive.VerifyChecksums().WithContext("\"" + path_ + "\""));
        Take(archive.ReadValue(true));
        VerifyReport r;
        r.url = path_;
        r.items = 1;
        r.files = 1;
        r.bytes_read = static_cast<int64_t>(src->size());
        r.records_checked = static_cast<int64_t>(archive.records().size());
        json = r.ToJson();
      } else if (format_ == CheckpointFormat::kSafetensors) {
        VerifyReport r;  // no checksums in the format: every tensor's bytes are read
        r.url = path_;
        r.items = VerifySafetensors();
        json = r.ToJson();
      } else {
        VerifyReport r = Take(VerifyCheckpoint(path_, {thread_count}));
        if (!r.ok()) Throw(DataLossError(r.ToString()));
        json = r.ToJson();
      }
    }
    return nb::module_::import_("json").attr("loads")(json);
  }

 private:
  // Safetensors has no checksums: the headers were validated at open (offsets tile each data
  // section); here every tensor's bytes are read, so a truncated or unreadable file is found.
  int64_t VerifySafetensors() {
    constexpr uint64_t kPiece = 8 << 20;
    std::string buffer;
    std::map<std::string, std::unique_ptr<ReadableFile>> files;
    for (const auto& [index, si] : metadata_.storage_data) {
      auto& f = files[si.relative_path];
      if (!f) f = Take(store_->OpenRead(si.relative_path));
      const std::string what =
          "\"" + path_ + "\" file \"" + si.relative_path + "\" tensor \"" + index.fqn + "\"";
      if (si.offset < 0 || si.length < 0 ||
          static_cast<uint64_t>(si.offset) + static_cast<uint64_t>(si.length) > f->size()) {
        Throw(DataLossError(what + " at [" + std::to_string(si.offset) + ", +" +
                            std::to_string(si.length) + ") is past the end of the file (" +
                            std::to_string(f->size()) + " bytes)"));
      }
      for (uint64_t done = 0; done < static_cast<uint64_t>(si.length); done += kPiece) {
        const uint64_t n = std::min<uint64_t>(kPiece, static_cast<uint64_t>(si.length) - done);
        buffer.resize(n);
        Check(f->ReadAt(static_cast<uint64_t>(si.offset) + done, buffer.data(), n)
                  .WithContext("reading " + what));
      }
    }
    return static_cast<int64_t>(metadata_.storage_data.size());
  }

  const EntryInfo& Entry(const std::string& key) const {
    auto it = index_.find(key);
    if (it == index_.end()) {
      Throw(NotFoundError("\"" + path_ + "\" has no key \"" + key + "\""));
    }
    return source_->entries()[it->second];
  }

  std::string path_;
  CheckpointFormat format_ = CheckpointFormat::kDcp;
  std::unique_ptr<CheckpointSource> source_;
  std::unique_ptr<CountingStore> store_;
  std::unique_ptr<StorageReader> reader_;  // DCP and safetensors
  Metadata metadata_;
  std::map<std::string, size_t> index_;
};

// ---- the engine behind dcpp.torch ----

// fn(0..n-1) on dcpp's thread pool, at most `threads` at once; the first failure.
Status ParallelFor(size_t n, int threads, const std::function<Status(size_t)>& fn) {
  return dcpp::internal::FirstError(
      dcpp::internal::ParallelFor(n, static_cast<size_t>(std::max(threads, 1)), fn));
}

struct Blob {
  bool is_tensor = false;
  Tensor tensor;
  std::string bytes;
};

// Writes each file of `files` ([(name, [item, ...])]) into directory `dir`, files in parallel on
// up to `threads` threads. An item is a tensor (written as one torch.save archive, streamed from
// its memory) or bytes (written as they are). Each file is fsync'ed when `sync`. Returns, per
// file, the (offset, length) of each item.
using BlobSpan = std::tuple<int64_t, int64_t, std::vector<uint64_t>>;

std::vector<std::vector<BlobSpan>> WriteFiles(const std::string& dir, nb::list files, int threads,
                                              bool sync) {
  std::vector<std::string> names;
  std::vector<std::vector<Blob>> blobs;
  for (nb::handle f : files) {
    auto pair = nb::cast<nb::tuple>(f);
    names.push_back(nb::cast<std::string>(pair[0]));
    std::vector<Blob> items;
    for (nb::handle item : nb::cast<nb::list>(pair[1])) {
      Blob b;
      if (PyBytes_Check(item.ptr())) {
        b.bytes = BytesToString(item);
      } else {
        b.is_tensor = true;
        auto t = TensorFromObject(item);
        if (!t.ok()) Throw(t.status().WithContext("writing \"" + names.back() + "\""));
        b.tensor = *std::move(t);
      }
      items.push_back(std::move(b));
    }
    blobs.push_back(std::move(items));
  }
  std::vector<std::vector<BlobSpan>> out(names.size());
  nb::gil_scoped_release release;
  auto store = Take(OpenStore(dir, {.create = true}));
  Check(ParallelFor(names.size(), threads, [&](size_t i) -> Status {
    const std::string what = "writing \"" + store->Describe(names[i]) + "\"";
    DCPP_ASSIGN_OR_RETURN(auto file, store->OpenWrite(names[i]));
    // Hashed on the way for the checkpoint's manifest (commit_checkpoint).
    dcpp::internal::HashingSink sink(*file);
    for (const Blob& b : blobs[i]) {
      int64_t start = static_cast<int64_t>(sink.position());
      sink.BeginBlob();
      if (b.is_tensor) {
        DCPP_RETURN_IF_ERROR(WriteTorchSave(Value::FromTensor(b.tensor), sink).WithContext(what));
      } else {
        DCPP_RETURN_IF_ERROR(sink.Write(b.bytes.data(), b.bytes.size()).WithContext(what));
      }
      out[i].emplace_back(start, static_cast<int64_t>(sink.position()) - start, sink.EndBlob());
    }
    if (sync) DCPP_RETURN_IF_ERROR(file->Sync().WithContext(what));
    return file->Close().WithContext(what);
  }));
  if (sync) Check(store->SyncDir());
  return out;
}

// The commit point: `bytes` to a temporary of its own, fsync, rename over dir/name, fsync the
// directory (Store::WriteAtomic).
void CommitFile(const std::string& dir, const std::string& name, nb::bytes bytes) {
  std::string data(bytes.c_str(), bytes.size());
  nb::gil_scoped_release release;
  auto store = Take(OpenStore(dir, {.create = true}));
  Check(store->WriteAtomic(name, data).WithContext("committing \"" + store->Describe(name) + "\""));
}

// The commit of a checkpoint dcpp.torch wrote: the manifest of `blobs` ([(file, offset, length,
// hashes)], None when some writer kept no hashes) named after `metadata`'s bytes, then the
// metadata itself (CommitFile); then manifests of earlier metadata under `name` are removed.
void CommitCheckpoint(
    const std::string& dir, const std::string& name, nb::bytes metadata,
    std::optional<std::vector<std::tuple<std::string, int64_t, int64_t, std::vector<uint64_t>>>>
        blobs) {
  std::string data(metadata.c_str(), metadata.size());
  nb::gil_scoped_release release;
  auto store = Take(OpenStore(dir, {.create = true}));
  const uint64_t hash = dcpp::internal::Xxh3(data.data(), data.size());
  const std::string key = dcpp::internal::ManifestKey(name, hash);
  if (blobs) {
    dcpp::internal::Manifest m;
    m.metadata_hash = hash;
    for (const auto& [file, offset, length, hashes] : *blobs) {
      m.Add(file, static_cast<uint64_t>(offset), static_cast<uint64_t>(length), hashes);
    }
    std::string bytes = Take(dcpp::internal::EncodeManifest(std::move(m)));
    Check(store->WriteAtomic(key, bytes).WithContext("writing \"" + store->Describe(key) + "\""));
  }
  Check(store->WriteAtomic(name, data).WithContext("committing \"" + store->Describe(name) + "\""));
  // Whatever manifest an earlier commit of this name left is stale now.
  auto keys = store->List();
  if (!keys.ok()) return;
  for (const auto& k : *keys) {
    if (k != key && k.rfind(name + ".", 0) == 0 && dcpp::internal::IsManifestKey(k)) {
      (void)store->Remove(k);
    }
  }
}

// What dcpp.torch's coordinator holds from planning to the commit, as dcpp's own writer does: a
// directory that is not a checkpoint is refused, the exclusive save lock is taken (a second save
// to the same directory fails at once instead of mixing files), and leftovers of earlier failed
// saves are removed under it, before this save and after its commit.
class SaveGuard {
 public:
  explicit SaveGuard(const std::string& dir) : dir_(dir) {
    nb::gil_scoped_release release;
    store_ = Take(OpenStore(dir, {.create = true}));
    const std::vector<std::string> keys = Take(store_->List());
    Check(dcpp::internal::CheckCheckpointDirectory(keys, dir));
    if (store_->CanLock()) {
      lock_ = Take(store_->TryLock(dcpp::internal::kLockFileName, LockMode::kExclusive));
      RemoveLeftoversUnlocked();
    }
  }

  // Removes data files, temporaries and manifests no committed metadata references (only while
  // the lock is held: another save's files in flight would look the same). Returns their names.
  std::vector<std::string> RemoveLeftovers() {
    nb::gil_scoped_release release;
    return RemoveLeftoversUnlocked();
  }

  void Release() { lock_.reset(); }
  bool locked() const { return lock_ != nullptr; }

 private:
  // The same, with the GIL already released.
  std::vector<std::string> RemoveLeftoversUnlocked() {
    if (!lock_) return {};
    std::vector<std::string> removed = Take(dcpp::internal::RemoveLeftovers(*store_));
    if (!removed.empty()) Check(store_->SyncDir());
    return removed;
  }

  std::string dir_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<StoreLock> lock_;
};

nb::bytes ReadWhole(const std::string& dir, const std::string& name) {
  std::string data;
  {
    nb::gil_scoped_release release;
    auto store = Take(OpenStore(dir));
    data = Take(store->ReadAll(name));
  }
  return nb::bytes(data.data(), data.size());
}

// Reads item blobs of a DCP directory. Each request is (file, offset, length, dest, src_offsets):
//   dest a tensor (TensorIn or array): the blob is a torch.save archive of a tensor whose box
//     [src_offsets, src_offsets + dest.shape) is read straight into dest;
//   dest None and src_offsets None: the blob's bytes are returned;
//   dest None and src_offsets given: the stored tensor's box of that offset is returned as a
//     RawTensor (the caller copies it; for destinations the engine cannot write into).
// Requests run in parallel on up to `threads` threads.
// With `verify`, each blob is checked against the manifest of metadata file `metadata_name`
// (when it has one) or, without one, the zip CRC-32s of the records read whole.
nb::list ReadItems(const std::string& dir, nb::list requests, int threads,
                   std::optional<std::string> metadata_name, bool verify) {
  struct Req {
    std::string file;
    int64_t offset = 0, length = 0;
    bool has_dest = false;
    Tensor dest;
    std::optional<Shape> src_offsets;
    std::optional<Shape> sizes;
    std::string bytes_out;
    Tensor tensor_out;
  };
  std::vector<Req> reqs;
  for (nb::handle r : requests) {
    auto t = nb::cast<nb::tuple>(r);
    Req q;
    q.file = nb::cast<std::string>(t[0]);
    q.offset = nb::cast<int64_t>(t[1]);
    q.length = nb::cast<int64_t>(t[2]);
    if (!t[3].is_none()) {
      q.has_dest = true;
      auto d = TensorFromObject(t[3]);
      if (!d.ok()) Throw(d.status().WithContext("reading \"" + q.file + "\""));
      q.dest = *std::move(d);
    }
    if (!t[4].is_none()) q.src_offsets = nb::cast<Shape>(t[4]);
    if (t.size() > 5 && !t[5].is_none()) q.sizes = nb::cast<Shape>(t[5]);
    reqs.push_back(std::move(q));
  }
  {
    nb::gil_scoped_release release;
    auto store = Take(OpenStore(dir));
    std::optional<dcpp::internal::Manifest> manifest;
    if (verify && metadata_name) {
      const std::string md = Take(store->ReadAll(*metadata_name));
      const uint64_t hash = dcpp::internal::Xxh3(md.data(), md.size());
      const std::string key = dcpp::internal::ManifestKey(*metadata_name, hash);
      auto bytes = store->ReadAll(key);
      if (bytes.ok()) {
        manifest = Take(dcpp::internal::DecodeManifest(*bytes, store->Describe(key)));
        if (manifest->metadata_hash != hash) {
          Throw(DataLossError(store->Describe(key) + ": manifest belongs to other metadata"));
        }
      } else if (bytes.status().code() != StatusCode::kNotFound) {
        Throw(bytes.status());
      }
    }
    std::map<std::string, std::unique_ptr<ReadableFile>> files;
    for (const Req& q : reqs) {
      auto& f = files[q.file];
      if (!f) f = Take(store->OpenRead(q.file));
    }
    Check(ParallelFor(reqs.size(), threads, [&](size_t i) -> Status {
      Req& q = reqs[i];
      const ReadableFile& f = *files[q.file];
      const std::string what = "reading \"" + store->Describe(q.file) + "\" [" +
                               std::to_string(q.offset) + ", +" + std::to_string(q.length) + ")";
      if (q.offset < 0 || q.length < 0 || static_cast<uint64_t>(q.offset + q.length) > f.size()) {
        return DataLossError(what + ": past the end of the file (" + std::to_string(f.size()) +
                             " bytes)");
      }
      SubSource raw(f, q.offset, q.length);
      const ByteSource* blob = &raw;
      std::optional<dcpp::internal::VerifiedBlobSource> verified;
      std::optional<dcpp::internal::CrcCheckingSource> crc_checked;
      const dcpp::internal::ManifestBlob* sums =
          manifest ? manifest->Find(q.file, static_cast<uint64_t>(q.offset),
                                    static_cast<uint64_t>(q.length))
                   : nullptr;
      if (manifest && !sums) return DataLossError(what + ": no checksum in the manifest");
      if (sums) {
        verified.emplace(raw, manifest->HashesOf(*sums), sums->hash_count, manifest->segment_bytes,
                         static_cast<uint64_t>(q.offset), store->Describe(q.file));
        blob = &*verified;
      } else if (verify) {
        crc_checked.emplace(raw);
        blob = &*crc_checked;
      }
      if (!q.has_dest && !q.src_offsets) {
        q.bytes_out.resize(q.length);
        return blob->ReadAt(0, q.bytes_out.data(), q.length).WithContext(what);
      }
      DCPP_ASSIGN_OR_RETURN(auto archive, TorchSaveArchive::Open(*blob));
      if (crc_checked) {
        // No manifest: small records now, large ones when read whole.
        for (const auto& [rname, rec] : archive.records()) {
          const std::string full = archive.prefix() + "/" + rname;
          if (rec.size > (1 << 20)) {
            crc_checked->AddRecord(full, rec.data_offset, rec.size, rec.crc32);
          } else {
            DCPP_RETURN_IF_ERROR(
                dcpp::internal::VerifyZipCrc(*blob, full, rec.data_offset, rec.size, rec.crc32)
                    .WithContext(what));
          }
        }
      }
      auto ref = archive.RootTensor();
      if (!ref.ok()) return ref.status().WithContext(what);
      Shape src = q.src_offsets.value_or(Shape(ref->shape.size(), 0));
      Tensor dst = q.has_dest ? q.dest : Tensor::Zeros(ref->dtype, q.sizes.value_or(ref->shape));
      if (dst.dtype() != ref->dtype) {
        return InvalidArgumentError(what + ": stored " + std::string(DTypeName(ref->dtype)) +
                                    ", destination " + std::string(DTypeName(dst.dtype())));
      }
      DCPP_RETURN_IF_ERROR(
          archive.ReadTensorInto(*ref, src, dst.view(), Shape(dst.shape().size(), 0), dst.shape())
              .WithContext(what));
      if (!q.has_dest) q.tensor_out = dst;
      return Status::Ok();
    }));
  }
  nb::list out;
  for (Req& q : reqs) {
    if (q.has_dest) {
      out.append(nb::none());
    } else if (!q.src_offsets) {
      out.append(nb::bytes(q.bytes_out.data(), q.bytes_out.size()));
    } else {
      out.append(nb::cast(RawTensor{std::string(DTypeName(q.tensor_out.dtype())),
                                    q.tensor_out.shape(), q.tensor_out}));
    }
  }
  return out;
}

void SaveTree(nb::handle tree, const std::string& path, int thread_count, bool overwrite) {
  if (!PyDict_Check(tree.ptr())) Throw(InvalidArgumentError("dcpp.save takes a dict"));
  Value sd = Take(ToValue(tree, ""));
  nb::gil_scoped_release release;
  SaveOptions options;
  options.writer.thread_count = thread_count;
  options.writer.overwrite = overwrite;
  Take(Save(sd, path, options));
}

// to="torch" | "dcp" | "safetensors"; the source's format is detected (DCP directory,
// torch.save file, safetensors file or directory). Returns the keys left out (safetensors holds
// only tensors).
std::vector<std::string> ConvertPath(const std::string& src, const std::string& dst,
                                     const std::string& to, uint64_t max_shard_size) {
  nb::gil_scoped_release release;
  const CheckpointFormat from = Take(DetectFormat(src));
  std::vector<std::string> skipped;
  if (to == "safetensors") {
    if (from == CheckpointFormat::kSafetensors) {
      Throw(InvalidArgumentError("convert: \"" + src + "\" is already safetensors"));
    }
    SafetensorsConvertOptions options;
    options.max_shard_size = max_shard_size;
    options.skipped = &skipped;
    Check(ConvertToSafetensors(src, dst, options));
  } else if (to == "torch") {
    Check(from == CheckpointFormat::kSafetensors ? ConvertSafetensorsToTorch(src, dst)
                                                 : ConvertDcpToTorch(src, dst));
  } else if (to == "dcp") {
    Check(from == CheckpointFormat::kSafetensors ? ConvertSafetensorsToDcp(src, dst)
                                                 : ConvertTorchToDcp(src, dst));
  } else {
    Throw(InvalidArgumentError("convert: to must be \"dcp\", \"torch\" or \"safetensors\", not \"" +
                               to + "\""));
  }
  return skipped;
}

}  // namespace
}  // namespace dcpp::python

NB_MODULE(_dcpp, m) {
  using namespace dcpp::python;
  m.doc() = "dcpp's C++ engine (use the dcpp package, not this module)";
  MakeErrors(m);

  nb::class_<RawTensor>(m, "RawTensor")
      .def_ro("dtype", &RawTensor::dtype)
      .def_ro("shape", &RawTensor::shape)
      .def_prop_ro(
          "data", [](const RawTensor& t) { return BytesOf(t); }, nb::rv_policy::move);

  nb::class_<TensorIn>(m, "TensorIn")
      .def(nb::init<nb::ndarray<nb::ro, nb::device::cpu>, std::string>(), "array"_a,
           "dtype"_a = "");

  nb::class_<Checkpoint>(m, "Checkpoint")
      .def(nb::init<const std::string&, int>(), "path"_a, "thread_count"_a = 4)
      .def_prop_ro("format", &Checkpoint::format)
      .def_prop_ro("path", &Checkpoint::path)
      .def_prop_ro("bytes_read", &Checkpoint::bytes_read)
      .def("reset_bytes_read", &Checkpoint::reset_bytes_read)
      .def("keys", &Checkpoint::keys)
      .def("__contains__", &Checkpoint::contains)
      .def("info", &Checkpoint::info)
      .def("read", &Checkpoint::read, "key"_a, "offsets"_a = nb::none(), "sizes"_a = nb::none())
      .def("value", &Checkpoint::value)
      .def("verify", &Checkpoint::verify, "thread_count"_a = 4);

  m.def("save", &SaveTree, "tree"_a, "path"_a, "thread_count"_a = 4, "overwrite"_a = true);
  m.def("convert", &ConvertPath, "src"_a, "dst"_a, "to"_a, "max_shard_size"_a = 5'000'000'000);
  m.def("write_files", &WriteFiles, "dir"_a, "files"_a, "threads"_a = 1, "sync"_a = true);
  m.def("commit_file", &CommitFile, "dir"_a, "name"_a, "data"_a);
  m.def("commit_checkpoint", &CommitCheckpoint, "dir"_a, "name"_a, "metadata"_a,
        "blobs"_a = nb::none());
  nb::class_<SaveGuard>(m, "SaveGuard")
      .def(nb::init<const std::string&>(), "dir"_a)
      .def("remove_leftovers", &SaveGuard::RemoveLeftovers)
      .def("release", &SaveGuard::Release)
      .def_prop_ro("locked", &SaveGuard::locked);
  m.def("read_file", &ReadWhole, "dir"_a, "name"_a);
  m.def("read_items", &ReadItems, "dir"_a, "requests"_a, "threads"_a = 1,
        "metadata_name"_a = nb::none(), "verify"_a = true);
}
