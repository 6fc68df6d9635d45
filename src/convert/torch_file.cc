#include "convert/torch_file.h"

#include "dcpp/storage.h"

namespace dcpp {

Result<Value> LoadTorchFile(const std::string& url) {
  DCPP_ASSIGN_OR_RETURN(StoreFile file, OpenStoreFile(url));
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<ReadableFile> source, file.store->OpenRead(file.key));
  DCPP_ASSIGN_OR_RETURN(TorchSaveArchive archive, TorchSaveArchive::Open(*source));
  return archive.ReadValue();
}

Status SaveTorchFile(const Value& value, const std::string& url) {
  return internal::SaveTorchFile(value, url, TorchSaveWriteOptions{});
}

namespace internal {

Status SaveTorchFile(const Value& value, const std::string& url, TorchSaveWriteOptions options) {
  DCPP_ASSIGN_OR_RETURN(StoreFile file, OpenStoreFile(url, {.create = true}));
  // As PyTorchStreamWriter: the basename up to its last '.'.
  std::string base = file.key;
  const size_t dot = base.find_last_of('.');
  if (dot != std::string::npos) base = base.substr(0, dot);
  options.archive_name = base.empty() ? "archive" : base;
  return file.store->WriteAtomic(
      file.key, [&](ByteSink& sink) { return WriteTorchSave(value, sink, options); });
}

}  // namespace internal
}  // namespace dcpp
