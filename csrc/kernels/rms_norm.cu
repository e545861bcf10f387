// The fused residual add + RMSNorm of a decode / prefill step (see norm_params.h): one pass reads
// x and the residual and writes the new residual, one reads the residual again (L1 / L2
// resident) and writes the normalised output - one launch where the unfused chain takes four
// (add, cast, rms_norm, weight multiply) and two extra round trips of the activations.
// One block per row; the sum of squares is reduced per warp with shuffles, then across warps
// through shared memory in a fixed order (every thread adds the warp sums the same way).
#include <algorithm>

#include "kernel_utils.cuh"
#include "norm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

template <typename T, typename R>
__global__ void add_rms_norm_kernel(AddRmsNormParams p) {
  extern __shared__ __align__(16) unsigned char tpssm_dynamic_smem[];
  float* warp_sums = reinterpret_cast<float*>(tpssm_dynamic_smem);
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  R* res = p.residual != nullptr ? static_cast<R*>(p.residual) + row * p.residual_row_stride
                                 : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + row * p.out_row_stride;

  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) {
    float v = to_float(x[i]);
    if (res != nullptr) {
      const R r = from_float<R>(to_float(res[i]) + v);
      res[i] = r;
      v = to_float(from_float<T>(to_float(r)));  // the norm reads the stream in the act dtype
    }
    ss += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, offset);
  const int warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int k = 0; k < warps; ++k) total += warp_sums[k];
  const float inv = rsqrtf(total / static_cast<float>(p.dim) + p.eps);

  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) {
    const float v = res != nullptr ? to_float(from_float<T>(to_float(res[i])))
                                   : to_float(x[i]);
    const T normed = from_float<T>(v * inv);
    out[i] = from_float<T>(to_float(w[i]) * to_float(normed));
  }
}

int threads_for(int64_t dim) {
  // About eight elements a thread, whole warps, at most 1024 threads.
  int64_t t = 32;
  while (t < 1024 && t * 8 < dim) t *= 2;
  return static_cast<int>(t);
}

}  // namespace

void run_add_rms_norm(const AddRmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  const int threads = threads_for(p.dim);
  const size_t smem = sizeof(float) * (threads / 32);
  const DType residual_dtype = p.residual != nullptr ? p.residual_dtype : p.act_dtype;
  TPSSM_DTYPE_SWITCH(p.act_dtype, act_t, [&] {
    TPSSM_STATE_DTYPE_SWITCH(residual_dtype, p.act_dtype, act_t, res_t, [&] {
      add_rms_norm_kernel<act_t, res_t>
          <<<static_cast<unsigned>(p.rows), threads, smem, stream>>>(p);
      TPSSM_CHECK_LAUNCH("add_rms_norm_kernel");
    });
  });
}

}  // namespace tpssm
