#include "linear_ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "arg_checks.h"
#include "overlap_checks.h"
#include "ssm_ops.h"

namespace tpssm {
namespace {

bool is_pow2_upto(int64_t v, int64_t most) { return v >= 1 && v <= most && (v & (v - 1)) == 0; }

GemvParams product_params(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& out,
                          int64_t warps_per_row, int64_t rows_per_warp) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (N, K), got shape ",
              weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(M <= kGemvMaxRows, op, ": x may have at most ", kGemvMaxRows,
              " rows (tokens), got ", M, "; larger batches are GEMMs (torch.nn.functional.linear)");
  TORCH_CHECK(warps_per_row == 0 || is_pow2_upto(warps_per_row, 8), op,
              ": warps_per_row must be 0 (automatic), 1, 2, 4 or 8, got ", warps_per_row);
  TORCH_CHECK(rows_per_warp == 0 || is_pow2_upto(rows_per_warp, 4), op,
              ": rows_per_warp must be 0 (automatic), 1, 2 or 4, got ", rows_per_warp);
  GemvParams p;
  p.dtype = float_dtype(op, x, "x");
  check_matrix(op, x, "x", M, K, "(M, K)");
  check_matrix(op, weight, "weight", N, K, "(N, K)");
  check_matrix(op, out, "out", M, N, "(M, N)");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&weight, "weight"},
                                {&out, "out"}}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype (",
                x.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device (",
                x.device(), "), got ", t->device());
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.is_contiguous(), op,
                ": bias must be a contiguous (N,) = (", N, ",) tensor, got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias must have x's dtype (",
                x.scalar_type(), "), got ", b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": bias must be on x's device (", x.device(),
                "), got ", b.device());
    p.bias = b.data_ptr();
  }
  check_written_disjoint(op, {named(out, "out")},
                         {named(x, "x"), named(weight, "weight"), named(bias, "bias")});
  p.rows = M;
  p.out_features = N;
  p.in_features = K;
  p.x_row_stride = x.stride(0);
  p.weight_row_stride = weight.stride(0);
  p.out_row_stride = out.stride(0);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.warps_per_row = static_cast<int>(warps_per_row);
  p.rows_per_warp = static_cast<int>(rows_per_warp);
  return p;
}

}  // namespace

GemvParams make_gemv_params(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& out,
                            int64_t warps_per_row, int64_t rows_per_warp) {
  return product_params("gemv", x, weight, bias, out, warps_per_row, rows_per_warp);
}

GemvParams make_gemv_conv_update_params(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& conv_state, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, int64_t conv_start, bool silu,
    const std::optional<at::Tensor>& cache_indices, int64_t pad_slot_id, const at::Tensor& out,
    int64_t warps_per_row, int64_t rows_per_warp, bool check_index_values) {
  const char* op = "gemv_conv_update";
  GemvParams p = product_params(op, x, weight, bias, out, warps_per_row, rows_per_warp);
  p.conv = make_gemv_conv_params(out, conv_start, conv_state, conv_weight, conv_bias, silu,
                                 cache_indices, pad_slot_id, check_index_values);
  check_written_disjoint(op, {named(out, "out"), named(conv_state, "conv_state")},
                         {named(x, "x"), named(weight, "weight"), named(bias, "bias"),
                          named(conv_weight, "conv_weight"), named(conv_bias, "conv_bias"),
                          named(cache_indices, "cache_indices")});
  return p;
}

}  // namespace tpssm
