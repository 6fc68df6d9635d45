// Fuzz target for the pickle reader and writer. Seeds: tests/fuzz/pickle_fuzz/ (regenerate with
// `/usr/bin/python3 tests/interop/pickle_peer.py seeds tests/fuzz/pickle_fuzz`).
//
// Any input must be read without crashing, leaking or allocating beyond its size. When it reads,
// the tree must write with protocol 4 (and protocol 2 unless it holds NEWOBJ_EX keyword
// arguments), the written pickle must read back, and writing that again must give the same bytes:
// the reader and writer preserve everything they model, including shared nodes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "codec/pickle.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    __builtin_trap();  // a fuzzer finding: `what` names the broken property
  }
  (void)what;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const dcpp::PickleAllowList* const allow =
      new dcpp::PickleAllowList(dcpp::PickleAllowList::DcpMetadata());
  dcpp::PickleReadOptions options;
  options.allow = allow;
  dcpp::Result<dcpp::PickleRef> tree =
      dcpp::ReadPickle(std::string_view(reinterpret_cast<const char*>(data), size), options);
  if (!tree.ok()) return 0;
  (void)(*tree)->DebugString();

  // Re-reading allows a little more depth: protocol 2 spells a set as set(list) inside a tuple,
  // two levels deeper than the set it becomes again.
  dcpp::PickleReadOptions reread = options;
  reread.max_depth += 2;
  for (int protocol : {2, 4}) {
    dcpp::Result<std::string> first = dcpp::WritePickle(**tree, {.protocol = protocol});
    if (!first.ok()) {
      Check(protocol == 2 && first.status().code() == dcpp::StatusCode::kInvalidArgument,
            "a tree that was read must be writable");
      continue;
    }
    dcpp::Result<dcpp::PickleRef> back = dcpp::ReadPickle(*first, reread);
    Check(back.ok(), "written pickle must read back");
    dcpp::Result<std::string> second = dcpp::WritePickle(**back, {.protocol = protocol});
    Check(second.ok(), "re-read tree must be writable");
    Check(*first == *second, "write(read(write(x))) must equal write(x)");
  }
  return 0;
}
