// Launcher of the fused residual add + RMSNorm kernel (csrc/kernels/rms_norm.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "norm_params.h"

namespace tpssm {

void run_add_rms_norm(const AddRmsNormParams& params, cudaStream_t stream);

}  // namespace tpssm
