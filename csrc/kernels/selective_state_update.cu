// Decode step of the selective SSM: one token per request, the state read from one slot and the
// updated state written to another (or the same) slot.
//
// The op is bound by the state bytes (read + write, fp32 by default), so the mapping serves the
// state accesses: a group of G threads (a power of two up to a warp) owns kRows state rows of
// one (batch row, head) (4 adjacent headdim rows for Mamba2, 1 for Mamba1) and walks their
// dstate elements with 16-byte accesses, G * 16 bytes contiguous per step; the outputs are
// shuffle reductions within the group. Groups are
// independent, so padded rows return early without disturbing their neighbours' shuffles.
#include <algorithm>
#include <type_traits>

#include "kernel_utils.cuh"
#include "ssm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

template <typename input_t_, typename state_t_, int kVec_, bool kPerStateA_, int kRows_>
struct StateUpdateTraits {
  using input_t = input_t_;
  using state_t = state_t_;
  static constexpr int kVec = kVec_;  // state elements per access
  static constexpr bool kPerStateA = kPerStateA_;
  // headdim rows of one (batch row, head) per thread group: they share dt, A, B and C, and their
  // state loads are all in flight before the first use.
  static constexpr int kRows = kRows_;
  static constexpr int kThreads = 128;
  static_assert(kVec == 1 || kVec * sizeof(state_t) == 16, "kVec must fill 16 bytes or be 1");
  static_assert(kRows >= 1 && kRows <= 8, "a few rows per group");
  static_assert(kThreads % 32 == 0, "whole warps");
};

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads) void selective_state_update_kernel(
    SelectiveStateUpdateParams p, int group_threads) {
  using input_t = typename Traits::input_t;
  using state_t = typename Traits::state_t;
  constexpr int kV = Traits::kVec;
  constexpr int kR = Traits::kRows;
  const int G = group_threads;
  const int lane = threadIdx.x & (G - 1);
  const int64_t row_blocks = (p.headdim + kR - 1) / kR;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * (Traits::kThreads / G) + threadIdx.x / G;
  if (group >= p.batch * p.nheads * row_blocks) return;
  const int64_t p0 = (group % row_blocks) * kR;
  const int64_t h = (group / row_blocks) % p.nheads;
  const int64_t b = group / (row_blocks * p.nheads);

  const int64_t src = p.state_batch_indices ? p.state_batch_indices[b] : b;
  const int64_t dst = p.dst_state_batch_indices ? p.dst_state_batch_indices[b] : src;
  if (p.state_batch_indices && src == p.pad_slot_id) return;
  if (p.dst_state_batch_indices && dst == p.pad_slot_id) return;
  // Slots cannot be validated without a host sync: never touch memory outside the pool.
  if (src < 0 || src >= p.num_slots || dst < 0 || dst >= p.num_slots) return;

  const int64_t g = h / (p.nheads / p.ngroups);
  float dt = to_float(static_cast<const input_t*>(p.dt)[b * p.dt_batch_stride + h]);
  if (p.dt_bias) dt += p.dt_bias[h];
  if (p.dt_softplus) dt = softplus_thresholded(dt);

  const input_t* x = static_cast<const input_t*>(p.x) + b * p.x_batch_stride + h * p.headdim;
  float xv[kR];
  bool valid[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    valid[r] = p0 + r < p.headdim;
    xv[r] = valid[r] ? to_float(x[p0 + r]) : 0.f;
  }

  const float* A = p.A + h * p.A_head_stride;
  float dA_head = 0.f;
  if constexpr (!Traits::kPerStateA) dA_head = exp2f(dt * (A[0] * kLog2e));

  const int64_t src_off = src * p.state_slot_stride + h * p.state_head_stride;
  const int64_t dst_off = dst * p.state_slot_stride + h * p.state_head_stride;
  const state_t* s_src = static_cast<const state_t*>(p.state) + src_off + p0 * p.state_dim_stride;
  state_t* s_dst = static_cast<state_t*>(p.state) + dst_off + p0 * p.state_dim_stride;
  const input_t* Bg = static_cast<const input_t*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
  const input_t* Cg = static_cast<const input_t*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;

  float y[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) y[r] = 0.f;
  for (int64_t n0 = static_cast<int64_t>(lane) * kV; n0 < p.dstate;
       n0 += static_cast<int64_t>(G) * kV) {
    float s[kR][kV];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (valid[r]) load_vec<state_t, kV>(s_src + r * p.state_dim_stride + n0, s[r]);
    }
    float Bv[kV], Cv[kV], dA[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      Bv[i] = dt * to_float(Bg[n0 + i]);
      Cv[i] = to_float(Cg[n0 + i]);
      if constexpr (Traits::kPerStateA) {
        dA[i] = exp2f(dt * (A[(n0 + i) * p.A_state_stride] * kLog2e));
      } else {
        dA[i] = dA_head;
      }
    }
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (!valid[r]) continue;
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        s[r][i] = fmaf(s[r][i], dA[i], Bv[i] * xv[r]);
        y[r] = fmaf(s[r][i], Cv[i], y[r]);
      }
      store_vec<state_t, kV>(s_dst + r * p.state_dim_stride + n0, s[r]);
    }
  }

  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned group_mask =
      G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane & ~static_cast<unsigned>(G - 1)));
  for (int offset = G / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int r = 0; r < kR; ++r) y[r] += __shfl_xor_sync(group_mask, y[r], offset, G);
  }
  if (lane == 0) {
    const input_t* z = p.z ? static_cast<const input_t*>(p.z) + b * p.z_batch_stride +
                                 h * p.headdim
                           : nullptr;
    input_t* out = static_cast<input_t*>(p.out) + b * p.out_batch_stride + h * p.headdim;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (!valid[r]) continue;
      float v = y[r];
      if (p.D) v = fmaf(p.D[h], xv[r], v);
      if (z) v *= silu(to_float(z[p0 + r]));
      out[p0 + r] = from_float<input_t>(v);
    }
  }
}

