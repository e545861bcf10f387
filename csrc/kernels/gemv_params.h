// Parameters of the decode-sized projection (gemv): a few token rows times a weight streamed
// once. Torch-free: the CUDA kernel, its launch plan and its host emulation read it;
// csrc/linear_ops.h fills it from tensors.
#pragma once

#include <cstdint>

#include "ssm_params.h"  // DType

namespace tpssm {

// out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]), m < rows <= kGemvMaxRows, accumulated
// in fp32 and rounded once to the dtype (x, weight, bias and out share it).
struct GemvParams {
  int64_t rows = 0;          // M: tokens
  int64_t out_features = 0;  // N: weight rows
  int64_t in_features = 0;   // K
  int64_t x_row_stride = 0;  // elements; every last dim is contiguous
  int64_t weight_row_stride = 0;
  int64_t out_row_stride = 0;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;  // (N,) or nullptr
  void* out = nullptr;
  // Launch options, 0 = the plan picks (see GemvPlan); tests and benchmarks set them.
  int warps_per_row = 0;  // 1, 2, 4 or 8 warps share each weight row's K range
  int rows_per_warp = 0;  // 1, 2 or 4 weight rows streamed by each warp at once
};

constexpr int64_t kGemvMaxRows = 8;

}  // namespace tpssm
