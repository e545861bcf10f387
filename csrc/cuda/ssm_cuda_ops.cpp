// CUDA implementations of the four SSM ops: validate and fill the params (make_*_params, shared
// with the CPU ops), guard the device, launch the torch-free kernels on the current stream.
// Only c10 CUDA headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE / cuBLAS headers that a bare
// toolkit may lack.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/index_checks.h"
#include "kernels/ssm_kernels.h"
#include "ssm_ops.h"

namespace tpssm {

void causal_conv1d_cuda(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                        const OptTensor& conv_states, const OptTensor& query_start_loc,
                        const OptTensor& cache_indices, const OptTensor& has_initial_state,
                        bool silu, int64_t pad_slot_id, const at::Tensor& out,
                        int64_t chunk_len) {
  const CausalConv1dParams params =
      make_causal_conv1d_params(x, weight, bias, conv_states, query_start_loc, cache_indices,
                                has_initial_state, silu, pad_slot_id, out, chunk_len,
                                index_values_checked_on_host(x));
  const c10::cuda::CUDAGuard guard(x.device());
  run_causal_conv1d(params, c10::cuda::getCurrentCUDAStream().stream());
}

void causal_conv1d_update_cuda(const at::Tensor& x, const at::Tensor& conv_state,
                               const at::Tensor& weight, const OptTensor& bias, bool silu,
                               const OptTensor& cache_indices, int64_t pad_slot_id,
                               const at::Tensor& out) {
  const CausalConv1dUpdateParams params = make_causal_conv1d_update_params(
      x, conv_state, weight, bias, silu, cache_indices, pad_slot_id, out,
      index_values_checked_on_host(x));
  const c10::cuda::CUDAGuard guard(x.device());
  run_causal_conv1d_update(params, c10::cuda::getCurrentCUDAStream().stream());
}

void selective_scan_cuda(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                         const OptTensor& z, const OptTensor& delta_bias, bool delta_softplus,
                         const OptTensor& ssm_states, const OptTensor& query_start_loc,
                         const OptTensor& cache_indices, const OptTensor& has_initial_state,
                         int64_t pad_slot_id, const at::Tensor& out,
                         std::optional<double> dt_min, std::optional<double> dt_max,
                         c10::string_view algorithm, int64_t chunk_size, int64_t split_len,
                         int64_t lanes_per_channel) {
  const SelectiveScanParams params = make_selective_scan_params(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_states, query_start_loc,
      cache_indices, has_initial_state, pad_slot_id, out, dt_min, dt_max, algorithm, chunk_size,
      split_len, lanes_per_channel, index_values_checked_on_host(u));
  const c10::cuda::CUDAGuard guard(u.device());
  // One plan per call: it sizes the workspace and is what the launcher runs. The chunked plan's
  // workspace comes from the caching allocator: no cudaMalloc on the hot path.
  const ScanPlan plan = plan_selective_scan(params);
  const size_t bytes = static_cast<size_t>(plan.workspace_bytes);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, u.options().dtype(at::kByte));
  }
  run_selective_scan(params, plan, bytes > 0 ? workspace.data_ptr() : nullptr, bytes,
                     c10::cuda::getCurrentCUDAStream().stream());
}

void selective_state_update_cuda(const at::Tensor& ssm_state, const at::Tensor& x,
                                 const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                 const OptTensor& dt_bias, const OptTensor& dt_proj_weight,
                                 bool dt_softplus, const OptTensor& state_batch_indices,
                                 const OptTensor& dst_state_batch_indices, int64_t pad_slot_id,
                                 const at::Tensor& out) {
  const SelectiveStateUpdateParams params = make_selective_state_update_params(
      ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight, dt_softplus,
      state_batch_indices, dst_state_batch_indices, pad_slot_id, out,
      index_values_checked_on_host(x));
  const c10::cuda::CUDAGuard guard(x.device());
  run_selective_state_update(params, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace tpssm

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) {
  m.impl("causal_conv1d", &tpssm::causal_conv1d_cuda);
  m.impl("causal_conv1d_update", &tpssm::causal_conv1d_update_cuda);
  m.impl("selective_scan", &tpssm::selective_scan_cuda);
  m.impl("selective_state_update", &tpssm::selective_state_update_cuda);
}
