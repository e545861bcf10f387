// Torch-free launchers of the SSM CUDA kernels. Each enqueues its kernel(s) on `stream`, does not
// synchronise or allocate, and checks the launch. Used by csrc/cuda/ssm_cuda_ops.cpp and by the
// standalone benchmark binaries (CMakeLists.txt).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "ssm_params.h"

namespace tpssm {

void run_causal_conv1d(const CausalConv1dParams& params, cudaStream_t stream);
void run_causal_conv1d_update(const CausalConv1dUpdateParams& params, cudaStream_t stream);
void run_selective_scan(const SelectiveScanParams& params, cudaStream_t stream);
// The selective scan may split long sequences into chunks (see selective_scan.cu), which needs an
// fp32 workspace of selective_scan_workspace_bytes(params) bytes on the current device (0 when
// the plan does not chunk). The overload without a workspace allocates it stream-ordered
// (cudaMallocAsync); the torch binding passes one from torch's caching allocator.
size_t selective_scan_workspace_bytes(const SelectiveScanParams& params);
void run_selective_scan(const SelectiveScanParams& params, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);
void run_selective_state_update(const SelectiveStateUpdateParams& params, cudaStream_t stream);

}  // namespace tpssm
