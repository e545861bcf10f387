// CUDA gemv: validate, guard the device, launch on the current stream.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/index_checks.h"
#include "kernels/gemv_kernels.h"
#include "linear_ops.h"
#include "ssm_ops.h"

namespace tpssm {
namespace {

void gemv_cuda(const at::Tensor& x, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& out,
               int64_t warps_per_row, int64_t rows_per_warp,
               const std::optional<at::Tensor>& norm_weight,
               const std::optional<at::Tensor>& residual,
               const std::optional<at::Tensor>& residual_out, double norm_eps) {
  const GemvParams p = make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp,
                                        norm_weight, residual, residual_out, norm_eps);
  const c10::cuda::CUDAGuard guard(x.device());
  run_gemv(p, c10::cuda::getCurrentCUDAStream().stream());
}

void gemv_conv_update_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& conv_state,
                           const at::Tensor& conv_weight,
                           const std::optional<at::Tensor>& conv_bias, int64_t conv_start,
                           bool silu, const std::optional<at::Tensor>& cache_indices,
                           int64_t pad_slot_id, const at::Tensor& out, int64_t warps_per_row,
                           int64_t rows_per_warp, const std::optional<at::Tensor>& norm_weight,
                           const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& residual_out, double norm_eps) {
  const GemvParams p = make_gemv_conv_update_params(
      x, weight, bias, conv_state, conv_weight, conv_bias, conv_start, silu, cache_indices,
      pad_slot_id, out, warps_per_row, rows_per_warp, norm_weight, residual, residual_out,
      norm_eps, index_values_checked_on_host(x));
  const c10::cuda::CUDAGuard guard(x.device());
  run_gemv(p, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) {
  m.impl("gemv", &gemv_cuda);
  m.impl("gemv_conv_update", &gemv_conv_update_cuda);
}

}  // namespace tpssm
