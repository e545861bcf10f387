// The fused norms of a decode / prefill step (see norm_params.h), one launch each where the
// unfused torch chains take four (add_rms_norm: add, cast, rms_norm, weight multiply) and about
// ten (gated_rms_norm: casts, silu, multiply, pow, mean, add, rsqrt, multiply, cast, weight
// multiply) with a round trip of the activations per step.
// add_rms_norm: one block per row; one pass reads x and the residual and writes the new residual,
// one reads the residual again (L1 / L2 resident) and writes the normalised output.
// gated_rms_norm: one block per (row, group), the same two passes over x and z.
// The sum of squares is reduced per warp with shuffles, then across warps through shared memory
// in a fixed order (every thread adds the warp sums the same way).
#include <algorithm>

#include "kernel_utils.cuh"
#include "norm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

// Sum of v over the block: shuffles within each warp, then the warp sums in a fixed order, so
// every thread gets the same total. warp_sums: one float per warp of the block.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int k = 0; k < static_cast<int>(blockDim.x / 32); ++k) total += warp_sums[k];
  return total;
}

template <typename T, typename R>
__global__ void add_rms_norm_kernel(AddRmsNormParams p) {
  extern __shared__ __align__(16) unsigned char tpssm_dynamic_smem[];
  float* warp_sums = reinterpret_cast<float*>(tpssm_dynamic_smem);
  pdl_wait();
  pdl_launch_dependents();
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
  const float inv = rsqrtf(block_sum(ss, warp_sums) / static_cast<float>(p.dim) + p.eps);

  for (int64_t i = threadIdx.x; i < p.dim; i += blockDim.x) {
    const float v = res != nullptr ? to_float(from_float<T>(to_float(res[i])))
                                   : to_float(x[i]);
    const T normed = from_float<T>(v * inv);
    out[i] = from_float<T>(to_float(w[i]) * to_float(normed));
  }
}

// One block per (row, group), rows on grid.x (a prefill has more rows than grid.y allows); also
// the sums of gated_sum_squares (p.sum_sq_out), and the second half of a group spanning ranks
// (p.sum_sq: the first pass is skipped). The gate is recomputed in the second pass instead of
// kept: a group is at most a few thousand columns, so x and z are L1 / L2 hits the second time,
// and the registers stay few.
template <typename T>
__global__ void gated_rms_norm_kernel(GatedRmsNormParams p) {
  extern __shared__ __align__(16) unsigned char tpssm_dynamic_smem[];
  float* warp_sums = reinterpret_cast<float*>(tpssm_dynamic_smem);
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const int64_t col0 =
      blockIdx.y == 0 ? 0 : p.first_group_size + (blockIdx.y - 1) * p.group_size;
  const int64_t size = blockIdx.y == 0 ? p.first_group_size : p.group_size;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride + col0;
  const T* z = p.z != nullptr ? static_cast<const T*>(p.z) + row * p.z_row_stride + col0
                              : nullptr;

  // Uniform per block: every thread takes the same branch, so block_sum's barrier is reached.
  float inv;
  if (p.sum_sq != nullptr) {
    inv = rsqrtf(p.sum_sq[row * p.sum_sq_row_stride + blockIdx.y] / p.norm_size + p.eps);
  } else {
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
      float v = to_float(x[i]);
      if (z != nullptr) v *= silu(to_float(z[i]));
      ss += v * v;
    }
    const float total = block_sum(ss, warp_sums);
    if (p.sum_sq_out != nullptr) {  // gated_sum_squares: the sum is the result
      if (threadIdx.x == 0) p.sum_sq_out[row * p.sum_sq_row_stride + blockIdx.y] = total;
      return;
    }
    inv = rsqrtf(total / static_cast<float>(size) + p.eps);
  }

  const T* w = p.weight != nullptr ? static_cast<const T*>(p.weight) + col0 : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.out_row_stride + col0;

  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
    float v = to_float(x[i]);
    if (z != nullptr) v *= silu(to_float(z[i]));
    const T normed = from_float<T>(v * inv);
    out[i] = w != nullptr ? from_float<T>(to_float(w[i]) * to_float(normed)) : normed;
  }
}

}  // namespace

void run_add_rms_norm(const AddRmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  if (p.rows > 0x7fffffff) {
    throw std::runtime_error("tpssm add_rms_norm: too many rows for one launch");
  }
  const int threads = norm_block_threads(p.dim);
  const size_t smem = sizeof(float) * (threads / 32);
  const DType residual_dtype = p.residual != nullptr ? p.residual_dtype : p.act_dtype;
  TPSSM_DTYPE_SWITCH(p.act_dtype, act_t, [&] {
    TPSSM_STATE_DTYPE_SWITCH(residual_dtype, p.act_dtype, act_t, res_t, [&] {
      launch_programmatic(add_rms_norm_kernel<act_t, res_t>,
                          dim3(static_cast<unsigned>(p.rows)), dim3(threads), smem, stream,
                          "add_rms_norm_kernel", p);
    });
  });
}

void run_gated_sum_squares(const GatedRmsNormParams& p, cudaStream_t stream) {
  run_gated_rms_norm(p, stream);  // the kernel stops after the sums when sum_sq_out is set
}

void run_gated_rms_norm(const GatedRmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.dim == 0) return;
  const int64_t groups = 1 + (p.dim - p.first_group_size) / p.group_size;
  if (p.rows > 0x7fffffff || groups > 65535) {
    throw std::runtime_error("tpssm gated_rms_norm: too many rows or groups for one launch");
  }
  const int threads = norm_block_threads(std::max(p.first_group_size, p.group_size));
  const size_t smem = sizeof(float) * (threads / 32);
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(groups));
  TPSSM_DTYPE_SWITCH(p.act_dtype, act_t, [&] {
    launch_programmatic(gated_rms_norm_kernel<act_t>, grid, dim3(threads), smem, stream,
                        "gated_rms_norm_kernel", p);
  });
}

}  // namespace tpssm
