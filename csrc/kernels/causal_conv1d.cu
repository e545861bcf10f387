// Depthwise causal conv1d over token-major activations: the prefill kernel (dense and varlen,
// initial / final state through slots) and the decode update kernel (state updated in place).
//
// Prefill mapping: a thread owns kVec adjacent channels (one 16-byte access per token) and walks a
// chunk of tokens, keeping the width-1 previous inputs in registers, so every input is read once
// (plus a width-1 halo per chunk). Chunks of the flattened token range are independent blocks, so
// the grid fills the GPU at any batch size; a chunk may straddle sequence boundaries and restarts
// the window at each sequence start. Final states are written by a second small kernel: the first
// chunk of a sequence reads the initial state from the slot, and a write from the block holding
// the sequence end would race with that read.
#include "kernel_utils.cuh"
#include "ssm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

template <typename input_t_, int kWidth_, int kVec_>
struct CausalConv1dTraits {
  using input_t = input_t_;
  static constexpr int kWidth = kWidth_;
  static constexpr int kVec = kVec_;  // channels per thread
  static constexpr int kThreads = 128;
  // Independent 16-byte loads in flight per thread. With 4 the 16-bit width-4 kernel held ~24 KB
  // of loads in flight per SM (3 blocks of 142 registers) and reached 35% of the copy bandwidth
  // on an H200; 8 tokens within 168 registers (still 3 blocks, no spills) double that. A cap of
  // 128 registers (4 blocks) spills.
  static constexpr int kTokenUnroll = 8;
  static constexpr int kMinBlocksPerSm = 3;
  static constexpr int kMinChunk = 16;    // keeps the halo re-read under (width-1)/16
  static constexpr int kMaxChunk = 1024;
  static constexpr int kTargetBlocksPerSm = 16;
  static_assert(kWidth >= 2 && kWidth <= 4, "conv width must be 2..4");
  static_assert(kVec == 1 || kVec * sizeof(input_t) == 16, "kVec must fill 16 bytes or be 1");
  static_assert(kThreads % 32 == 0, "whole warps");
};

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
void causal_conv1d_fwd_kernel(
    CausalConv1dParams p, int64_t chunk_len, int64_t total_tokens) {
  using input_t = typename Traits::input_t;
  constexpr int kW = Traits::kWidth;
  constexpr int kV = Traits::kVec;
  constexpr int kU = Traits::kTokenUnroll;

  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * Traits::kThreads + threadIdx.x) * kV;
  if (c0 >= p.dim) return;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t chunk_end = min(chunk_begin + chunk_len, total_tokens);

  const input_t* weight = static_cast<const input_t*>(p.weight);
  float w[kW][kV];
  float bias[kV];
#pragma unroll
  for (int v = 0; v < kV; ++v) {
#pragma unroll
    for (int k = 0; k < kW; ++k) {
      w[k][v] = to_float(weight[(c0 + v) * p.weight_channel_stride + k * p.weight_width_stride]);
    }
    bias[v] = p.bias ? to_float(static_cast<const input_t*>(p.bias)[c0 + v]) : 0.f;
  }

  const input_t* x = static_cast<const input_t*>(p.x);
  input_t* out = static_cast<input_t*>(p.out);
  const input_t* conv_states = static_cast<const input_t*>(p.conv_states);
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};

  for (int64_t b = seqs.seq_of(chunk_begin); b < p.batch; ++b) {
    const int64_t seq_begin = seqs.begin(b);
    const int64_t seq_end = seqs.end(b);
    if (seq_begin >= chunk_end) break;
    const int64_t seg_begin = max(seq_begin, chunk_begin);
    const int64_t seg_end = min(seq_end, chunk_end);
    if (seg_begin >= seg_end) continue;
    const int64_t slot = p.cache_indices ? p.cache_indices[b] : b;
    if (p.cache_indices && slot == p.pad_slot_id) continue;
    const bool slot_in_range = slot >= 0 && slot < p.num_slots;
    // An out-of-range slot cannot be validated without a host sync: skip the row rather than
    // touch memory outside the pool.
    if (p.conv_states && !slot_in_range) continue;
    const bool initial = p.conv_states && p.has_initial_state && p.has_initial_state[b];

    const input_t* xb = x + seqs.batch_offset(b, p.x_batch_stride) + c0;
    input_t* ob = out + seqs.batch_offset(b, p.out_batch_stride) + c0;

    float win[kW - 1][kV];  // inputs at seg_begin - (width-1) .. seg_begin - 1
#pragma unroll
    for (int k = 0; k < kW - 1; ++k) {
      const int64_t pos = seg_begin - (kW - 1) + k;
      if (pos >= seq_begin) {
        load_vec<input_t, kV>(xb + seqs.addr_token(b, pos) * p.x_token_stride, win[k]);
      } else if (initial) {
        const int64_t col = (kW - 1) + (pos - seq_begin);
        const input_t* st = conv_states + slot * p.conv_states_slot_stride +
                            c0 * p.conv_states_channel_stride + col * p.conv_states_width_stride;
#pragma unroll
        for (int v = 0; v < kV; ++v) win[k][v] = to_float(st[v * p.conv_states_channel_stride]);
      } else {
#pragma unroll
        for (int v = 0; v < kV; ++v) win[k][v] = 0.f;
      }
    }

    for (int64_t t = seg_begin; t < seg_end; t += kU) {
      Pack<input_t, kV> xv[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (t + u < seg_end) {
          xv[u] = load_pack<input_t, kV>(xb + seqs.addr_token(b, t + u) * p.x_token_stride);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (t + u < seg_end) {
          float acc[kV];
#pragma unroll
          for (int v = 0; v < kV; ++v) {
            float a = bias[v];
#pragma unroll
            for (int k = 0; k < kW - 1; ++k) a = fmaf(w[k][v], win[k][v], a);
            a = fmaf(w[kW - 1][v], to_float(xv[u].elems[v]), a);
            acc[v] = p.silu ? silu(a) : a;
          }
          store_vec<input_t, kV>(ob + seqs.addr_token(b, t + u) * p.out_token_stride, acc);
#pragma unroll
          for (int k = 0; k < kW - 2; ++k) {
#pragma unroll
            for (int v = 0; v < kV; ++v) win[k][v] = win[k + 1][v];
          }
#pragma unroll
          for (int v = 0; v < kV; ++v) win[kW - 2][v] = to_float(xv[u].elems[v]);
        }
      }
    }
  }
}

