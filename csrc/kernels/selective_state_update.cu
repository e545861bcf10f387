// Decode step of the selective SSM: one token per request, the state read from one slot and the
// updated state written to another (or the same) slot.
//
// The op is bound by the state bytes (read + write, fp32 by default), so the mapping serves the
// state accesses: a group of G threads (a power of two up to a warp) owns one (row, head,
// headdim) state row and walks its dstate elements with 16-byte accesses, G * 16 bytes
// contiguous per step; the output is a shuffle reduction within the group. Groups are
// independent, so padded rows return early without disturbing their neighbours' shuffles.
#include "kernel_utils.cuh"
#include "ssm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

template <typename input_t_, typename state_t_, int kVec_, bool kPerStateA_>
struct StateUpdateTraits {
  using input_t = input_t_;
  using state_t = state_t_;
  static constexpr int kVec = kVec_;  // state elements per access
  static constexpr bool kPerStateA = kPerStateA_;
  static constexpr int kThreads = 128;
  static_assert(kVec == 1 || kVec * sizeof(state_t) == 16, "kVec must fill 16 bytes or be 1");
  static_assert(kThreads % 32 == 0, "whole warps");
};

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads) void selective_state_update_kernel(
    SelectiveStateUpdateParams p, int group_threads) {
  using input_t = typename Traits::input_t;
  using state_t = typename Traits::state_t;
  constexpr int kV = Traits::kVec;
  const int G = group_threads;
  const int lane = threadIdx.x & (G - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (Traits::kThreads / G) + threadIdx.x / G;
  if (row >= p.batch * p.nheads * p.headdim) return;
  const int64_t pidx = row % p.headdim;
  const int64_t h = (row / p.headdim) % p.nheads;
  const int64_t b = row / (p.headdim * p.nheads);

  const int64_t src = p.state_batch_indices ? p.state_batch_indices[b] : b;
  const int64_t dst = p.dst_state_batch_indices ? p.dst_state_batch_indices[b] : src;
  if (p.state_batch_indices && src == p.pad_slot_id) return;
  if (p.dst_state_batch_indices && dst == p.pad_slot_id) return;
  // Slots cannot be validated without a host sync: never touch memory outside the pool.
  if (src < 0 || src >= p.num_slots || dst < 0 || dst >= p.num_slots) return;

  const int64_t g = h / (p.nheads / p.ngroups);
  const int64_t ch = h * p.headdim + pidx;
  float dt = to_float(static_cast<const input_t*>(p.dt)[b * p.dt_batch_stride + h]);
  if (p.dt_bias) dt += p.dt_bias[h];
  if (p.dt_softplus) dt = softplus_thresholded(dt);
  const float xv = to_float(static_cast<const input_t*>(p.x)[b * p.x_batch_stride + ch]);
  const float dtx = dt * xv;

  const float* A = p.A + h * p.A_head_stride;
  float dA_head = 0.f;
  if constexpr (!Traits::kPerStateA) dA_head = exp2f(dt * (A[0] * kLog2e));

  const state_t* s_src = static_cast<const state_t*>(p.state) + src * p.state_slot_stride +
                         h * p.state_head_stride + pidx * p.state_dim_stride;
  state_t* s_dst = static_cast<state_t*>(p.state) + dst * p.state_slot_stride +
                   h * p.state_head_stride + pidx * p.state_dim_stride;
  const input_t* Bg = static_cast<const input_t*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
  const input_t* Cg = static_cast<const input_t*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;

  float y = 0.f;
  for (int64_t n0 = static_cast<int64_t>(lane) * kV; n0 < p.dstate;
       n0 += static_cast<int64_t>(G) * kV) {
    float s[kV];
    load_vec<state_t, kV>(s_src + n0, s);
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      float dA;
      if constexpr (Traits::kPerStateA) {
        dA = exp2f(dt * (A[(n0 + i) * p.A_state_stride] * kLog2e));
      } else {
        dA = dA_head;
      }
      s[i] = fmaf(s[i], dA, dtx * to_float(Bg[n0 + i]));
      y = fmaf(s[i], to_float(Cg[n0 + i]), y);
    }
    store_vec<state_t, kV>(s_dst + n0, s);
  }

  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned group_mask =
      G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane & ~static_cast<unsigned>(G - 1)));
  for (int offset = G / 2; offset > 0; offset /= 2) {
    y += __shfl_xor_sync(group_mask, y, offset, G);
  }
  if (lane == 0) {
    if (p.D) y = fmaf(p.D[h], xv, y);
    if (p.z) y *= silu(to_float(static_cast<const input_t*>(p.z)[b * p.z_batch_stride + ch]));
    static_cast<input_t*>(p.out)[b * p.out_batch_stride + ch] = from_float<input_t>(y);
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
  auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    using Traits = StateUpdateTraits<input_t, state_t, kVec, kPerStateA>;
    const int G = static_cast<int>(std::min<int64_t>(32, next_pow2(ceil_div(p.dstate, kVec))));
    const int64_t rows = p.batch * p.nheads * p.headdim;
    const int64_t blocks = ceil_div(rows, Traits::kThreads / G);
    if (blocks > 0x7fffffff) throw std::runtime_error("tpssm selective_state_update: too many rows");
    selective_state_update_kernel<Traits>
        <<<static_cast<unsigned>(blocks), Traits::kThreads, 0, stream>>>(p, G);
    TPSSM_CHECK_LAUNCH("selective_state_update_kernel");
  };
  if (vec_ok) {
    launch(std::integral_constant<int, kVecFull>{});
  } else {
    launch(std::integral_constant<int, 1>{});
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
