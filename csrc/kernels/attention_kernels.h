// Launcher of the decode attention kernel (csrc/kernels/attention.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "attention_params.h"

namespace tpssm {

void run_decode_attention(const DecodeAttentionParams& params, cudaStream_t stream);

}  // namespace tpssm
