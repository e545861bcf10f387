// Torch-side entry of the fused norm ops (add_rms_norm, gated_rms_norm, gated_sum_squares). make_*_params validate
// every rule (an error names the argument and the rule) and fill the plain params the CUDA
// kernels read; the CPU ops (csrc/cpu/norm_cpu.cpp) run the same arithmetic with ATen ops.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "kernels/norm_params.h"

namespace tpssm {

// x, out: (rows, dim), float32 / float16 / bfloat16, last dim contiguous; weight: (dim,) of x's
// dtype; residual: (rows, dim), float32 or x's dtype, updated in place, or none. No written
// tensor (out, residual) may overlap another argument.
AddRmsNormParams make_add_rms_norm_params(const at::Tensor& x,
                                          const std::optional<at::Tensor>& residual,
                                          const at::Tensor& weight, double eps,
                                          const at::Tensor& out);

// x, out: (rows, dim), float32 / float16 / bfloat16, last dim contiguous; z: like x (its own row
// stride) or none; weight: (dim,) of x's dtype or none; group_size: 0 (one group) or > 0;
// first_group_size: 0 (= group_size) or the leading group's width; the groups must tile dim
// exactly. sum_sq: none, or float32 (rows, groups) sums of squares already reduced over the TP
// group, with norm_size (>= 1) the groups' width over all ranks. out may not overlap any input.
GatedRmsNormParams make_gated_rms_norm_params(const at::Tensor& x,
                                              const std::optional<at::Tensor>& z,
                                              const std::optional<at::Tensor>& weight,
                                              int64_t group_size, int64_t first_group_size,
                                              double eps, const std::optional<at::Tensor>& sum_sq,
                                              int64_t norm_size, const at::Tensor& out);

// The first half of gated_rms_norm for groups that span ranks: x, z and the groups as there;
// out: float32 (rows, groups), the sums of (x * silu(z))^2 per group.
GatedRmsNormParams make_gated_sum_squares_params(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& z,
                                                 int64_t group_size, int64_t first_group_size,
                                                 const at::Tensor& out);

}  // namespace tpssm
