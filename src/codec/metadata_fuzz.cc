// Fuzz target for the `.metadata` codec. Seeds: tests/fuzz/metadata_fuzz/ (a PyTorch 1.13
// prototype checkpoint's .metadata and dcpp-written ones of every flavor).
//
// Any input must parse or fail cleanly; what parses must be valid (ValidateMetadata), encode in
// every flavor, and parse back to the same keys, chunks and storage entries.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "dcpp/metadata.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto md = dcpp::ParseMetadata(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!md.ok()) return 0;
  if (!dcpp::ValidateMetadata(*md, "fuzz").ok()) __builtin_trap();
  for (auto flavor : {dcpp::MetadataFlavor::kTorch2, dcpp::MetadataFlavor::kTorch113Prototype}) {
    auto bytes = dcpp::EncodeMetadata(*md, {flavor, 4});
    if (!bytes.ok()) __builtin_trap();
    auto back = dcpp::ParseMetadata(*bytes);
    if (!back.ok()) __builtin_trap();
    if (back->state_dict_metadata.size() != md->state_dict_metadata.size() ||
        back->storage_data.size() != md->storage_data.size()) {
      __builtin_trap();
    }
    for (const auto& [index, info] : md->storage_data) {
      auto it = back->storage_data.find(index);
      if (it == back->storage_data.end() || !(it->second == info)) __builtin_trap();
    }
  }
  return 0;
}
