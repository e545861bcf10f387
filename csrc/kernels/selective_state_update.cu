// Decode step of the selective SSM: one token per request, the state read from one slot and the
// updated state written to another (or the same) slot.
//
// The op is bound by the state bytes (read + write, fp32 by default), so the mapping serves the
// state accesses. A "row" is the dstate elements of one (head, headdim index); G lanes of a warp
// (a power of two up to 32) share a row, each taking 16-byte chunks of it. A block takes one
// batch row (blockIdx.y, its slots looked up once) and a tile of rows (blockIdx.x); each thread
// owns kRows rows and issues all their state loads (and every other load it needs, z included)
// before its first store, so one DRAM round trip covers kRows * 16 bytes per thread. Two tilings:
//  - head tiles (A per head, headdims of Mamba-2 size): a block's rows lie in one head, so dt,
//    its softplus, exp(dt A), B and C are computed once per thread and shared by its rows;
//  - flat tiles (Mamba-1 channels, and every other shape): consecutive rows across heads; each
//    row's dt and softplus are computed by one of its G lanes and shuffled to the others, A rows
//    are read as 16-byte vectors, B and C are reloaded only where a row's group changes.
// After the G-lane shuffle reduction every lane holds every row's sum, so the epilogue (D, the z
// gate, the output) is spread over the G lanes: lane j writes the rows r with r % G == j.
// Mamba-1 decode may fuse its dt_proj GEMM (dt_proj_weight): a flat-tile row's dt is then the dot
// product of its weight row with the batch row's low-rank dt, split over the row's G lanes and
// shuffle-summed where dt is otherwise loaded (project_dt), which saves a GEMM launch per layer.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "kernel_utils.cuh"
#include "ssm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

template <typename input_t_, typename state_t_, int kVec_, bool kHeadTile_>
struct StateUpdateTraits {
  using input_t = input_t_;
  using state_t = state_t_;
  // State elements per access: 16 bytes (the widest global access), or 1 for the scalar path.
  static constexpr int kVec = kVec_;
  // Rows of a block in one head (see the header comment); A per head only.
  static constexpr bool kHeadTile = kHeadTile_;
  // 4 warps: not yet measured. Small blocks keep the last partial wave short on small grids
  // (Mamba-1 tp 4, batch 64: 640 blocks for 132 SMs).
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  // Rows per thread. Head tiles: 8 x 16 B = 128 B of state loads in flight per thread in ~32
  // registers; a 64-row head at dstate 128 is 2 blocks (fp32 state) or 1 (16-bit). Flat tiles:
  // 4, each with its A row (another 16 B, from L2): 64 B of state per thread, 128 channels per
  // block at dstate 16 fp32. Derived from the register budget; the counts are not yet measured.
  static constexpr int kRows = kHeadTile ? 8 : 4;
  // Occupancy floor: at most 128 registers a thread, 4 blocks (16 warps) an SM. Unbounded, ptxas
  // takes 130-190 registers for load-ahead scheduling and leaves 2-3 blocks an SM. Not yet
  // measured.
  static constexpr int kMinBlocks = 4;
  // Fused dt_proj (project_dt): loop steps whose weight chunks a lane keeps in flight. Two halve
  // the serial L2 round trips of a long dt_rank (160 in bf16 at 4 lanes a row: 3 instead of 5)
  // and fit the fp32-state tiles without spills (ptxas, sm_90); the 16-bit-state tiles have no
  // registers left for a second step (bf16: 28 bytes of spill stores with two, 8 with one).
  // Latency not yet measured.
  static constexpr int kDtProjUnroll = sizeof(state_t) == 4 ? 2 : 1;

  static_assert(kVec == 1 || kVec * sizeof(state_t) == 16, "kVec must fill 16 bytes or be 1");
  static_assert(kVec == 1 || kVec % 4 == 0, "a vector chunk's A row is whole 16-byte fp32 loads");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, one block");
  static_assert(kRows >= 1 && (kRows & (kRows - 1)) == 0, "rows per thread: a power of two");
  static_assert(!kHeadTile || kVec > 1, "head tiles serve the vector path only");
  static_assert(kDtProjUnroll >= 1, "at least one dt_proj chunk in flight");
};

