// Device helpers shared by the SSM kernels: dtype conversion, 16-byte vector access, launch
// checks, device properties and the dense / varlen sequence walk. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "launch_options.h"

namespace tpssm {

#define TPSSM_CUDA_CHECK(EXPR)                                                               \
  do {                                                                                       \
    cudaError_t tpssm_err_ = (EXPR);                                                         \
    if (tpssm_err_ != cudaSuccess) {                                                         \
      throw std::runtime_error(std::string("tpssm CUDA error: ") +                          \
                               cudaGetErrorString(tpssm_err_) + " (" #EXPR ") at " +         \
                               __FILE__ + ":" + std::to_string(__LINE__));                   \
    }                                                                                        \
  } while (0)

// After every launch: a bad configuration surfaces here instead of at the next sync.
#define TPSSM_CHECK_LAUNCH(KERNEL_NAME)                                                      \
  do {                                                                                       \
    cudaError_t tpssm_err_ = cudaGetLastError();                                             \
    if (tpssm_err_ != cudaSuccess) {                                                         \
      throw std::runtime_error(std::string("tpssm: launch of ") + KERNEL_NAME +             \
                               " failed: " + cudaGetErrorString(tpssm_err_));                \
    }                                                                                        \
  } while (0)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A device attribute of the current device, cached per device and attribute slot: launch
// heuristics ask on every call and the query is not free.
template <int kSlot>
inline int cached_device_attribute(cudaDeviceAttr attr) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  TPSSM_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= 0 && device < kMaxDevices) {
    int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int value = 0;
  TPSSM_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(value, std::memory_order_relaxed);
  return value;
}

inline int current_device_sm_count() {
  return cached_device_attribute<2>(cudaDevAttrMultiProcessorCount);
}

inline int current_device_cc_major() {
  return cached_device_attribute<0>(cudaDevAttrComputeCapabilityMajor);
}

// Shared memory one block may opt in to (cudaFuncAttributeMaxDynamicSharedMemorySize).
inline int current_device_max_smem_per_block() {
  return cached_device_attribute<1>(cudaDevAttrMaxSharedMemoryPerBlockOptin);
}

// Lets kKernel launch with up to `bytes` of dynamic shared memory on the current device. Once per
// device and kernel, so that a launch being captured into a CUDA graph makes no attribute call
// (the first launch on a device must therefore come before any capture, as with every kernel's
// first launch). bytes must be the same on every call for one kernel.
template <auto kKernel>
void allow_dynamic_smem(int bytes) {
  static std::atomic<uint64_t> configured{0};
  int device = 0;
  TPSSM_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || (configured.load(std::memory_order_relaxed) & bit) == 0) {
    TPSSM_CUDA_CHECK(
        cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    configured.fetch_or(bit, std::memory_order_relaxed);
  }
}

// ---------------------------------------------------------------------------------------------
// Programmatic dependent launch (launch_options.h). A kernel launched by launch_programmatic
// calls pdl_wait() in every thread before it touches memory (only address arithmetic and
// prefetch_l2 come before), then pdl_launch_dependents() so that the next kernel can be
// scheduled while this one runs. Waiting before triggering keeps every kernel two or more back
// in the stream complete when a kernel starts. Both are no-ops in a launch without the
// attribute and below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Brings the 128-byte line holding ptr into L2. Never returns data, so it is safe before
// pdl_wait: a line the previous kernel writes afterwards is updated in L2 like any other.
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
#endif
}

// Whether the code of `kernel` that runs on the current device was compiled for sm_90+, so
// that its pdl_wait is there: a build for an older architecture only (e.g. 8.0+PTX) runs on an
// H100 as JIT-compiled compute_80 PTX, without the wait. Cached per (device, kernel).
inline bool kernel_has_programmatic_wait(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, bool> cache;
  int device = 0;
  TPSSM_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  auto it = cache.find(key);
  if (it == cache.end()) {
    cudaFuncAttributes attributes;
    TPSSM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    it = cache.emplace(key, attributes.ptxVersion >= 90).first;
  }
  return it->second;
}

