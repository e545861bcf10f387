// Chunked selective scan of the Mamba2 form (state-space duality, "SSD") on tensor cores.
//
// Within a head the Mamba2 decay is one scalar per token, a_t = exp(dt_t A), so a chunk of Q
// tokens is a masked matrix product instead of Q dependent steps. With c_t the cumulative
// log-decay inside the chunk (c_t = sum_{s <= t} dt_s A) and H the state entering it:
//   y_t = sum_{s <= t} (C_t . B_s) exp(c_t - c_s) dt_s x_s        intra-chunk (Q x Q products)
//       + exp(c_t) C_t H                                          inter-chunk
//       + D x_t, then y_t *= silu(z_t)
//   H'  = exp(c_last) H + sum_t exp(c_last - c_t) dt_t B_t x_t^T  the state after the chunk
// The products run on mma.sync (16-bit operands, fp32 accumulation); the cumulative decay, the
// exponentials, the causal mask and the state itself are fp32. The state stays in fp32 registers
// for the whole walk; a 16-bit copy in shared memory is the operand of the inter-chunk product.
//
// Mapping: a block of kWarps warps owns one head of one sequence (or of one piece of the split
// plan, scan_plan.h) and walks its chunks in order. Per chunk, x / z / B / C rows are staged in
// padded shared memory (cp.async; the 16-byte row padding keeps ldmatrix free of bank conflicts)
// and warp 0 computes dt and the cumulative decay; then
//   decay tiles: the 10 lower-triangular 16 x 16 tiles of M = (C B^T) o L o dt, spread over the
//     warps, go to shared memory (16-bit: they are the A operand of the next product);
//   output: warp (row tile r, column group) computes its y rows: C H scaled by exp(c_t), plus
//     M x over the column tiles s <= r, then the D skip and the z gate;
//   state: warp (state rows, headdim columns) updates its part of H in registers with
//     (B o w)^T x, w_t = exp(c_last - c_t) dt_t applied to the B fragments;
// then H is copied to shared memory for the next chunk and y leaves through shared memory with
// 16-byte stores. Chunks never straddle a sequence: each sequence (piece) restarts them. Eight
// warps per 64 headdim columns keep a thread's state share at 32 fp32 registers and the critical
// path of a chunk short; two blocks share an SM.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernel_utils.cuh"
#include "mma_sm80.cuh"
#include "scan_plan.h"
#include "static_switch.h"

namespace tpssm {
namespace {

template <typename input_t_, int kHeadDim_, int kDState_>
struct SsdTraits {
  using input_t = input_t_;
  static constexpr int kHeadDim = kHeadDim_;  // P
  static constexpr int kDState = kDState_;    // N
  static constexpr int kChunk = 64;           // Q
  static constexpr int kWarps = kHeadDim / 8;
  static constexpr int kThreads = 32 * kWarps;
  // Registers capped at 128 a thread (two 256-thread blocks, or one 512-thread block, per SM).
  static constexpr int kMinBlocks = kThreads == 256 ? 2 : 1;
  static constexpr int kPad = 8;  // elements: rows 16 bytes apart modulo 128 bytes
  static constexpr int kLdP = kHeadDim + kPad;  // row length of the x / z / H tiles
  static constexpr int kLdN = kDState + kPad;   // of the B / C tiles
  static constexpr int kLdQ = kChunk + kPad;    // of the M tile
  static constexpr int kRowTiles = kChunk / 16;
  static constexpr int kDecayTiles = kRowTiles * (kRowTiles + 1) / 2;  // s <= r
  // Output phase: warp w takes row tile w % kRowTiles and column group w / kRowTiles.
  static constexpr int kColGroups = kWarps / kRowTiles;
  static constexpr int kOutCols = kHeadDim / kColGroups;
  static constexpr int kOutTiles = kOutCols / 8;
  // State phase: warps as kWarpsM x kWarpsP over (dstate rows, headdim columns) of H.
  static constexpr int kWarpsM = kWarps < kDState / 16 ? kWarps : kDState / 16;
  static constexpr int kWarpsP = kWarps / kWarpsM;
  static constexpr int kStateMTiles = kDState / 16 / kWarpsM;
  static constexpr int kStatePTiles = kHeadDim / 8 / kWarpsP;
  // Shared memory, in elements: x, z (then y), B, C tiles of kChunk rows, H (kDState rows), M.
  static constexpr int kOffZ = kChunk * kLdP;
  static constexpr int kOffB = kOffZ + kChunk * kLdP;
  static constexpr int kOffC = kOffB + kChunk * kLdN;
  static constexpr int kOffH = kOffC + kChunk * kLdN;
  static constexpr int kOffM = kOffH + kDState * kLdP;
  static constexpr int kElems = kOffM + kChunk * kLdQ;
  static constexpr size_t kSmemBytes = kElems * sizeof(input_t) + 3 * kChunk * sizeof(float);

