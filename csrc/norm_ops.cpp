#include "norm_ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "overlap_checks.h"

namespace tpssm {
namespace {

constexpr const char* kOp = "add_rms_norm";

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, kOp, ": ", name, " must be float32, float16 or bfloat16, got ",
              t.scalar_type());
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t dim) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == dim, kOp, ": ", name,
              " must have shape (rows, dim) = (", rows, ", ", dim, "), got ", t.sizes());
  TORCH_CHECK(dim <= 1 || t.stride(1) == 1, kOp, ": ", name,
              " must have a contiguous last dim, got strides ", t.strides());
  TORCH_CHECK(rows <= 1 || t.stride(0) >= dim, kOp, ": ", name,
              " rows must not overlap each other, got strides ", t.strides());
}

}  // namespace

AddRmsNormParams make_add_rms_norm_params(const at::Tensor& x,
                                          const std::optional<at::Tensor>& residual,
                                          const at::Tensor& weight, double eps,
                                          const at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D (rows, dim), got shape ", x.sizes());
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(dim >= 1, kOp, ": x must have at least one column, got shape ", x.sizes());
  TORCH_CHECK(eps >= 0.0, kOp, ": eps must be >= 0, got ", eps);
  AddRmsNormParams p;
  p.act_dtype = dtype_of(x, "x");
  check_rows(x, "x", rows, dim);
  check_rows(out, "out", rows, dim);
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
  check_written_disjoint(kOp, {named(out, "out"), named(residual, "residual")},
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
    check_rows(r, "residual", rows, dim);
    TORCH_CHECK(r.device() == x.device(), kOp, ": residual must be on x's device (", x.device(),
                "), got ", r.device());
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == x.scalar_type(), kOp,
                ": residual must be float32 or x's dtype (", x.scalar_type(), "), got ",
                r.scalar_type());
    p.residual_dtype = dtype_of(r, "residual");
    p.residual_row_stride = r.stride(0);
    p.residual = r.data_ptr();
  }
  return p;
}

}  // namespace tpssm
