#include "dcpp/tensor.h"

#include <limits>
#include <new>

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "dcpp/chunk.h"

namespace dcpp {

std::string ShapeToString(const Shape& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Result<int64_t> CheckedNumBytes(DType dtype, const Shape& shape) {
  int64_t n = static_cast<int64_t>(ElementSize(dtype));
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && n > std::numeric_limits<int64_t>::max() / d)) {
      return InvalidArgumentError("tensor size " + ShapeToString(shape) + " of " +
                                  std::string(DTypeName(dtype)) +
                                  (d < 0 ? " has a negative size" : " overflows 64-bit bytes"));
    }
    n *= d;
  }
  return n;
}

Shape ContiguousStrides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

std::string Device::ToString() const {
  switch (type) {
    case Type::kCPU:
      return "cpu";
    case Type::kCUDA:
      return "cuda:" + std::to_string(index);
    case Type::kOther:
      return "other:" + std::to_string(index);
  }
  return "unknown";
}

// ---- Storage ----

namespace {
constexpr size_t kAlignment = 64;

std::byte* AlignedAlloc(size_t nbytes) {
  // aligned_alloc needs a size that is a multiple of the alignment, and a non-zero one.
  size_t rounded = (std::max<size_t>(nbytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  void* p = std::aligned_alloc(kAlignment, rounded);
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<std::byte*>(p);
}
}  // namespace

std::shared_ptr<Storage> Storage::AllocateUninitialized(size_t nbytes) {
  std::shared_ptr<Storage> s(new Storage());
  s->data_ = AlignedAlloc(nbytes);
  s->nbytes_ = nbytes;
  std::byte* p = s->data_;
  s->deleter_ = [p] { std::free(p); };
  return s;
}

std::shared_ptr<Storage> Storage::Allocate(size_t nbytes) {
  auto s = AllocateUninitialized(nbytes);
  if (nbytes) std::memset(s->data_, 0, nbytes);
  return s;
}

std::shared_ptr<Storage> Storage::Wrap(void* data, size_t nbytes, Device device,
                                       std::function<void()> deleter) {
  std::shared_ptr<Storage> s(new Storage());
  s->data_ = static_cast<std::byte*>(data);
  s->nbytes_ = nbytes;
  s->device_ = device;
  s->deleter_ = std::move(deleter);
  return s;
}

Storage::~Storage() {
  if (deleter_) deleter_();
}

// ---- TensorView ----

TensorView::TensorView(void* storage_base, DType dtype, Shape shape, Shape strides,
                       int64_t storage_offset, Device device)
    : base_(static_cast<std::byte*>(storage_base)),
      dtype_(dtype),
      shape_(std::move(shape)),
      strides_(strides.empty() && !shape_.empty() ? ContiguousStrides(shape_) : std::move(strides)),
      storage_offset_(storage_offset),
      device_(device) {}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (size_t i = shape_.size(); i-- > 0;) {
    if (shape_[i] == 1) continue;  // stride of a size-1 dim is irrelevant
    if (shape_[i] == 0) return true;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

int64_t TensorView::StorageElementsNeeded() const {
  if (numel() == 0) return storage_offset_;
  int64_t last = storage_offset_;
  for (size_t i = 0; i < shape_.size(); ++i) last += (shape_[i] - 1) * strides_[i];
  return last + 1;
}

Result<TensorView> TensorView::Narrow(const Shape& offsets, const Shape& sizes) const {
  if (offsets.size() != shape_.size() || sizes.size() != shape_.size()) {
    return InvalidArgumentError("narrow of " + ShapeToString(shape_) + " with offsets " +
                                ShapeToString(offsets) + " sizes " + ShapeToString(sizes) +
                                ": rank mismatch");
  }
  int64_t off = storage_offset_;
  for (size_t i = 0; i < shape_.size(); ++i) {
    if (offsets[i] < 0 || sizes[i] < 0 || offsets[i] + sizes[i] > shape_[i]) {
      return InvalidArgumentError("narrow of " + ShapeToString(shape_) + " with offsets " +
                                  ShapeToString(offsets) + " sizes " + ShapeToString(sizes) +
                                  ": out of bounds");
    }
    off += offsets[i] * strides_[i];
  }
  return TensorView(base_, dtype_, sizes, strides_, off, device_);
}

std::string TensorView::DebugString() const {
  return std::string(DTypeName(dtype_)) + ShapeToString(shape_) + " strides " +
         ShapeToString(strides_) + " offset " + std::to_string(storage_offset_);
}

// ---- Tensor ----

Result<Tensor> Tensor::FromStorage(std::shared_ptr<Storage> storage, DType dtype, Shape shape,
                                   Shape strides, int64_t storage_offset) {
  if (!storage) return InvalidArgumentError("tensor without storage");
  if (!strides.empty() && strides.size() != shape.size()) {
    return InvalidArgumentError("shape " + ShapeToString(shape) + " and strides " +
                                ShapeToString(strides) + " differ in rank");
  }
  for (int64_t s : shape) {
    if (s < 0) return InvalidArgumentError("negative size in shape " + ShapeToString(shape));
  }
  for (int64_t s : strides) {
    if (s < 0) return InvalidArgumentError("negative stride in " + ShapeToString(strides));
  }
  if (storage_offset < 0) return InvalidArgumentError("negative storage offset");
  Tensor t;
  t.view_ = TensorView(storage->data(), dtype, std::move(shape), std::move(strides), storage_offset,
                       storage->device());
  // Overflow-safe bound check: work in unsigned 128-bit.
  unsigned __int128 need =
      static_cast<unsigned __int128>(t.view_.StorageElementsNeeded()) * ElementSize(dtype);
  if (t.view_.numel() > 0 && need > storage->nbytes()) {
    return InvalidArgumentError("tensor " + t.view_.DebugString() + " needs " +
                                std::to_string(static_cast<uint64_t>(need)) +
                                " bytes of storage but it has " +
                                std::to_string(storage->nbytes()));
  }
  t.storage_ = std::move(storage);
  return t;
}

Tensor Tensor::Zeros(DType dtype, Shape shape) {
  size_t n = static_cast<size_t>(NumElements(shape)) * ElementSize(dtype);
  return *FromStorage(Storage::Allocate(n), dtype, std::move(shape));
}

Result<Tensor> Tensor::TryZeros(DType dtype, Shape shape) {
  DCPP_ASSIGN_OR_RETURN(int64_t n, CheckedNumBytes(dtype, shape));
  try {
    return Tensor::Zeros(dtype, std::move(shape));
  } catch (const std::bad_alloc&) {
    return UnavailableError("cannot allocate " + std::to_string(n) + " bytes for a tensor");
  }
}

Tensor Tensor::FromBytes(DType dtype, Shape shape, const void* data) {
  size_t n = static_cast<size_t>(NumElements(shape)) * ElementSize(dtype);
  auto storage = Storage::AllocateUninitialized(n);
  if (n) std::memcpy(storage->data(), data, n);
  return *FromStorage(std::move(storage), dtype, std::move(shape));
}

Tensor Tensor::Clone() const {
  auto storage = Storage::AllocateUninitialized(nbytes());
  Tensor out = *FromStorage(std::move(storage), dtype(), shape());
  Status s = CopyTensor(out.view_, view_);
  (void)s;  // same dtype and shape by construction
  return out;
}

Tensor Tensor::Compact() const {
  if (is_contiguous() && storage_offset() == 0 && storage_->nbytes() == nbytes()) return *this;
  return Clone();
}

bool Tensor::BitwiseEqual(const Tensor& other) const {
  if (dtype() != other.dtype() || shape() != other.shape()) return false;
  Tensor a = is_contiguous() ? *this : Clone();
  Tensor b = other.is_contiguous() ? other : other.Clone();
  return nbytes() == 0 || std::memcmp(a.data(), b.data(), nbytes()) == 0;
}

}  // namespace dcpp