  static_assert(sizeof(input_t) == 2, "tensor-core operands are 16-bit");
  static_assert(kHeadDim % 64 == 0 && kDState % 16 == 0, "whole tiles");
  static_assert(kWarps % kRowTiles == 0 && kOutTiles % 2 == 0, "output tiles in pairs");
  static_assert(kWarps % kWarpsM == 0 && kDState % (16 * kWarpsM) == 0, "state rows per warp");
  static_assert(kStatePTiles % 2 == 0, "state columns in pairs");
  static_assert((kLdP * sizeof(input_t)) % 16 == 0 && (kLdN * sizeof(input_t)) % 16 == 0 &&
                    (kLdQ * sizeof(input_t)) % 16 == 0,
                "rows start 16-byte aligned (ldmatrix, cp.async)");
  static_assert(kChunk == 64, "warp 0 scans the chunk's dt as 2 x 32 lanes");
};

template <typename Traits>
struct SsdSmem {
  using input_t = typename Traits::input_t;
  input_t* x;   // (kChunk, kLdP): the chunk's x rows of this head
  input_t* z;   // (kChunk, kLdP): z rows, overwritten with the gated y rows
  input_t* B;   // (kChunk, kLdN)
  input_t* C;   // (kChunk, kLdN)
  input_t* H;   // (kDState, kLdP): 16-bit copy of the state entering the chunk, H[n][p]
  input_t* M;   // (kChunk, kLdQ): decayed C B^T, M[t][s] (tiles with s <= t only)
  float* dt;    // (kChunk,): dt after bias, softplus and limits; 0 past the piece
  float* cum;   // (kChunk,): inclusive cumulative dt * A in log2 units
  float* w;     // (kChunk,): the state weights exp(c_last - c_t) dt_t

  __device__ explicit SsdSmem(unsigned char* base) {
    input_t* e = reinterpret_cast<input_t*>(base);
    x = e;
    z = e + Traits::kOffZ;
    B = e + Traits::kOffB;
    C = e + Traits::kOffC;
    H = e + Traits::kOffH;
    M = e + Traits::kOffM;
    dt = reinterpret_cast<float*>(e + Traits::kElems);
    cum = dt + Traits::kChunk;
    w = cum + Traits::kChunk;
  }
};

// Two 16-bit values as one 32-bit register (the lower index in the low half), and back: one
// conversion instruction each way.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, 4);
  }
  return r;
}

template <typename T>
__device__ __forceinline__ void unpack2(uint32_t r, float& lo, float& hi) {
  float2 f;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v;
    memcpy(&v, &r, 4);
    f = __bfloat1622float2(v);
  } else {
    __half2 v;
    memcpy(&v, &r, 4);
    f = __half22float2(v);
  }
  lo = f.x;
  hi = f.y;
}

template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t r, float s_lo, float s_hi) {
  float lo, hi;
  unpack2<T>(r, lo, hi);
  return pack2<T>(lo * s_lo, hi * s_hi);
}

// ldmatrix addresses. Lane l gives row l % 8 of matrix l / 8 (mma_sm80.cuh); a tile's four
// matrices are either stacked rows-first (matrices 0 / 1 differ in rows: the A operand of a
// row-major [m][k] tile, and two B operands of a [k][n] tile) or columns-first (matrices 0 / 1
// differ in columns: the A operand of a transposed [k][m] tile, two B operands of an [n][k]
// tile). These give the lane's element offset inside the 16 x 16 tile; callers add the tile's
// offset to the shared address of the lane's start.
__device__ __forceinline__ int lane_offset_rows_first(int lane, int ld) {
  return ((lane & 7) + 8 * ((lane >> 3) & 1)) * ld + 8 * (lane >> 4);
}

__device__ __forceinline__ int lane_offset_cols_first(int lane, int ld) {
  return ((lane & 7) + 8 * (lane >> 4)) * ld + 8 * ((lane >> 3) & 1);
}

