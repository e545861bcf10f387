// Torch-side entry of decode_attention. make_decode_attention_params validates every rule (an
// error names the argument and the rule) and fills the plain params the CUDA kernel and the CPU
// op (csrc/cpu/attention_cpu.cpp) read.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels/attention_params.h"

namespace tpssm {

// q, out: (B, H, hd) float32 / float16 / bfloat16; k_cache, v_cache: (S, H, L, hd) of q's dtype;
// every head dim contiguous (other strides free), 1 <= hd <= 256; rows, lengths: (B,) int64 or
// int32. out may not overlap any input. The values of rows and lengths are not checked here
// (a device read would sync): a bad row or a length <= 0 gives zeros, lengths clamp to L.
// num_splits: key splits of the CUDA launch, 0 (automatic, see plan_decode_attention_splits) to
// kDecodeAttentionMaxSplits; the CPU op computes the exact softmax whatever it is.
DecodeAttentionParams make_decode_attention_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache,
                                                   const at::Tensor& rows,
                                                   const at::Tensor& lengths, double scale,
                                                   const at::Tensor& out, int64_t num_splits);

// Settles p.num_splits (0: decode_attention_auto_splits for a device of sm_count SMs) and, with
// more than one split, allocates the partial results on q's device and points p at them; the
// returned tensor must outlive the launch's enqueueing (the caching allocator's stream order
// covers the rest).
at::Tensor plan_decode_attention_splits(DecodeAttentionParams& p, int64_t sm_count,
                                        const at::Tensor& q);

}  // namespace tpssm
