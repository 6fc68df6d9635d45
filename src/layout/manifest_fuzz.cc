// Fuzz target for the checksum manifest decoder (layout/manifest.h). Seeds:
// tests/fuzz/manifest_fuzz/ (manifests of checkpoints dcpp wrote).
//
// Each input is decoded as it is and once more with its trailing checksum recomputed, so the
// body's parser is reached by mutated inputs too. Any input must decode or fail cleanly; what
// decodes must re-encode to bytes that decode to the same manifest, and find each of its blobs.
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "layout/manifest.h"

namespace {

void Check(std::string_view bytes) {
  auto m = dcpp::internal::DecodeManifest(bytes, "fuzz");
  if (!m.ok()) return;
  for (const auto& b : m->blobs) {
    const auto* found = m->Find(m->files[b.file], b.offset, b.length);
    if (found == nullptr || found->length != b.length) __builtin_trap();
    if (b.hash_count != dcpp::internal::SegmentCount(b.length, m->segment_bytes)) __builtin_trap();
  }
  auto again = dcpp::internal::EncodeManifest(*m);
  if (!again.ok()) __builtin_trap();
  auto back = dcpp::internal::DecodeManifest(*again, "again");
  if (!back.ok() || back->files != m->files || back->hashes != m->hashes ||
      back->blobs.size() != m->blobs.size() || back->segment_bytes != m->segment_bytes ||
      back->metadata_hash != m->metadata_hash) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  Check(bytes);
  if (size >= 8) {
    std::string sealed(bytes.substr(0, size - 8));
    const uint64_t h = XXH3_64bits(sealed.data(), sealed.size());
    for (int i = 0; i < 8; ++i) sealed.push_back(static_cast<char>(h >> (8 * i)));
    Check(sealed);
  }
  return 0;
}