// acc[nt] += a * B_nt over the kTiles 8-column tiles of a 16-row band of a [k][n] tile;
// `band` is the shared address of this lane's start in the band (lane_offset_rows_first).
template <typename T, int kTiles>
__device__ __forceinline__ void mma_row_band(float (&acc)[kTiles][4], const uint32_t (&a)[4],
                                             uint32_t band) {
  static_assert(kTiles % 2 == 0, "column tiles in pairs");
#pragma unroll
  for (int nt = 0; nt < kTiles; nt += 2) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, band + sizeof(T) * 8 * nt);
    mma_16816<T>(acc[nt], a, b[0], b[1]);
    mma_16816<T>(acc[nt + 1], a, b[2], b[3]);
  }
}

// The thread's share of the fp32 state H (dstate x headdim): element (mt, pt, e) is
// H[row(mt, e)][col(pt, e)] in the m16n8 accumulator layout.
template <typename Traits>
struct StateFrag {
  float v[Traits::kStateMTiles][Traits::kStatePTiles][4];
};

template <typename Traits, typename F>
__device__ __forceinline__ void for_each_state_elem(F&& f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % Traits::kWarpsM, wp = warp / Traits::kWarpsM;
#pragma unroll
  for (int mt = 0; mt < Traits::kStateMTiles; ++mt) {
#pragma unroll
    for (int pt = 0; pt < Traits::kStatePTiles; ++pt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 16 * (wm * Traits::kStateMTiles + mt) + (lane >> 2) + 8 * (e >> 1);
        const int pc = 8 * (wp * Traits::kStatePTiles + pt) + 2 * (lane & 3) + (e & 1);
        f(mt, pt, e, n, pc);
      }
    }
  }
}

// Slot states are (num_slots, nheads, headdim, dstate), fp32 or the activation dtype.
__device__ __forceinline__ int64_t slot_offset(const SelectiveScanParams& p, int64_t slot,
                                               int64_t h, int n, int pc) {
  return slot * p.ssm_states_slot_stride + h * p.ssm_states_head_stride +
         pc * p.ssm_states_dim_stride + n;
}

template <typename Traits>
__device__ __forceinline__ void load_state_from_slot(const SelectiveScanParams& p, int64_t slot,
                                                     int64_t h, StateFrag<Traits>& H) {
  using T = typename Traits::input_t;
  for_each_state_elem<Traits>([&](int mt, int pt, int e, int n, int pc) {
    const int64_t off = slot_offset(p, slot, h, n, pc);
    H.v[mt][pt][e] = p.state_dtype == DType::kFloat32
                         ? static_cast<const float*>(p.ssm_states)[off]
                         : to_float(static_cast<const T*>(p.ssm_states)[off]);
  });
}

template <typename Traits>
__device__ __forceinline__ void store_state_to_slot(const SelectiveScanParams& p, int64_t slot,
                                                    int64_t h, const StateFrag<Traits>& H) {
  using T = typename Traits::input_t;
  for_each_state_elem<Traits>([&](int mt, int pt, int e, int n, int pc) {
    const int64_t off = slot_offset(p, slot, h, n, pc);
    if (p.state_dtype == DType::kFloat32) {
      static_cast<float*>(p.ssm_states)[off] = H.v[mt][pt][e];
    } else {
      static_cast<T*>(p.ssm_states)[off] = from_float<T>(H.v[mt][pt][e]);
    }
  });
}

// Workspace rows are (channels, dstate) per piece, channel = h * headdim + p (scan_plan.h).
template <typename Traits>
__device__ __forceinline__ float* ws_head(float* base, const ScanPlan& plan, int64_t j,
                                          int64_t h) {
  return base + (j * plan.channels + h * Traits::kHeadDim) * Traits::kDState;
}

template <typename Traits>
__device__ __forceinline__ void load_state_from_ws(const float* ws, StateFrag<Traits>& H) {
  for_each_state_elem<Traits>([&](int mt, int pt, int e, int n, int pc) {
    H.v[mt][pt][e] = ws[pc * Traits::kDState + n];
  });
}

template <typename Traits>
__device__ __forceinline__ void store_state_to_ws(float* ws, const StateFrag<Traits>& H) {
  for_each_state_elem<Traits>([&](int mt, int pt, int e, int n, int pc) {
    ws[pc * Traits::kDState + n] = H.v[mt][pt][e];
  });
}

template <typename Traits>
__device__ __forceinline__ void zero_state(StateFrag<Traits>& H) {
  for_each_state_elem<Traits>([&](int mt, int pt, int e, int, int) { H.v[mt][pt][e] = 0.f; });
}

