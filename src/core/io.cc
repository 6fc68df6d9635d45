#include "dcpp/io.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/thread_pool.h"

namespace dcpp {

// With parallelism, two stages overlap: piece k is visited (a CRC, hashes) on one thread while
// piece k - 1 is written on another. Writes stay in order and one at a time, so the sink needs
// no more than its Write; a file's copy into the page cache (one at a time per file anyway,
// under the kernel's inode lock) no longer waits for the checksums.
Status ByteSink::WritePieces(const void* data, size_t n, size_t parallelism, size_t align,
                             const PieceVisitor& visit) {
  const size_t piece = PieceBytes(align);
  const char* p = static_cast<const char*>(data);
  const size_t count = (n + piece - 1) / piece;
  auto size_of = [&](size_t k) { return std::min(piece, n - k * piece); };
  if (parallelism <= 1 || count < 2) {
    for (size_t k = 0; k < count; ++k) {
      visit(k * piece, p + k * piece, size_of(k));
      DCPP_RETURN_IF_ERROR(Write(p + k * piece, size_of(k)));
    }
    return Status::Ok();
  }
  for (size_t k = 0; k <= count; ++k) {
    // The caller claims index 0 first: it writes, and a pool thread, once awake, visits.
    const std::vector<Status> done = internal::ParallelFor(2, 2, [&](size_t stage) -> Status {
      if (stage == 1) {
        if (k < count) visit(k * piece, p + k * piece, size_of(k));
        return Status::Ok();
      }
      return k == 0 ? Status::Ok() : Write(p + (k - 1) * piece, size_of(k - 1));
    });
    DCPP_RETURN_IF_ERROR(internal::FirstError(done));
  }
  return Status::Ok();
}

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
