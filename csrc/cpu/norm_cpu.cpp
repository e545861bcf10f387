// CPU add_rms_norm: the arithmetic of the unfused model code in ATen ops (the residual add in the
// residual's dtype, torch's rms_norm, the weight multiply in the activation dtype), so the op is
// bit-identical to it on the CPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "norm_ops.h"

namespace tpssm {
namespace {

void add_rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const at::Tensor& weight, double eps, const at::Tensor& out) {
  const AddRmsNormParams p = make_add_rms_norm_params(x, residual, weight, eps, out);
  at::Tensor h = x;
  if (residual.has_value()) {
    at::Tensor r = *residual;
    r.copy_(at::add(r, x));  // type promotion: fp32 + 16-bit adds in fp32, as `residual + out`
    h = r.to(x.scalar_type());
  }
  out.copy_(weight * at::rms_norm(h, {p.dim}, std::nullopt, eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) { m.impl("add_rms_norm", &add_rms_norm_cpu); }

}  // namespace tpssm
