// Argument rules the op bindings share: the activation dtype (float32, float16 or bfloat16,
// mapped to the kernels' DType) and a 2-D operand with a contiguous last dim and rows that do
// not overlap. Errors name the op, the argument and the rule.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels/ssm_params.h"  // DType

namespace tpssm {

inline DType float_dtype(const char* op, const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

// t must be (rows, cols); `shape` names the dims in the message, e.g. "(rows, dim)".
inline void check_matrix(const char* op, const at::Tensor& t, const char* name, int64_t rows,
                         int64_t cols, const char* shape) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
              " must have shape ", shape, " = (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have a contiguous last dim, got strides ", t.strides());
  TORCH_CHECK(rows <= 1 || t.stride(0) >= cols, op, ": ", name,
              " rows must not overlap each other, got strides ", t.strides());
}

}  // namespace tpssm
