#include "dcpp/io.h"

#include <cstring>

namespace dcpp {
namespace {
bool InRange(uint64_t offset, size_t n, uint64_t size) {
  return offset <= size && n <= size - offset;
}
}  // namespace

Status MemorySource::ReadAt(uint64_t offset, void* dst, size_t n) const {
  if (!InRange(offset, n, bytes_.size())) {
    return DataLossError(name_ + ": read of " + std::to_string(n) + " bytes at offset " +
                         std::to_string(offset) + " is past the end (" +
                         std::to_string(bytes_.size()) + " bytes)");
  }
  if (n) std::memcpy(dst, bytes_.data() + offset, n);
  return Status::Ok();
}

const std::byte* MemorySource::Peek(uint64_t offset, size_t n) const {
  if (!InRange(offset, n, bytes_.size())) return nullptr;
  return reinterpret_cast<const std::byte*>(bytes_.data()) + offset;
}

Status SubSource::ReadAt(uint64_t offset, void* dst, size_t n) const {
  if (!InRange(offset, n, length_)) {
    return DataLossError(name() + ": read of " + std::to_string(n) + " bytes at offset " +
                         std::to_string(offset) + " is past the end (" + std::to_string(length_) +
                         " bytes)");
  }
  return base_.ReadAt(offset_ + offset, dst, n);
}

std::string SubSource::name() const {
  return base_.name() + "[" + std::to_string(offset_) + ", +" + std::to_string(length_) + "]";
}

const std::byte* SubSource::Peek(uint64_t offset, size_t n) const {
  if (!InRange(offset, n, length_)) return nullptr;
  return base_.Peek(offset_ + offset, n);
}

}  // namespace dcpp
