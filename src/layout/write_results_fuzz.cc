// Fuzz target for the write-results wire decoder (DecodeWriteResults: what each rank sends the
// coordinator after writing). Seeds: tests/fuzz/write_results_fuzz/ (results of real writes;
// write_results_wire_test.cc writes them with DCPP_WRITE_FUZZ_SEEDS=1).
//
// Any input must decode or fail cleanly; decoded results must re-encode to bytes that decode and
// encode to the same bytes again. Only the public encode/decode pair is used, so the target
// holds whatever fields a WriteResult carries.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "dcpp/layout.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto results =
      dcpp::DecodeWriteResults(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!results.ok()) return 0;
  const std::string once = dcpp::EncodeWriteResults(*results);
  auto back = dcpp::DecodeWriteResults(once);
  if (!back.ok() || back->size() != results->size()) __builtin_trap();
  if (dcpp::EncodeWriteResults(*back) != once) __builtin_trap();
  return 0;
}
