// CUDA kernels of the quantized two-shot all-reduce. Bit-exact with the CPU kernels and the
// reference: the scalar numerics come from kernels/qallreduce_math.h (explicit __f*_rn fp32
// operations, no contraction, no fast-math).
//
// Work decomposition: one thread owns kElemsPerThread = 16 contiguous elements of a group, so a
// group of G is G / 16 adjacent lanes (2..16, always within one warp) that combine their absmax
// with xor shuffles. Every global access is 128 bits wide: group starts are multiples of
// G * sizeof(element) >= 64 bytes from a 16-byte aligned base, and chunk starts are multiples of
// 16 bytes by construction of the layout.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/qallreduce_kernels.h"
#include "kernels/qallreduce_math.h"
#include "kernels/qallreduce_switch.h"

namespace tpssm {

namespace {

struct QarKernelTraits {
  static constexpr int kElemsPerThread = 16;
  static constexpr int kThreadsPerBlock = 256;
  static constexpr int kMinGroupSize = 32;
  static constexpr int kMaxGroupSize = 256;
  static_assert(kElemsPerThread == 16, "one thread's codes are exactly one 128-bit word");
  static_assert(kMaxGroupSize / kElemsPerThread <= 32, "a group must fit in one warp");
  static_assert(kThreadsPerBlock % 32 == 0, "whole warps: the shuffles use the full mask");
  static_assert(kMinGroupSize * 2 % 16 == 0, "16-bit group starts must stay 16-byte aligned");
};
using Traits = QarKernelTraits;
constexpr int kE = Traits::kElemsPerThread;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ void load_elems(const T* p, float (&v)[kE]) {
  constexpr int kVecs = kE * sizeof(T) / 16;
  static_assert(kE * sizeof(T) % 16 == 0, "whole 128-bit words");
  uint4 raw[kVecs];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) raw[i] = reinterpret_cast<const uint4*>(p)[i];
  const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
  for (int i = 0; i < kE; ++i) v[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_elems(T* p, const float (&v)[kE]) {
  constexpr int kVecs = kE * sizeof(T) / 16;
  uint4 raw[kVecs];
  T* e = reinterpret_cast<T*>(raw);
#pragma unroll
  for (int i = 0; i < kE; ++i) e[i] = from_float<T>(v[i]);
#pragma unroll
  for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(p)[i] = raw[i];
}

union Codes16 {
  uint4 word;
  uint8_t b[kE];
};

// Absmax of the group spread over `threads_per_group` adjacent lanes. All 32 lanes of the warp
// must call it (inactive lanes contribute 0).
__device__ __forceinline__ float group_absmax(const float (&v)[kE], int threads_per_group) {
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < kE; ++i) a = qar::nan_max(a, fabsf(v[i]));
  for (int off = threads_per_group / 2; off > 0; off >>= 1) {
    a = qar::nan_max(a, __shfl_xor_sync(0xffffffffu, a, off));
  }
  return a;
}

// Writes one thread's 16 codes, and (first lane of the group) the scale and, for the last group
// of the chunk, the zero padding after the scales.
template <QarCodec kCodec>
__device__ __forceinline__ void quantize_store(const float (&v)[kE], float a, uint8_t* chunk,
                                               int64_t j, int part, const QarLayout& l) {
  const float s = qar::group_scale<kCodec>(a);
  const float inv = qar::group_inv<kCodec>(a);
  Codes16 c;
#pragma unroll
  for (int i = 0; i < kE; ++i) c.b[i] = qar::encode<kCodec>(v[i], inv);
  *reinterpret_cast<uint4*>(chunk + j * l.group_size + part * kE) = c.word;
  if (part == 0) {
    *reinterpret_cast<float*>(chunk + l.values_bytes + j * 4) = s;
    if (j == l.groups_per_chunk - 1) {
      const int64_t scales_end = l.values_bytes + l.groups_per_chunk * 4;
      for (int64_t b = scales_end; b < l.chunk_bytes; ++b) chunk[b] = 0;
    }
  }
}

template <QarCodec kCodec, typename T>
__global__ void __launch_bounds__(Traits::kThreadsPerBlock)
qar_quantize_pack_kernel(const QarQuantizePackParams p) {
  const QarLayout l = p.layout;
  const int tpg = l.group_size / kE;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = tid / tpg;
  const int part = static_cast<int>(tid % tpg);
  float v[kE];
  if (g < l.num_groups) {
    load_elems(static_cast<const T*>(p.x) + g * l.group_size + part * kE, v);
  } else {
#pragma unroll
    for (int i = 0; i < kE; ++i) v[i] = 0.0f;
  }
  const float a = group_absmax(v, tpg);
  if (g >= l.world_size * l.groups_per_chunk) return;
  quantize_store<kCodec>(v, a, p.send + (g / l.groups_per_chunk) * l.chunk_bytes,
                         g % l.groups_per_chunk, part, l);
}

template <QarCodec kCodec>
__global__ void __launch_bounds__(Traits::kThreadsPerBlock)
qar_reduce_requant_kernel(const QarReduceParams p) {
  const QarLayout l = p.layout;
  const int tpg = l.group_size / kE;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j = tid / tpg;
  const int part = static_cast<int>(tid % tpg);
  float acc[kE];
#pragma unroll
  for (int i = 0; i < kE; ++i) acc[i] = 0.0f;
  if (j < l.groups_per_chunk) {
    // Fixed rank order: every owner sums identically, whatever the arrival order.
    for (int r = 0; r < l.world_size; ++r) {
      const uint8_t* chunk = p.recv + r * l.chunk_bytes;
      const float s = *reinterpret_cast<const float*>(chunk + l.values_bytes + j * 4);
      Codes16 c;
      c.word = *reinterpret_cast<const uint4*>(chunk + j * l.group_size + part * kE);
#pragma unroll
      for (int i = 0; i < kE; ++i) {
        acc[i] = qar::fadd(acc[i], qar::fmul(qar::decode<kCodec>(c.b[i]), s));
      }
    }
  }
  const float a = group_absmax(acc, tpg);
  if (j >= l.groups_per_chunk) return;
  quantize_store<kCodec>(acc, a, p.mine, j, part, l);
}

template <QarCodec kCodec, typename T>
__global__ void __launch_bounds__(Traits::kThreadsPerBlock)
qar_dequant_kernel(const QarDequantParams p) {
  const QarLayout l = p.layout;
  const int tpg = l.group_size / kE;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = tid / tpg;
  if (g >= l.num_groups) return;
  const int part = static_cast<int>(tid % tpg);
  const uint8_t* chunk = p.gathered + (g / l.groups_per_chunk) * l.chunk_bytes;
  const int64_t j = g % l.groups_per_chunk;
  const float s = *reinterpret_cast<const float*>(chunk + l.values_bytes + j * 4);
  Codes16 c;
  c.word = *reinterpret_cast<const uint4*>(chunk + j * l.group_size + part * kE);
  float y[kE];
#pragma unroll
  for (int i = 0; i < kE; ++i) y[i] = qar::fmul(qar::decode<kCodec>(c.b[i]), s);
  const int64_t offset = g * l.group_size + part * kE;
  if (p.residual != nullptr) {
    float r[kE];
    load_elems(static_cast<const T*>(p.residual) + offset, r);
#pragma unroll
    for (int i = 0; i < kE; ++i) y[i] = qar::fadd(y[i], r[i]);
  }
  store_elems(static_cast<T*>(p.out) + offset, y);
}

int64_t num_blocks(int64_t groups, int group_size) {
  const int64_t threads = groups * (group_size / kE);
  const int64_t blocks = (threads + Traits::kThreadsPerBlock - 1) / Traits::kThreadsPerBlock;
  // grid.x limit: a larger count would wrap in the launch and leave most groups untouched.
  if (blocks > 0x7fffffff) {
    throw std::runtime_error("tpssm qallreduce: message too large for one launch");
  }
  return blocks;
}

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("tpssm: launch of ") + name +
                             " failed: " + cudaGetErrorString(err));
  }
}

