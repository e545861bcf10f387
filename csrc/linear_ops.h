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
GemvParams make_gemv_params(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& out,
                            int64_t warps_per_row, int64_t rows_per_warp);

}  // namespace tpssm
