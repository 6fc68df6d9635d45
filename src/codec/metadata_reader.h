// The two `.metadata` decoders behind dcpp::ParseMetadata, and a comparison of their results.
//
// DecodeMetadataDirect runs a pickle machine specialised for `.metadata` files: it goes from the
// bytes to a dcpp::Metadata without building a PickleValue tree (values are 16-byte handles,
// strings stay views into the input until the result is assembled, each dataclass is reduced to
// a compact record at its BUILD). It handles what dcpp's encoder and PyTorch's pickler emit and
// stops at anything else: Unimplemented for a construct it does not model (an unknown callable,
// sets, OrderedDict, persistent ids, state forms no writer uses), DataLoss with the byte offset
// for malformed input. It applies the tree reader's rules (stack and MARK discipline, memo,
// STOP, the DcpMetadata allow-list, nesting and memo bounds, no change to a value once it is
// inside another), so whatever it accepts the tree path accepts with the same result.
//
// DecodeMetadataTree is the general path: ReadPickle's tree, then its interpretation. It reads
// every variant (include/dcpp/metadata.h) and its errors are the ones users see. ParseMetadata
// tries the direct decoder first and asks the tree path on any failure, then validates.
//
// Neither runs ValidateMetadata. Thread-safety: reentrant functions over caller-owned bytes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "dcpp/metadata.h"

namespace dcpp::internal {

// The modules each `.metadata` class is found in, for every PyTorch that wrote one (the 1.13
// prototype's paths included); both decoders match a class by name and one of these modules.
inline constexpr std::string_view kMetaModules[] = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed._shard.checkpoint.metadata",
};
inline constexpr std::string_view kStorageInfoModules[] = {
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed._shard.checkpoint.filesystem",
};
inline constexpr std::string_view kPropertiesModules[] = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed._shard.sharded_tensor.metadata",
    "torch.distributed._shard.checkpoint.metadata",
};

// Both charge every string, shape and chunk they copy into the Metadata to a DecodeBudget
// (codec/decode_budget.h) of DecodeBudget::For(size) units, or of `budget` units, before copying
// it; a file that decodes to more is DataLoss naming the key. They charge the same amounts, so
// what one accepts under a budget the other accepts too.
Result<Metadata> DecodeMetadataDirect(std::string_view pickle_bytes);
Result<Metadata> DecodeMetadataDirect(std::string_view pickle_bytes, uint64_t budget);
Result<Metadata> DecodeMetadataTree(std::string_view pickle_bytes);
Result<Metadata> DecodeMetadataTree(std::string_view pickle_bytes, uint64_t budget);

// The budget units a decoder charges to produce `md` from a file without repeated keys: the
// least budget under which its file decodes (for measuring how far real files are from the
// bound).
uint64_t DecodedCost(const Metadata& md);

// "" when `a` and `b` are identical in every field (entry order, index hints, strides, planner
// data, storage meta and version included); otherwise the first difference, in words.
std::string MetadataDifference(const Metadata& a, const Metadata& b);

}  // namespace dcpp::internal