// Whether launch_programmatic launches `kernel` with the attribute: the process setting is on,
// the current device is sm_90+ and so is the kernel's code.
inline bool programmatic_launch_active(const void* kernel) {
  return programmatic_launch_setting().load(std::memory_order_relaxed) &&
         current_device_cc_major() >= 9 && kernel_has_programmatic_wait(kernel);
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization when
// `programmatic` (the kernel must follow pdl_wait's rule). For a kernel that also needs the
// decision as an argument; launch_programmatic below takes it from the setting.
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), bool programmatic, dim3 grid, dim3 block,
                   size_t smem, cudaStream_t stream, const char* name, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  const unsigned attributes = programmatic ? 1u : 0u;
  // In field order (gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs): the kernel
  // emulator defines gridDim and blockDim as macros.
  cudaLaunchConfig_t config = {grid, block, smem, stream, attribute, attributes};
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so that the next launch check is not charged with it
    throw std::runtime_error(std::string("tpssm: launch of ") + name +
                             " failed: " + cudaGetErrorString(err));
  }
}

// launch_kernel with programmatic serialization when programmatic_launch_active(kernel).
template <typename... KArgs, typename... Args>
void launch_programmatic(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t stream, const char* name, Args&&... args) {
  launch_kernel(kernel, programmatic_launch_active(reinterpret_cast<const void*>(kernel)), grid,
                block, smem, stream, name, std::forward<Args>(args)...);
}

// The block's dynamic shared memory, 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char tpssm_dynamic_smem[];
  return tpssm_dynamic_smem;
}

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// ---------------------------------------------------------------------------------------------
// Conversions. Arithmetic is always fp32; storage types are float, __half, __nv_bfloat16.
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The register type of one 16- or 8-byte vector access.
template <int kBytes>
using VecRaw = std::conditional_t<kBytes == 16, uint4, uint2>;

