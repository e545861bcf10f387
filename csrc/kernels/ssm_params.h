// Plain parameter structs for the four SSM ops. Torch-free: the CPU kernels, the CUDA kernels and
// the standalone benchmark binaries all consume these, and only csrc/ssm_ops.cpp fills them from
// tensors (after validating every rule the op documents).
//
// Layout conventions (shared by every op):
// - Activations are token-major: a dense batch is (batch, seqlen, channels) and a packed varlen
//   batch is (total_tokens, channels) with query_start_loc. The channel stride is always 1; the
//   token and batch strides are free, so column slices of a fused in_proj output are accepted
//   without copies.
// - Strides are in elements, int64.
// - A unified head form covers Mamba1 and Mamba2: channels = nheads * headdim.
//     Mamba1: nheads = dim, headdim = 1, A is (dim, dstate) (a_is_per_state = true),
//             delta is (tokens, dim).
//     Mamba2: A is (nheads,) (a_is_per_state = false), delta is (tokens, nheads).
//   B and C are (tokens, ngroups, dstate); head h uses group h / (nheads / ngroups).
// - A slot index equal to pad_slot_id marks a batch row that is skipped entirely: nothing is read
//   from or written to its slot, and its output rows are not written.
// - Index values are not validated before a CUDA launch (that would be a host sync), so the
//   kernels keep every access in bounds whatever they are: a slot index outside [0, num_slots)
//   makes its row a padded row, and query_start_loc entries are clamped to [0, total_tokens]
//   with a sequence ending before its start taken as empty (SeqView in kernel_utils.cuh). The
//   results this gives are documented in python/tpssm/ops.py.
#pragma once

#include <cstdint>

namespace tpssm {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Prefill depthwise causal conv1d:
//   out[t, c] = act(bias[c] + sum_{k<width} weight[c, k] * xpad[t - (width-1) + k, c])
// where xpad prepends the width-1 previous inputs of the sequence: the slot's conv state when
// has_initial_state, zeros otherwise. The final width-1 inputs (state included when the
// sequence is shorter than width-1) are written back to the slot.
struct CausalConv1dParams {
  DType dtype;          // of x, weight, bias, conv_states, out
  int64_t batch;        // number of sequences
  int64_t dim;          // channels
  int64_t seqlen;       // dense: tokens per sequence; varlen: total tokens
  int32_t width;        // 2..4
  bool silu;

  const void* x;        // dense (batch, seqlen, dim) / varlen (total_tokens, dim)
  int64_t x_batch_stride;   // dense only
  int64_t x_token_stride;
  const void* weight;   // (dim, width)
  int64_t weight_channel_stride;
  int64_t weight_width_stride;
  const void* bias;     // (dim,) contiguous, or nullptr
  void* out;            // same shape as x
  int64_t out_batch_stride;
  int64_t out_token_stride;

  void* conv_states;    // (num_slots, dim, width - 1), or nullptr (no initial / final state)
  int64_t num_slots;
  int64_t conv_states_slot_stride;
  int64_t conv_states_channel_stride;
  int64_t conv_states_width_stride;

  const int32_t* query_start_loc;   // (batch + 1,) for varlen, nullptr for dense
  const int32_t* cache_indices;     // (batch,) slot per sequence, nullptr: slot b for row b
  const bool* has_initial_state;    // (batch,), nullptr: no sequence has an initial state
  int32_t pad_slot_id;

  // CUDA: tokens per block of the flattened token range, walked in shared-memory tiles of
  // 64 (16-bit) / 32 (fp32) tokens x 128 channels. Any value >= 1; 0: one tile per block (more
  // only if the grid would exceed 2^31-1 blocks). Tests force small values so that short inputs
  // cross tile boundaries. The result does not depend on it.
  int64_t chunk_len;
};

// Decode conv: seqlen (>= 1, small) new tokens per request, the slot's conv state updated in
// place to the last width-1 inputs of (state ++ x).
struct CausalConv1dUpdateParams {
  DType dtype;
  int64_t batch;
  int64_t dim;
  int64_t seqlen;
  int32_t width;
  bool silu;

  const void* x;        // (batch, seqlen, dim)
  int64_t x_batch_stride;
  int64_t x_token_stride;
  const void* weight;   // (dim, width)
  int64_t weight_channel_stride;
  int64_t weight_width_stride;
  const void* bias;     // (dim,) contiguous, or nullptr
  void* out;            // (batch, seqlen, dim)
  int64_t out_batch_stride;
  int64_t out_token_stride;

  void* conv_state;     // (num_slots, dim, width - 1)
  int64_t num_slots;
  int64_t conv_state_slot_stride;
  int64_t conv_state_channel_stride;
  int64_t conv_state_width_stride;