// Launch-time shape constants, 32-bit: every row index and in-slot offset fits (checked by the
// launcher), which keeps the per-row address math to one wide multiply-add.
struct StateUpdateShape {
  int batch;
  int rows;             // nheads * headdim: rows of one batch row
  int headdim;
  int ngroups;
  int heads_per_group;
  int head_stride;      // state strides inside a slot
  int dim_stride;
  int num_chunks;       // dstate / kVec
  int log2_lanes;       // G = 1 << log2_lanes lanes share a row
  int tiles_per_head;   // head tiles: ceil(headdim / rows per block)
  bool a_vec;           // flat vector path: A rows contiguous and 16-byte aligned
  bool dt_proj_vec;     // fused dt_proj: dt and its weight rows 16-byte aligned
};

// dt of head h from its raw value: bias, then softplus.
__device__ __forceinline__ float finish_dt(const SelectiveStateUpdateParams& p, float dt, int h) {
  if (p.dt_bias) dt += p.dt_bias[h];
  if (p.dt_softplus) dt = softplus_thresholded(dt);
  return dt;
}

template <typename input_t>
__device__ __forceinline__ float head_dt(const SelectiveStateUpdateParams& p,
                                         const input_t* dt_b, int h) {
  return finish_dt(p, to_float(dt_b[h]), h);
}

// The fused dt_proj (Mamba-1, headdim 1): the raw dt of row r is
// round_to_act_dtype(sum_k W[h[r], k] * dt_lr[k]), accumulated in fp32; the rounding reproduces
// the activation-dtype output of the dt_proj GEMM this replaces. The G lanes of a row split
// dt_rank - lane j takes the 16-byte chunks j, j + G, ... (vec: dt_lr, W and their strides
// 16-byte aligned) and then the tail elements past the last whole chunk - so a row's weights are
// read once per batch row, spread over its lanes, and each loaded dt_lr chunk serves all kR rows.
// The xor-shuffle sum leaves every row's total on every lane; every lane must call this.
template <typename input_t, int kR, int kUnroll>
__device__ __forceinline__ void project_dt(const SelectiveStateUpdateParams& p,
                                           const input_t* dt_lr, const int (&h)[kR], int j,
                                           int log2_lanes, bool vec, float (&dt_raw)[kR]) {
  constexpr int kDtVec = 16 / sizeof(input_t);
  constexpr unsigned kFull = 0xffffffffu;
  const int G = 1 << log2_lanes;
  const int rank = static_cast<int>(p.dt_rank);
  const int w_stride = static_cast<int>(p.dt_proj_row_stride);
  const input_t* W = static_cast<const input_t*>(p.dt_proj_weight);
  float acc[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) acc[r] = 0.f;
  const int num_vec = vec ? rank / kDtVec : 0;
#pragma unroll kUnroll
  for (int c = j; c < num_vec; c += G) {
    float d[kDtVec];
    load_vec<input_t, kDtVec>(dt_lr + c * kDtVec, d);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      float w[kDtVec];
      load_vec<input_t, kDtVec>(W + h[r] * w_stride + c * kDtVec, w);
#pragma unroll
      for (int i = 0; i < kDtVec; ++i) acc[r] = fmaf(w[i], d[i], acc[r]);
    }
  }
#pragma unroll 1
  for (int k = num_vec * kDtVec + j; k < rank; k += G) {
    const float d = to_float(dt_lr[k]);
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] = fmaf(to_float(W[h[r] * w_stride + k]), d, acc[r]);
  }
  for (int offset = G >> 1; offset > 0; offset >>= 1) {
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[r] += __shfl_xor_sync(kFull, acc[r], offset);
  }
#pragma unroll
  for (int r = 0; r < kR; ++r) dt_raw[r] = to_float(from_float<input_t>(acc[r]));
}