// Final conv state of every non-padded sequence: the last width-1 inputs of (state ++ x). Runs
// after the forward kernel, which is the only reader of the initial states.
template <typename input_t, int kWidth>
__global__ __launch_bounds__(128) void causal_conv1d_final_state_kernel(CausalConv1dParams p) {
  const int64_t b = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  const int64_t slot = p.cache_indices ? p.cache_indices[b] : b;
  if (p.cache_indices && slot == p.pad_slot_id) return;
  if (slot < 0 || slot >= p.num_slots) return;
  const bool initial = p.has_initial_state && p.has_initial_state[b];
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};
  const int64_t seq_begin = seqs.begin(b);
  const int64_t seq_end = seqs.end(b);
  const int64_t len = seq_end - seq_begin;
  const input_t* x = static_cast<const input_t*>(p.x) + seqs.batch_offset(b, p.x_batch_stride) + c;
  input_t* st = static_cast<input_t*>(p.conv_states) + slot * p.conv_states_slot_stride +
                c * p.conv_states_channel_stride;
  // Read everything before writing: short sequences shift old state columns into new places.
  input_t vals[kWidth - 1];
#pragma unroll
  for (int j = 0; j < kWidth - 1; ++j) {
    const int64_t pos = seq_end - (kWidth - 1) + j;
    if (pos >= seq_begin) {
      vals[j] = x[seqs.addr_token(b, pos) * p.x_token_stride];
    } else {
      vals[j] = initial ? st[(len + j) * p.conv_states_width_stride] : from_float<input_t>(0.f);
    }
  }
#pragma unroll
  for (int j = 0; j < kWidth - 1; ++j) st[j * p.conv_states_width_stride] = vals[j];
}

template <typename input_t, int kWidth, int kVec>
void launch_causal_conv1d_fwd(const CausalConv1dParams& p, int64_t total_tokens,
                              cudaStream_t stream) {
  using Traits = CausalConv1dTraits<input_t, kWidth, kVec>;
  const int64_t channel_blocks = ceil_div(ceil_div(p.dim, kVec), Traits::kThreads);
  const int64_t target_blocks =
      static_cast<int64_t>(current_device_sm_count()) * Traits::kTargetBlocksPerSm;
  int64_t chunk_len = ceil_div(total_tokens * channel_blocks, target_blocks);
  chunk_len = std::min<int64_t>(std::max<int64_t>(chunk_len, Traits::kMinChunk),
                                Traits::kMaxChunk);
  if (p.chunk_len > 0) chunk_len = p.chunk_len;
  const int64_t num_chunks = ceil_div(total_tokens, chunk_len);
  if (channel_blocks > 65535) throw std::runtime_error("tpssm causal_conv1d: dim too large");
  dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(channel_blocks));
  causal_conv1d_fwd_kernel<Traits><<<grid, Traits::kThreads, 0, stream>>>(p, chunk_len,
                                                                          total_tokens);
  TPSSM_CHECK_LAUNCH("causal_conv1d_fwd_kernel");
}

