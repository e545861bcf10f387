#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "norm_ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "arg_checks.h"
#include "buffer_rules.h"

namespace tpssm {
namespace {

void check_rows(const char* op, const at::Tensor& t, const char* name, int64_t rows,
                int64_t dim) {
  check_matrix(op, t, name, rows, dim, "(rows, dim)");
}

}  // namespace

AddRmsNormParams make_add_rms_norm_params(const at::Tensor& x,
                                          const std::optional<at::Tensor>& residual,
                                          const at::Tensor& weight, double eps,
                                          const at::Tensor& out) {
  constexpr const char* kOp = "add_rms_norm";
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (rows, dim), got shape ", x.sizes());
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(dim >= 1, kOp, ": x must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0, got ", eps);
  AddRmsNormParams p;
  p.act_dtype = float_dtype(kOp, x, "x");
  check_rows(kOp, x, "x", rows, dim);
  check_rows(kOp, out, "out", rows, dim);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), kOp, ": out must have x's dtype (",
              x.scalar_type(), "), got ", out.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim && weight.is_contiguous(), kOp,
              ": weight must be a contiguous (dim,) = (", dim, ",) tensor, got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kOp, ": weight must have x's dtype (",
              x.scalar_type(), "), got ", weight.scalar_type());
  for (const auto* t : {&out, &weight}) {
    TORCH_CHECK(t->device() == x.device(), kOp, ": every tensor must be on x's device (",
                x.device(), "), got ", t->device());
  }
  check_buffer_rules(kOp, {named(out, "out"), named(residual, "residual")},
                     {named(x, "x"), named(weight, "weight")});
  p.rows = rows;
  p.dim = dim;
  p.x_row_stride = x.stride(0);
  p.out_row_stride = out.stride(0);
  p.eps = static_cast<float>(eps);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    check_rows(kOp, r, "residual", rows, dim);
    TORCH_CHECK(r.device() == x.device(), kOp, ": residual must be on x's device (", x.device(),
                "), got ", r.device());
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == x.scalar_type(), kOp,
                ": residual must be float32 or x's dtype (", x.scalar_type(), "), got ",
                r.scalar_type());
    p.residual_dtype = float_dtype(kOp, r, "residual");
    p.residual_row_stride = r.stride(0);
    p.residual = r.data_ptr();
  }
  return p;
}

namespace {

// x, z and the column groups, shared by gated_rms_norm and gated_sum_squares.
GatedRmsNormParams gated_common(const char* op, const at::Tensor& x,
                                const std::optional<at::Tensor>& z, int64_t group_size,
                                int64_t first_group_size) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, dim), got shape ", x.sizes());
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(dim >= 1, op, ": x must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(group_size >= 0 && first_group_size >= 0, op,
              ": group_size and first_group_size must be >= 0, got ", group_size, " and ",
              first_group_size);
  if (group_size == 0) group_size = dim;
  if (first_group_size == 0) first_group_size = group_size;
  TORCH_CHECK(first_group_size <= dim && (dim - first_group_size) % group_size == 0, op,
              ": the groups must tile dim (", dim, "): a first group of ", first_group_size,
              " columns, then groups of group_size ", group_size);
  GatedRmsNormParams p;
  p.act_dtype = float_dtype(op, x, "x");
  check_rows(op, x, "x", rows, dim);
  if (z.has_value()) {
    check_rows(op, *z, "z", rows, dim);
    TORCH_CHECK(z->scalar_type() == x.scalar_type(), op, ": z must have x's dtype (",
                x.scalar_type(), "), got ", z->scalar_type());
    TORCH_CHECK(z->device() == x.device(), op, ": z must be on x's device (", x.device(),
                "), got ", z->device());
    p.z_row_stride = z->stride(0);
    p.z = z->data_ptr();
  }
  p.rows = rows;
  p.dim = dim;
  p.group_size = group_size;
  p.first_group_size = first_group_size;
  p.x_row_stride = x.stride(0);
  p.x = x.data_ptr();
  return p;
}

void check_sums(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x,
                int64_t rows, int64_t groups) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device (", x.device(),
              "), got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == groups, op, ": ", name,
              " must have shape (rows, groups) = (", rows, ", ", groups, "), got ", t.sizes());
  TORCH_CHECK(groups <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have a contiguous last dim, got strides ", t.strides());
}

int64_t num_groups(const GatedRmsNormParams& p) {
  return 1 + (p.dim - p.first_group_size) / p.group_size;
}

}  // namespace

GatedRmsNormParams make_gated_rms_norm_params(const at::Tensor& x,
                                              const std::optional<at::Tensor>& z,
                                              const std::optional<at::Tensor>& weight,
                                              int64_t group_size, int64_t first_group_size,
                                              double eps, const std::optional<at::Tensor>& sum_sq,
                                              int64_t norm_size, const at::Tensor& out) {
  constexpr const char* kOp = "gated_rms_norm";
  GatedRmsNormParams p = gated_common(kOp, x, z, group_size, first_group_size);
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0, got ", eps);
  check_rows(kOp, out, "out", p.rows, p.dim);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), kOp, ": out must have x's dtype (",
              x.scalar_type(), "), got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), kOp, ": out must be on x's device (", x.device(),
              "), got ", out.device());
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == p.dim && w.is_contiguous(), kOp,
                ": weight must be a contiguous (dim,) = (", p.dim, ",) tensor, got shape ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), kOp, ": weight must have x's dtype (",
                x.scalar_type(), "), got ", w.scalar_type());
    TORCH_CHECK(w.device() == x.device(), kOp, ": weight must be on x's device (", x.device(),
                "), got ", w.device());
    p.weight = w.data_ptr();
  }
  if (sum_sq.has_value()) {
    check_sums(kOp, *sum_sq, "sum_sq", x, p.rows, num_groups(p));
    TORCH_CHECK(norm_size >= 1, kOp,
                ": norm_size (the groups' width over all ranks) must be >= 1 with sum_sq, got ",
                norm_size);
    p.sum_sq = sum_sq->data_ptr<float>();
    p.sum_sq_row_stride = sum_sq->stride(0);
    p.norm_size = static_cast<float>(norm_size);
  } else {
    TORCH_CHECK(norm_size == 0, kOp, ": norm_size applies with sum_sq only, got ", norm_size);
  }
  check_buffer_rules(kOp, {named(out, "out")},
                     {named(x, "x"), named(z, "z"), named(weight, "weight"),
                      named(sum_sq, "sum_sq")});
  p.out_row_stride = out.stride(0);
  p.eps = static_cast<float>(eps);
  p.out = out.data_ptr();
  return p;
}

GatedRmsNormParams make_gated_sum_squares_params(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& z,
                                                 int64_t group_size, int64_t first_group_size,
                                                 const at::Tensor& out) {
  constexpr const char* kOp = "gated_sum_squares";
  GatedRmsNormParams p = gated_common(kOp, x, z, group_size, first_group_size);
  check_sums(kOp, out, "out", x, p.rows, num_groups(p));
  check_buffer_rules(kOp, {named(out, "out")}, {named(x, "x"), named(z, "z")});
  p.sum_sq_out = out.data_ptr<float>();
  p.sum_sq_row_stride = out.stride(0);
  return p;
}

}  // namespace tpssm
