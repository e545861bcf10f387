// CPU kernels of causal_conv1d (prefill) and causal_conv1d_update (decode). Work items are
// (sequence, block of channels): channels are the contiguous axis of the token-major layout, so a
// block walks the tokens reading whole cache lines, and the window of the width - 1 previous inputs
// of each channel lives in a small local array.
#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "ssm_ops.h"

namespace tpssm {
namespace {

constexpr int64_t kChannelBlock = 64;
constexpr int kMaxWidth = 4;

// The conv of one block of channels over tokens [t0, t1). `window[k][c]` holds the width - 1
// previous inputs of channel c (oldest first) on entry and the last width - 1 inputs on exit.
// Arrays are channel-innermost so every loop over c vectorises.
template <int kWidth, typename T>
void conv_block(const T* x, int64_t x_token_stride, T* out, int64_t out_token_stride,
                int64_t t0, int64_t t1, int64_t num_channels, const float (*w)[kChannelBlock],
                const float* bias, bool silu, float (*window)[kChannelBlock]) {
  float xv[kChannelBlock];
  float acc[kChannelBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const T* xt = x + t * x_token_stride;
    T* ot = out + t * out_token_stride;
    for (int64_t c = 0; c < num_channels; ++c) xv[c] = cpu::load(xt + c);
    for (int64_t c = 0; c < num_channels; ++c) acc[c] = 0.0f;
    for (int k = 0; k < kWidth - 1; ++k) {
      for (int64_t c = 0; c < num_channels; ++c) acc[c] += w[k][c] * window[k][c];
    }
    for (int64_t c = 0; c < num_channels; ++c) acc[c] += w[kWidth - 1][c] * xv[c];
    if (bias != nullptr) {
      for (int64_t c = 0; c < num_channels; ++c) acc[c] += bias[c];
    }
    if (silu) {
      for (int64_t c = 0; c < num_channels; ++c) acc[c] = cpu::silu(acc[c]);
    }
    for (int64_t c = 0; c < num_channels; ++c) cpu::store(ot + c, acc[c]);
    for (int k = 0; k + 2 < kWidth; ++k) {
      for (int64_t c = 0; c < num_channels; ++c) window[k][c] = window[k + 1][c];
    }
    for (int64_t c = 0; c < num_channels; ++c) window[kWidth - 2][c] = xv[c];
  }
}

template <typename T>
void conv_block_any_width(int width, const T* x, int64_t x_token_stride, T* out,
                          int64_t out_token_stride, int64_t t0, int64_t t1, int64_t num_channels,
                          const float (*w)[kChannelBlock], const float* bias, bool silu,
                          float (*window)[kChannelBlock]) {
  switch (width) {
    case 2:
      return conv_block<2>(x, x_token_stride, out, out_token_stride, t0, t1, num_channels, w,
                           bias, silu, window);
    case 3:
      return conv_block<3>(x, x_token_stride, out, out_token_stride, t0, t1, num_channels, w,
                           bias, silu, window);
    case 4:
      return conv_block<4>(x, x_token_stride, out, out_token_stride, t0, t1, num_channels, w,
                           bias, silu, window);
  }
  TORCH_CHECK(false, "causal_conv1d: unsupported width ", width);
}

template <typename T>
void load_weights(const T* weight, int64_t channel_stride, int64_t width_stride, const T* bias,
                  int64_t c0, int64_t num_channels, int width, float (*w)[kChannelBlock],
                  float* bias_f) {
  for (int64_t c = 0; c < num_channels; ++c) {
    for (int k = 0; k < width; ++k) {
      w[k][c] = cpu::load(weight + (c0 + c) * channel_stride + k * width_stride);
    }
    if (bias != nullptr) bias_f[c] = cpu::load(bias + c0 + c);
  }
}

// The width-1 previous inputs of nc channels: read from a conv state slot (zeros when state is
// nullptr), and written back to it after the block's tokens.
template <typename T>
void load_window(const T* state, int64_t channel_stride, int64_t width_stride, int64_t nc,
                 int width, float (&window)[kMaxWidth - 1][kChannelBlock]) {
  for (int64_t c = 0; c < nc; ++c) {
    for (int k = 0; k < width - 1; ++k) {
      window[k][c] =
          state ? cpu::load(state + c * channel_stride + k * width_stride) : 0.0f;
    }
  }
}

template <typename T>
void store_window(T* state, int64_t channel_stride, int64_t width_stride, int64_t nc, int width,
                  const float (&window)[kMaxWidth - 1][kChannelBlock]) {
  for (int64_t c = 0; c < nc; ++c) {
    for (int k = 0; k < width - 1; ++k) {
      cpu::store(state + c * channel_stride + k * width_stride, window[k][c]);
    }
  }
}

template <typename T>
void causal_conv1d_kernel(const CausalConv1dParams& p) {
  const int64_t num_blocks = (p.dim + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, p.batch * num_blocks, 1, [&](int64_t begin, int64_t end) {
    float w[kMaxWidth][kChannelBlock];
    float bias[kChannelBlock];
    float window[kMaxWidth - 1][kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_blocks;
      const int64_t c0 = (item % num_blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, p.dim - c0);
      int64_t slot = b;
      if (p.cache_indices != nullptr) {
        slot = p.cache_indices[b];
        if (slot == p.pad_slot_id) continue;
      }
      const int64_t t0 = p.query_start_loc ? p.query_start_loc[b] : 0;
      const int64_t t1 = p.query_start_loc ? p.query_start_loc[b + 1] : p.seqlen;
      T* state = p.conv_states == nullptr
                     ? nullptr
                     : static_cast<T*>(p.conv_states) + slot * p.conv_states_slot_stride +
                           c0 * p.conv_states_channel_stride;
      const bool initial =
          state != nullptr && p.has_initial_state != nullptr && p.has_initial_state[b];
      load_window(initial ? state : nullptr, p.conv_states_channel_stride,
                  p.conv_states_width_stride, nc, p.width, window);
      load_weights(static_cast<const T*>(p.weight), p.weight_channel_stride,
                   p.weight_width_stride, static_cast<const T*>(p.bias), c0, nc, p.width, w,
                   bias);
      conv_block_any_width(p.width, static_cast<const T*>(p.x) + b * p.x_batch_stride + c0,
                           p.x_token_stride,
                           static_cast<T*>(p.out) + b * p.out_batch_stride + c0,
                           p.out_token_stride, t0, t1, nc, w, p.bias ? bias : nullptr, p.silu,
                           window);
      if (state == nullptr) continue;
      store_window(state, p.conv_states_channel_stride, p.conv_states_width_stride, nc, p.width,
                   window);
    }
  });
}

template <typename T>
void causal_conv1d_update_kernel(const CausalConv1dUpdateParams& p) {
  const int64_t num_blocks = (p.dim + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, p.batch * num_blocks, 1, [&](int64_t begin, int64_t end) {
    float w[kMaxWidth][kChannelBlock];
    float bias[kChannelBlock];
    float window[kMaxWidth - 1][kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_blocks;
      const int64_t c0 = (item % num_blocks) * kChannelBlock;
      const int64_t nc = std::min(kChannelBlock, p.dim - c0);
      int64_t slot = b;
      if (p.cache_indices != nullptr) {
        slot = p.cache_indices[b];
        if (slot == p.pad_slot_id) continue;
      }
      T* state = static_cast<T*>(p.conv_state) + slot * p.conv_state_slot_stride +
                 c0 * p.conv_state_channel_stride;
      load_window(state, p.conv_state_channel_stride, p.conv_state_width_stride, nc, p.width,
                  window);
      load_weights(static_cast<const T*>(p.weight), p.weight_channel_stride,
                   p.weight_width_stride, static_cast<const T*>(p.bias), c0, nc, p.width, w,
                   bias);
      conv_block_any_width(p.width, static_cast<const T*>(p.x) + b * p.x_batch_stride + c0,
                           p.x_token_stride,
                           static_cast<T*>(p.out) + b * p.out_batch_stride + c0,
                           p.out_token_stride, 0, p.seqlen, nc, w, p.bias ? bias : nullptr,
                           p.silu, window);
      store_window(state, p.conv_state_channel_stride, p.conv_state_width_stride, nc, p.width,
                   window);
    }
  });
}

void causal_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                       const OptTensor& conv_states, const OptTensor& query_start_loc,
                       const OptTensor& cache_indices, const OptTensor& has_initial_state,
                       bool silu, int64_t pad_slot_id, const at::Tensor& out,
                       int64_t chunk_len) {
  const CausalConv1dParams p =
      make_causal_conv1d_params(x, weight, bias, conv_states, query_start_loc, cache_indices,
                                has_initial_state, silu, pad_slot_id, out, chunk_len,
                                /*check_index_values=*/true);
  cpu::dispatch_dtype(p.dtype, "causal_conv1d", [&](auto tag) {
    causal_conv1d_kernel<decltype(tag)>(p);
  });
}

void causal_conv1d_update_cpu(const at::Tensor& x, const at::Tensor& conv_state,
                              const at::Tensor& weight, const OptTensor& bias, bool silu,
                              const OptTensor& cache_indices, int64_t pad_slot_id,
                              const at::Tensor& out) {
  const CausalConv1dUpdateParams p = make_causal_conv1d_update_params(
      x, conv_state, weight, bias, silu, cache_indices, pad_slot_id, out,
      /*check_index_values=*/true);
  cpu::dispatch_dtype(p.dtype, "causal_conv1d_update", [&](auto tag) {
    causal_conv1d_update_kernel<decltype(tag)>(p);
  });
}

}  // namespace
}  // namespace tpssm

TORCH_LIBRARY_IMPL(tpssm, CPU, m) {
  m.impl("causal_conv1d", &tpssm::causal_conv1d_cpu);
  m.impl("causal_conv1d_update", &tpssm::causal_conv1d_update_cpu);
}