  const int32_t* cache_indices;  // (batch,), nullptr: slot b for row b
  int32_t pad_slot_id;
};

// Which algorithm selective_scan runs (the op's `algorithm` argument).
//   kAuto: the chunked (SSD) form for the Mamba2 form where the device and shapes allow it, the
//          recurrence otherwise.
//   kRecurrent: the per-token recurrence (Mamba1 on CUDA: staged token tiles).
//   kRecurrentDirect: the recurrence with one token of look-ahead instead of staged tiles (CUDA,
//          Mamba1 form; elsewhere the same as kRecurrent). Kept for comparison.
//   kSsd: the chunked state-space-duality form: Mamba2 form only (A per head).
enum class ScanAlgorithm : int32_t { kAuto = 0, kRecurrent = 1, kRecurrentDirect = 2, kSsd = 3 };

// Prefill selective scan over the unified head form (see the header comment):
//   dt      = delta_softplus ? softplus(delta + delta_bias) : delta + delta_bias
//   dt      = min(max(dt, dt_min), dt_max)
//   state   = exp(dt * A) * state + dt * B[t, g] * u[t]
//   y[t]    = <state, C[t, g]> + D * u[t];  y *= silu(z[t]) when z is given
// The state is carried in fp32 and rounded to state_dtype only when stored.
struct SelectiveScanParams {
  DType act_dtype;      // u, delta, B, C, z, out
  DType state_dtype;    // ssm_states: float32, or act_dtype (16-bit state)
  int64_t batch;
  int64_t seqlen;       // dense: tokens per sequence; varlen: total tokens
  int64_t nheads;
  int64_t headdim;
  int64_t dstate;
  int64_t ngroups;
  bool a_is_per_state;  // Mamba1 A (nheads, dstate) vs Mamba2 A (nheads,)
  bool delta_softplus;

  const void* u;        // (batch, seqlen, nheads * headdim) / (total_tokens, nheads * headdim)
  int64_t u_batch_stride;
  int64_t u_token_stride;
  const void* delta;    // (batch, seqlen, nheads) / (total_tokens, nheads)
  int64_t delta_batch_stride;
  int64_t delta_token_stride;
  const float* A;       // (nheads, dstate) or (nheads,)
  int64_t A_head_stride;
  int64_t A_state_stride;   // 0 for the Mamba2 form
  const void* B;        // (batch, seqlen, ngroups, dstate) / (total_tokens, ngroups, dstate)
  int64_t B_batch_stride;
  int64_t B_token_stride;
  int64_t B_group_stride;
  const void* C;        // same shape as B
  int64_t C_batch_stride;
  int64_t C_token_stride;
  int64_t C_group_stride;
  const float* D;       // (nheads,) contiguous, or nullptr
  const void* z;        // same shape as u, or nullptr
  int64_t z_batch_stride;
  int64_t z_token_stride;
  const float* delta_bias;  // (nheads,) contiguous, or nullptr
  void* out;            // same shape as u
  int64_t out_batch_stride;
  int64_t out_token_stride;

  void* ssm_states;     // (num_slots, nheads, headdim, dstate), or nullptr
  int64_t num_slots;
  int64_t ssm_states_slot_stride;
  int64_t ssm_states_head_stride;
  int64_t ssm_states_dim_stride;   // dstate stride is 1

  const int32_t* query_start_loc;   // (batch + 1,) for varlen, nullptr for dense
  const int32_t* cache_indices;     // (batch,), nullptr: slot b for row b
  const bool* has_initial_state;    // (batch,), nullptr: no sequence has an initial state
  int32_t pad_slot_id;

  float dt_min;         // dt limits (-inf and +inf: none)
  float dt_max;
  ScanAlgorithm algorithm;
  // Tokens per chunk of the SSD form (0: the kernel's default; CUDA supports 64 only).
  int64_t chunk_size;
  // Tokens per piece when the launcher splits the flattened token range to fill the device
  // (0: the launcher decides; > 0 forces the split plan, so tests cross piece boundaries).
  int64_t split_len;
  // Lanes per channel of the Mamba1 form's staged walk (0: the launcher decides; 1, 2 or 4
  // forces it, and > 1 needs the staged walk).
  int64_t lanes_per_channel;
};

// Decode: one token per request; the state is read from state_batch_indices[b] and the updated
// state written to dst_state_batch_indices[b] (the same slot when dst is nullptr).
struct SelectiveStateUpdateParams {
  DType act_dtype;      // x, dt, B, C, z, out
  DType state_dtype;    // float32 or act_dtype
  int64_t batch;
  int64_t nheads;
  int64_t headdim;
  int64_t dstate;
  int64_t ngroups;
  bool a_is_per_state;
  bool dt_softplus;

  void* state;          // (num_slots, nheads, headdim, dstate)
  int64_t num_slots;
  int64_t state_slot_stride;
  int64_t state_head_stride;
  int64_t state_dim_stride;    // dstate stride is 1

  const void* x;        // (batch, nheads * headdim)
  int64_t x_batch_stride;
  const void* dt;       // (batch, nheads), or (batch, dt_rank) with dt_proj_weight
  int64_t dt_batch_stride;
  // (nheads, dt_rank), last dim contiguous, or nullptr. Mamba-1 form only: dt of head h is then
  // round_to_act_dtype(sum_r dt_proj_weight[h, r] * dt[b, r]), accumulated in fp32 (the rounding
  // reproduces the activation-dtype output of the dt_proj GEMM this replaces).
  const void* dt_proj_weight;
  int64_t dt_rank;
  int64_t dt_proj_row_stride;
  const float* A;       // (nheads, dstate) or (nheads,)
  int64_t A_head_stride;
  int64_t A_state_stride;
  const void* B;        // (batch, ngroups, dstate)
  int64_t B_batch_stride;
  int64_t B_group_stride;
  const void* C;
  int64_t C_batch_stride;
  int64_t C_group_stride;
  const float* D;       // (nheads,) contiguous, or nullptr
  const void* z;        // (batch, nheads * headdim), or nullptr
  int64_t z_batch_stride;
  const float* dt_bias; // (nheads,) contiguous, or nullptr
  void* out;            // (batch, nheads * headdim)
  int64_t out_batch_stride;

  const int32_t* state_batch_indices;      // (batch,), nullptr: slot b for row b
  const int32_t* dst_state_batch_indices;  // (batch,), nullptr: same as the read slot
  int32_t pad_slot_id;
};

}  // namespace tpssm
