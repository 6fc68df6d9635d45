// SingleCommunicator: the group of one process; every collective is a local copy.
#include <string>

#include "dcpp/comm.h"

namespace dcpp {

Status SingleCommunicator::Broadcast(std::string& buf, int root) {
  return internal::CheckRoot(*this, root, "Broadcast");
}

Result<std::vector<std::string>> SingleCommunicator::Gather(const std::string& mine, int root) {
  DCPP_RETURN_IF_ERROR(internal::CheckRoot(*this, root, "Gather"));
  return std::vector<std::string>{mine};
}

Result<std::vector<std::string>> SingleCommunicator::AllGather(const std::string& mine) {
  return std::vector<std::string>{mine};
}

Result<std::string> SingleCommunicator::Scatter(const std::vector<std::string>& parts, int root) {
  DCPP_RETURN_IF_ERROR(internal::CheckRoot(*this, root, "Scatter"));
  if (parts.size() != 1) {
    return InvalidArgumentError("Scatter: root 0 passed " + std::to_string(parts.size()) +
                                " parts for a group of 1");
  }
  return parts[0];
}

Result<std::unique_ptr<Communicator>> SingleCommunicator::CreateSubGroup(
    const std::vector<int>& ranks) {
  return std::unique_ptr<Communicator>(new SingleCommunicator());
}

}  // namespace dcpp
