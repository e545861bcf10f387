// Torch-free launchers of the SSM CUDA kernels. Each enqueues its kernel(s) on `stream`, does not
// synchronise or allocate, and checks the launch. Used by csrc/cuda/ssm_cuda_ops.cpp and by the
// standalone benchmark binaries (CMakeLists.txt).
#pragma once

#include <cuda_runtime_api.h>

#include "ssm_params.h"

namespace tpssm {

void run_causal_conv1d(const CausalConv1dParams& params, cudaStream_t stream);
void run_causal_conv1d_update(const CausalConv1dUpdateParams& params, cudaStream_t stream);
void run_selective_scan(const SelectiveScanParams& params, cudaStream_t stream);
void run_selective_state_update(const SelectiveStateUpdateParams& params, cudaStream_t stream);

}  // namespace tpssm