// B and C of group g at state n0; C zeroed on lanes past dstate, whose products must add nothing.
template <typename input_t, int kV>
__device__ __forceinline__ void load_bc(const SelectiveStateUpdateParams& p, int b, int g, int n0,
                                        bool active, float (&Bv)[kV], float (&Cv)[kV]) {
  const input_t* Bg = static_cast<const input_t*>(p.B) + b * p.B_batch_stride +
                      g * p.B_group_stride + n0;
  const input_t* Cg = static_cast<const input_t*>(p.C) + b * p.C_batch_stride +
                      g * p.C_group_stride + n0;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    Bv[i] = to_float(Bg[i]);
    Cv[i] = active ? to_float(Cg[i]) : 0.f;
  }
}

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocks) void
selective_state_update_kernel(SelectiveStateUpdateParams p, StateUpdateShape sh) {
  using input_t = typename Traits::input_t;
  using state_t = typename Traits::state_t;
  constexpr int kV = Traits::kVec;
  constexpr int kR = Traits::kRows;
  constexpr bool kHeadTile = Traits::kHeadTile;
  constexpr unsigned kFull = 0xffffffffu;  // every lane reaches every shuffle
  pdl_wait();  // programmatic launch: nothing before it reads memory
  pdl_launch_dependents();

  const int G = 1 << sh.log2_lanes;
  const int lane = threadIdx.x & 31;
  const int j = lane & (G - 1);  // chunk lane within the row
  const int rows_per_step = 32 >> sh.log2_lanes;
  const int rows_per_warp = kR * rows_per_step;
  const int rows_per_block = Traits::kWarps * rows_per_warp;
  // The thread's row r has index first + r * rows_per_step (the headdim index for head tiles, the
  // row of the batch row for flat tiles): a warp's step covers rows_per_step adjacent rows,
  // G * 16 contiguous bytes each. Rows past the end stand in for the tile's first row (which
  // exists): every load stays in bounds without a branch, and only their stores and outputs are
  // skipped.
  int head = 0;  // head tiles: the block's head
  int tile_first;
  if constexpr (kHeadTile) {
    head = blockIdx.x / sh.tiles_per_head;
    tile_first = (blockIdx.x - head * sh.tiles_per_head) * rows_per_block;
  } else {
    tile_first = blockIdx.x * rows_per_block;
  }
  const int first = tile_first + (threadIdx.x >> 5) * rows_per_warp + (lane >> sh.log2_lanes);
  const int end = kHeadTile ? sh.headdim : sh.rows;
  auto valid = [&](int r) { return first + r * rows_per_step < end; };
  auto index_of = [&](int r) { return valid(r) ? first + r * rows_per_step : tile_first; };
  auto head_of = [&](int r) {
    if constexpr (kHeadTile) {
      return head;
    } else {
      const int idx = index_of(r);
      return sh.headdim == 1 ? idx : idx / sh.headdim;
    }
  };
  auto chan_of = [&](int r) {  // channel in x, z, out
    return kHeadTile ? head * sh.headdim + index_of(r) : index_of(r);
  };
  auto offset_of = [&](int r) {  // in-slot state offset of the row
    const int h = head_of(r);
    return h * sh.head_stride + (chan_of(r) - h * sh.headdim) * sh.dim_stride;
  };
  auto group_of = [&](int h) { return sh.ngroups == 1 ? 0 : h / sh.heads_per_group; };
  // With G >= kR (always for head tiles: the launcher's rule), lane j < kR computes row j's dt
  // and writes row j's output: one softplus and one output per lane. Otherwise (flat tiles with
  // dstate of one or two chunks) every lane computes all its rows' dt, and lane j writes the rows
  // r with r % G == j.
  const bool spread = kHeadTile || G >= kR;
  const int mine = j < kR ? j : 0;
  const bool writes_mine = spread && j < kR && valid(mine);

  for (int b = blockIdx.y; b < sh.batch; b += gridDim.y) {
    // Block-uniform: padded rows skip the whole block, before any shuffle.
    const int64_t src = p.state_batch_indices ? p.state_batch_indices[b] : b;
    const int64_t dst = p.dst_state_batch_indices ? p.dst_state_batch_indices[b] : src;
    if (p.state_batch_indices && src == p.pad_slot_id) continue;
    if (p.dst_state_batch_indices && dst == p.pad_slot_id) continue;
    // Slots cannot be validated without a host sync: never touch memory outside the pool.
    if (src < 0 || src >= p.num_slots || dst < 0 || dst >= p.num_slots) continue;

    const state_t* s_src = static_cast<const state_t*>(p.state) + src * p.state_slot_stride;
    state_t* s_dst = static_cast<state_t*>(p.state) + dst * p.state_slot_stride;
    const input_t* x_b = static_cast<const input_t*>(p.x) + b * p.x_batch_stride;
    const input_t* dt_b = static_cast<const input_t*>(p.dt) + b * p.dt_batch_stride;
    const input_t* z_b = p.z ? static_cast<const input_t*>(p.z) + b * p.z_batch_stride : nullptr;

    // x of every row (flat tiles), or of the lane's own row, shuffled to the others when used
    // (head tiles: 8 rows, 7 registers fewer).
    float xv[kHeadTile ? 1 : kR];
    if constexpr (kHeadTile) {
      xv[0] = to_float(x_b[chan_of(mine)]);
    } else {
#pragma unroll
      for (int r = 0; r < kR; ++r) xv[r] = to_float(x_b[chan_of(r)]);
    }
    // The epilogue inputs of the lane's own row, loaded now: after the stores they would cost a
    // second memory round trip.
    float z_mine = 0.f, D_mine = 0.f;
    if (spread) {
      if (z_b) z_mine = to_float(z_b[chan_of(mine)]);
      if (p.D) D_mine = p.D[head_of(mine)];
    }

    float y[kR], dt[kHeadTile ? 1 : kR];  // head tiles: one dt for all rows
    float dA_head = 0.f;
#pragma unroll
    for (int r = 0; r < kR; ++r) y[r] = 0.f;
    // One pass for dstate <= 32 * kVec (every model shape); more passes for larger dstate.
#pragma unroll 1
    for (int c0 = 0; c0 < sh.num_chunks; c0 += G) {
      // Lanes past dstate read chunk 0 and add nothing (their C is zero).
      const bool active = c0 + j < sh.num_chunks;
      const int n0 = active ? (c0 + j) * kV : 0;
      Pack<state_t, kV> raw[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) raw[r] = load_pack<state_t, kV>(s_src + offset_of(r) + n0);

      // dt once per row, on the first pass, after its state loads are issued.
      if (c0 == 0) {
        if constexpr (kHeadTile) {
          dt[0] = head_dt(p, dt_b, head);
          dA_head = exp2f(dt[0] * (p.A[head * p.A_head_stride] * kLog2e));
        } else if (p.dt_proj_weight) {
          // Flat tiles only: the binding allows dt_proj_weight for the Mamba-1 form (A per
          // state), which the launcher never gives head tiles.
          int h[kR];
#pragma unroll
          for (int r = 0; r < kR; ++r) h[r] = head_of(r);
          project_dt<input_t, kR, Traits::kDtProjUnroll>(p, dt_b, h, j, sh.log2_lanes,
                                                         sh.dt_proj_vec, dt);
          if (spread) {
            float own = dt[0];
#pragma unroll
            for (int r = 1; r < kR; ++r) {
              if (r == mine) own = dt[r];
            }
            own = finish_dt(p, own, head_of(mine));
#pragma unroll
            for (int r = 0; r < kR; ++r) dt[r] = __shfl_sync(kFull, own, r, G);
          } else {
#pragma unroll
            for (int r = 0; r < kR; ++r) dt[r] = finish_dt(p, dt[r], h[r]);
          }
        } else if (spread) {
          const float own = head_dt(p, dt_b, head_of(mine));
#pragma unroll
          for (int r = 0; r < kR; ++r) dt[r] = __shfl_sync(kFull, own, r, G);
        } else {
#pragma unroll
          for (int r = 0; r < kR; ++r) dt[r] = head_dt(p, dt_b, head_of(r));
        }
      }

      float a[kHeadTile ? 1 : kR][kV];
      if constexpr (!kHeadTile) {
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          const float* A_row = p.A + head_of(r) * p.A_head_stride;
          bool done = false;
          if constexpr (kV % 4 == 0) {
            if (sh.a_vec) {
#pragma unroll
              for (int q = 0; q < kV / 4; ++q) {
                float four[4];
                load_vec<float, 4>(A_row + n0 + 4 * q, four);
#pragma unroll
                for (int i = 0; i < 4; ++i) a[r][4 * q + i] = four[i];
              }
              done = true;
            }
          }
          if (!done) {
#pragma unroll
            for (int i = 0; i < kV; ++i) a[r][i] = A_row[(n0 + i) * p.A_state_stride];
          }
        }
      }
      // Row 0's group is every row's in head tiles, and in flat tiles but past a group boundary.
      float Bv[kV], Cv[kV];
      int g_loaded = group_of(head_of(0));
      load_bc<input_t, kV>(p, b, g_loaded, n0, active, Bv, Cv);

#pragma unroll
      for (int r = 0; r < kR; ++r) {
        float dA[kV], dtx;
        if constexpr (kHeadTile) {
#pragma unroll
          for (int i = 0; i < kV; ++i) dA[i] = dA_head;
          dtx = dt[0] * __shfl_sync(kFull, xv[0], r, G);
        } else {
          const int g = group_of(head_of(r));
          if (g != g_loaded) {
            load_bc<input_t, kV>(p, b, g, n0, active, Bv, Cv);
            g_loaded = g;
          }
          const float dt_log2e = dt[r] * kLog2e;
#pragma unroll
          for (int i = 0; i < kV; ++i) dA[i] = exp2f(a[r][i] * dt_log2e);
          dtx = dt[r] * xv[r];
        }
        float s[kV];
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          s[i] = fmaf(to_float(raw[r].elems[i]), dA[i], dtx * Bv[i]);
          y[r] = fmaf(s[i], Cv[i], y[r]);
        }
        if (active && valid(r)) store_vec<state_t, kV>(s_dst + offset_of(r) + n0, s);
      }
    }

    for (int offset = G >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int r = 0; r < kR; ++r) y[r] += __shfl_xor_sync(kFull, y[r], offset);
    }
    input_t* out_b = static_cast<input_t*>(p.out) + b * p.out_batch_stride;
    if (spread) {
      if (writes_mine) {
        float v = y[0], x_mine = xv[0];
#pragma unroll
        for (int r = 1; r < kR; ++r) {
          if (r == mine) {
            v = y[r];
            if constexpr (!kHeadTile) x_mine = xv[r];
          }
        }
        if (p.D) v = fmaf(D_mine, x_mine, v);
        if (z_b) v *= silu(z_mine);
        out_b[chan_of(mine)] = from_float<input_t>(v);
      }
    } else if constexpr (!kHeadTile) {
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        if (!valid(r) || (r & (G - 1)) != j) continue;
        float v = y[r];
        if (p.D) v = fmaf(p.D[head_of(r)], xv[r], v);
        if (z_b) v *= silu(to_float(z_b[chan_of(r)]));
        out_b[chan_of(r)] = from_float<input_t>(v);
      }
    }
  }
}

