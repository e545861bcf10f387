// CUDA add_rms_norm: validate, guard the device, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/norm_kernels.h"
#include "norm_ops.h"

namespace tpssm {
namespace {

void add_rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const at::Tensor& weight, double eps, const at::Tensor& out) {
  const AddRmsNormParams p = make_add_rms_norm_params(x, residual, weight, eps, out);
  const c10::cuda::CUDAGuard guard(x.device());
  run_add_rms_norm(p, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) { m.impl("add_rms_norm", &add_rms_norm_cuda); }

}  // namespace tpssm
