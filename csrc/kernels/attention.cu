// Decode attention read in place from a slot-indexed KV cache (see attention_params.h): each
// (row, head) reads only the keys its row holds, where gathering the row's whole slot and masking
// moves every one of max_len keys (about three times the slot's bytes: gather write, read back).
//
// One block per (batch row, head, key split); its warps take the split's keys round robin (warp
// w: keys w, w + 4, ...), each lane holding head-dim elements lane, lane + 32, ... of q and of
// its accumulator. A key's score is a per-lane partial dot product reduced with xor shuffles
// (every lane ends with it), folded into the warp's online softmax (running max, sum,
// accumulator). The warps' partial results are merged through shared memory at the end.
// Why splits (flash-decoding): with one block per (row, head), a batch of B rows x H local heads
// fills the GPU only from B * H of about the SM count up, and each block walks its row's keys
// with a few loads in flight - at batch 1 a long row's time is its length times a memory
// latency. Below that, the launcher gives each (row, head) several blocks, each over an equal
// share of the row's keys (the share is computed on the device from the row's length), and a
// second kernel merges their (max, sum, accumulator) triples. The split count depends on the
// shapes only, so the grid is fixed and the op stays CUDA-graph capturable.
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

// Row b's keys: its length clamped to max_len, or 0 for a row index outside the cache (a length
// <= 0 stays as it is). Both kernels decide a row's fate here, so they agree on bad rows.
__device__ __forceinline__ int64_t row_keys(const DecodeAttentionParams& p, int64_t b,
                                            int64_t row) {
  int64_t len = load_index(p.lengths, p.lengths_int32, b * p.lengths_stride);
  len = len < p.max_len ? len : p.max_len;
  return row < 0 || row >= p.num_slots ? 0 : len;
}

// A split's partial result: its running max (log2 domain), its sum of exp2(score - max), and
// its accumulator (not yet divided by the sum). A split without keys writes max = -inf, sum 0.
__device__ __forceinline__ float* split_partials(const DecodeAttentionParams& p, int64_t pair,
                                                 int64_t split) {
  return p.partials + (pair * p.num_splits + split) * (p.head_dim + 2);
}

template <int kThreads>
__device__ __forceinline__ void write_no_keys(float* part, int hd) {
  for (int d = threadIdx.x; d < hd + 2; d += kThreads) part[d] = d == 0 ? -INFINITY : 0.f;
}

// 8 blocks an SM (64 registers): the share bounds would otherwise take the 8-element-a-lane
// instantiation to 80 registers and 6 blocks, fewer loads in flight where B x H fills the GPU.
template <typename T, typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 8)
    decode_attention_kernel(DecodeAttentionParams p) {
  constexpr int kPerLane = Traits::kPerLane;
  constexpr int kWarps = Traits::kWarps;
  constexpr int kKeys = Traits::kKeysPerStep;
  __shared__ float s_max[kWarps];
  __shared__ float s_sum[kWarps];
  __shared__ float s_acc[kWarps][Traits::kMaxHeadDim];

  const int64_t pair = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t b = pair / p.heads;
  const int64_t h = pair % p.heads;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int hd = static_cast<int>(p.head_dim);
  const bool splits = p.num_splits > 1;
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  float* part = splits ? split_partials(p, pair, split) : nullptr;

  const int64_t row = load_index(p.rows, p.rows_int32, b * p.rows_stride);
  const int64_t len = row_keys(p, b, row);
  // This split's share of the row's keys (all of them without splits).
  const int64_t share = (len + p.num_splits - 1) / p.num_splits;
  const int64_t key_begin = split * share;
  const int64_t key_end = key_begin + share < len ? key_begin + share : len;
  // Uniform per block, before any barrier: a bad row index or an empty row writes zeros (a
  // split without keys, an empty partial result).
  if (len <= 0 || key_begin >= key_end) {
    if (splits) {
      write_no_keys<Traits::kThreads>(part, hd);
    } else {
      for (int d = threadIdx.x; d < hd; d += Traits::kThreads) out[d] = from_float<T>(0.f);
    }
    return;
  }

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

  for (int64_t j0 = key_begin + warp; j0 < key_end; j0 += kWarps * kKeys) {
    float s[kKeys];
    float vr[kKeys][kPerLane];
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * kWarps;
      const bool valid = j < key_end;  // uniform per warp
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
      if (j0 + static_cast<int64_t>(u) * kWarps < key_end) m_new = fmaxf(m_new, s[u]);
    }
    const float corr = exp2f(m - m_new);
    l *= corr;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= corr;
#pragma unroll
    for (int u = 0; u < kKeys; ++u) {
      if (j0 + static_cast<int64_t>(u) * kWarps < key_end) {
        const float pu = exp2f(s[u] - m_new);
        l += pu;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) acc[i] += pu * vr[u][i];
      }
    }
    m = m_new;
  }

  // Merge the warps: a warp without keys (fewer keys than warps) has m = -inf and l = 0, weight
  // 0; warp 0 always has the split's first key, so the block maximum is finite.
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
  if (splits && threadIdx.x == 0) {
    part[0] = m_all;
    part[1] = l_all;
  }
  for (int d = threadIdx.x; d < hd; d += Traits::kThreads) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += s_acc[w][d] * weight[w];
    if (splits) {
      part[2 + d] = o;
    } else {
      out[d] = from_float<T>(o * inv);
    }
  }
}

