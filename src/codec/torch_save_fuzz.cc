// Fuzz target: torch.save archives from untrusted bytes. Opening, reading the whole tree (with
// uninterpreted objects allowed), listing leaves, checking CRCs and reading a root tensor must
// never crash, hang or allocate without bound; errors are fine.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "codec/torch_save.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dcpp::MemorySource source(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  auto archive = dcpp::TorchSaveArchive::Open(source);
  if (!archive.ok()) return 0;
  (void)archive->ReadValue(/*opaque_objects=*/true);
  (void)archive->Leaves(/*opaque_objects=*/true);
  (void)archive->VerifyChecksums();
  auto root = archive->RootTensor();
  if (root.ok() && root->nbytes() <= (size_t{1} << 24)) {
    dcpp::Tensor dst = dcpp::Tensor::Zeros(root->dtype, root->shape);
    const dcpp::Shape zeros(root->shape.size(), 0);
    (void)archive->ReadTensorInto(*root, zeros, dst.view(), zeros, root->shape);
  }
  return 0;
}
