// Launcher of the decode-sized projection kernel (csrc/kernels/gemv.cu) and its launch plan.
#pragma once

#include <cuda_runtime_api.h>

#include "gemv_params.h"

namespace tpssm {

constexpr int kGemvWarps = 8;  // warps a block

// How a launch splits the work. A block's 8 warps form 8 / warps_per_row groups; each group
// owns rows_per_warp weight rows and splits their K range over its warps, so a block covers
// (8 / warps_per_row) * rows_per_warp rows. vectorized: 16-byte loads (K a multiple of the
// elements in 16 bytes, rows and bases 16-byte aligned), else element loads and one row a warp.
struct GemvPlan {
  int warps_per_row = 1;
  int rows_per_warp = 1;
  bool vectorized = false;
  int64_t blocks = 0;
};

// The plan for p on a device with sm_count SMs: explicit options are kept (a rows_per_warp
// above 1 needs the vector path); automatic ones give each lane at most ~4 chunks of K and, of
// the ways left, the most rows a warp that still leave two blocks an SM.
GemvPlan plan_gemv(const GemvParams& p, int sm_count);

void run_gemv(const GemvParams& p, cudaStream_t stream);

}  // namespace tpssm
