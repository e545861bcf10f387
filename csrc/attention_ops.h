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
DecodeAttentionParams make_decode_attention_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache,
                                                   const at::Tensor& rows,
                                                   const at::Tensor& lengths, double scale,
                                                   const at::Tensor& out);

}  // namespace tpssm
