// BroadcastingTorchSaveReader: one rank reads a torch.save file, every rank receives it.
//
// 1. ReadMetadata: the root loads the file and builds Metadata (each tensor one whole chunk,
//    other leaves bytes items); the encoded metadata (or the root's error) is broadcast.
// 2. ReadData: every rank walks the metadata's keys in order; for each, the root broadcasts the
//    tensor bytes (or the value's torch.save bytes) and each rank copies the parts its plan needs
//    into place. Only one tensor is in flight at a time.
#include <cstring>

#include "codec/torch_save.h"
#include "core/wire.h"
#include "dcpp/comm.h"
#include "dcpp/layout.h"
#include "dcpp/storage.h"

namespace dcpp {

namespace {

std::string WithStatus(const Status& s, std::string_view payload) {
  internal::WireWriter w;
  w.Status(s);
  if (s.ok()) w.Raw(payload);
  return w.Release();
}

// Strips the status off `buf`, leaving the payload; returns the status.
Status TakeStatus(std::string& buf) {
  internal::WireReader r(buf, "broadcast");
  Status carried;
  DCPP_RETURN_IF_ERROR(r.ReadStatus(&carried));
  if (!carried.ok()) return carried;
  buf = std::string(r.Rest());
  return Status::Ok();
}

}  // namespace

BroadcastingTorchSaveReader::BroadcastingTorchSaveReader(std::string path, Communicator* comm,
                                                         int root)
    : path_(std::move(path)), comm_(comm), root_(root) {}

BroadcastingTorchSaveReader::~BroadcastingTorchSaveReader() = default;

Result<Metadata> BroadcastingTorchSaveReader::ReadMetadata(int /*rank*/) {
  std::string buf;
  if (comm_->rank() == root_) {
    Status s = [&]() -> Status {
      DCPP_ASSIGN_OR_RETURN(StoreFile file, OpenStoreFile(path_));
      DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> source, file.store->OpenRead(file.key));
      DCPP_ASSIGN_OR_RETURN(TorchSaveArchive archive, TorchSaveArchive::Open(*source));
      DCPP_ASSIGN_OR_RETURN(root_value_, archive.ReadValue());
      if (!root_value_.is_dict()) {
        return InvalidArgumentError("\"" + path_ + "\" holds a " +
                                    std::string(KindName(root_value_.kind())) + ", not a dict");
      }
      DCPP_ASSIGN_OR_RETURN(flat_, FlattenStateDict(root_value_));
      Metadata md;
      std::map<std::string, ObjectPath> paths;
      for (const auto& e : flat_) {
        if (e.value->is_tensor()) {
          const Tensor& t = e.value->tensor();
          md.state_dict_metadata[e.fqn] =
              TensorStorageMetadata{TensorProperties{t.dtype()}, t.shape(), {WholeBox(t.shape())}};
          md.storage_data[{e.fqn, Shape(t.dim(), 0), 0}] = StorageInfo{
              "broadcast", 0, static_cast<int64_t>(t.nbytes()), {}};  // the bytes the root sends
        } else {
          md.state_dict_metadata[e.fqn] = BytesStorageMetadata{};
          md.storage_data[{e.fqn, std::nullopt, std::nullopt}] = StorageInfo{"broadcast", 0, 0, {}};
        }
        paths[e.fqn] = e.path;
      }
      md.planner_data = std::move(paths);
      DCPP_ASSIGN_OR_RETURN(buf, EncodeMetadata(md));
      return Status::Ok();
    }();
    buf = WithStatus(s, std::move(buf));
  }
  DCPP_RETURN_IF_ERROR(comm_->Broadcast(buf, root_));
  DCPP_RETURN_IF_ERROR(
      TakeStatus(buf).WithContext("reading \"" + path_ + "\" on rank " + std::to_string(root_)));
  return ParseMetadata(buf);
}

Status BroadcastingTorchSaveReader::SetUp(const Metadata& metadata, bool, int) {
  metadata_ = &metadata;
  return Status::Ok();
}

Status BroadcastingTorchSaveReader::ReadData(const LoadPlan& plan, LoadPlanner& planner) {
  if (!metadata_) return FailedPreconditionError("ReadData before SetUp");
  std::map<std::string, std::vector<const ReadItem*>> wanted;
  for (const auto& item : plan.items) wanted[item.storage_index.fqn].push_back(&item);
  std::map<std::string, const Value*> local;
  for (const auto& e : flat_) local[e.fqn] = e.value;
  // Every rank walks the same keys in the same order, so the broadcasts pair up. A rank that
  // fails keeps walking (and reports its first error at the end).
  Status first;
  for (const auto& [fqn, m] : metadata_->state_dict_metadata) {
    std::string buf;
    if (comm_->rank() == root_) {
      const Value* v = local[fqn];
      if (v && v->is_tensor()) {
        Tensor t = v->tensor().is_contiguous() ? v->tensor() : v->tensor().Clone();
        buf.assign(reinterpret_cast<const char*>(t.data()), t.nbytes());
      } else if (v) {
        auto bytes = EncodeTorchSave(*v);
        buf = bytes.ok() ? std::move(*bytes) : std::string();
      }
    }
    DCPP_RETURN_IF_ERROR(comm_->Broadcast(buf, root_));
    if (!first.ok()) continue;
    auto it = wanted.find(fqn);
    if (it == wanted.end()) continue;
    if (const auto* t = std::get_if<TensorStorageMetadata>(&m)) {
      if (buf.size() !=
          static_cast<size_t>(NumElements(t->size)) * ElementSize(t->properties.dtype)) {
        first = DataLossError("broadcast of \"" + fqn + "\" has " + std::to_string(buf.size()) +
                              " bytes");
        continue;
      }
      TensorView src(buf.data(), t->properties.dtype, t->size);
      for (const ReadItem* item : it->second) {
        auto dst = planner.ResolveTensor(*item);
        Status s = dst.ok() ? CopyRegion(*dst, item->dest_offsets, src, item->storage_offsets,
                                         item->lengths)
                            : dst.status();
        if (!s.ok() && first.ok()) first = s.WithContext("key \"" + fqn + "\"");
      }
    } else {
      MemorySource src(buf, path_);
      auto archive = TorchSaveArchive::Open(src);
      auto value = archive.ok() ? archive->ReadValue() : Result<Value>(archive.status());
      if (!value.ok()) {
        first = value.status().WithContext("key \"" + fqn + "\"");
        continue;
      }
      for (const ReadItem* item : it->second) {
        Status s = planner.LoadBytes(*item, *value);
        if (!s.ok() && first.ok()) first = s;
      }
    }
  }
  DCPP_RETURN_IF_ERROR(first);
  return planner.Finish();
}

}  // namespace dcpp
