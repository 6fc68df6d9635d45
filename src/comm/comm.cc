// Communicator: the parts every backend shares (argument checks and SubGroup's agreement step).
//
// SubGroup, in steps:
//   1. all-gather every rank's rank list, so a disagreement is seen by every rank alike;
//   2. check the lists are equal and valid; on failure every rank returns the same error;
//   3. call the backend's CreateSubGroup on every rank.
#include <cstring>
#include <set>
#include <string>

#include "dcpp/comm.h"

namespace dcpp {
namespace {

std::string EncodeRanks(const std::vector<int>& ranks) {
  std::string out(ranks.size() * sizeof(int32_t), '\0');
  for (size_t i = 0; i < ranks.size(); ++i) {
    int32_t r = ranks[i];
    std::memcpy(out.data() + i * sizeof(int32_t), &r, sizeof(r));
  }
  return out;
}

std::string FormatRanks(const std::string& encoded) {
  std::string out = "[";
  for (size_t i = 0; i + sizeof(int32_t) <= encoded.size(); i += sizeof(int32_t)) {
    int32_t r;
    std::memcpy(&r, encoded.data() + i, sizeof(r));
    if (i) out += ", ";
    out += std::to_string(r);
  }
  return out + "]";
}

}  // namespace

namespace internal {
Status CheckRoot(const Communicator& comm, int root, std::string_view op) {
  if (root < 0 || root >= comm.size()) {
    return InvalidArgumentError(std::string(op) + ": root " + std::to_string(root) +
                                " is not a rank of a group of " + std::to_string(comm.size()));
  }
  return Status::Ok();
}
}  // namespace internal

Result<std::unique_ptr<Communicator>> Communicator::SubGroup(const std::vector<int>& ranks) {
  const std::string mine = EncodeRanks(ranks);
  DCPP_ASSIGN_OR_RETURN(std::vector<std::string> all, AllGather(mine));
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r] != all[0]) {
      return InvalidArgumentError("SubGroup: ranks disagree on the list: rank 0 passed " +
                                  FormatRanks(all[0]) + ", rank " + std::to_string(r) + " passed " +
                                  FormatRanks(all[r]));
    }
  }
  if (ranks.empty()) return InvalidArgumentError("SubGroup: empty rank list");
  std::set<int> seen;
  for (int r : ranks) {
    if (r < 0 || r >= size()) {
      return InvalidArgumentError("SubGroup: rank " + std::to_string(r) + " is not in a group of " +
                                  std::to_string(size()));
    }
    if (!seen.insert(r).second) {
      return InvalidArgumentError("SubGroup: rank " + std::to_string(r) + " is listed twice");
    }
  }
  return CreateSubGroup(ranks);
}

}  // namespace dcpp