void check_group_size(int group_size) {
  if (group_size < Traits::kMinGroupSize || group_size > Traits::kMaxGroupSize ||
      group_size % kE != 0) {
    throw std::invalid_argument("tpssm: unsupported group_size " + std::to_string(group_size));
  }
}

}  // namespace

void run_qar_quantize_pack(const QarQuantizePackParams& p, cudaStream_t stream) {
  check_group_size(p.layout.group_size);
  const int64_t blocks = num_blocks(p.layout.world_size * p.layout.groups_per_chunk,
                                    p.layout.group_size);
  if (blocks == 0) return;
  qar_dispatch_codec(p.codec, [&](auto codec) {
    qar_dispatch_dtype<float, __half, __nv_bfloat16>(p.dtype, [&](auto tag) {
      qar_quantize_pack_kernel<decltype(codec)::value, decltype(tag)>
          <<<blocks, Traits::kThreadsPerBlock, 0, stream>>>(p);
    });
  });
  check_launch("qar_quantize_pack_kernel");
}

void run_qar_reduce_requant(const QarReduceParams& p, cudaStream_t stream) {
  check_group_size(p.layout.group_size);
  const int64_t blocks = num_blocks(p.layout.groups_per_chunk, p.layout.group_size);
  if (blocks == 0) return;
  qar_dispatch_codec(p.codec, [&](auto codec) {
    qar_reduce_requant_kernel<decltype(codec)::value>
        <<<blocks, Traits::kThreadsPerBlock, 0, stream>>>(p);
  });
  check_launch("qar_reduce_requant_kernel");
}

void run_qar_dequant(const QarDequantParams& p, cudaStream_t stream) {
  check_group_size(p.layout.group_size);
  const int64_t blocks = num_blocks(p.layout.num_groups, p.layout.group_size);
  if (blocks == 0) return;
  qar_dispatch_codec(p.codec, [&](auto codec) {
    qar_dispatch_dtype<float, __half, __nv_bfloat16>(p.dtype, [&](auto tag) {
      qar_dequant_kernel<decltype(codec)::value, decltype(tag)>
          <<<blocks, Traits::kThreadsPerBlock, 0, stream>>>(p);
    });
  });
  check_launch("qar_dequant_kernel");
}

}  // namespace tpssm
