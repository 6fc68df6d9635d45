#include "dcpp/dlpack.h"

#include <memory>
#include <vector>

namespace dcpp {
namespace {

constexpr uint8_t kBoolCode = 6;  // kDLBool in DLPack >= 0.8; absent from older headers

struct ExportContext {
  Tensor tensor;  // keeps the storage alive
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  DLManagedTensor managed;
};

void DeleteExport(DLManagedTensor* m) { delete static_cast<ExportContext*>(m->manager_ctx); }

Result<Device> FromDLDevice(DLDevice d) {
  switch (d.device_type) {
    case kDLCPU:
      return Device::CPU();
    case kDLCUDA:
      return Device{Device::Type::kCUDA, d.device_id};
    default:
      return Device{Device::Type::kOther, d.device_id};
  }
}

}  // namespace

Result<DLDataType> ToDLDataType(DType dtype) {
  const uint8_t bits = static_cast<uint8_t>(ElementSize(dtype) * 8);
  switch (dtype) {
    case DType::kBool:
      return DLDataType{kBoolCode, 8, 1};
    case DType::kUInt8:
    case DType::kUInt16:
    case DType::kUInt32:
    case DType::kUInt64:
      return DLDataType{kDLUInt, bits, 1};
    case DType::kInt8:
    case DType::kInt16:
    case DType::kInt32:
    case DType::kInt64:
      return DLDataType{kDLInt, bits, 1};
    case DType::kFloat16:
    case DType::kFloat32:
    case DType::kFloat64:
      return DLDataType{kDLFloat, bits, 1};
    case DType::kBFloat16:
      return DLDataType{kDLBfloat, 16, 1};
    case DType::kComplex32:
    case DType::kComplex64:
    case DType::kComplex128:
      return DLDataType{kDLComplex, bits, 1};
    default:
      return UnimplementedError("dtype " + std::string(DTypeName(dtype)) +
                                " has no DLPack type code");
  }
}

Result<DType> FromDLDataType(DLDataType t) {
  if (t.lanes != 1) {
    return UnimplementedError("DLPack vector types (lanes=" + std::to_string(t.lanes) +
                              ") are not supported");
  }
  auto bad = [&] {
    return InvalidArgumentError("unsupported DLPack type code " + std::to_string(t.code) +
                                " with " + std::to_string(t.bits) + " bits");
  };
  switch (t.code) {
    case kDLInt:
      switch (t.bits) {
        case 8:
          return DType::kInt8;
        case 16:
          return DType::kInt16;
        case 32:
          return DType::kInt32;
        case 64:
          return DType::kInt64;
      }
      return bad();
    case kDLUInt:
      switch (t.bits) {
        case 8:
          return DType::kUInt8;
        case 16:
          return DType::kUInt16;
        case 32:
          return DType::kUInt32;
        case 64:
          return DType::kUInt64;
      }
      return bad();
    case kDLFloat:
      switch (t.bits) {
        case 16:
          return DType::kFloat16;
        case 32:
          return DType::kFloat32;
        case 64:
          return DType::kFloat64;
      }
      return bad();
    case kDLBfloat:
      if (t.bits == 16) return DType::kBFloat16;
      return bad();
    case kDLComplex:
      switch (t.bits) {
        case 32:
          return DType::kComplex32;
        case 64:
          return DType::kComplex64;
        case 128:
          return DType::kComplex128;
      }
      return bad();
    case kBoolCode:
      if (t.bits == 8) return DType::kBool;
      return bad();
  }
  return bad();
}

Result<DLManagedTensor*> ToDLPack(const Tensor& tensor) {
  if (!tensor.defined()) return InvalidArgumentError("cannot export an undefined tensor");
  DCPP_ASSIGN_OR_RETURN(DLDataType type, ToDLDataType(tensor.dtype()));
  auto ctx = std::make_unique<ExportContext>();
  ctx->tensor = tensor;
  ctx->shape = tensor.shape();
  ctx->strides = tensor.strides();
  DLTensor& t = ctx->managed.dl_tensor;
  t.data = tensor.storage()->data();
  t.byte_offset = static_cast<uint64_t>(tensor.storage_offset()) * ElementSize(tensor.dtype());
  const Device dev = tensor.storage()->device();
  t.device = DLDevice{dev.type == Device::Type::kCUDA ? kDLCUDA : kDLCPU, dev.index};
  t.ndim = tensor.dim();
  t.dtype = type;
  t.shape = ctx->shape.data();
  t.strides = ctx->strides.data();
  ctx->managed.manager_ctx = ctx.get();
  ctx->managed.deleter = DeleteExport;
  return &ctx.release()->managed;
}

Result<TensorView> ViewFromDLPack(const DLTensor& t) {
  DCPP_ASSIGN_OR_RETURN(DType dtype, FromDLDataType(t.dtype));
  DCPP_ASSIGN_OR_RETURN(Device device, FromDLDevice(t.device));
  if (t.ndim < 0 || (t.ndim > 0 && t.shape == nullptr)) {
    return InvalidArgumentError("DLPack tensor with a bad shape");
  }
  Shape shape(t.shape, t.shape + t.ndim);
  Shape strides;
  if (t.strides) {
    strides.assign(t.strides, t.strides + t.ndim);
    for (int64_t s : strides) {
      if (s < 0) return UnimplementedError("DLPack tensors with negative strides");
    }
  }
  const size_t elem = ElementSize(dtype);
  if (t.byte_offset % elem != 0) {
    return InvalidArgumentError("DLPack byte offset " + std::to_string(t.byte_offset) +
                                " is not a multiple of the element size");
  }
  return TensorView(t.data, dtype, std::move(shape), std::move(strides),
                    static_cast<int64_t>(t.byte_offset / elem), device);
}

Result<Tensor> FromDLPack(DLManagedTensor* managed) {
  if (!managed) return InvalidArgumentError("null DLManagedTensor");
  auto release = [managed] {
    if (managed->deleter) managed->deleter(managed);
  };
  auto view = ViewFromDLPack(managed->dl_tensor);
  if (!view.ok()) {
    release();
    return view.status();
  }
  const size_t extent = static_cast<size_t>(view->StorageElementsNeeded()) * view->element_size();
  auto storage = Storage::Wrap(managed->dl_tensor.data, extent, view->device(), release);
  return Tensor::FromStorage(std::move(storage), view->dtype(), view->shape(), view->strides(),
                             view->storage_offset());
}

}  // namespace dcpp
