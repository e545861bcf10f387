// Launchers of the fused norm kernels (csrc/kernels/rms_norm.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "norm_params.h"

namespace tpssm {

void run_add_rms_norm(const AddRmsNormParams& params, cudaStream_t stream);
void run_gated_rms_norm(const GatedRmsNormParams& params, cudaStream_t stream);
// gated_sum_squares: the same params with sum_sq_out set.
void run_gated_sum_squares(const GatedRmsNormParams& params, cudaStream_t stream);

}  // namespace tpssm
