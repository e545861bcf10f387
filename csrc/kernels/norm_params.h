// Parameters of the fused residual add + RMSNorm (add_rms_norm). Torch-free: the CUDA kernel and
// its host emulation read it; csrc/norm_ops.h fills it from tensors.
#pragma once

#include <cstdint>

#include "ssm_params.h"  // DType

namespace tpssm {

// Per row r of (rows, dim):  residual[r] += x[r] (in the residual's dtype, fp32 add);
//   h = residual[r] rounded to the activation dtype (x[r] itself without a residual);
//   out[r] = weight * round(h * rsqrt(mean(h^2) + eps))   (fp32 inside, activation dtype out).
struct AddRmsNormParams {
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t x_row_stride = 0;         // elements; the last dim is contiguous
  int64_t residual_row_stride = 0;
  int64_t out_row_stride = 0;
  DType act_dtype = DType::kFloat32;       // x, weight, out
  DType residual_dtype = DType::kFloat32;  // float32 or the activation dtype
  float eps = 1e-5f;
  const void* x = nullptr;
  void* residual = nullptr;  // nullptr: no residual add, the norm of x
  const void* weight = nullptr;
  void* out = nullptr;
};

}  // namespace tpssm
