// Torch-side entry points of the quantized all-reduce ops. make_qar_*_params validate every
// documented rule (raising an error that names the argument and the rule) and fill the plain
// params structs of csrc/kernels/qallreduce_params.h; the CPU and CUDA implementations call them
// first.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "kernels/qallreduce_params.h"

namespace tpssm {

void qar_check_common(int64_t world_size, int64_t group_size, int64_t codec);

QarLayout qar_checked_layout(int64_t numel, int64_t world_size, int64_t group_size);

QarQuantizePackParams make_qar_quantize_pack_params(const at::Tensor& x, int64_t world_size,
                                                    int64_t group_size, int64_t codec,
                                                    const at::Tensor& send);

QarReduceParams make_qar_reduce_params(const at::Tensor& recv, int64_t numel, int64_t world_size,
                                       int64_t group_size, int64_t codec, const at::Tensor& mine);

QarDequantParams make_qar_dequant_params(const at::Tensor& gathered, int64_t world_size,
                                         int64_t group_size, int64_t codec,
                                         const std::optional<at::Tensor>& residual,
                                         const at::Tensor& out);

// Validation of the loopback op (N simulated ranks): xs (N, ...), residual of xs.shape[1:],
// send / recv / gathered of at least N * N * chunk_bytes bytes (rank r's buffer at r * N *
// chunk_bytes), mine of at least N * chunk_bytes, out like xs. Returns the per-rank layout.
QarLayout check_qar_loopback_args(const at::Tensor& xs, int64_t group_size, int64_t codec,
                                  const std::optional<at::Tensor>& residual,
                                  const at::Tensor& send, const at::Tensor& recv,
                                  const at::Tensor& mine, const at::Tensor& gathered,
                                  const at::Tensor& out);

// Buffer rules shared with the fused NCCL op.
void qar_check_buffer(const at::Tensor& buf, const char* name, int64_t min_bytes,
                      const at::Tensor& like);

DType qar_dtype(const at::Tensor& t, const char* name);

}  // namespace tpssm