// kN elements of T starting at ptr, as one 16- or 8-byte access (kN * sizeof(T) bytes, ptr
// aligned to them) or as a scalar access (kN == 1).
template <typename T, int kN>
__device__ __forceinline__ void load_vec(const T* ptr, float (&dst)[kN]) {
  static_assert(kN == 1 || kN * sizeof(T) == 16 || kN * sizeof(T) == 8,
                "vector access must be 16 or 8 bytes or scalar");
  if constexpr (kN == 1) {
    dst[0] = to_float(ptr[0]);
  } else {
    using Raw = VecRaw<kN * sizeof(T)>;
    union {
      Raw raw;
      T elems[kN];
    } pack;
    pack.raw = *reinterpret_cast<const Raw*>(ptr);
#pragma unroll
    for (int i = 0; i < kN; ++i) dst[i] = to_float(pack.elems[i]);
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_vec(T* ptr, const float (&src)[kN]) {
  static_assert(kN == 1 || kN * sizeof(T) == 16 || kN * sizeof(T) == 8,
                "vector access must be 16 or 8 bytes or scalar");
  if constexpr (kN == 1) {
    ptr[0] = from_float<T>(src[0]);
  } else {
    using Raw = VecRaw<kN * sizeof(T)>;
    union {
      Raw raw;
      T elems[kN];
    } pack;
#pragma unroll
    for (int i = 0; i < kN; ++i) pack.elems[i] = from_float<T>(src[i]);
    *reinterpret_cast<Raw*>(ptr) = pack.raw;
  }
}

// Raw storage of kN elements (one 16-byte register quad when vectorised): keeps 16-bit inputs
// packed in registers until they are used, halving the registers of a load-ahead buffer.
template <typename T, int kN>
struct alignas(kN * sizeof(T)) Pack {
  T elems[kN];
};

template <typename T, int kN>
__device__ __forceinline__ Pack<T, kN> load_pack(const T* ptr) {
  static_assert(kN == 1 || kN * sizeof(T) == 16, "vector access must be 16 bytes or scalar");
  Pack<T, kN> pack;
  if constexpr (kN == 1) {
    pack.elems[0] = ptr[0];
  } else {
    *reinterpret_cast<uint4*>(&pack) = *reinterpret_cast<const uint4*>(ptr);
  }
  return pack;
}

// load_pack for data the kernel reads once and never again (a weight streamed by a GEMV): the
// read-only path without an L1 line, so that the data a block does re-read from L1 stays there.
template <typename T, int kN>
__device__ __forceinline__ Pack<T, kN> load_pack_streaming(const T* ptr) {
  static_assert(kN == 1 || kN * sizeof(T) == 16, "vector access must be 16 bytes or scalar");
  Pack<T, kN> pack;
  if constexpr (kN == 1) {
    pack.elems[0] = ptr[0];
  } else {
#if defined(__CUDA_ARCH__)
    // volatile: kept after a preceding pdl_wait (a plain asm could be hoisted above it).
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    *reinterpret_cast<uint4*>(&pack) = v;
#else
    *reinterpret_cast<uint4*>(&pack) = *reinterpret_cast<const uint4*>(ptr);
#endif
  }
  return pack;
}

template <typename T, int kN>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, kN>& pack) {
  static_assert(kN * sizeof(T) == 16, "vector access must be 16 bytes");
  *reinterpret_cast<uint4*>(ptr) = *reinterpret_cast<const uint4*>(&pack);
}

constexpr float kLog2e = 1.4426950408889634f;

constexpr float kLn2 = 0.6931471805599453f;

// 2^x on the MUFU unit alone (ex2.approx.ftz: ~2 ulp). exp2f wraps the same instruction in a
// range fix-up (a compare and two predicated multiplies) so that results under 2^-126 come out
// as denormals; a scan decay that small is zero to fp32 working precision, and the fix-up was a
// third of the Mamba1 scan's instructions. The host build (tools/cuda_emu) uses exp2f.
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// 2^x on the FMA pipe, for a kernel whose MUFU unit is its bound while issue slots are spare:
// x = i + f with i = round(x) (the 1.5 * 2^23 shift) and f in [-0.5, 0.5]; 2^f from a degree-5
// near-minimax polynomial (relative error ~2e-7 in fp32 arithmetic, about ex2.approx's), scaled
// by adding i to the exponent bits (mod 2^32 the shifted bits of the rounding constant vanish).
// x is clamped to [-127, 127]: near and below -126 the result is 0 or a denormal of the wrong
// mantissa (zero to working precision for a decay), +inf gives 2^127, and a NaN x gives 0, so a
// caller must carry NaN through its other terms (a NaN dt reaches the state through dt * u).
__device__ __forceinline__ float exp2_fma(float x) {
  x = fminf(fmaxf(x, -127.f), 127.f);
  const float shifted = x + 12582912.f;  // 1.5 * 2^23: the low mantissa bits hold round(x)
  const float f = x - (shifted - 12582912.f);
  float p = 1.3264727e-3f;
  p = fmaf(p, f, 9.6715127e-3f);
  p = fmaf(p, f, 5.5507337e-2f);
  p = fmaf(p, f, 2.4022242e-1f);
  p = fmaf(p, f, 6.9314698e-1f);
  p = fmaf(p, f, 1.f);
  const uint32_t scale = static_cast<uint32_t>(__float_as_int(shifted)) << 23;
  return __int_as_float(static_cast<int>(static_cast<uint32_t>(__float_as_int(p)) + scale));
}

// log2 on the MUFU unit (lg2.approx.ftz: absolute error ~2^-22 on [0.5, 2], 2 ulp elsewhere).
__device__ __forceinline__ float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

// softplus with the reference threshold: identity above 20, where log1p(exp(x)) == x in fp32.
__device__ __forceinline__ float softplus_thresholded(float x) {
  return x <= 20.f ? log1pf(expf(x)) : x;
}

// The same function for a scan's per-token hot loop, from the MUFU units: log1p(e) with e = e^x
// is log2(1 + e) * ln 2, or for e < 1/32 (where 1 + e drops e's low bits) the series up to e^5
// (truncation under e^5 / 6 relative). Relative error under ~1e-5 for x above -87; below, e^x
// flushes to 0 where the reference keeps a denormal (an absolute error under 1e-38). The accurate
// log1pf(expf(x)) costs ~35 instructions.
__device__ __forceinline__ float softplus_fast(float x) {
  if (x > 20.f) return x;
  const float e = fast_exp2(x * kLog2e);
  if (e < 0.03125f) {
    return e * (1.f + e * (-0.5f + e * (1.f / 3.f + e * (-0.25f + e * 0.2f))));
  }
  return fast_log2(1.f + e) * kLn2;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

// silu with a fast division (2 ulp): for results rounded to 16 bits right after.
__device__ __forceinline__ float silu_fast(float x) { return __fdividef(x, 1.f + __expf(-x)); }

// The scan's dt: bias, optional softplus, then the limits (comparisons, so a NaN stays NaN).
// kFast: softplus_fast, for kernels where the softplus is a large share of the per-token work.
template <bool kFast = false>
__device__ __forceinline__ float scan_dt(float raw, float bias, bool softplus, float dt_min,
                                         float dt_max) {
  float dt = raw + bias;
  if (softplus) dt = kFast ? softplus_fast(dt) : softplus_thresholded(dt);
  if (dt < dt_min) dt = dt_min;
  if (dt > dt_max) dt = dt_max;
  return dt;
}

// ---------------------------------------------------------------------------------------------
// Dense and varlen batches through one view: sequence b covers the "flat" token range
// [begin(b), end(b)) of the batch laid end to end. Memory addresses use
// batch_offset(b, batch_stride) + addr_token(b, flat) * token_stride, which is the dense
// (b, t) address or the varlen packed-row address.
//
// query_start_loc is not validated on the host (that would be a sync), so its values are
// clamped here: begin(b) = clamp(qsl[b], 0, T) and end(b) = clamp(qsl[b + 1], begin(b), T), with
// T the total token count. Every range lies in [0, T) whatever the values, so no kernel touches a
// token row outside the tensors: an entry below 0 or above T acts as 0 or T, and a sequence whose
// end precedes its start is empty. A well-formed query_start_loc is unchanged.
struct SeqView {
  const int32_t* qsl;  // (batch + 1,) or nullptr for dense
  int64_t batch;
  int64_t seqlen;      // dense: tokens per sequence; varlen: total tokens T

  __device__ __forceinline__ int64_t clamp_token(int32_t v) const {
    return min(max(static_cast<int64_t>(v), int64_t{0}), seqlen);
  }
  __device__ __forceinline__ int64_t begin(int64_t b) const {
    return qsl ? clamp_token(qsl[b]) : b * seqlen;
  }
  __device__ __forceinline__ int64_t end(int64_t b) const {
    return qsl ? max(clamp_token(qsl[b + 1]), begin(b)) : (b + 1) * seqlen;
  }
  __device__ __forceinline__ int64_t addr_token(int64_t b, int64_t flat) const {
    return qsl ? flat : flat - b * seqlen;
  }
  __device__ __forceinline__ int64_t batch_offset(int64_t b, int64_t batch_stride) const {
    return qsl ? 0 : b * batch_stride;
  }
  // The sequence holding flat token `flat` (0 <= flat < T): the last one starting at or before
  // it, or 0 when none does. With a malformed query_start_loc (starts out of order, or `flat` in
  // a gap between sequences) it is some sequence in [0, batch) that need not hold `flat`;
  // callers intersect its range with theirs like any other.
  __device__ __forceinline__ int64_t seq_of(int64_t flat) const {
    if (!qsl) return flat / seqlen;
    int64_t lo = 0, hi = batch;  // first b in [0, batch] with begin(b) > flat, minus one
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (begin(mid) > flat) hi = mid; else lo = mid + 1;
    }
    return max(lo - 1, int64_t{0});
  }
  // The first sequence a chunk starting at flat token `chunk_begin` must visit: the one that
  // continues into the chunk, else the first one starting at or after it (empty ones included).
  __device__ __forceinline__ int64_t first_in_chunk(int64_t chunk_begin) const {
    if (!qsl) return seqlen > 0 ? chunk_begin / seqlen : 0;
    int64_t lo = 0, hi = batch;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      const bool reached = end(mid) > chunk_begin || begin(mid) >= chunk_begin;
      if (reached) hi = mid; else lo = mid + 1;
    }
    return lo;
  }
};

}  // namespace tpssm
