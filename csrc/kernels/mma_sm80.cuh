// Warp-level tensor-core and async-copy primitives of sm_80 and later (mma.sync m16n8k16 with
// 16-bit operands and fp32 accumulators, ldmatrix, cp.async), as small device functions with the
// PTX fragment layouts documented here. tools/cuda_emu replaces this header with a host
// emulation of the same functions, so the kernels that use them run on the CPU in CI.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 * g + q, g = lane / 4, q = lane % 4), each 32-bit
// register holding two 16-bit elements, the lower-indexed one in the low half:
//   A (16 x 16, row-major): a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..],
//                           a[3] = A[g+8][2q+8..]
//   B (16 x 8, k x n):      b[0] = B[2q..2q+1][g], b[1] = B[2q+8..2q+9][g]
//   C / D (16 x 8, fp32):   c[0..1] = C[g][2q..2q+1], c[2..3] = C[g+8][2q..2q+1]
// ldmatrix .x4 loads four 8 x 8 matrices of 16-bit elements; lanes 8i..8i+7 give the addresses of
// the 8 rows of matrix i (16 bytes each, 16-byte aligned) and lane l receives in r[i] the
// elements (l / 4, 2 (l % 4) .. + 1) of matrix i, or with .trans the elements (2 (l % 4), l / 4)
// and (2 (l % 4) + 1, l / 4).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace tpssm {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// Built for an older architecture: the launchers never select these kernels there.
#define TPSSM_SM80_ONLY(...) __trap()
#else
#define TPSSM_SM80_ONLY(...) __VA_ARGS__
#endif

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// `row`: the shared-memory address (smem_address) of this lane's row. Kernels form it as a
// per-lane base plus constant offsets, which the compiler folds into the instruction instead of
// keeping one register per fragment address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) {
  TPSSM_SM80_ONLY(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                               : "r"(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) {
  TPSSM_SM80_ONLY(
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(row)));
}

// d += a * b for 16-bit T (__nv_bfloat16 or __half).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    TPSSM_SM80_ONLY(asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
  } else {
    static_assert(std::is_same_v<T, __half>, "16-bit operands only");
    TPSSM_SM80_ONLY(asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
  }
}

// 32-bit shared-memory access by address: hot loops address their tiles as a per-lane base plus
// constant offsets (one register), where generic pointers would each be kept live.
__device__ __forceinline__ uint32_t ld_shared_b32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid (the
// source is then not read, but must still be a mapped address).
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  TPSSM_SM80_ONLY(asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem),
                               "l"(gmem), "r"(valid ? 16 : 0)));
}

// 8 bytes global -> shared, both 8-byte aligned (the .ca form: .cg takes 16-byte copies only).
__device__ __forceinline__ void cp_async_8(uint32_t smem, const void* gmem, bool valid) {
  TPSSM_SM80_ONLY(asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem),
                               "l"(gmem), "r"(valid ? 8 : 0)));
}

// Waits for every cp.async this thread issued (other threads' copies need a barrier after it).
__device__ __forceinline__ void cp_async_wait_all() {
  TPSSM_SM80_ONLY(asm volatile("cp.async.wait_all;\n" ::));
}

// Closes this thread's group of cp.async issued since the last commit (a group may be empty).
__device__ __forceinline__ void cp_async_commit() {
  TPSSM_SM80_ONLY(asm volatile("cp.async.commit_group;\n" ::));
}

// Waits until at most kPending of this thread's committed groups are still in flight (the
// newest ones): with double buffering, kPending = 1 waits for the older tile only.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
  TPSSM_SM80_ONLY(asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)));
}

#undef TPSSM_SM80_ONLY

}  // namespace tpssm
