// Decode attention read in place from a slot-indexed KV cache (see attention_params.h): each
// (row, head) reads only the keys its row holds, where gathering the row's whole slot and masking
// moves every one of max_len keys (about three times the slot's bytes: gather write, read back).
//
// One block per (batch row, head); its warps take the keys round robin (warp w: keys w, w + 4,
// ...), each lane holding head-dim elements lane, lane + 32, ... of q and of its accumulator. A
// key's score is a per-lane partial dot product reduced with xor shuffles (every lane ends with
// it), folded into the warp's online softmax (running max, sum, accumulator). The warps' partial
// results are merged through shared memory at the end. No workspace: nothing is allocated but
// out, the grid depends on B and H only, so the op is CUDA-graph capturable.
// Why not a split over keys across blocks (flash-decoding): with one block per (row, head) a
// batch of B rows x H local heads fills the GPU only from B * H of about the SM count up; the
// split needs a workspace and a combine launch. Start with the simple form; the split is the
// next step if short batches of long sequences matter (benchmarks/NOTES.md).
#include <cmath>

#include "attention_kernels.h"
#include "kernel_utils.cuh"
#include "static_switch.h"

namespace tpssm {
namespace {

template <int kPerLane_>
struct DecodeAttentionTraits {
  static constexpr int kPerLane = kPerLane_;  // head-dim elements per lane
  static constexpr int kMaxHeadDim = 32 * kPerLane;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Keys a warp scores before updating its softmax: their K and V loads are in flight together
  // instead of one key's loads waiting for the previous key's shuffle reduction.
  static constexpr int kKeysPerStep = 2;
  static_assert(kPerLane >= 1 && 32 * kPerLane <= kDecodeAttentionMaxHeadDim,
                "a lane holds at most max_head_dim / 32 elements");
};

__device__ __forceinline__ int64_t load_index(const void* ptr, bool is_int32, int64_t i) {
  return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(ptr)[i])
                  : static_cast<const int64_t*>(ptr)[i];
}

template <typename T, typename Traits>
__global__ void __launch_bounds__(Traits::kThreads)
    decode_attention_kernel(DecodeAttentionParams p) {
  constexpr int kPerLane = Traits::kPerLane;
  constexpr int kWarps = Traits::kWarps;
  constexpr int kKeys = Traits::kKeysPerStep;
  __shared__ float s_max[kWarps];
  __shared__ float s_sum[kWarps];
  __shared__ float s_acc[kWarps][Traits::kMaxHeadDim];

  const int64_t b = blockIdx.x / p.heads;
  const int64_t h = blockIdx.x % p.heads;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int hd = static_cast<int>(p.head_dim);
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;

  const int64_t row = load_index(p.rows, p.rows_int32, b * p.rows_stride);
  int64_t len = load_index(p.lengths, p.lengths_int32, b * p.lengths_stride);
  // Uniform per block, before any barrier: a bad row index or an empty row writes zeros.
  if (row < 0 || row >= p.num_slots || len <= 0 || p.max_len <= 0) {
    for (int d = threadIdx.x; d < hd; d += Traits::kThreads) out[d] = from_float<T>(0.f);
    return;
  }
  len = len < p.max_len ? len : p.max_len;

  // Scores in the log2 domain: exp2f(s - m) is the softmax's exp with log2(e) folded into q.
  const float q_scale = p.scale * 1.4426950408889634f;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k_cache) + row * p.k_slot_stride + h * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v_cache) + row * p.v_slot_stride + h * p.v_head_stride;
  float qr[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < hd ? to_float(q[d]) * q_scale : 0.f;
  }

  float m = -INFINITY, l = 0.f;
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;

  for (int64_t j0 = warp; j0 < len; j0 += kWarps * kKeys) {
    float s[kKeys];
    float vr[kKeys][kPerLane];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * kWarps;
      const bool valid = j < len;  // uniform per warp
      float partial = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        const bool in = valid && d < hd;
        partial += in ? qr[i] * to_float(k[j * p.k_seq_stride + d]) : 0.f;
        vr[u][i] = in ? to_float(v[j * p.v_seq_stride + d]) : 0.f;
      }
      s[u] = partial;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
      for (int u = 0; u < kKeys; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], offset);
    }
    // Key j0 is valid (the loop condition), so m_new is finite and exp2f(m - m_new) is 0 on the
    // first step (m = -inf), never NaN.
    float m_new = m;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      if (j0 + static_cast<int64_t>(u) * kWarps < len) m_new = fmaxf(m_new, s[u]);
    }
    const float corr = exp2f(m - m_new);
    l *= corr;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= corr;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      if (j0 + static_cast<int64_t>(u) * kWarps < len) {
        const float pu = exp2f(s[u] - m_new);
        l += pu;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) acc[i] += pu * vr[u][i];
      }
    }
    m = m_new;
  }

  // Merge the warps: a warp without keys (len < kWarps) has m = -inf and l = 0, weight 0; warp 0
  // always has key 0, so the block maximum is finite.
  if (lane == 0) {
    s_max[warp] = m;
    s_sum[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) s_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_max[w]);
  float weight[kWarps];
  float l_all = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = exp2f(s_max[w] - m_all);
    l_all += s_sum[w] * weight[w];
  }
  const float inv = 1.f / l_all;
  for (int d = threadIdx.x; d < hd; d += Traits::kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_acc[w][d] * weight[w];
    out[d] = from_float<T>(o * inv);
  }
}

}  // namespace

void run_decode_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.head_dim == 0) return;
  const int64_t blocks = p.batch * p.heads;
  if (blocks > 0x7fffffff || p.head_dim > kDecodeAttentionMaxHeadDim) {
    throw std::runtime_error("tpssm decode_attention: too many (row, head) pairs or head_dim > " +
                             std::to_string(kDecodeAttentionMaxHeadDim));
  }
  // Two widths only (template instantiations cost build minutes): heads up to 128 (every
  // Zamba / Zamba2 size) hold 4 elements a lane, larger ones 8.
  TPSSM_DTYPE_SWITCH(p.dtype, act_t, [&] {
    TPSSM_BOOL_SWITCH(p.head_dim <= 128, kSmall, [&] {
      using Traits = DecodeAttentionTraits<kSmall ? 4 : 8>;
      decode_attention_kernel<act_t, Traits>
          <<<static_cast<unsigned>(blocks), Traits::kThreads, 0, stream>>>(p);
      TPSSM_CHECK_LAUNCH("decode_attention_kernel");
    });
  });
}

}  // namespace tpssm
