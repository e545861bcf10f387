// CPU gemv: ATen's linear, which sums in fp32 and rounds once to the dtype (the CUDA kernel's
// arithmetic, summed in another order) without an fp32 copy of the weight; the norm prologue is
// the registered add_rms_norm op before it. One row at a time: a CPU GEMM may round a row by the
// number of rows (on AVX2, one, two and more rows take different kernels), and like the CUDA
// kernel's, a row's result must not depend on its batch (a graph replays a padded batch).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "linear_ops.h"

namespace tpssm {
namespace {

// The product's input: x, or with the norm prologue the registered CPU add_rms_norm of x
// (residual_out takes a copy of the residual, which the norm then updates in place).
at::Tensor product_input(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight,
                         const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& residual_out, double norm_eps) {
  if (!norm_weight.has_value()) return x;
  static const auto add_rms_norm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tpssm::add_rms_norm", "")
          .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                      double, const at::Tensor&)>();
  if (residual.has_value()) residual_out->copy_(*residual);
  const at::Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
  add_rms_norm.call(x, residual_out, *norm_weight, norm_eps, h);
  return h;
}

void linear_row_by_row(const at::Tensor& h, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  for (int64_t i = 0; i < h.size(0); ++i) {
    out.narrow(0, i, 1).copy_(at::linear(h.narrow(0, i, 1), weight, bias));
  }
}

void gemv_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& out, int64_t warps_per_row, int64_t rows_per_warp,
              const std::optional<at::Tensor>& norm_weight,
              const std::optional<at::Tensor>& residual,
              const std::optional<at::Tensor>& residual_out, double norm_eps) {
  const GemvParams p = make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp,
                                        norm_weight, residual, residual_out, norm_eps);
  if (p.rows == 0 || p.out_features == 0) return;
  const at::Tensor h = product_input(x, norm_weight, residual, residual_out, norm_eps);
  linear_row_by_row(h, weight, bias, out);
}

// The product through gemv_cpu's arithmetic, then the CPU conv update op on its conv columns
// (reading a copy of them): the composition the fused CUDA kernel computes in one launch.
void gemv_conv_update_cpu(const at::Tensor& x, const at::Tensor& weight,
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
      norm_eps, /*check_index_values=*/true);
  if (p.rows == 0) return;
  const at::Tensor h = product_input(x, norm_weight, residual, residual_out, norm_eps);
  linear_row_by_row(h, weight, bias, out);
  const at::Tensor cols = out.narrow(1, conv_start, p.conv.dim);
  static const auto conv_update =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tpssm::causal_conv1d_update", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&,
                      int64_t, const at::Tensor&)>();
  conv_update.call(cols.clone(), conv_state, conv_weight, conv_bias, silu, cache_indices,
                   pad_slot_id, cols);
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) {
  m.impl("gemv", &gemv_cpu);
  m.impl("gemv_conv_update", &gemv_conv_update_cpu);
}

}  // namespace tpssm
