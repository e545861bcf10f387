// The activation dtype rule the op bindings share: float32, float16 or bfloat16, mapped to the
// kernels' DType, with an error naming the op, the argument and the rule otherwise.
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

}  // namespace tpssm
