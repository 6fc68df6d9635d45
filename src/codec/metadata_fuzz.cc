// Fuzz target for the `.metadata` codec. Seeds: tests/fuzz/metadata_fuzz/ (a PyTorch 1.13
// prototype checkpoint's .metadata, PyTorch 2.13's, and dcpp-written ones of every flavor).
//
// Any input must parse or fail cleanly. The direct decoder and the tree path must agree: the
// direct one never accepts what the tree path refuses, and when both accept, the Metadata is
// identical, under the default decode budget and under a tight one. What parses must be valid
// (ValidateMetadata), encode in every flavor, and parse back to the same keys, chunks and storage
// entries.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string_view>

#include "codec/metadata_reader.h"
#include "dcpp/metadata.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto direct = dcpp::internal::DecodeMetadataDirect(bytes);
  if (direct.ok()) {
    auto tree = dcpp::internal::DecodeMetadataTree(bytes);
    if (!tree.ok()) {
      std::fprintf(stderr, "direct decoder accepted what the tree path refuses: %s\n",
                   tree.status().ToString().c_str());
      __builtin_trap();
    }
    const std::string diff = dcpp::internal::MetadataDifference(*tree, *direct);
    if (!diff.empty()) {
      std::fprintf(stderr, "decoders disagree: %s\n", diff.c_str());
      __builtin_trap();
    }
  }
  // Both charge the decode budget alike: under a tight one (twice the input's size, so the
  // budget's refusals are reached too), what the direct decoder accepts the tree path accepts.
  const uint64_t tight = 2 * static_cast<uint64_t>(size) + 64;
  if (dcpp::internal::DecodeMetadataDirect(bytes, tight).ok() &&
      !dcpp::internal::DecodeMetadataTree(bytes, tight).ok()) {
    std::fprintf(stderr,
                 "under a budget of %llu the direct decoder accepted what the tree refuses\n",
                 static_cast<unsigned long long>(tight));
    __builtin_trap();
  }
  auto md = dcpp::ParseMetadata(bytes);
  if (!md.ok()) return 0;
  if (!dcpp::ValidateMetadata(*md, "fuzz").ok()) __builtin_trap();
  for (auto flavor : {dcpp::MetadataFlavor::kTorch2, dcpp::MetadataFlavor::kTorch113Prototype}) {
    auto encoded = dcpp::EncodeMetadata(*md, {flavor, 4});
    if (!encoded.ok()) __builtin_trap();
    auto back = dcpp::ParseMetadata(*encoded);
    if (!back.ok()) __builtin_trap();
    // dcpp's own output always takes the direct path.
    if (!dcpp::internal::DecodeMetadataDirect(*encoded).ok()) __builtin_trap();
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
