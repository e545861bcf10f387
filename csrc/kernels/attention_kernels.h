// Launcher of the decode attention kernel (csrc/kernels/attention.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "attention_params.h"

namespace tpssm {

void run_decode_attention(const DecodeAttentionParams& params, cudaStream_t stream);

// The current device's SM count (cached per device): the automatic split plan's input.
int decode_attention_sm_count();

}  // namespace tpssm
