#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "linear_ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "arg_checks.h"
#include "kernels/norm_params.h"
#include "buffer_rules.h"
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

// The norm prologue's operands (GemvNormParams), checked against p's x; all absent: no norm.
void add_norm_params(const char* op, GemvParams& p, const at::Tensor& x,
                     const std::optional<at::Tensor>& norm_weight,
                     const std::optional<at::Tensor>& residual,
                     const std::optional<at::Tensor>& residual_out, double eps) {
  if (!norm_weight.has_value()) {
    TORCH_CHECK(!residual.has_value() && !residual_out.has_value(), op,
                ": residual and residual_out belong to the norm prologue and need norm_weight");
    return;
  }
  const int64_t M = p.rows, K = p.in_features;
  TORCH_CHECK(p.out_features >= 1, op,
              ": the norm prologue needs at least one weight row (N >= 1): the blocks that "
              "multiply are the ones that normalise");
  const at::Tensor& w = *norm_weight;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == K && w.is_contiguous(), op,
              ": norm_weight must be a contiguous (K,) = (", K, ",) tensor, got shape ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op,
              ": norm_weight must have x's dtype and device (", x.scalar_type(), ", ",
              x.device(), "), got ", w.scalar_type(), ", ", w.device());
  TORCH_CHECK(eps >= 0.0, op, ": norm_eps must be >= 0, got ", eps);
  TORCH_CHECK(residual.has_value() == residual_out.has_value(), op,
              ": residual and residual_out come together (the updated residual stream is "
              "written to residual_out), got ", residual.has_value() ? "residual" : "residual_out",
              " alone");
  GemvNormParams& nm = p.norm;
  nm.weight = w.data_ptr();
  nm.eps = static_cast<float>(eps);
  nm.reduce_threads = norm_block_threads(K);
  if (!residual.has_value()) return;
  const at::Tensor& r = *residual;
  const at::Tensor& ro = *residual_out;
  check_matrix(op, r, "residual", M, K, "(M, K)");
  check_matrix(op, ro, "residual_out", M, K, "(M, K)");
  TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == x.scalar_type(), op,
              ": residual must be float32 or x's dtype (", x.scalar_type(), "), got ",
              r.scalar_type());
  TORCH_CHECK(ro.scalar_type() == r.scalar_type(), op,
              ": residual_out must have residual's dtype (", r.scalar_type(), "), got ",
              ro.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&r, "residual"},
                                {&ro, "residual_out"}}) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device (",
                x.device(), "), got ", t->device());
  }
  nm.residual = r.data_ptr();
  nm.residual_out = ro.data_ptr();
  nm.residual_fp32 = r.scalar_type() == at::kFloat;
  nm.residual_row_stride = r.stride(0);
  nm.residual_out_row_stride = ro.stride(0);
}

// gemv's product with its optional norm prologue; the caller checks the overlap rule once over
// everything its op reads and writes.
GemvParams product_with_norm(const char* op, const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& out,
                             int64_t warps_per_row, int64_t rows_per_warp,
                             const std::optional<at::Tensor>& norm_weight,
                             const std::optional<at::Tensor>& residual,
                             const std::optional<at::Tensor>& residual_out, double norm_eps) {
  GemvParams p = product_params(op, x, weight, bias, out, warps_per_row, rows_per_warp);
  add_norm_params(op, p, x, norm_weight, residual, residual_out, norm_eps);
  return p;
}

}  // namespace

GemvParams make_gemv_params(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& out,
                            int64_t warps_per_row, int64_t rows_per_warp,
                            const std::optional<at::Tensor>& norm_weight,
                            const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& residual_out, double norm_eps) {
  GemvParams p = product_with_norm("gemv", x, weight, bias, out, warps_per_row, rows_per_warp,
                                   norm_weight, residual, residual_out, norm_eps);
  check_buffer_rules("gemv", {named(out, "out"), named(residual_out, "residual_out")},
                     {named(x, "x"), named(weight, "weight"), named(bias, "bias"),
                      named(norm_weight, "norm_weight"), named(residual, "residual")});
  return p;
}

GemvParams make_gemv_conv_update_params(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& conv_state, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, int64_t conv_start, bool silu,
    const std::optional<at::Tensor>& cache_indices, int64_t pad_slot_id, const at::Tensor& out,
    int64_t warps_per_row, int64_t rows_per_warp, const std::optional<at::Tensor>& norm_weight,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_out,
    double norm_eps, bool check_index_values) {
  const char* op = "gemv_conv_update";
  GemvParams p = product_with_norm(op, x, weight, bias, out, warps_per_row, rows_per_warp,
                                   norm_weight, residual, residual_out, norm_eps);
  p.conv = make_gemv_conv_params(out, conv_start, conv_state, conv_weight, conv_bias, silu,
                                 cache_indices, pad_slot_id, check_index_values);
  check_buffer_rules(op, {named(out, "out"), named(conv_state, "conv_state"),
                          named(residual_out, "residual_out")},
                     {named(x, "x"), named(weight, "weight"), named(bias, "bias"),
                      named(norm_weight, "norm_weight"), named(residual, "residual"),
                      named(conv_weight, "conv_weight"), named(conv_bias, "conv_bias"),
                      named(cache_indices, "cache_indices")});
  return p;
}

}  // namespace tpssm
