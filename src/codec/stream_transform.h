// Stream transforms: how an item's stored bytes differ from its torch.save archive.
//
// DCP records the transforms applied to each blob in StorageInfo::transform_descriptors (e.g.
// "stream.zstd/1", PyTorch's ZStandard extension). Each transform is one StreamTransform, found
// by its descriptor, so another (an encryption, another codec) is added beside zstd without
// touching the layouts. Decoding is capped: a blob that would expand beyond `max_output` bytes
// is DataLoss, so a hostile frame cannot exhaust memory.
//
// Thread-safety: transforms are stateless; every function is reentrant.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "dcpp/io.h"
#include "dcpp/status.h"

namespace dcpp::internal {

class StreamTransform {
 public:
  virtual ~StreamTransform() = default;
  // The descriptor written to the metadata ("stream.zstd/1").
  virtual std::string_view descriptor() const = 0;
  virtual Result<std::string> Encode(std::string_view blob) const = 0;
  // `what` names the item for errors.
  virtual Result<std::string> Decode(const ByteSource& src, uint64_t max_output,
                                     const std::string& what) const = 0;
};

// zstd at `level` (1..19); one frame with its content size.
const StreamTransform& ZstdTransform(int level);

// The transform for a descriptor read from a checkpoint; Unimplemented naming it if unknown.
Result<const StreamTransform*> FindStreamTransform(std::string_view descriptor);

inline constexpr std::string_view kZstdDescriptor = "stream.zstd/1";

}  // namespace dcpp::internal