// The 16-bit copy of H that feeds the next chunk's inter-chunk product.
template <typename Traits>
__device__ __forceinline__ void state_to_smem(const StateFrag<Traits>& H,
                                              const SsdSmem<Traits>& sm) {
  using T = typename Traits::input_t;
  constexpr int kMT = Traits::kStateMTiles, kPT = Traits::kStatePTiles, kLd = Traits::kLdP;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % Traits::kWarpsM, wp = warp / Traits::kWarpsM;
  const uint32_t base =
      smem_address(sm.H) + sizeof(T) * ((16 * wm * kMT + (lane >> 2)) * kLd + 8 * wp * kPT +
                                         2 * (lane & 3));
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int pt = 0; pt < kPT; ++pt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        st_shared_b32(base + sizeof(T) * ((16 * mt + 8 * half) * kLd + 8 * pt),
                      pack2<T>(H.v[mt][pt][2 * half], H.v[mt][pt][2 * half + 1]));
      }
    }
  }
}

// A tile of kChunk rows x kCols from `src` (row stride `stride`): 16-byte async copies (rows past
// n zero-filled, their source address replaced by row 0's) when the rows are 16-byte aligned,
// else element loads.
template <typename Traits, int kCols, int kLd>
__device__ __forceinline__ void stage_tile(const ScanPlan& plan, typename Traits::input_t* dst,
                                           const typename Traits::input_t* src, int64_t stride,
                                           int n) {
  using T = typename Traits::input_t;
  constexpr int kQ = Traits::kChunk, kThreads = Traits::kThreads;
  const int tid = threadIdx.x;
  if (plan.ssd_in_vec) {
    constexpr int kPacks = kCols / 8;
    constexpr int kRowsPerPass = kThreads / kPacks;
    static_assert(kThreads % kPacks == 0 && kQ % kRowsPerPass == 0, "whole rows per pass");
    const int r0 = tid / kPacks, c = (tid % kPacks) * 8;
    const uint32_t base = smem_address(dst) + sizeof(T) * (r0 * kLd + c);
    // One row pointer advanced by a stride product, rather than an offset kept per row.
    const T* row = src + r0 * stride + c;
    const int64_t step = kRowsPerPass * stride;
#pragma unroll
    for (int k = 0; k < kQ / kRowsPerPass; ++k, row += step) {
      const bool valid = r0 + k * kRowsPerPass < n;
      cp_async_16(base + sizeof(T) * k * kRowsPerPass * kLd, valid ? row : src, valid);
    }
  } else {
    for (int e = tid; e < kQ * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      dst[r * kLd + c] = r < n ? src[r * stride + c] : from_float<T>(0.f);
    }
  }
}

// Rows [t0, t0 + n) of one head's x / z and one group's B / C into the tile, zero rows after n;
// warp 0 computes dt and the cumulative decay.
template <typename Traits>
__device__ __forceinline__ void load_chunk(const SelectiveScanParams& p, const ScanPlan& plan,
                                           const SsdSmem<Traits>& sm, const SeqView& seqs,
                                           int64_t b, int64_t t0, int n, int64_t h, int64_t g,
                                           bool output, float A2, float bias) {
  using T = typename Traits::input_t;
  constexpr int kP = Traits::kHeadDim, kN = Traits::kDState;
  const int tid = threadIdx.x;
  const int64_t at0 = seqs.addr_token(b, t0);
  const T* u = static_cast<const T*>(p.u) + seqs.batch_offset(b, p.u_batch_stride) +
               at0 * p.u_token_stride + h * kP;
  const T* z = output && p.z ? static_cast<const T*>(p.z) +
                                   seqs.batch_offset(b, p.z_batch_stride) +
                                   at0 * p.z_token_stride + h * kP
                             : nullptr;
  const T* Bp = static_cast<const T*>(p.B) + seqs.batch_offset(b, p.B_batch_stride) +
                at0 * p.B_token_stride + g * p.B_group_stride;
  const T* Cp = output ? static_cast<const T*>(p.C) + seqs.batch_offset(b, p.C_batch_stride) +
                             at0 * p.C_token_stride + g * p.C_group_stride
                       : nullptr;
  stage_tile<Traits, kP, Traits::kLdP>(plan, sm.x, u, p.u_token_stride, n);
  stage_tile<Traits, kN, Traits::kLdN>(plan, sm.B, Bp, p.B_token_stride, n);
  if (output) {
    stage_tile<Traits, kN, Traits::kLdN>(plan, sm.C, Cp, p.C_token_stride, n);
    if (z) stage_tile<Traits, kP, Traits::kLdP>(plan, sm.z, z, p.z_token_stride, n);
  }
  if (tid < 32) {
    const T* delta = static_cast<const T*>(p.delta) +
                     seqs.batch_offset(b, p.delta_batch_stride) + h;
    float dt[2], a[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int t = tid + 32 * k;
      dt[k] = t < n ? scan_dt(to_float(delta[seqs.addr_token(b, t0 + t) * p.delta_token_stride]),
                              bias, p.delta_softplus, p.dt_min, p.dt_max)
                    : 0.f;
      a[k] = dt[k] * A2;
    }
    // Inclusive scans of the two halves; the second starts from the first half's total.
#pragma unroll
    for (int k = 0; k < 2; ++k) {
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float v = __shfl_up_sync(0xffffffffu, a[k], o);
        if (tid >= o) a[k] += v;
      }
    }
    a[1] += __shfl_sync(0xffffffffu, a[0], 31);
    const float last = __shfl_sync(0xffffffffu, a[1], 31);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      sm.dt[tid + 32 * k] = dt[k];
      sm.cum[tid + 32 * k] = a[k];
      sm.w[tid + 32 * k] = exp2f(last - a[k]) * dt[k];
    }
  }
}

