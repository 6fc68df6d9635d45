#include "dcpp/dtype.h"

#include <array>

namespace dcpp {
namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
  std::string_view storage_class;
};

// Order matches the enum.
constexpr std::array<DTypeInfo, kNumDTypes> kInfo = {{
    {DType::kBool, "bool", 1, "BoolStorage"},
    {DType::kUInt8, "uint8", 1, "ByteStorage"},
    {DType::kInt8, "int8", 1, "CharStorage"},
    {DType::kInt16, "int16", 2, "ShortStorage"},
    {DType::kInt32, "int32", 4, "IntStorage"},
    {DType::kInt64, "int64", 8, "LongStorage"},
    {DType::kUInt16, "uint16", 2, ""},
    {DType::kUInt32, "uint32", 4, ""},
    {DType::kUInt64, "uint64", 8, ""},
    {DType::kFloat16, "float16", 2, "HalfStorage"},
    {DType::kBFloat16, "bfloat16", 2, "BFloat16Storage"},
    {DType::kFloat32, "float32", 4, "FloatStorage"},
    {DType::kFloat64, "float64", 8, "DoubleStorage"},
    {DType::kComplex32, "complex32", 4, ""},
    {DType::kComplex64, "complex64", 8, "ComplexFloatStorage"},
    {DType::kComplex128, "complex128", 16, "ComplexDoubleStorage"},
    {DType::kFloat8_e4m3fn, "float8_e4m3fn", 1, ""},
    {DType::kFloat8_e5m2, "float8_e5m2", 1, ""},
    {DType::kFloat8_e4m3fnuz, "float8_e4m3fnuz", 1, ""},
    {DType::kFloat8_e5m2fnuz, "float8_e5m2fnuz", 1, ""},
    {DType::kFloat8_e8m0fnu, "float8_e8m0fnu", 1, ""},
    {DType::kFloat4_e2m1fn_x2, "float4_e2m1fn_x2", 1, ""},
}};

struct Alias {
  std::string_view name;
  DType dtype;
};
constexpr Alias kAliases[] = {
    {"float", DType::kFloat32},    {"double", DType::kFloat64},     {"half", DType::kFloat16},
    {"long", DType::kInt64},       {"int", DType::kInt32},          {"short", DType::kInt16},
    {"cfloat", DType::kComplex64}, {"cdouble", DType::kComplex128}, {"chalf", DType::kComplex32},
};

const DTypeInfo& Info(DType d) { return kInfo[static_cast<size_t>(d)]; }

std::string_view StripTorch(std::string_view name) {
  constexpr std::string_view kPrefix = "torch.";
  if (name.substr(0, kPrefix.size()) == kPrefix) name.remove_prefix(kPrefix.size());
  return name;
}

}  // namespace

size_t ElementSize(DType dtype) { return Info(dtype).size; }
std::string_view DTypeName(DType dtype) { return Info(dtype).name; }
std::string_view StorageClassName(DType dtype) { return Info(dtype).storage_class; }

Result<DType> DTypeFromName(std::string_view name) {
  std::string_view n = StripTorch(name);
  for (const auto& i : kInfo) {
    if (i.name == n) return i.dtype;
  }
  for (const auto& a : kAliases) {
    if (a.name == n) return a.dtype;
  }
  return NotFoundError("unknown dtype \"" + std::string(name) + "\"");
}

Result<DType> DTypeFromStorageClass(std::string_view name) {
  std::string_view n = StripTorch(name);
  for (const auto& i : kInfo) {
    if (!i.storage_class.empty() && i.storage_class == n) return i.dtype;
  }
  return NotFoundError("unsupported storage class \"" + std::string(name) + "\"");
}

bool IsFloatingPoint(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32:
    case DType::kFloat64:
    case DType::kFloat8_e4m3fn:
    case DType::kFloat8_e5m2:
    case DType::kFloat8_e4m3fnuz:
    case DType::kFloat8_e5m2fnuz:
    case DType::kFloat8_e8m0fnu:
    case DType::kFloat4_e2m1fn_x2:  // torch.float4_e2m1fn_x2.is_floating_point is True
      return true;
    default:
      return false;
  }
}

bool IsComplex(DType d) {
  return d == DType::kComplex32 || d == DType::kComplex64 || d == DType::kComplex128;
}

bool IsSignedInteger(DType d) {
  return d == DType::kInt8 || d == DType::kInt16 || d == DType::kInt32 || d == DType::kInt64;
}

bool IsUnsignedInteger(DType d) {
  return d == DType::kUInt8 || d == DType::kUInt16 || d == DType::kUInt32 || d == DType::kUInt64;
}

}  // namespace dcpp
