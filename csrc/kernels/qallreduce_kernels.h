// Torch-free launchers of the quantized all-reduce CUDA kernels (csrc/kernels/qallreduce_kernels.cu).
// Each launches on `stream` without synchronising and throws std::runtime_error if the launch
// fails. Callers validate the params first (csrc/qallreduce_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/qallreduce_params.h"

namespace tpssm {

void run_qar_quantize_pack(const QarQuantizePackParams& params, cudaStream_t stream);
void run_qar_reduce_requant(const QarReduceParams& params, cudaStream_t stream);
void run_qar_dequant(const QarDequantParams& params, cudaStream_t stream);

}  // namespace tpssm
