// Tensors: TensorView (non-owning description of strided memory) and Tensor (owning).
//
// A TensorView describes elements of one dtype laid out in a storage: element (i0, i1, ...) lives
// at byte `storage_base + (storage_offset + Σ i_k * strides[k]) * ElementSize(dtype)`. Shapes and
// strides are in elements, like PyTorch's; strides are non-negative. A view never owns memory;
// whoever made it keeps the storage alive.
//
// A Tensor owns (shares) a Storage and holds a view into it; copying a Tensor shares the storage
// (like torch.Tensor), Clone() copies the bytes. Several tensors may share one storage, as
// torch.save records allow.
//
// Thread-safety: Storage bytes are not synchronized; concurrent reads are fine, a writer needs
// external synchronization. Tensor/TensorView objects are values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/dtype.h"
#include "dcpp/status.h"

namespace dcpp {

using Shape = std::vector<int64_t>;

std::string ShapeToString(const Shape& shape);  // "[2, 3]"
int64_t NumElements(const Shape& shape);        // product; 1 for a 0-d shape
// The bytes of a dense tensor of `shape`, for shapes read from untrusted input: InvalidArgument
// naming the shape if a size is negative or the byte count does not fit in int64.
Result<int64_t> CheckedNumBytes(DType dtype, const Shape& shape);
Shape ContiguousStrides(const Shape& shape);  // row-major strides

struct Device {
  enum class Type : uint8_t { kCPU, kCUDA, kOther };
  Type type = Type::kCPU;
  int index = 0;

  static Device CPU() { return {}; }
  bool is_cpu() const { return type == Type::kCPU; }
  std::string ToString() const;  // "cpu", "cuda:0"
  friend bool operator==(const Device&, const Device&) = default;
};

// Owning, contiguous, 64-byte aligned bytes (or foreign memory with a deleter).
class Storage {
 public:
  // Zero-filled allocation. nbytes may be 0.
  static std::shared_ptr<Storage> Allocate(size_t nbytes);
  // Uninitialized allocation for buffers that are fully overwritten right away.
  static std::shared_ptr<Storage> AllocateUninitialized(size_t nbytes);
  // Adopts foreign memory; `deleter` runs when the last reference goes.
  static std::shared_ptr<Storage> Wrap(void* data, size_t nbytes, Device device,
                                       std::function<void()> deleter);

  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  std::byte* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  Storage() = default;
  std::byte* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  std::function<void()> deleter_;
};

class TensorView {
 public:
  TensorView() = default;
  // `storage_base` points at element 0 of the storage; empty `strides` means contiguous.
  TensorView(void* storage_base, DType dtype, Shape shape, Shape strides = {},
             int64_t storage_offset = 0, Device device = Device::CPU());

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t storage_offset() const { return storage_offset_; }
  Device device() const { return device_; }
  int dim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int d) const { return shape_[d]; }
  int64_t numel() const { return NumElements(shape_); }
  size_t element_size() const { return ElementSize(dtype_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(); }

  std::byte* storage_base() const { return base_; }
  // Address of element (0, ..., 0).
  std::byte* data() const { return base_ + storage_offset_ * static_cast<int64_t>(element_size()); }
  template <typename T>
  T* data_as() const {
    return reinterpret_cast<T*>(data());
  }

  bool is_contiguous() const;
  // Elements of storage this view can touch: storage_offset + 1 + Σ (shape_k-1)*stride_k, or
  // storage_offset when empty.
  int64_t StorageElementsNeeded() const;

  // Sub-box view: dims [offsets, offsets+sizes). InvalidArgument when out of bounds.
  Result<TensorView> Narrow(const Shape& offsets, const Shape& sizes) const;

  std::string DebugString() const;  // "float32[2, 3] strides [3, 1] offset 0"

 private:
  std::byte* base_ = nullptr;
  DType dtype_ = DType::kFloat32;
  Shape shape_;
  Shape strides_;
  int64_t storage_offset_ = 0;
  Device device_;
};

class Tensor {
 public:
  Tensor() = default;
  // InvalidArgument if the view would reach past the storage.
  static Result<Tensor> FromStorage(std::shared_ptr<Storage> storage, DType dtype, Shape shape,
                                    Shape strides = {}, int64_t storage_offset = 0);
  // Contiguous, zero-filled, CPU.
  static Tensor Zeros(DType dtype, Shape shape);
  // Zeros for a shape from untrusted input: checked sizes, and an allocation failure is an
  // Unavailable status instead of an exception.
  static Result<Tensor> TryZeros(DType dtype, Shape shape);
  // Contiguous CPU tensor whose bytes are copied from `data` (nbytes = numel * element size).
  static Tensor FromBytes(DType dtype, Shape shape, const void* data);

  bool defined() const { return storage_ != nullptr; }
  const TensorView& view() const { return view_; }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  DType dtype() const { return view_.dtype(); }
  const Shape& shape() const { return view_.shape(); }
  const Shape& strides() const { return view_.strides(); }
  int64_t storage_offset() const { return view_.storage_offset(); }
  int dim() const { return view_.dim(); }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }
  bool is_contiguous() const { return view_.is_contiguous(); }
  std::byte* data() const { return view_.data(); }
  template <typename T>
  T* data_as() const {
    return view_.data_as<T>();
  }

  // Deep copy into a new contiguous storage of exactly nbytes().
  Tensor Clone() const;
  // This tensor if it is contiguous and its storage holds exactly its bytes, else Clone().
  Tensor Compact() const;

  // Same dtype, shape and element bytes (strides and storage may differ). NaNs compare by bits.
  bool BitwiseEqual(const Tensor& other) const;

 private:
  std::shared_ptr<Storage> storage_;
  TensorView view_;
};

}  // namespace dcpp
