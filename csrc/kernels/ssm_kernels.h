// Torch-free launchers of the SSM CUDA kernels. Each enqueues its kernel(s) on `stream`, does not
// synchronise or allocate, and checks the launch. Used by csrc/cuda/ssm_cuda_ops.cpp and by the
// standalone benchmark binaries (CMakeLists.txt).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "ssm_params.h"

namespace tpssm {

void run_causal_conv1d(const CausalConv1dParams& params, cudaStream_t stream);
void run_causal_conv1d_update(const CausalConv1dUpdateParams& params, cudaStream_t stream);

// The launch plan of one selective_scan call: the kernel family, how the flattened token range is
// split over the device, the vector paths, and the workspace the split plan needs. Built once per
// call by plan_selective_scan (from the params, the options in them and the current device's
// attributes) and launched as built by run_selective_scan with the same params.
struct ScanPlan {
  int group_threads;    // G: threads per channel of the recurrent kernels (staged: 1, 2 or 4)
  bool flat;            // chunked flat plan (three passes) vs one block row per sequence
  bool bc_vec;          // B / C rows are 16-byte aligned with dstate % 16 == 0
  bool staged;          // staged token tiles (see the top of selective_scan.cu)
  bool own_vec;         // staged: u, delta, z tiles load as 16-byte packs (aligned, headdim 1)
  bool ssd;             // the chunked SSD kernel (ssd_scan.cu) instead of the recurrence
  bool ssd_in_vec;      // SSD: u, z, B, C rows load as 16-byte async copies
  bool ssd_out_vec;     // SSD: out rows store as 16-byte packs
  int64_t total_tokens;
  int64_t chunk_len;
  int64_t num_chunks;
  int64_t channels;
  int64_t channel_blocks;
  // Bytes of the workspace on the current device (0 unless flat); run_selective_scan points the
  // ws_* arrays into the one it is given.
  int64_t workspace_bytes;
  float* ws_S;          // (num_chunks, channels, dstate): chunk end states, then carried H_j
  float* ws_I;          // (num_chunks, channels, dstate): initial state of a spanning sequence
  float* ws_P;          // (num_chunks, nheads, dstate or 1): chunk decay
  int32_t* ws_flags;    // (num_chunks,): 0 no carry, 1 carry starts here, 2 carry continues
};

ScanPlan plan_selective_scan(const SelectiveScanParams& params);
// Launches `plan` (built for these params) with a workspace of at least plan.workspace_bytes
// bytes; the torch binding passes one from torch's caching allocator.
void run_selective_scan(const SelectiveScanParams& params, const ScanPlan& plan, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);
// Plans, allocates the workspace stream-ordered (cudaMallocAsync) and launches.
void run_selective_scan(const SelectiveScanParams& params, cudaStream_t stream);
void run_selective_state_update(const SelectiveStateUpdateParams& params, cudaStream_t stream);

}  // namespace tpssm
