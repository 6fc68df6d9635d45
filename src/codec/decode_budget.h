// DecodeBudget: a bound on what decoding a pickle may produce, tied to the size of its input.
//
// A pickle can memoize one object and refer to it again with a 2-byte BINGET, so a decoder that
// copies a memo-shared object for every reference (the `.metadata` decoders when they assemble
// a dcpp::Metadata; the pickle reader's calls that rebuild bytes, sets and argument tuples) can
// be made to produce far more than its input holds: a few MB of hostile `.metadata` that would
// decode to tens of GB. Each decoder charges what it is about to copy, in bytes of memory it
// roughly holds (the Cost* functions), before allocating it, and stops with DataLoss once the
// total passes the budget.
//
// The bound is kRatio times the input's size plus kAllowance. Legitimate memo sharing (interned
// FQNs and file names, dtype globals) copies small objects, so real files stay far below it.
// Measured expansion, Cost* units per input byte (DecodedCost in metadata_reader.h):
//   PyTorch 2.13 goldens (tests/data/dcp_213_2ranks): sync 2.58, nocoll __0/__1 3.05
//   PyTorch 2.13 FileSystemWriter.finish of 20 000 2-D tensors in 2 chunks (7.9 MB):  2.80
//   PyTorch 1.13 prototype golden (tests/data/dcp_113_2ranks_dim0):                   1.39
//   dcpp's encodings, 1 to 20 000 tensors, 1-D to 4-D, 1 to 8 chunks, every flavor:   0.85 - 1.98
// so 64 is over 20 times the largest. A unit is close to a byte of memory (a 2-D chunk costs 80
// units and holds about 112 bytes), so what a hostile file can make before it is refused is
// about 100 times its size. MetadataBudgetTest keeps real files below kRatio / 8.
//
// Thread-safety: a plain value, owned by one decoder.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dcpp/status.h"

namespace dcpp::internal {

class DecodeBudget {
 public:
  static constexpr uint64_t kRatio = 64;
  static constexpr uint64_t kAllowance = uint64_t{1} << 20;

  // The bound for an input of `input_size` bytes.
  static constexpr uint64_t For(size_t input_size) {
    return kRatio * static_cast<uint64_t>(input_size) + kAllowance;
  }

  explicit DecodeBudget(size_t input_size) : input_size_(input_size), left_(For(input_size)) {}
  // An explicit bound, for tests that need one exactly at a file's cost.
  DecodeBudget(size_t input_size, uint64_t units) : input_size_(input_size), left_(units) {}

  // Takes `units`; false (and nothing taken) when fewer are left.
  bool Take(uint64_t units) {
    if (units > left_) return false;
    left_ -= units;
    return true;
  }
  uint64_t left() const { return left_; }

  // The error once Take failed; decoders add what they were decoding (`key "w"`) as context.
  Status Exceeded() const {
    return DataLossError("the file decodes to more than " + std::to_string(kRatio) +
                         "x its size (" + std::to_string(input_size_) +
                         " bytes): a memo-shared object is referenced too often");
  }

 private:
  size_t input_size_;
  uint64_t left_;
};

// Costs of decoded pieces, in bytes they roughly hold.
constexpr uint64_t CostStr(size_t length) { return 32 + length; }
constexpr uint64_t CostShape(size_t rank) { return 24 + 8 * static_cast<uint64_t>(rank); }
constexpr uint64_t CostChunk(size_t offsets_rank, size_t sizes_rank) {
  return CostShape(offsets_rank) + CostShape(sizes_rank);
}
// One entry of state_dict_metadata, storage_data or planner_data, beyond its strings and shapes.
inline constexpr uint64_t kCostEntry = 64;
// One element of a planner path, beyond its string (a std::variant<std::string, int64_t>).
inline constexpr uint64_t kCostPathPart = 40;

}  // namespace dcpp::internal