inline int next_pow2(int64_t v) {
  int r = 1;
  while (r < v) r *= 2;
  return r;
}

template <typename input_t, typename state_t, bool kPerStateA>
void launch_state_update(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  constexpr int kVecFull = 16 / sizeof(state_t);
  const bool vec_ok = p.dstate % kVecFull == 0 && is_aligned(p.state, 16) &&
                      p.state_slot_stride % kVecFull == 0 &&
                      p.state_head_stride % kVecFull == 0 && p.state_dim_stride % kVecFull == 0;
  // Mamba2 heads (headdim 64) take 4 rows per group; Mamba1 (headdim 1) one.
  const bool four_rows = !kPerStateA && p.headdim % 4 == 0;
  auto launch = [&](auto vec_tag, auto rows_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    constexpr int kRows = decltype(rows_tag)::value;
    using Traits = StateUpdateTraits<input_t, state_t, kVec, kPerStateA, kRows>;
    const int G = static_cast<int>(std::min<int64_t>(32, next_pow2(ceil_div(p.dstate, kVec))));
    const int64_t groups = p.batch * p.nheads * ceil_div(p.headdim, kRows);
    const int64_t blocks = ceil_div(groups, Traits::kThreads / G);
    if (blocks > 0x7fffffff) throw std::runtime_error("tpssm selective_state_update: too many rows");
    selective_state_update_kernel<Traits>
        <<<static_cast<unsigned>(blocks), Traits::kThreads, 0, stream>>>(p, G);
    TPSSM_CHECK_LAUNCH("selective_state_update_kernel");
  };
  using One = std::integral_constant<int, 1>;
  using Four = std::integral_constant<int, 4>;
  using VecFull = std::integral_constant<int, kVecFull>;
  if constexpr (kPerStateA) {
    if (vec_ok) launch(VecFull{}, One{}); else launch(One{}, One{});
  } else {
    if (vec_ok) {
      if (four_rows) launch(VecFull{}, Four{}); else launch(VecFull{}, One{});
    } else {
      if (four_rows) launch(One{}, Four{}); else launch(One{}, One{});
    }
  }
}

}  // namespace

void run_selective_state_update(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.nheads == 0 || p.headdim == 0 || p.dstate == 0) return;
  if (p.ngroups <= 0 || p.nheads % p.ngroups != 0) {
    throw std::runtime_error("tpssm selective_state_update: nheads must be a multiple of ngroups");
  }
  TPSSM_DTYPE_SWITCH(p.act_dtype, input_t, [&] {
    TPSSM_STATE_DTYPE_SWITCH(p.state_dtype, p.act_dtype, input_t, state_t, [&] {
      TPSSM_BOOL_SWITCH(p.a_is_per_state, kPerStateA, [&] {
        launch_state_update<input_t, state_t, kPerStateA>(p, stream);
      });
    });
  });
}

}  // namespace tpssm
