// Parameters of the decode-sized projection (gemv): a few token rows times a weight streamed
// once. Torch-free: the CUDA kernel, its launch plan and its host emulation read it;
// csrc/linear_ops.h fills it from tensors.
#pragma once

#include <cstdint>

#include "ssm_params.h"  // DType

namespace tpssm {

// The decode conv applied in place to the product's columns [start, start + dim) (in_proj's
// conv channels), as causal_conv1d_update of one token per row would apply it to them: with
// v = the product rounded to the dtype, out[m, start + c] = act(bias[c] + sum_{k < width-1}
// weight[c, k] * state[slot, c, k] + weight[c, width-1] * v), and the slot's window shifted by
// one with v appended. Row m uses slot cache_indices[m] (slot m without them); a row whose slot
// is pad_slot_id or outside [0, num_slots) keeps the plain product and its state is untouched.
// The dtype is the projection's; dim == 0: no conv.
struct GemvConvParams {
  int64_t start = 0;
  int64_t dim = 0;
  int32_t width = 0;  // 2..4
  bool silu = false;
  const void* weight = nullptr;  // (dim, width)
  int64_t weight_channel_stride = 0;
  int64_t weight_width_stride = 0;
  const void* bias = nullptr;  // (dim,) contiguous, or nullptr
  void* state = nullptr;       // (num_slots, dim, width - 1)
  int64_t num_slots = 0;
  int64_t state_slot_stride = 0;
  int64_t state_channel_stride = 0;
  int64_t state_width_stride = 0;
  const int32_t* cache_indices = nullptr;  // (rows,), nullptr: slot m for row m
  int32_t pad_slot_id = -1;
};

// The RMSNorm applied to x before the product (a decode layer's norm and in_proj in one launch),
// as add_rms_norm would apply it: with a residual, s = residual + x rounded to the residual's
// dtype and written to residual_out (the residual itself is only read), h = s rounded to the
// dtype; without, h = x. The product then reads weight_norm * rms_norm(h) with add_rms_norm's
// rounding and its order of the sum of squares (reduce_threads, the block size add_rms_norm
// takes for in_features), so that the result equals add_rms_norm followed by gemv bit for bit.
// weight == nullptr: no norm.
struct GemvNormParams {
  const void* weight = nullptr;  // (in_features,) contiguous, the dtype
  float eps = 0.f;
  int reduce_threads = 0;
  const void* residual = nullptr;  // (rows, in_features), fp32 or the dtype; nullptr: none
  void* residual_out = nullptr;    // same shape and dtype, disjoint from every input
  bool residual_fp32 = false;
  int64_t residual_row_stride = 0;
  int64_t residual_out_row_stride = 0;
};

// out[m, n] = sum_k x[m, k] * weight[n, k] (+ bias[n]), m < rows <= kGemvMaxRows, accumulated
// in fp32 and rounded once to the dtype (x, weight, bias and out share it), where x is first
// normalised when norm.weight is set; then the conv epilogue when conv.dim > 0.
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
  GemvNormParams norm;
  GemvConvParams conv;
};

constexpr int64_t kGemvMaxRows = 8;

}  // namespace tpssm