template <typename input_t, int kWidth>
__global__ __launch_bounds__(128) void causal_conv1d_update_kernel(CausalConv1dUpdateParams p) {
  const int64_t b = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  const int64_t slot = p.cache_indices ? p.cache_indices[b] : b;
  if (p.cache_indices && slot == p.pad_slot_id) return;
  if (slot < 0 || slot >= p.num_slots) return;

  const input_t* weight = static_cast<const input_t*>(p.weight) + c * p.weight_channel_stride;
  float w[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) w[k] = to_float(weight[k * p.weight_width_stride]);
  const float bias = p.bias ? to_float(static_cast<const input_t*>(p.bias)[c]) : 0.f;

  input_t* st = static_cast<input_t*>(p.conv_state) + slot * p.conv_state_slot_stride +
                c * p.conv_state_channel_stride;
  float win[kWidth - 1];
#pragma unroll
  for (int k = 0; k < kWidth - 1; ++k) win[k] = to_float(st[k * p.conv_state_width_stride]);

  const input_t* x = static_cast<const input_t*>(p.x) + b * p.x_batch_stride + c;
  input_t* out = static_cast<input_t*>(p.out) + b * p.out_batch_stride + c;
  for (int64_t t = 0; t < p.seqlen; ++t) {
    const float xv = to_float(x[t * p.x_token_stride]);
    float a = bias;
#pragma unroll
    for (int k = 0; k < kWidth - 1; ++k) a = fmaf(w[k], win[k], a);
    a = fmaf(w[kWidth - 1], xv, a);
    out[t * p.out_token_stride] = from_float<input_t>(p.silu ? silu(a) : a);
#pragma unroll
    for (int k = 0; k < kWidth - 2; ++k) win[k] = win[k + 1];
    win[kWidth - 2] = xv;
  }
#pragma unroll
  for (int k = 0; k < kWidth - 1; ++k) {
    st[k * p.conv_state_width_stride] = from_float<input_t>(win[k]);
  }
}

}  // namespace

void run_causal_conv1d(const CausalConv1dParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return;
  const int64_t total_tokens = p.query_start_loc ? p.seqlen : p.batch * p.seqlen;
  TPSSM_DTYPE_SWITCH(p.dtype, input_t, [&] {
    TPSSM_WIDTH_SWITCH(p.width, kWidth, [&] {
      if (total_tokens > 0) {
        constexpr int kVecFull = 16 / sizeof(input_t);
        const bool vec_ok = p.dim % kVecFull == 0 && is_aligned(p.x, 16) &&
                            is_aligned(p.out, 16) && p.x_token_stride % kVecFull == 0 &&
                            p.out_token_stride % kVecFull == 0 &&
                            (p.query_start_loc != nullptr ||
                             (p.x_batch_stride % kVecFull == 0 &&
                              p.out_batch_stride % kVecFull == 0));
        if (vec_ok) {
          launch_causal_conv1d_fwd<input_t, kWidth, kVecFull>(p, total_tokens, stream);
        } else {
          launch_causal_conv1d_fwd<input_t, kWidth, 1>(p, total_tokens, stream);
        }
      }
      if (p.conv_states) {
        const int64_t channel_blocks = ceil_div(p.dim, 128);
        if (p.batch > 0x7fffffff || channel_blocks > 65535) {
          throw std::runtime_error("tpssm causal_conv1d: batch or dim too large");
        }
        dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(channel_blocks));
        causal_conv1d_final_state_kernel<input_t, kWidth><<<grid, 128, 0, stream>>>(p);
        TPSSM_CHECK_LAUNCH("causal_conv1d_final_state_kernel");
      }
    });
  });
}

void run_causal_conv1d_update(const CausalConv1dUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return;
  TPSSM_DTYPE_SWITCH(p.dtype, input_t, [&] {
    TPSSM_WIDTH_SWITCH(p.width, kWidth, [&] {
      const int64_t channel_blocks = ceil_div(p.dim, 128);
      if (p.batch > 0x7fffffff || channel_blocks > 65535) {
        throw std::runtime_error("tpssm causal_conv1d_update: batch or dim too large");
      }
      dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(channel_blocks));
      causal_conv1d_update_kernel<input_t, kWidth><<<grid, 128, 0, stream>>>(p);
      TPSSM_CHECK_LAUNCH("causal_conv1d_update_kernel");
    });
  });
}

}  // namespace tpssm
