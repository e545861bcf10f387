// Torch-side entry of the fused residual add + RMSNorm op (add_rms_norm). make_add_rms_norm_params
// validates every rule (an error names the argument and the rule) and fills the plain params the
// CUDA kernel reads; the CPU op (csrc/cpu/norm_cpu.cpp) runs the same arithmetic with ATen ops.
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

}  // namespace tpssm
