// DLPack interop: hand dcpp tensors to other frameworks and adopt theirs without copying.
//
// ToDLPack returns a DLManagedTensor that shares the tensor's storage; the consumer calls its
// deleter once, which releases dcpp's reference. FromDLPack takes ownership of a producer's
// DLManagedTensor; its deleter runs when the last dcpp Tensor that shares the memory goes.
// dtypes map as DLPack defines them: bool is code 6 (kDLBool, bits 8; code kDLUInt with 8 bits
// imports as uint8), bfloat16 kDLBfloat, complex32/64/128 kDLComplex with 32/64/128 bits. The
// float8 kinds have no code in this DLPack version (Unimplemented). Negative strides are
// Unimplemented; lanes must be 1.
//
// Thread-safety: functions are reentrant. The deleter may run on any thread.
#pragma once

#include <dlpack/dlpack.h>

#include "dcpp/status.h"
#include "dcpp/tensor.h"

namespace dcpp {

Result<DLDataType> ToDLDataType(DType dtype);
Result<DType> FromDLDataType(DLDataType type);

// A managed DLPack tensor sharing `tensor`'s memory.
Result<DLManagedTensor*> ToDLPack(const Tensor& tensor);

// Adopts `managed` (also on error: its deleter is then called before returning).
Result<Tensor> FromDLPack(DLManagedTensor* managed);

// A non-owning view of a DLTensor; the producer keeps the memory alive.
Result<TensorView> ViewFromDLPack(const DLTensor& tensor);

}  // namespace dcpp
