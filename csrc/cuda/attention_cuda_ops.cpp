// CUDA decode_attention: validate, guard the device, plan the key splits, launch on the current
// stream.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_ops.h"
#include "kernels/attention_kernels.h"

namespace tpssm {
namespace {

void decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& rows,
                           const at::Tensor& lengths, double scale, const at::Tensor& out,
                           int64_t num_splits) {
  DecodeAttentionParams p =
      make_decode_attention_params(q, k_cache, v_cache, rows, lengths, scale, out, num_splits);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor partials = plan_decode_attention_splits(p, decode_attention_sm_count(), q);
  run_decode_attention(p, c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace tpssm
