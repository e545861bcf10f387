// CPU gemv: ATen's linear, which sums in fp32 and rounds once to the dtype (the CUDA kernel's
// arithmetic, summed in another order) without an fp32 copy of the weight.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
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

// The product through gemv_cpu's arithmetic, then the CPU conv update op on its conv columns
// (reading a copy of them): the composition the fused CUDA kernel computes in one launch.
void gemv_conv_update_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& conv_state,
                          const at::Tensor& conv_weight,
                          const std::optional<at::Tensor>& conv_bias, int64_t conv_start,
                          bool silu, const std::optional<at::Tensor>& cache_indices,
                          int64_t pad_slot_id, const at::Tensor& out, int64_t warps_per_row,
                          int64_t rows_per_warp) {
  const GemvParams p = make_gemv_conv_update_params(
      x, weight, bias, conv_state, conv_weight, conv_bias, conv_start, silu, cache_indices,
      pad_slot_id, out, warps_per_row, rows_per_warp, /*check_index_values=*/true);
  if (p.rows == 0) return;
  out.copy_(at::linear(x, weight, bias));
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
