// Host emulation of csrc/kernels/mma_sm80.cuh (build.py puts this in its place): the same
// functions with the fragment layouts that header documents, computed from the whole warp's
// registers and addresses (emu_warp_all_gather). Shared addresses are byte offsets into the
// block's dynamic shared memory, checked against its size. mma accumulates in fp32 in k order;
// the tensor cores' order differs, so results agree to fp32 rounding, not bit for bit.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_shim.h"

namespace tpssm {

inline uint32_t smem_address(const void* ptr) {
  const auto* base = emu_dynamic_smem();
  const auto* p = static_cast<const unsigned char*>(ptr);
  if (p < base || p > base + emu_block->dynamic.size()) {
    emu_fail("shared address of a pointer outside the dynamic shared memory");
    return 0;
  }
  return static_cast<uint32_t>(p - base);
}

inline unsigned char* emu_smem_at(uint32_t addr, size_t bytes, size_t align) {
  if (addr + bytes > emu_block->dynamic.size()) {
    emu_fail("shared memory access out of range");
    static unsigned char sink[16];
    return sink;
  }
  if (addr % align != 0) emu_fail("misaligned shared memory access");
  return emu_dynamic_smem() + addr;
}

inline uint16_t emu_b16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, emu_smem_at(addr, 2, 2), 2);
  return v;
}

// Lane l receives for each matrix i the pair (row l / 4, cols 2 (l % 4), +1), or transposed the
// pair (rows 2 (l % 4), +1; col l / 4), of the 8 x 8 matrix whose rows lanes 8i..8i+7 address.
inline void emu_ldmatrix_x4(uint32_t (&r)[4], uint32_t row, bool trans) {
  if (row % 16 != 0) emu_fail("ldmatrix row address not 16-byte aligned");
  uint32_t rows[32];
  emu_warp_all_gather(&row, sizeof(row), rows);
  const int lane = emu_threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (trans) {
      lo = emu_b16(rows[8 * i + 2 * q] + 2 * g);
      hi = emu_b16(rows[8 * i + 2 * q + 1] + 2 * g);
    } else {
      lo = emu_b16(rows[8 * i + g] + 4 * q);
      hi = emu_b16(rows[8 * i + g] + 4 * q + 2);
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) { emu_ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) { emu_ldmatrix_x4(r, row, true); }

template <typename T>
inline float emu_half_of(uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit operands");
  struct Regs {
    uint32_t a[4];
    uint32_t b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}}, all[32];
  emu_warp_all_gather(&mine, sizeof(Regs), all);
  // A[m][k]: lane 4 (m % 8) + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2.
  auto A = [&](int m, int k) {
    return emu_half_of<T>(all[4 * (m % 8) + (k % 8) / 2].a[(m >= 8) + 2 * (k >= 8)], k % 2);
  };
  // B[k][n]: lane 4 n + (k % 8) / 2, register k >= 8, half k % 2.
  auto B = [&](int k, int n) { return emu_half_of<T>(all[4 * n + (k % 8) / 2].b[k >= 8], k % 2); };
  const int lane = emu_threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int m = g + 8 * (e >> 1), n = 2 * q + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(m, k) * B(k, n);
    d[e] = acc;
  }
}

inline uint32_t ld_shared_b32(uint32_t addr) {
  uint32_t v;
  std::memcpy(&v, emu_smem_at(addr, 4, 4), 4);
  return v;
}

inline void st_shared_b32(uint32_t addr, uint32_t v) { std::memcpy(emu_smem_at(addr, 4, 4), &v, 4); }

inline float ld_shared_f32(uint32_t addr) {
  float v;
  std::memcpy(&v, emu_smem_at(addr, 4, 4), 4);
  return v;
}

// cp.async issued since emu_ops' take_cp_async_counts last read them, by size (4, 8, 16 bytes):
// tests check that a copy path they mean to cover was taken.
inline std::atomic<int64_t> emu_cp_async_count[3];

// Deferred like the hardware's: the copy is queued (its destination poisoned) and lands when a
// cp_async_wait_group / cp_async_wait_all retires its group.
inline void emu_cp_async(uint32_t smem, const void* gmem, bool valid, int bytes) {
  emu_cp_async_count[bytes == 4 ? 0 : bytes == 8 ? 1 : 2].fetch_add(1);
  if (reinterpret_cast<uintptr_t>(gmem) % bytes != 0) emu_fail("misaligned cp.async source");
  unsigned char* dst = emu_smem_at(smem, bytes, bytes);
  std::memset(dst, 0xff, bytes);
  emu_async_open.push_back({dst, gmem, valid, bytes});
}

inline void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  emu_cp_async(smem, gmem, valid, 16);
}

inline void cp_async_8(uint32_t smem, const void* gmem, bool valid) {
  emu_cp_async(smem, gmem, valid, 8);
}

inline void cp_async_commit() {
  emu_async_groups.push_back(std::move(emu_async_open));
  emu_async_open.clear();
}

template <int kPending>
inline void cp_async_wait_group() {
  while (emu_async_groups.size() > static_cast<size_t>(kPending)) {
    for (const EmuAsyncCopy& c : emu_async_groups.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, c.bytes);
      } else {
        std::memset(c.dst, 0, c.bytes);
      }
    }
    emu_async_groups.pop_front();
  }
}

// cp.async.wait_all: commit what is open, then wait for every group.
inline void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_group<0>();
}

}  // namespace tpssm
