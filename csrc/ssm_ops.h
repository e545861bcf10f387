// Torch-side entry points of the four SSM ops. make_*_params validates every documented rule
// (raising an error that names the argument and the rule) and fills the plain params struct that
// the CPU and CUDA kernels consume. The *_cpu / *_cuda functions are what TORCH_LIBRARY_IMPL
// registers; each calls make_*_params first.
//
// check_index_values: read the index tensors (query_start_loc, cache / state indices) on the host
// and reject bad values. The CPU ops always pass true (their kernels trust the values); the CUDA
// ops pass index_values_checked_on_host() (cuda/index_checks.h: TPSSM_DEBUG_CHECKS=1, and not
// under CUDA-graph capture), because reading device values back is a host synchronisation, and
// their kernels range-check every index instead (see ssm_params.h).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "kernels/gemv_params.h"
#include "kernels/ssm_params.h"

namespace tpssm {

using OptTensor = std::optional<at::Tensor>;

CausalConv1dParams make_causal_conv1d_params(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const OptTensor& conv_states, const OptTensor& query_start_loc,
    const OptTensor& cache_indices, const OptTensor& has_initial_state, bool silu,
    int64_t pad_slot_id, const at::Tensor& out, int64_t chunk_len, bool check_index_values);

CausalConv1dUpdateParams make_causal_conv1d_update_params(
    const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
    const OptTensor& bias, bool silu, const OptTensor& cache_indices, int64_t pad_slot_id,
    const at::Tensor& out, bool check_index_values);

// The conv epilogue of gemv_conv_update (csrc/kernels/gemv_params.h): the decode conv of the
// columns [conv_start, conv_start + conv_dim) of the product out (rows, N), in place. Checks the
// conv's own arguments against out; the caller checks the product's and the overlaps.
GemvConvParams make_gemv_conv_params(const at::Tensor& out, int64_t conv_start,
                                     const at::Tensor& conv_state, const at::Tensor& conv_weight,
                                     const OptTensor& conv_bias, bool silu,
                                     const OptTensor& cache_indices, int64_t pad_slot_id,
                                     bool check_index_values);

SelectiveScanParams make_selective_scan_params(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    bool delta_softplus, const OptTensor& ssm_states, const OptTensor& query_start_loc,
    const OptTensor& cache_indices, const OptTensor& has_initial_state, int64_t pad_slot_id,
    const at::Tensor& out, std::optional<double> dt_min, std::optional<double> dt_max,
    c10::string_view algorithm, int64_t chunk_size, int64_t split_len, int64_t lanes_per_channel,
    bool check_index_values);

SelectiveStateUpdateParams make_selective_state_update_params(
    const at::Tensor& ssm_state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
    const OptTensor& dt_bias, const OptTensor& dt_proj_weight, bool dt_softplus,
    const OptTensor& state_batch_indices, const OptTensor& dst_state_batch_indices,
    int64_t pad_slot_id, const at::Tensor& out, bool check_index_values);

// True when TPSSM_DEBUG_CHECKS=1: the CUDA ops then check index values on the host as well.
bool cuda_index_values_checked_on_host();

}  // namespace tpssm
