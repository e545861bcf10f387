// The pybind11 tensor casters and per-operator ATen headers, not torch/extension.h (the whole
// C++ frontend): a faster build.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <map>

#include "emu_shim.h"
#include "emu_mma.h"  // the cp.async counters
#include "ssm_ops.h"
#include "kernels/ssm_kernels.h"  // the transformed copies (build dir first on the include path)
#include "kernels/norm_kernels.h"
#include "norm_ops.h"
#include "kernels/attention_kernels.h"
#include "attention_ops.h"
#include "kernels/gemv_kernels.h"
#include "kernels/launch_options.h"
#include "linear_ops.h"

using tpssm::OptTensor;

static void reset() { emu_error.clear(); }

void causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                   const OptTensor& conv_states, const OptTensor& qsl, const OptTensor& ci,
                   const OptTensor& his, bool silu, int64_t pad, const at::Tensor& out,
                   int64_t chunk_len) {
  reset();
  auto p = tpssm::make_causal_conv1d_params(x, weight, bias, conv_states, qsl, ci, his, silu,
                                            pad, out, chunk_len,
                                            tpssm::cuda_index_values_checked_on_host());
  tpssm::run_causal_conv1d(p, nullptr);
}
void causal_conv1d_update(const at::Tensor& x, const at::Tensor& st, const at::Tensor& weight,
                          const OptTensor& bias, bool silu, const OptTensor& ci, int64_t pad,
                          const at::Tensor& out) {
  reset();
  auto p = tpssm::make_causal_conv1d_update_params(x, st, weight, bias, silu, ci, pad, out,
                                                   tpssm::cuda_index_values_checked_on_host());
  tpssm::run_causal_conv1d_update(p, nullptr);
}
void selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                    const OptTensor& z, const OptTensor& db, bool sp, const OptTensor& states,
                    const OptTensor& qsl, const OptTensor& ci, const OptTensor& his, int64_t pad,
                    const at::Tensor& out, std::optional<double> dt_min,
                    std::optional<double> dt_max, const std::string& algorithm, int64_t chunk_size,
                    int64_t split_len, int64_t lanes_per_channel) {
  reset();
  auto p = tpssm::make_selective_scan_params(u, delta, A, B, C, D, z, db, sp, states, qsl, ci,
                                             his, pad, out, dt_min, dt_max, algorithm, chunk_size,
                                             split_len, lanes_per_channel,
                                             tpssm::cuda_index_values_checked_on_host());
  const tpssm::ScanPlan plan = tpssm::plan_selective_scan(p);
  const size_t bytes = static_cast<size_t>(plan.workspace_bytes);
  // 0xFF bytes: NaN floats, so a read of a workspace entry no pass wrote poisons the result.
  at::Tensor ws = at::full({static_cast<int64_t>(bytes) + 1}, 255, u.options().dtype(at::kByte));
  tpssm::run_selective_scan(p, plan, bytes ? ws.data_ptr() : nullptr, bytes, nullptr);
}
void selective_state_update(const at::Tensor& s, const at::Tensor& x, const at::Tensor& dt,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const OptTensor& D, const OptTensor& z, const OptTensor& db,
                            const OptTensor& dtw, bool sp,
                            const OptTensor& src, const OptTensor& dst, int64_t pad,
                            const at::Tensor& out) {
  reset();
  auto p = tpssm::make_selective_state_update_params(
      s, x, dt, A, B, C, D, z, db, dtw, sp, src, dst, pad, out,
      tpssm::cuda_index_values_checked_on_host());
  tpssm::run_selective_state_update(p, nullptr);
}
void add_rms_norm(const at::Tensor& x, const OptTensor& residual, const at::Tensor& weight,
                  double eps, const at::Tensor& out) {
  reset();
  auto p = tpssm::make_add_rms_norm_params(x, residual, weight, eps, out);
  tpssm::run_add_rms_norm(p, nullptr);
}
void gated_rms_norm(const at::Tensor& x, const OptTensor& z, const OptTensor& weight,
                    int64_t group_size, int64_t first_group_size, double eps,
                    const OptTensor& sum_sq, int64_t norm_size, const at::Tensor& out) {
  reset();
  auto p = tpssm::make_gated_rms_norm_params(x, z, weight, group_size, first_group_size, eps,
                                             sum_sq, norm_size, out);
  tpssm::run_gated_rms_norm(p, nullptr);
}
void gated_sum_squares(const at::Tensor& x, const OptTensor& z, int64_t group_size,
                       int64_t first_group_size, const at::Tensor& out) {
  reset();
  auto p = tpssm::make_gated_sum_squares_params(x, z, group_size, first_group_size, out);
  tpssm::run_gated_sum_squares(p, nullptr);
}
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& rows, const at::Tensor& lengths, double scale,
                      const at::Tensor& out, int64_t num_splits) {
  reset();
  auto p = tpssm::make_decode_attention_params(q, k_cache, v_cache, rows, lengths, scale, out,
                                               num_splits);
  const at::Tensor partials = tpssm::plan_decode_attention_splits(p, emu_sm_count, q);
  tpssm::run_decode_attention(p, nullptr);
}
void gemv(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
          const at::Tensor& out, int64_t warps_per_row, int64_t rows_per_warp,
          const OptTensor& norm_weight, const OptTensor& residual, const OptTensor& residual_out,
          double norm_eps) {
  reset();
  auto p = tpssm::make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp,
                                   norm_weight, residual, residual_out, norm_eps);
  tpssm::run_gemv(p, nullptr);
}
void gemv_conv_update(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                      const at::Tensor& conv_state, const at::Tensor& conv_weight,
                      const OptTensor& conv_bias, int64_t conv_start, bool silu,
                      const OptTensor& ci, int64_t pad, const at::Tensor& out,
                      int64_t warps_per_row, int64_t rows_per_warp, const OptTensor& norm_weight,
                      const OptTensor& residual, const OptTensor& residual_out,
                      double norm_eps) {
  reset();
  auto p = tpssm::make_gemv_conv_update_params(
      x, weight, bias, conv_state, conv_weight, conv_bias, conv_start, silu, ci, pad, out,
      warps_per_row, rows_per_warp, norm_weight, residual, residual_out, norm_eps,
      tpssm::cuda_index_values_checked_on_host());
  tpssm::run_gemv(p, nullptr);
}
// The launch plan gemv would take: (warps_per_row, rows_per_warp, vectorized, blocks).
std::tuple<int, int, bool, int64_t> gemv_plan(const at::Tensor& x, const at::Tensor& weight,
                                              const OptTensor& bias, const at::Tensor& out,
                                              int64_t warps_per_row, int64_t rows_per_warp) {
  auto p = tpssm::make_gemv_params(x, weight, bias, out, warps_per_row, rows_per_warp,
                                   std::nullopt, std::nullopt, std::nullopt, 0.0);
  const tpssm::GemvPlan plan = tpssm::plan_gemv(p, emu_sm_count);
  return {plan.warps_per_row, plan.rows_per_warp, plan.vectorized, plan.blocks};
}
// The emulated kernels' own programmatic-launch setting (this module's copy of it).
bool set_programmatic_launch(bool enabled) {
  return tpssm::programmatic_launch_setting().exchange(enabled);
}
// Launches made with the programmatic-serialization attribute since the last call.
int64_t take_programmatic_launches() { return emu_programmatic_launches.exchange(0); }
void set_sm_count(int n) { emu_sm_count = n; }
void set_max_grid_y(int n) { emu_max_grid_y = n; }
// {bytes: cp.async issued} since the last call, which resets them.
std::map<int, int64_t> take_cp_async_counts() {
  std::map<int, int64_t> counts;
  const int sizes[3] = {4, 8, 16};
  for (int i = 0; i < 3; ++i) counts[sizes[i]] = tpssm::emu_cp_async_count[i].exchange(0);
  return counts;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_conv1d", &causal_conv1d);
  m.def("causal_conv1d_update", &causal_conv1d_update);
  m.def("selective_scan", &selective_scan);
  m.def("selective_state_update", &selective_state_update);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("gated_rms_norm", &gated_rms_norm);
  m.def("gated_sum_squares", &gated_sum_squares);
  m.def("decode_attention", &decode_attention);
  m.def("decode_attention_splits", &tpssm::decode_attention_auto_splits);
  m.def("gemv", &gemv);
  m.def("gemv_conv_update", &gemv_conv_update);
  m.def("gemv_plan", &gemv_plan);
  m.def("set_programmatic_launch", &set_programmatic_launch);
  m.def("take_programmatic_launches", &take_programmatic_launches);
  m.def("set_sm_count", &set_sm_count);
  m.def("set_max_grid_y", &set_max_grid_y);
  m.def("take_cp_async_counts", &take_cp_async_counts);
}