// gridDim.y limit of the current device (65535 on every architecture so far): larger batches
// loop over batch rows inside the kernel.
int device_max_grid_y() { return cached_device_attribute<3>(cudaDevAttrMaxGridDimY); }

inline int log2_ceil(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

template <typename Traits>
void launch_state_update_with(const SelectiveStateUpdateParams& p, StateUpdateShape sh,
                              cudaStream_t stream) {
  const int rows_per_block = Traits::kWarps * Traits::kRows * (32 >> sh.log2_lanes);
  // Row indices (plus one block of overhang) stay in int32.
  if (static_cast<int64_t>(sh.rows) + rows_per_block > INT_MAX) {
    throw std::runtime_error("tpssm selective_state_update: nheads * headdim too large");
  }
  int64_t tiles;
  if constexpr (Traits::kHeadTile) {
    sh.tiles_per_head = static_cast<int>(ceil_div(sh.headdim, rows_per_block));
    tiles = (p.nheads) * sh.tiles_per_head;
  } else {
    tiles = ceil_div(sh.rows, rows_per_block);
  }
  if (tiles > INT_MAX) throw std::runtime_error("tpssm selective_state_update: too many rows");
  const dim3 grid(static_cast<unsigned>(tiles),
                  static_cast<unsigned>(std::min<int64_t>(p.batch, device_max_grid_y())));
  launch_programmatic(selective_state_update_kernel<Traits>, grid, dim3(Traits::kThreads), 0,
                      stream, "selective_state_update_kernel", p, sh);
}

template <typename input_t, typename state_t>
void launch_state_update(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  constexpr int kVecFull = 16 / sizeof(state_t);
  const bool vec_ok = p.dstate % kVecFull == 0 && is_aligned(p.state, 16) &&
                      p.state_slot_stride % kVecFull == 0 &&
                      p.state_head_stride % kVecFull == 0 && p.state_dim_stride % kVecFull == 0;
  const int vec = vec_ok ? kVecFull : 1;
  // In-slot offsets as int32: a slot of 2^31 elements or more (8 GiB in fp32) is not a decode
  // cache.
  const int64_t slot_span = (p.nheads - 1) * p.state_head_stride +
                            (p.headdim - 1) * p.state_dim_stride + p.dstate;
  if (slot_span > INT_MAX || p.state_head_stride > INT_MAX || p.state_dim_stride > INT_MAX) {
    throw std::runtime_error(
        "tpssm selective_state_update: a state slot must span fewer than 2^31 elements");
  }
  if (p.dt_proj_weight && (p.nheads - 1) * p.dt_proj_row_stride + p.dt_rank > INT_MAX) {
    throw std::runtime_error(
        "tpssm selective_state_update: dt_proj_weight must span fewer than 2^31 elements");
  }
  // The kernel walks batch rows as int, b += gridDim.y: keep that from wrapping.
  if (p.batch > INT_MAX - device_max_grid_y()) {
    throw std::runtime_error("tpssm selective_state_update: too many batch rows for one launch");
  }
  StateUpdateShape sh{};
  sh.batch = static_cast<int>(p.batch);
  sh.rows = static_cast<int>(p.nheads * p.headdim);
  sh.headdim = static_cast<int>(p.headdim);
  sh.ngroups = static_cast<int>(p.ngroups);
  sh.heads_per_group = static_cast<int>(p.nheads / p.ngroups);
  sh.head_stride = static_cast<int>(p.state_head_stride);
  sh.dim_stride = static_cast<int>(p.state_dim_stride);
  sh.num_chunks = static_cast<int>(p.dstate / vec);
  sh.log2_lanes = log2_ceil(std::min(sh.num_chunks, 32));
  sh.a_vec = p.a_is_per_state && p.A_state_stride == 1 && p.A_head_stride % 4 == 0 &&
             is_aligned(p.A, 16);
  constexpr int kDtVec = 16 / sizeof(input_t);
  sh.dt_proj_vec = p.dt_proj_weight && is_aligned(p.dt, 16) && is_aligned(p.dt_proj_weight, 16) &&
                   p.dt_batch_stride % kDtVec == 0 && p.dt_proj_row_stride % kDtVec == 0;
  if (!vec_ok) {
    launch_state_update_with<StateUpdateTraits<input_t, state_t, 1, false>>(p, sh, stream);
    return;
  }
  using HeadTraits = StateUpdateTraits<input_t, state_t, kVecFull, true>;
  const int head_rows_per_block = HeadTraits::kWarps * HeadTraits::kRows * (32 >> sh.log2_lanes);
  // Head tiles when at least half of a block's rows are used and a row has at least kRows lanes
  // (each lane then writes one output); flat tiles otherwise.
  if (!p.a_is_per_state && 2 * p.headdim >= head_rows_per_block &&
      (1 << sh.log2_lanes) >= HeadTraits::kRows) {
    launch_state_update_with<HeadTraits>(p, sh, stream);
  } else {
    launch_state_update_with<StateUpdateTraits<input_t, state_t, kVecFull, false>>(p, sh,
                                                                                   stream);
  }
}

}  // namespace

void run_selective_state_update(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.nheads == 0 || p.headdim == 0 || p.dstate == 0) return;
  if (p.ngroups <= 0 || p.nheads % p.ngroups != 0) {
    throw std::runtime_error("tpssm selective_state_update: nheads must be a multiple of ngroups");
  }
  TPSSM_DTYPE_SWITCH(p.act_dtype, input_t, [&] {
    TPSSM_STATE_DTYPE_SWITCH(p.state_dtype, p.act_dtype, input_t, state_t, [&] {
      launch_state_update<input_t, state_t>(p, stream);
    });
  });
}

}  // namespace tpssm
