// Parameters of decode attention over a slot-indexed KV cache (decode_attention). Torch-free: the
// CUDA kernel, its host emulation and the CPU op read it; csrc/attention_ops.h fills it.
#pragma once

#include <cstdint>

#include "ssm_params.h"  // DType

namespace tpssm {

// For every batch row b and head h, with r = rows[b] and n = min(lengths[b], max_len):
//   out[b, h] = softmax(scale * K[r, h, :n] q[b, h]) V[r, h, :n]   (fp32 inside, dtype out).
// A row index outside [0, num_slots) or a length <= 0 gives out[b] = 0: the values live on the
// device and are never checked on the host (no sync, CUDA-graph capturable).
struct DecodeAttentionParams {
  int64_t batch = 0;      // B
  int64_t heads = 0;      // H
  int64_t head_dim = 0;   // hd, at most kDecodeAttentionMaxHeadDim
  int64_t num_slots = 0;  // S: cache rows
  int64_t max_len = 0;    // L: keys a cache row holds
  // Strides in elements; the head_dim of every tensor is contiguous.
  int64_t q_batch_stride = 0, q_head_stride = 0;
  int64_t k_slot_stride = 0, k_head_stride = 0, k_seq_stride = 0;
  int64_t v_slot_stride = 0, v_head_stride = 0, v_seq_stride = 0;
  int64_t out_batch_stride = 0, out_head_stride = 0;
  int64_t rows_stride = 0, lengths_stride = 0;
  bool rows_int32 = false;     // rows: int32, else int64
  bool lengths_int32 = false;  // lengths: int32, else int64
  DType dtype = DType::kFloat32;  // q, k_cache, v_cache, out
  float scale = 1.f;
  const void* q = nullptr;        // (B, H, hd)
  const void* k_cache = nullptr;  // (S, H, L, hd)
  const void* v_cache = nullptr;  // (S, H, L, hd)
  const void* rows = nullptr;     // (B,)
  const void* lengths = nullptr;  // (B,)
  void* out = nullptr;            // (B, H, hd)
  // Key splits (flash-decoding): 1 = one block per (row, head); S > 1 = S blocks per (row,
  // head), each over an S-th of the row's keys, their partial softmax results (max, sum,
  // unnormalised head_dim accumulator) in `partials` (B * H * S * (hd + 2) floats), merged by a
  // second kernel.
  int64_t num_splits = 1;
  float* partials = nullptr;
};

// A lane of the kernel holds up to 8 of a head's elements (see attention.cu).
constexpr int64_t kDecodeAttentionMaxHeadDim = 256;
constexpr int64_t kDecodeAttentionMaxSplits = 32;

// The automatic split count, from the heads, the cache's length and the SM count - not the
// batch, so that a row's result (its reduction order) does not depend on the rows beside it, as
// in a decode graph replaying a padded batch: about four blocks an SM for a single row, each
// share over at least 64 of the cache's keys, at most 32 shares. A larger batch multiplies the
// blocks; the shares' partial results cost (head_dim + 2) floats against 64 keys' K and V.
inline int64_t decode_attention_auto_splits(int64_t heads, int64_t max_len, int64_t sm_count) {
  if (heads <= 0 || max_len <= 0 || sm_count <= 0) return 1;
  int64_t splits = (4 * sm_count + heads - 1) / heads;
  const int64_t by_keys = (max_len + 63) / 64;
  splits = splits < by_keys ? splits : by_keys;
  splits = splits < kDecodeAttentionMaxSplits ? splits : kDecodeAttentionMaxSplits;
  return splits > 1 ? splits : 1;
}

}  // namespace tpssm
