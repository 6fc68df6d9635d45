// Fuzz target for the safetensors codec. Seeds: tests/fuzz/safetensors_fuzz/ (files written by
// Python safetensors; tests/fuzz/make_safetensors_seeds.py made them).
//
// Any input must parse or fail cleanly; what parses must tile its data section, re-encode to a
// header that parses back identically, and every tensor of a torch dtype must read back whole.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "codec/safetensors.h"

namespace st = dcpp::safetensors;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  dcpp::MemorySource src(bytes, "fuzz");
  auto h = st::ReadHeader(src);
  if (!h.ok()) return 0;
  uint64_t covered = 0;
  std::vector<st::TensorSpec> specs;
  for (const auto& t : h->tensors) {
    covered += t.nbytes();
    specs.push_back({t.name, t.dtype, t.shape});
  }
  if (covered != h->data_size || h->data_start() + h->data_size != size) __builtin_trap();
  auto layout = st::LayoutHeader(specs, h->metadata, /*sort_like_crate=*/false);
  if (!layout.ok()) __builtin_trap();
  std::string encoded = st::EncodeHeader(*layout);
  encoded.resize(encoded.size() + layout->data_size);
  dcpp::MemorySource again(encoded, "again");
  auto back = st::ReadHeader(again);
  if (!back.ok() || back->tensors.size() != h->tensors.size() || back->metadata != h->metadata) {
    __builtin_trap();
  }
  for (const auto& t : h->tensors) {
    auto dtype = st::ToTorchDType(t.dtype);
    if (!dtype) continue;
    dcpp::Tensor dst = dcpp::Tensor::Zeros(*dtype, t.shape);
    dcpp::Shape zeros(t.shape.size(), 0);
    if (!st::ReadBoxInto(src, h->data_start() + t.begin, *dtype, t.shape, zeros, dst.view(), zeros,
                         t.shape)
             .ok()) {
      __builtin_trap();
    }
  }
  return 0;
}