// M = (C B^T) o L o dt in 16 x 16 tiles (r, s), s <= r, spread over the warps:
// M[t][s] = (C_t . B_s) exp(c_t - c_s) dt_s for s <= t, 0 above the diagonal.
template <typename Traits>
__device__ __forceinline__ void decay_tiles_phase(const SsdSmem<Traits>& sm) {
  using T = typename Traits::input_t;
  constexpr int kLdN = Traits::kLdN, kLdQ = Traits::kLdQ;
  constexpr uint32_t kE = sizeof(T);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int q = lane & 3;
  const uint32_t c_base = smem_address(sm.C) + kE * lane_offset_rows_first(lane, kLdN);
  const uint32_t b_base = smem_address(sm.B) + kE * lane_offset_cols_first(lane, kLdN);
  const uint32_t m_base = smem_address(sm.M) + kE * ((lane >> 2) * kLdQ + 2 * q);
  for (int tile = warp; tile < Traits::kDecayTiles; tile += Traits::kWarps) {
    int r = 0;
    while ((r + 1) * (r + 2) / 2 <= tile) ++r;
    const int s = tile - r * (r + 1) / 2;
    float g[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < Traits::kDState / 16; ++kk) {
      uint32_t a[4], b[4];
      ldmatrix_x4(a, c_base + kE * (16 * r * kLdN + 16 * kk));
      ldmatrix_x4(b, b_base + kE * (16 * s * kLdN + 16 * kk));
      mma_16816<T>(g[0], a, b[0], b[1]);
      mma_16816<T>(g[1], a, b[2], b[3]);
    }
    const int t_lo = 16 * r + (lane >> 2), t_hi = t_lo + 8;
    const float cum_lo = sm.cum[t_lo], cum_hi = sm.cum[t_hi];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int s0 = 16 * s + 8 * half + 2 * q;
      const float dt0 = sm.dt[s0], dt1 = sm.dt[s0 + 1];
      const float cs0 = sm.cum[s0], cs1 = sm.cum[s0 + 1];
      const float v00 = s0 <= t_lo ? g[half][0] * exp2f(cum_lo - cs0) * dt0 : 0.f;
      const float v01 = s0 + 1 <= t_lo ? g[half][1] * exp2f(cum_lo - cs1) * dt1 : 0.f;
      const float v10 = s0 <= t_hi ? g[half][2] * exp2f(cum_hi - cs0) * dt0 : 0.f;
      const float v11 = s0 + 1 <= t_hi ? g[half][3] * exp2f(cum_hi - cs1) * dt1 : 0.f;
      const uint32_t at = m_base + kE * (16 * r * kLdQ + 16 * s + 8 * half);
      st_shared_b32(at, pack2<T>(v00, v01));
      st_shared_b32(at + kE * 8 * kLdQ, pack2<T>(v10, v11));
    }
  }
}

