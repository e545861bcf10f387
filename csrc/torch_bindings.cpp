// The one place where the tpssm op schemas are declared. Implementations register themselves next
// to their code: TORCH_LIBRARY_IMPL(tpssm, CPU, m) in csrc/cpu/, TORCH_LIBRARY_IMPL(tpssm, CUDA, m)
// in csrc/cuda/. Fake (meta) implementations live in python/tpssm/ops.py (SSM ops) and
// python/tpssm/qallreduce.py (quantized all-reduce ops).
//
// Conventions: activations are token-major with channel stride 1; outputs go to a caller-provided
// `out`; states are updated in place in their slots (Tensor(a!)). Shapes are documented in
// csrc/kernels/ssm_params.h and in the Python wrappers.
#include <Python.h>
#include <torch/library.h>

#include "kernels/attention_params.h"
#include "kernels/launch_options.h"

TORCH_LIBRARY(tpssm, m) {
  m.def(
      "causal_conv1d(Tensor x, Tensor weight, Tensor? bias, Tensor(a!)? conv_states, "
      "Tensor? query_start_loc, Tensor? cache_indices, Tensor? has_initial_state, bool silu, "
      "int pad_slot_id, Tensor(b!) out, int chunk_len=0) -> ()");
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "bool silu, Tensor? cache_indices, int pad_slot_id, Tensor(b!) out) -> ()");
  m.def(
      "selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor(a!)? ssm_states, Tensor? query_start_loc, "
      "Tensor? cache_indices, Tensor? has_initial_state, int pad_slot_id, Tensor(b!) out, "
      "float? dt_min=None, float? dt_max=None, str algorithm='auto', int chunk_size=0, "
      "int split_len=0, int lanes_per_channel=0) -> ()");
  m.def(
      "selective_state_update(Tensor(a!) ssm_state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? dt_proj_weight, "
      "bool dt_softplus, Tensor? state_batch_indices, Tensor? dst_state_batch_indices, "
      "int pad_slot_id, Tensor(b!) out) -> ()");
  // Fused residual add + RMSNorm (kernels/norm_params.h): residual += x; out = weight *
  // rms_norm(residual in x's dtype) (or of x without a residual).
  m.def(
      "add_rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps, "
      "Tensor(b!) out) -> ()");
  // Grouped RMSNorm of x * silu(z) (kernels/norm_params.h): Mamba-2's gated norm; without z and
  // weight, a plain weightless RMSNorm per group. Groups spanning TP ranks: gated_sum_squares,
  // an all-reduce of its sums, then gated_rms_norm with sum_sq and norm_size.
  m.def(
      "gated_rms_norm(Tensor x, Tensor? z, Tensor? weight, int group_size, int first_group_size, "
      "float eps, Tensor? sum_sq, int norm_size, Tensor(a!) out) -> ()");
  m.def(
      "gated_sum_squares(Tensor x, Tensor? z, int group_size, int first_group_size, "
      "Tensor(a!) out) -> ()");
  // Decode-sized projection (kernels/gemv_params.h): out (M, N) = x (M, K) . weight^T (+ bias)
  // for M <= 8 tokens, fp32 sums rounded once; the launch options are 0 for the plan's choice.
  // With norm_weight, x is first normalised as add_rms_norm would (residual + x written to
  // residual_out; the residual itself is only read).
  m.def(
      "gemv(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, int warps_per_row=0, "
      "int rows_per_warp=0, Tensor? norm_weight=None, Tensor? residual=None, "
      "Tensor(b!)? residual_out=None, float norm_eps=1e-5) -> ()");
  // in_proj of a decode step and its conv in one launch (csrc/linear_ops.h): gemv's product (with
  // its optional norm prologue), then causal_conv1d_update applied in place to its columns
  // [conv_start, conv_start + conv_dim).
  m.def(
      "gemv_conv_update(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_state, "
      "Tensor conv_weight, Tensor? conv_bias, int conv_start, bool silu, Tensor? cache_indices, "
      "int pad_slot_id, Tensor(b!) out, int warps_per_row=0, int rows_per_warp=0, "
      "Tensor? norm_weight=None, Tensor? residual=None, Tensor(c!)? residual_out=None, "
      "float norm_eps=1e-5) -> ()");
  // Decode attention read in place from the KV cache (kernels/attention_params.h): row b attends
  // keys 0 .. lengths[b] - 1 of cache row rows[b]; a bad row or a length <= 0 gives zeros.
  // num_splits: the CUDA launch's key splits (0: automatic).
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor lengths, "
      "float scale, Tensor(a!) out, int num_splits=0) -> ()");
  // The key splits decode_attention's automatic plan picks (kernels/attention_params.h).
  m.def("decode_attention_splits(int heads, int max_len, int sm_count) -> int");
  m.def("has_cuda_kernels() -> bool");
  // Programmatic dependent launch of the decode-step kernels (kernels/launch_options.h); returns
  // the previous setting.
  m.def("set_programmatic_launch(bool enabled) -> bool");
  // Quantized two-shot all-reduce (design: docs/qallreduce.md; layout:
  // kernels/qallreduce_params.h).
  // codec: 0 = int8, 1 = fp8 e4m3. Buffers are uint8; only their first bytes (as the layout of
  // the current message needs) are read or written.
  m.def(
      "qar_quantize_pack(Tensor x, int world_size, int group_size, int codec, "
      "Tensor(a!) send) -> ()");
  m.def(
      "qar_reduce_requant(Tensor recv, int numel, int world_size, int group_size, int codec, "
      "Tensor(a!) mine) -> ()");
  m.def(
      "qar_dequant(Tensor gathered, int world_size, int group_size, int codec, "
      "Tensor? residual, Tensor(a!) out) -> ()");
  m.def(
      "qar_loopback(Tensor xs, int group_size, int codec, Tensor? residual, Tensor(a!) send, "
      "Tensor(b!) recv, Tensor(c!) mine, Tensor(d!) gathered, Tensor(e!) out) -> ()");
  m.def("qar_nccl_unique_id() -> Tensor");
  m.def("qar_nccl_init(Tensor unique_id, int rank, int world_size) -> int");
  m.def("qar_nccl_destroy(int handle) -> ()");
  m.def(
      "qar_nccl_all_reduce(int handle, Tensor x, int group_size, int codec, Tensor? residual, "
      "Tensor(a!) send, Tensor(b!) recv, Tensor(c!) mine, Tensor(d!) gathered, "
      "Tensor(e!) out) -> ()");
}

namespace {
bool has_cuda_kernels() {
#ifdef TPSSM_WITH_CUDA
  return true;
#else
  return false;
#endif
}
bool set_programmatic_launch(bool enabled) {
  return tpssm::programmatic_launch_setting().exchange(enabled);
}
int64_t decode_attention_splits(int64_t heads, int64_t max_len, int64_t sm_count) {
  return tpssm::decode_attention_auto_splits(heads, max_len, sm_count);
}
}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CompositeExplicitAutograd, m) {
  m.impl("decode_attention_splits", &decode_attention_splits);
  m.impl("has_cuda_kernels", &has_cuda_kernels);
  m.impl("set_programmatic_launch", &set_programmatic_launch);
}

// `import tpssm._C` loads this library, which runs the registrations above; the module itself
// holds nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
