// CPU gemv: the product in fp32 (ATen's matmul), the bias added in fp32, rounded once to the
// dtype - the arithmetic the CUDA kernel does, summed in another order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear_ops.h"

namespace tpssm {
namespace {

void gemv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& out, int64_t warps_per_row, int64_t rows_per_warp) {
  const GemvParams p = make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp);
  if (p.rows == 0 || p.out_features == 0) return;
  at::Tensor y = at::matmul(x.to(at::kFloat), weight.to(at::kFloat).t());
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  out.copy_(y);
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) { m.impl("gemv", &gemv_cpu); }

}  // namespace tpssm
