// Fuzz target for the status envelope every collective step and the broadcasting reader put
// around their payloads (core/wire.h: WireWriter::Status + Raw, read by WireReader::ReadStatus
// + Rest), and for the reader's primitives. Seeds: tests/fuzz/wire_fuzz/.
//
// Any input must be read or refused cleanly; an envelope that reads must re-encode to the same
// bytes, and a carried status must keep its code and message.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  {
    dcpp::internal::WireReader r(bytes, "fuzz envelope");
    dcpp::Status carried;
    if (r.ReadStatus(&carried).ok()) {
      const std::string_view rest = r.Rest();
      if (!r.done()) __builtin_trap();
      dcpp::internal::WireWriter w;
      w.Status(carried);
      w.Raw(rest);
      if (w.Release() != bytes) __builtin_trap();
    }
  }
  // The primitives in the order a plan uses them: a string, a count, shapes.
  dcpp::internal::WireReader r(bytes, "fuzz fields");
  auto s = r.Str();
  if (!s.ok()) return 0;
  auto n = r.Count();
  if (!n.ok()) return 0;
  if (*n > size) __builtin_trap();  // a count is bounded by the bytes left
  for (uint64_t i = 0; i < *n; ++i) {
    auto d = r.Dims();
    if (!d.ok()) return 0;
    if (d->size() > 64) __builtin_trap();
  }
  return 0;
}
