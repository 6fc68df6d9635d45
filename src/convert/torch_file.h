// torch.save files named by URL, read and written through the Store of their location
// (OpenStoreFile), so the codec stays on bytes and every backend serves these files.
#pragma once

#include <string>

#include "codec/torch_save.h"
#include "dcpp/convert.h"

namespace dcpp::internal {

// SaveTorchFile with codec options; `archive_name` is always derived from the file's name.
Status SaveTorchFile(const Value& value, const std::string& url, TorchSaveWriteOptions options);

}  // namespace dcpp::internal
