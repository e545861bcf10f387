// CPU gemv: ATen's linear, which sums in fp32 and rounds once to the dtype (the CUDA kernel's
// arithmetic, summed in another order) without an fp32 copy of the weight.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear_ops.h"

namespace tpssm {
namespace {

void gemv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& out, int64_t warps_per_row, int64_t rows_per_warp) {
  const GemvParams p = make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp);
  if (p.rows == 0 || p.out_features == 0) return;
  out.copy_(at::linear(x, weight, bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) { m.impl("gemv", &gemv_cpu); }

}  // namespace tpssm