// y rows of this warp's tile, gated, written over the z tile.
template <typename Traits>
__device__ __forceinline__ void output_phase(const SsdSmem<Traits>& sm, float Dh, bool has_z) {
  using T = typename Traits::input_t;
  constexpr int kLdP = Traits::kLdP, kLdN = Traits::kLdN, kLdQ = Traits::kLdQ;
  constexpr int kTiles = Traits::kOutTiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = warp % Traits::kRowTiles;
  const int c0 = (warp / Traits::kRowTiles) * Traits::kOutCols;
  const int q = lane & 3;
  const int t_lo = 16 * r + (lane >> 2), t_hi = t_lo + 8;
  constexpr uint32_t kE = sizeof(T);
  // Shared addresses of this lane's start in each operand (bytes), see lane_offset_*.
  const uint32_t c_base =
      smem_address(sm.C) + kE * (lane_offset_rows_first(lane, kLdN) + 16 * r * kLdN);
  const uint32_t h_base = smem_address(sm.H) + kE * (lane_offset_rows_first(lane, kLdP) + c0);
  const uint32_t m_base =
      smem_address(sm.M) + kE * (lane_offset_rows_first(lane, kLdQ) + 16 * r * kLdQ);
  const uint32_t x_base = smem_address(sm.x) + kE * (lane_offset_rows_first(lane, kLdP) + c0);
  float acc[kTiles][4];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  // Inter-chunk: (C H)[t] * exp(c_t); A = C rows [t][n], B = H [n][p].
#pragma unroll
  for (int kk = 0; kk < Traits::kDState / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, c_base + kE * 16 * kk);
    mma_row_band<T>(acc, a, h_base + kE * 16 * kk * kLdP);
  }
  const float e_lo = exp2f(sm.cum[t_lo]), e_hi = exp2f(sm.cum[t_hi]);
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    acc[nt][0] *= e_lo;
    acc[nt][1] *= e_lo;
    acc[nt][2] *= e_hi;
    acc[nt][3] *= e_hi;
  }

  // Intra-chunk: M x over the column tiles s <= r; A = M rows [t][s], B = x rows [s][p].
  for (int s = 0; s <= r; ++s) {
    uint32_t a[4];
    ldmatrix_x4(a, m_base + kE * 16 * s);
    mma_row_band<T>(acc, a, x_base + kE * 16 * s * kLdP);
  }

  // D skip and z gate; each thread rewrites only the z elements it reads.
  const uint32_t xe_base = smem_address(sm.x) + kE * (t_lo * kLdP + c0 + 2 * q);
  const uint32_t ze_base = smem_address(sm.z) + kE * (t_lo * kLdP + c0 + 2 * q);
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const uint32_t off = kE * (8 * hr * kLdP + 8 * nt);
      float x0, x1;
      unpack2<T>(ld_shared_b32(xe_base + off), x0, x1);
      float y0 = fmaf(Dh, x0, acc[nt][2 * hr]);
      float y1 = fmaf(Dh, x1, acc[nt][2 * hr + 1]);
      if (has_z) {
        float z0, z1;
        unpack2<T>(ld_shared_b32(ze_base + off), z0, z1);
        y0 *= silu_fast(z0);
        y1 *= silu_fast(z1);
      }
      st_shared_b32(ze_base + off, pack2<T>(y0, y1));
    }
  }
}

