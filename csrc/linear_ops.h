// Torch-side entry of the decode-sized projection op (gemv). make_gemv_params validates every
// rule (an error names the argument and the rule) and fills the plain params the CUDA kernel
// reads; the CPU op (csrc/cpu/linear_cpu.cpp) computes the same product with ATen.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "kernels/gemv_params.h"

namespace tpssm {

// x: (M, K) with 0 <= M <= 8; weight: (N, K); bias: (N,) contiguous or none; out: (M, N). All
// float32 / float16 / bfloat16 of one dtype on one device, last dims contiguous (row strides
// free, e.g. a column slice of a wider buffer). out may not overlap any input.
// warps_per_row: 0 (the plan picks), 1, 2, 4 or 8; rows_per_warp: 0, 1, 2 or 4.
// The norm prologue (gemv_params.h GemvNormParams), absent without norm_weight: norm_weight (K,)
// contiguous in x's dtype; residual and residual_out together or neither, (M, K) float32 or x's
// dtype (both the same), last dims contiguous; norm_eps >= 0. residual_out is written and may not
// overlap any input, out or the conv state.
GemvParams make_gemv_params(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& out,
                            int64_t warps_per_row, int64_t rows_per_warp,
                            const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& residual_out, double norm_eps);

// gemv_conv_update: gemv's product (with its optional norm prologue), then the decode conv (causal_conv1d_update of one token a
// row, silu optional) in place on its columns [conv_start, conv_start + conv_dim):
// conv_weight (conv_dim, width 2..4), conv_bias (conv_dim,) or none, conv_state (num_slots,
// conv_dim, width - 1) updated in place, cache_indices (M,) int32 or none (row m: slot m), all in
// x's dtype and on its device. Rows whose slot is pad_slot_id (or, on CUDA, out of range) keep
// the product in those columns and leave the state alone. Neither out nor conv_state may overlap
// any input or each other. check_index_values: as in ssm_ops.h.
GemvParams make_gemv_conv_update_params(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& conv_state, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, int64_t conv_start, bool silu,
    const std::optional<at::Tensor>& cache_indices, int64_t pad_slot_id, const at::Tensor& out,
    int64_t warps_per_row, int64_t rows_per_warp, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_out,
    double norm_eps, bool check_index_values);

}  // namespace tpssm
