// CUDA gemv: validate, guard the device, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels/gemv_kernels.h"
#include "linear_ops.h"

namespace tpssm {
namespace {

void gemv_cuda(const at::Tensor& x, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& out,
               int64_t warps_per_row, int64_t rows_per_warp) {
  const GemvParams p = make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp);
  const c10::cuda::CUDAGuard guard(x.device());
  run_gemv(p, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) { m.impl("gemv", &gemv_cuda); }

}  // namespace tpssm