// H = exp(c_last) H + (B o w)^T x, w_t = exp(c_last - c_t) dt_t.
template <typename Traits>
__device__ __forceinline__ void state_phase(const SsdSmem<Traits>& sm, StateFrag<Traits>& H) {
  using T = typename Traits::input_t;
  constexpr int kMT = Traits::kStateMTiles, kPT = Traits::kStatePTiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % Traits::kWarpsM, wp = warp / Traits::kWarpsM;
  const int q = lane & 3;
  const float cum_last = sm.cum[Traits::kChunk - 1];
  const float decay = exp2f(cum_last);
  for_each_state_elem<Traits>([&](int mt, int pt, int e, int, int) { H.v[mt][pt][e] *= decay; });
  constexpr uint32_t kE = sizeof(T);
  // A = B rows [t][n] read transposed (m = state, k = token); B operand = x rows [t][p].
  const uint32_t b_base = smem_address(sm.B) +
                          kE * (lane_offset_cols_first(lane, Traits::kLdN) + 16 * wm * kMT);
  const uint32_t x_base = smem_address(sm.x) +
                          kE * (lane_offset_rows_first(lane, Traits::kLdP) + 8 * wp * kPT);
  const uint32_t w_base = smem_address(sm.w) + 4 * 2 * q;
#pragma unroll
  for (int kk = 0; kk < Traits::kChunk / 16; ++kk) {
    // The weights of this thread's tokens 16 kk + 2q + {0, 1, 8, 9}.
    const float w0 = ld_shared_f32(w_base + 4 * 16 * kk);
    const float w1 = ld_shared_f32(w_base + 4 * (16 * kk + 1));
    const float w2 = ld_shared_f32(w_base + 4 * (16 * kk + 8));
    const float w3 = ld_shared_f32(w_base + 4 * (16 * kk + 9));
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      ldmatrix_x4_trans(a[mt], b_base + kE * (16 * kk * Traits::kLdN + 16 * mt));
      a[mt][0] = scale2<T>(a[mt][0], w0, w1);
      a[mt][1] = scale2<T>(a[mt][1], w0, w1);
      a[mt][2] = scale2<T>(a[mt][2], w2, w3);
      a[mt][3] = scale2<T>(a[mt][3], w2, w3);
    }
#pragma unroll
    for (int pt = 0; pt < kPT; pt += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, x_base + kE * (16 * kk * Traits::kLdP + 8 * pt));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16816<T>(H.v[mt][pt], a[mt], b[0], b[1]);
        mma_16816<T>(H.v[mt][pt + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// The gated y rows [t0, t0 + n) of this head from the z tile to `out`.
template <typename Traits>
__device__ __forceinline__ void store_y(const SelectiveScanParams& p, const ScanPlan& plan,
                                        const SsdSmem<Traits>& sm, const SeqView& seqs,
                                        int64_t b, int64_t t0, int n, int64_t h) {
  using T = typename Traits::input_t;
  constexpr int kP = Traits::kHeadDim;
  T* out = static_cast<T*>(p.out) + seqs.batch_offset(b, p.out_batch_stride) +
           seqs.addr_token(b, t0) * p.out_token_stride + h * kP;
  if (plan.ssd_out_vec) {
    for (int e = threadIdx.x; e < n * (kP / 8); e += Traits::kThreads) {
      const int r = e / (kP / 8), c = (e % (kP / 8)) * 8;
      store_pack<T, 8>(out + r * p.out_token_stride + c,
                       load_pack<T, 8>(sm.z + r * Traits::kLdP + c));
    }
  } else {
    for (int e = threadIdx.x; e < n * kP; e += Traits::kThreads) {
      const int r = e / kP, c = e % kP;
      out[r * p.out_token_stride + c] = sm.z[r * Traits::kLdP + c];
    }
  }
}

// Walks the chunks of tokens [t_begin, t_end) of sequence b from the state in H (updated in
// place); with `output`, writes y. Returns the summed dt * A of the piece in log2 units.
template <typename Traits>
__device__ __forceinline__ float ssd_walk(const SelectiveScanParams& p, const ScanPlan& plan,
                                          const SsdSmem<Traits>& sm, const SeqView& seqs,
                                          int64_t b, int64_t t_begin, int64_t t_end, int64_t h,
                                          int64_t g, float A2, float bias, float Dh, bool output,
                                          StateFrag<Traits>& H) {
  float total = 0.f;
  if (output) state_to_smem(H, sm);  // the first chunk's barrier orders it before the reads
  for (int64_t t0 = t_begin; t0 < t_end; t0 += Traits::kChunk) {
    const int n = static_cast<int>(min(static_cast<int64_t>(Traits::kChunk), t_end - t0));
    load_chunk(p, plan, sm, seqs, b, t0, n, h, g, output, A2, bias);
    cp_async_wait_all();
    __syncthreads();
    total += sm.cum[Traits::kChunk - 1];
    if (output) {
      decay_tiles_phase(sm);
      __syncthreads();  // the M tiles, written by other warps
      output_phase(sm, Dh, p.z != nullptr);
    }
    state_phase(sm, H);
    __syncthreads();  // every warp is done with the H copy and its y rows are in the z tile
    if (output) {
      state_to_smem(H, sm);
      store_y(p, plan, sm, seqs, b, t0, n, h);
    }
    __syncthreads();  // the next chunk's loads overwrite the tiles
  }
  return total;
}

// Grid: (sequences, or pieces of the split plan) x heads. state_pass: the split plan's first pass
// (the end state of every piece whose last sequence continues past it, with the piece's decay);
// otherwise outputs and final states, each piece starting from its exact state (the combined
// workspace state, the copied initial state, the slot, or zeros). Mirrors the recurrent passes
// of selective_scan.cu, whose combine pass runs in between.
template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocks) void ssd_scan_kernel(
    SelectiveScanParams p, ScanPlan plan, bool state_pass) {
  const SsdSmem<Traits> sm(dynamic_smem());
  const int64_t h = blockIdx.y;
  const int64_t g = h / (p.nheads / p.ngroups);
  const float A2 = p.A[h * p.A_head_stride] * kLog2e;
  const float bias = p.delta_bias ? p.delta_bias[h] : 0.f;
  const float Dh = p.D ? p.D[h] : 0.f;
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};
  const int64_t j = blockIdx.x;
  StateFrag<Traits> H;

  if (state_pass) {
    const StatePiece piece = state_piece(p, plan, seqs, j);
    if (h == 0 && threadIdx.x == 0) plan.ws_flags[j] = piece.flag;
    if (piece.flag == 0) return;
    if (piece.flag == 1 && piece.initial) {
      load_state_from_slot(p, piece.slot, h, H);
    } else {
      zero_state(H);
    }
    if (piece.flag == 1) store_state_to_ws(ws_head<Traits>(plan.ws_I, plan, j, h), H);
    const float total = ssd_walk(p, plan, sm, seqs, piece.b, max(piece.seq_begin, piece.begin),
                                 piece.end, h, g, A2, bias, Dh, false, H);
    store_state_to_ws(ws_head<Traits>(plan.ws_S, plan, j, h), H);
    if (threadIdx.x == 0) plan.ws_P[j * p.nheads + h] = exp2f(total);
    return;
  }

  const OutputPiece piece = output_piece(p, plan, seqs, j);
  for (int64_t b = piece.b_first; b <= piece.b_last; ++b) {
    const int64_t seq_begin = seqs.begin(b);
    const int64_t seq_end = seqs.end(b);
    if (!piece.visits(seq_begin)) break;
    int64_t slot = 0;
    bool initial = false;
    if (!resolve_slot(p, b, slot, initial)) continue;
    switch (start_state(piece, seq_begin, seq_end, initial)) {
      case StartState::kCarried:
        load_state_from_ws(ws_head<Traits>(plan.ws_S, plan, j - 1, h), H);
        break;
      case StartState::kCopiedInitial:
        load_state_from_ws(ws_head<Traits>(plan.ws_I, plan, j, h), H);
        break;
      case StartState::kSlot:
        load_state_from_slot(p, slot, h, H);
        break;
      case StartState::kZero:
        zero_state(H);
        break;
    }
    ssd_walk(p, plan, sm, seqs, b, max(seq_begin, piece.begin), min(seq_end, piece.end), h, g,
             A2, bias, Dh, true, H);
    if (seq_end <= piece.end && p.ssm_states) store_state_to_slot(p, slot, h, H);
  }
}

template <typename Traits>
void launch(const SelectiveScanParams& p, const ScanPlan& plan, bool state_pass,
            cudaStream_t stream) {
  const int64_t rows = plan.flat ? plan.num_chunks : p.batch;
  if (rows > 0x7fffffff || p.nheads > 65535) {
    throw std::runtime_error("tpssm selective_scan: too many sequences or heads for the SSD grid");
  }
  allow_dynamic_smem<ssd_scan_kernel<Traits>>(static_cast<int>(Traits::kSmemBytes));
  dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(p.nheads));
  ssd_scan_kernel<Traits><<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, plan,
                                                                                 state_pass);
  TPSSM_CHECK_LAUNCH("ssd_scan_kernel");
}

}  // namespace

