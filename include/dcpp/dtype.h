// DType: the element types of PyTorch tensors, with the names PyTorch uses for them.
//
// Each dtype has: a canonical torch name ("float32", as in `torch.float32`), an element size in
// bytes, and the legacy typed-storage class PyTorch pickles for it ("FloatStorage"), or none for
// the dtypes newer than typed storages (uint16/32/64, complex32, float8/float4 kinds), which
// torch.save records as `torch.UntypedStorage` + `_rebuild_tensor_v3(..., torch.<dtype>)`.
//
// Invariant: the enum values are stable and dense from 0 to kNumDTypes-1.
// Thread-safety: pure functions over constant tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dcpp/status.h"

namespace dcpp {

enum class DType : uint8_t {
  kBool,
  kUInt8,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kUInt16,
  kUInt32,
  kUInt64,
  kFloat16,
  kBFloat16,
  kFloat32,
  kFloat64,
  kComplex32,
  kComplex64,
  kComplex128,
  kFloat8_e4m3fn,
  kFloat8_e5m2,
  kFloat8_e4m3fnuz,
  kFloat8_e5m2fnuz,
  kFloat8_e8m0fnu,    // exponent only (MX block scales), PyTorch >= 2.7
  kFloat4_e2m1fn_x2,  // two float4 values packed in each byte (element), PyTorch >= 2.8
};
inline constexpr int kNumDTypes = 22;

// Element size in bytes (complex32 = 4: two float16).
size_t ElementSize(DType dtype);

// Canonical torch name without the "torch." prefix: "float32", "bfloat16", "float8_e4m3fn".
std::string_view DTypeName(DType dtype);

// Accepts the canonical names, the "torch." prefixed form and PyTorch's aliases ("float",
// "double", "half", "long", "int", "short", "cfloat", "cdouble", "chalf").
Result<DType> DTypeFromName(std::string_view name);

// Legacy typed storage class ("FloatStorage"), or "" where PyTorch has none.
std::string_view StorageClassName(DType dtype);

// Inverse of StorageClassName ("torch." prefix optional). NotFound for unknown names, including
// quantized storages (QInt8Storage, ...), which dcpp does not model.
Result<DType> DTypeFromStorageClass(std::string_view name);

bool IsFloatingPoint(DType dtype);  // float16/bfloat16/float32/float64/float8 kinds
bool IsComplex(DType dtype);
bool IsSignedInteger(DType dtype);
bool IsUnsignedInteger(DType dtype);  // uint8..uint64 (not bool)

}  // namespace dcpp
