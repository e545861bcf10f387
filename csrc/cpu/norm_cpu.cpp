// CPU norm ops: the arithmetic of the unfused model code in ATen ops, so each op is
// bit-identical to it on the CPU. add_rms_norm: the residual add in the residual's dtype, torch's
// rms_norm, the weight multiply in the activation dtype.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <vector>

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include "norm_ops.h"

namespace tpssm {
namespace {

void add_rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const at::Tensor& weight, double eps, const at::Tensor& out) {
  const AddRmsNormParams p = make_add_rms_norm_params(x, residual, weight, eps, out);
  at::Tensor h = x;
  if (residual.has_value()) {
    at::Tensor r = *residual;
    r.copy_(at::add(r, x));  // type promotion: fp32 + 16-bit adds in fp32, as `residual + out`
    h = r.to(x.scalar_type());
  }
  out.copy_(weight * at::rms_norm(h, {p.dim}, std::nullopt, eps));
}

// The gated values v = x * silu(z) (x without z) in fp32, as the models' torch code forms them.
at::Tensor gated_fp32(const at::Tensor& x, const std::optional<at::Tensor>& z) {
  at::Tensor v = x.to(at::kFloat);
  if (z.has_value()) v = v * at::silu(z->to(at::kFloat));
  return v;
}

// The groups as runs of equal width: the leading group when it differs, then the rest.
struct GroupRun {
  int64_t begin, count, width, first_group;  // columns [begin, begin + count * width)
};

std::vector<GroupRun> group_runs(const GatedRmsNormParams& p) {
  if (p.first_group_size == p.group_size) return {{0, p.dim / p.group_size, p.group_size, 0}};
  return {{0, 1, p.first_group_size, 0},
          {p.first_group_size, (p.dim - p.first_group_size) / p.group_size, p.group_size, 1}};
}

// (rows, count, width) view of a run's columns.
at::Tensor run_view(const at::Tensor& v, const GroupRun& r) {
  return v.narrow(1, r.begin, r.count * r.width).reshape({v.size(0), r.count, r.width});
}

// The models' unfused gated norm: gate in fp32, per-group mean of squares (or the reduced sums
// over norm_size), rounding to x's dtype, the weight multiply in x's dtype.
void gated_rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& weight, int64_t group_size,
                        int64_t first_group_size, double eps,
                        const std::optional<at::Tensor>& sum_sq, int64_t norm_size,
                        const at::Tensor& out) {
  const GatedRmsNormParams p = make_gated_rms_norm_params(x, z, weight, group_size,
                                                         first_group_size, eps, sum_sq,
                                                         norm_size, out);
  const at::Tensor v = gated_fp32(x, z);
  std::vector<at::Tensor> parts;
  for (const GroupRun& r : group_runs(p)) {
    const at::Tensor g = run_view(v, r);
    const at::Tensor mean =
        sum_sq.has_value()
            ? sum_sq->narrow(1, r.first_group, r.count).unsqueeze(-1) / static_cast<double>(norm_size)
            : g.pow(2).mean(-1, /*keepdim=*/true);
    parts.push_back((g * at::rsqrt(mean + eps)).reshape({p.rows, r.count * r.width}));
  }
  at::Tensor y = (parts.size() == 1 ? parts[0] : at::cat(parts, 1)).to(x.scalar_type());
  if (weight.has_value()) y = *weight * y;
  out.copy_(y);
}

void gated_sum_squares_cpu(const at::Tensor& x, const std::optional<at::Tensor>& z,
                           int64_t group_size, int64_t first_group_size, const at::Tensor& out) {
  const GatedRmsNormParams p =
      make_gated_sum_squares_params(x, z, group_size, first_group_size, out);
  const at::Tensor v = gated_fp32(x, z);
  for (const GroupRun& r : group_runs(p)) {
    out.narrow(1, r.first_group, r.count).copy_(run_view(v, r).pow(2).sum(-1));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("gated_rms_norm", &gated_rms_norm_cpu);
  m.impl("gated_sum_squares", &gated_sum_squares_cpu);
}

}  // namespace tpssm