bool ssd_supported(const SelectiveScanParams& p) {
  const bool shape = (p.headdim == 64 || p.headdim == 128) && (p.dstate == 64 || p.dstate == 128);
  const bool dtype = p.act_dtype == DType::kBFloat16 || p.act_dtype == DType::kFloat16;
  if (p.a_is_per_state || !shape || !dtype || (p.chunk_size != 0 && p.chunk_size != 64) ||
      current_device_cc_major() < 8) {
    return false;
  }
  // headdim 128 with dstate 128 takes 105 KB of shared memory: more than sm_86 / sm_89 offer.
  const size_t smem = TPSSM_64_128_SWITCH(p.headdim, kHeadDim, [&] {
    return TPSSM_64_128_SWITCH(p.dstate, kDState, [&] {
      return SsdTraits<__nv_bfloat16, kHeadDim, kDState>::kSmemBytes;
    });
  });
  return smem <= static_cast<size_t>(current_device_max_smem_per_block());
}

void launch_ssd_pass(const SelectiveScanParams& p, const ScanPlan& plan, bool state_pass,
                     cudaStream_t stream) {
  TPSSM_HALF_DTYPE_SWITCH(p.act_dtype, input_t, [&] {
    TPSSM_64_128_SWITCH(p.headdim, kHeadDim, [&] {
      TPSSM_64_128_SWITCH(p.dstate, kDState, [&] {
        launch<SsdTraits<input_t, kHeadDim, kDState>>(p, plan, state_pass, stream);
      });
    });
  });
}

}  // namespace tpssm
