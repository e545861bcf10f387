// CPU decode_attention: the kernel's semantics (bad rows and lengths <= 0 give zeros, lengths
// clamp to max_len; nothing raises on values, so CPU and CUDA agree on every input), computed as
// an exact softmax in fp32: scores first, then their maximum, exp and sum, then the weighted
// values. One task per (row, head).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_ops.h"
#include "cpu_common.h"

namespace tpssm {
namespace {

int64_t load_index(const void* ptr, bool is_int32, int64_t i) {
  return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(ptr)[i])
                  : static_cast<const int64_t*>(ptr)[i];
}

template <typename T>
void decode_attention_rows(const DecodeAttentionParams& p, int64_t begin, int64_t end) {
  const int64_t hd = p.head_dim;
  std::vector<float> qf(hd), acc(hd), scores;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
    const int64_t row = load_index(p.rows, p.rows_int32, b * p.rows_stride);
    const int64_t len =
        std::min(load_index(p.lengths, p.lengths_int32, b * p.lengths_stride), p.max_len);
    if (row < 0 || row >= p.num_slots || len <= 0) {
      for (int64_t d = 0; d < hd; ++d) cpu::store(out + d, 0.f);
      continue;
    }
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* k = static_cast<const T*>(p.k_cache) + row * p.k_slot_stride + h * p.k_head_stride;
    const T* v = static_cast<const T*>(p.v_cache) + row * p.v_slot_stride + h * p.v_head_stride;
    for (int64_t d = 0; d < hd; ++d) qf[d] = cpu::load(q + d) * p.scale;
    scores.resize(len);
    float m = -INFINITY;
    for (int64_t j = 0; j < len; ++j) {
      float s = 0.f;
      for (int64_t d = 0; d < hd; ++d) s += qf[d] * cpu::load(k + j * p.k_seq_stride + d);
      scores[j] = s;
      m = std::max(m, s);
    }
    float l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < len; ++j) {
      const float e = std::exp(scores[j] - m);
      l += e;
      for (int64_t d = 0; d < hd; ++d) acc[d] += e * cpu::load(v + j * p.v_seq_stride + d);
    }
    for (int64_t d = 0; d < hd; ++d) cpu::store(out + d, acc[d] / l);
  }
}

void decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& rows,
                          const at::Tensor& lengths, double scale, const at::Tensor& out,
                          int64_t num_splits) {
  const DecodeAttentionParams p =
      make_decode_attention_params(q, k_cache, v_cache, rows, lengths, scale, out, num_splits);
  cpu::dispatch_dtype(p.dtype, "decode_attention", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
      decode_attention_rows<T>(p, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace tpssm
