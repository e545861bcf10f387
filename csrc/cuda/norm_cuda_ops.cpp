// CUDA norm ops: validate, guard the device, launch on the current stream.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
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

void gated_rms_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& z,
                         const std::optional<at::Tensor>& weight, int64_t group_size,
                         int64_t first_group_size, double eps,
                         const std::optional<at::Tensor>& sum_sq, int64_t norm_size,
                         const at::Tensor& out) {
  const GatedRmsNormParams p = make_gated_rms_norm_params(x, z, weight, group_size,
                                                         first_group_size, eps, sum_sq,
                                                         norm_size, out);
  const c10::cuda::CUDAGuard guard(x.device());
  run_gated_rms_norm(p, c10::cuda::getCurrentCUDAStream().stream());
}

void gated_sum_squares_cuda(const at::Tensor& x, const std::optional<at::Tensor>& z,
                            int64_t group_size, int64_t first_group_size,
                            const at::Tensor& out) {
  const GatedRmsNormParams p =
      make_gated_sum_squares_params(x, z, group_size, first_group_size, out);
  const c10::cuda::CUDAGuard guard(x.device());
  run_gated_sum_squares(p, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) {
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("gated_rms_norm", &gated_rms_norm_cuda);
  m.impl("gated_sum_squares", &gated_sum_squares_cuda);
}

}  // namespace tpssm