// Merges a (row, head)'s split results: out = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m),
// m the largest m_s. Every split without keys has m_s = -inf (weight 0). A bad row or a length
// <= 0 gives zeros, decided here from the row as the split blocks decided it (scores that are
// all NaN or -inf still merge to NaN, as without splits).
constexpr int kCombineThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    decode_attention_combine_kernel(DecodeAttentionParams p) {
  __shared__ float s_weight[kDecodeAttentionMaxSplits];
  const int64_t pair = blockIdx.x;
  const int64_t b = pair / p.heads;
  const int64_t h = pair % p.heads;
  const int hd = static_cast<int>(p.head_dim);
  const int splits = static_cast<int>(p.num_splits);
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  if (row_keys(p, b, load_index(p.rows, p.rows_int32, b * p.rows_stride)) <= 0) {
    for (int d = threadIdx.x; d < hd; d += kCombineThreads) out[d] = from_float<T>(0.f);
    return;
  }
  float m_all = -INFINITY;
  for (int s = 0; s < splits; ++s) m_all = fmaxf(m_all, split_partials(p, pair, s)[0]);
  if (static_cast<int>(threadIdx.x) < splits) {
    s_weight[threadIdx.x] = exp2f(split_partials(p, pair, threadIdx.x)[0] - m_all);
  }
  __syncthreads();
  float l_all = 0.f;
  for (int s = 0; s < splits; ++s) l_all += split_partials(p, pair, s)[1] * s_weight[s];
  const float inv = 1.f / l_all;
  for (int d = threadIdx.x; d < hd; d += kCombineThreads) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += split_partials(p, pair, s)[2 + d] * s_weight[s];
    out[d] = from_float<T>(o * inv);
  }
}

}  // namespace

int decode_attention_sm_count() { return current_device_sm_count(); }

void run_decode_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.head_dim == 0) return;
  const int64_t pairs = p.batch * p.heads;
  if (pairs > 0x7fffffff || p.head_dim > kDecodeAttentionMaxHeadDim) {
    throw std::runtime_error("tpssm decode_attention: too many (row, head) pairs or head_dim > " +
                             std::to_string(kDecodeAttentionMaxHeadDim));
  }
  if (p.num_splits < 1 || p.num_splits > kDecodeAttentionMaxSplits ||
      (p.num_splits > 1 && p.partials == nullptr)) {
    throw std::runtime_error("tpssm decode_attention: num_splits must be in [1, " +
                             std::to_string(kDecodeAttentionMaxSplits) +
                             "], with a partials buffer above 1");
  }
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(p.num_splits));
  // Two widths only (template instantiations cost build minutes): heads up to 128 (every
  // Zamba / Zamba2 size) hold 4 elements a lane, larger ones 8.
  TPSSM_DTYPE_SWITCH(p.dtype, act_t, [&] {
    TPSSM_BOOL_SWITCH(p.head_dim <= 128, kSmall, [&] {
      using Traits = DecodeAttentionTraits<kSmall ? 4 : 8>;
      decode_attention_kernel<act_t, Traits><<<grid, Traits::kThreads, 0, stream>>>(p);
      TPSSM_CHECK_LAUNCH("decode_attention_kernel");
    });
    if (p.num_splits > 1) {
      decode_attention_combine_kernel<act_t>
          <<<static_cast<unsigned>(pairs), kCombineThreads, 0, stream>>>(p);
      TPSSM_CHECK_LAUNCH("decode_attention_combine_kernel");
    }
  });
}

}  // namespace tpssm
