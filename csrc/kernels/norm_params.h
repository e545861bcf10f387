// Parameters of the fused residual add + RMSNorm (add_rms_norm). Torch-free: the CUDA kernel and
// its host emulation read it; csrc/norm_ops.h fills it from tensors.
#pragma once

#include <cstdint>

#include "ssm_params.h"  // DType

namespace tpssm {

// Threads of a norm block over dim columns: about eight elements a thread, whole warps, at most
// 1024. The sum of squares is reduced in this block's order, which gemv's norm prologue
// (gemv_params.h) reproduces to match add_rms_norm bit for bit.
inline int norm_block_threads(int64_t dim) {
  int64_t t = 32;
  while (t < 1024 && t * 8 < dim) t *= 2;
  return static_cast<int>(t);
}

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

// Grouped RMSNorm with an optional SiLU gate (Mamba-2's gated norm, gate before the norm; without
// z and weight, Falcon-Mamba's weightless dt / B / C norms in one launch). A row's columns form a
// leading group of first_group_size columns, then groups of group_size. Per row and group:
//   v = x * silu(z)   (x alone without z; fp32);
//   out = weight * round(v * rsqrt(mean over the group of v^2 + eps))   (round: to the
//   activation dtype; the weight multiply in the activation dtype; no weight: the rounded norm).
struct GatedRmsNormParams {
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t first_group_size = 0;     // the leading group (== group_size when all are equal)
  int64_t group_size = 0;           // divides dim - first_group_size
  int64_t x_row_stride = 0;         // elements; the last dim is contiguous
  int64_t z_row_stride = 0;
  int64_t out_row_stride = 0;
  DType act_dtype = DType::kFloat32;  // x, z, weight, out
  float eps = 1e-6f;
  const void* x = nullptr;
  const void* z = nullptr;       // nullptr: no gate
  const void* weight = nullptr;  // (dim,), nullptr: no weight
  void* out = nullptr;
  // Groups that span TP ranks take two launches around an all-reduce: gated_sum_squares writes
  // each group's sum of v^2 to sum_sq_out (rows, groups); gated_rms_norm then reads the reduced
  // sums from sum_sq and divides by norm_size (the groups' width over all ranks) for the mean.
  float* sum_sq_out = nullptr;
  const float* sum_sq = nullptr;
  int64_t sum_sq_row_stride = 0;
  float norm_size = 0.f;
};

}  // namespace tpssm
