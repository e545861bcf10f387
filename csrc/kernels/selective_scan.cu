// Prefill selective scan over token-major activations (Mamba1 and Mamba2 head forms).
//
// Mapping: a group of G threads owns one channel (head h, headdim index p) and kStates = 16 of its
// dstate states each (G = next power of two of dstate / 16: 1 for Mamba1's 16 states, 8 for
// Mamba2's 128), walks tokens in order and keeps its states in fp32 registers. The per-token
// output is a shuffle reduction within the group.
//
// Scaling with the sequence: with few channels (1280 per rank at TP 4) and batch 1, one block row
// per sequence cannot fill the GPU, so the launcher switches to a chunked plan over the flattened
// token range (the batch laid end to end, chunks may straddle sequence boundaries):
//   pass 1 (chunk_state_kernel): for every chunk whose last sequence continues past it, scan that
//           sequence's part of the chunk from zero (or from the initial state when it starts in
//           the chunk) and record its end state S_j and the chunk decay P_j = exp(A * sum dt).
//   pass 2 (chunk_combine_kernel): per (channel, state), carry across chunks in order:
//           H_j = P_j * H_{j-1} + S_j (or S_j where the sequence starts), stored over S_j.
//   pass 3 (scan_output_kernel): every chunk rescans its tokens from the exact start state
//           (H_{j-1} for a sequence continuing into it) and writes the outputs and, for sequences
//           ending in it, the final state.
// Pass 3 of a chunk never reads a slot that another block writes: a sequence spanning chunks has
// its initial state copied to the workspace (I_j) by pass 1, and only the chunk holding its end
// writes the slot. With enough (sequence x channel-block) work the launcher uses one block row
// per sequence and runs pass 3 alone.
//
// Staged token tiles (Mamba1 form, 1, 2, 4 or 8 threads a channel, a warp's channels in one
// group): the direct walk has one token of look-ahead, so each thread waits a full memory latency
// per token. The staged walk copies tiles of kTile tokens - each warp its channels' u / delta / z
// rows and its group's B / C rows - into shared memory with 16-byte cp.async (8-byte for the
// 16-bit rows of a warp of 4 channels at 8 lanes), double buffered: the next tile's copies are in
// flight while the current tile is scanned. Only lanes of one warp share data,
// so __syncwarp over the warp's live lanes suffices, and blocks are 2 warps. The per-token work is
// what bounds it (16 exp2 per token and channel, at 16 a clock per SM), so the walk keeps its
// instructions near the 16 exp2: B / C rows converted to fp32 once per tile for all lanes, exp2 as
// the bare MUFU instruction and a MUFU softplus (fast_exp2, softplus_fast). sm_90 SASS of the
// 16-bit output pass: ~151 instructions a token and warp, 20 of them MUFU (~160 MUFU cycles at 4
// lanes a clock per SM sub-partition): issue and MUFU are balanced.
//
// Lanes per channel (staged walk): one pass needs (sequences x channel blocks) to fill the SMs,
// and a tensor-parallel shard has 1 / tp of the channels. With L = 2, 4 or 8 lanes per channel
// a 2-warp block covers 64 / L channels, each lane 16 / L of the states, so the shard's grid has
// L times the blocks and stays one pass where L = 1 would fall to the chunked plan (two scans of
// every token); at L = 8 so would a single long prompt (mamba-2.8b tp 1, batch 1: 640 blocks),
// an explicit option (kMaxAutoLanes). A group's L lanes walk the same tokens; dt and
// dt * u are computed once per (channel, token) into shared memory with the tile (lane l of a
// group takes the tile's tokens l, l + L, ...), and y is reduce-scattered over L tokens at a
// time, so that each lane finishes one token's output (D, the z gate, the store) instead of every
// lane repeating it. sm_90 SASS of the 16-bit output pass, token loop: L = 1 ~151 instructions a
// token and warp of 32 channels, L = 4 ~146 per 4 tokens and warp of 8 channels, L = 8 ~182 per
// 8 tokens and warp of 4: 4.7 / 4.6 / 5.7 a channel and token. A warp's per-tile work (B / C
// conversion and copies, ~150 instructions a tile, and at L > 1 the dt pass) is shared by 32 / L
// channels, so in all ~5.0 / ~6.7 / ~9.1 a channel and token (counted, not measured;
// benchmarks/NOTES.md).
#include <algorithm>
#include <type_traits>

#include "kernel_utils.cuh"
#include "mma_sm80.cuh"
#include "scan_plan.h"
#include "ssm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

constexpr int kScanThreads = 128;
constexpr int kStates = 16;  // states per thread

// The staged walk's blocks: 2 warps (the warps share nothing), so that the blocks of a
// mamba-2.8b tp 1 batch of 8 (8 x 5120 channels: 640 blocks) spread evenly over 132 SMs, where
// 4-warp blocks left some SMs 3 blocks and others 2; and at most 128 registers (8 blocks an SM,
// where shared memory allows: StagedLayout).
constexpr int kStagedThreads = 64;
constexpr int kStagedMinBlocks = 8;
constexpr int kMaxStagedLanes = 8;  // lanes per channel of the staged walk: 1, 2, 4 or 8
// The automatic plan's most lanes. 8 lanes (4 channels a warp) pay the per-warp, per-token work
// (B / C rows, their conversion, the tile's bookkeeping) over half the channels of 4: counted
// from sm_90 SASS ~1.8x the per-channel-token issue of one lane, about the chunked plan's two
// passes; so 8 is an explicit option until a GPU run shows where it wins (batch 1 prompts).
constexpr int kMaxAutoLanes = 4;

template <typename input_t_, typename state_t_, bool kPerStateA_, bool kStaged_,
          int kLanes_ = 1>
struct ScanTraits {
  using input_t = input_t_;
  using state_t = state_t_;
  static constexpr bool kPerStateA = kPerStateA_;
  static constexpr bool kStaged = kStaged_;
  // Tokens per staged tile: 2 buffers of 4 KB (16-bit) / 8 KB (fp32) a warp, plus 2 KB of
  // converted B / C rows for 16-bit inputs (StagedLayout).
  static constexpr int kTile = 16;
  static constexpr int kMinBlocks = kStaged ? kStagedMinBlocks : 1;
  // Staged walk: lanes per channel (the plan's group_threads) and the channels of a warp.
  static constexpr int kLanes = kLanes_;
  static constexpr int kWarpChannels = 32 / kLanes;
  static constexpr int kStatesPerThread = kStaged ? kStates / kLanes : kStates;
  // Decays of the staged state pass computed by exp2_fma (~10 issue slots each) instead of the
  // MUFU (8 cycles a warp each), per lane. From the one-lane pass's sm_90 SASS (not measured):
  // all 16 on the MUFU are ~109 issue slots against ~144 MUFU cycles a token and warp; 2 on the
  // FMA pipe, ~128 / ~128. With 2 lanes one each; with 4 or 8 none (not counted: all on the
  // MUFU).
  static constexpr int kFmaExpStates = 2 / kLanes;
  static constexpr int kThreads = kStaged ? kStagedThreads : kScanThreads;
  static constexpr int kPerPack = 16 / sizeof(input_t);  // elements per 16-byte access
  // The direct walk's B / C rows (kStates a lane).
  static constexpr int kPacks = kStates / kPerPack;
  static_assert(kStates % kPerPack == 0, "B / C rows load as whole 16-byte packs");
  static_assert(kThreads % 32 == 0, "whole warps");
  static_assert(kLanes == 1 || (kStaged && (kLanes == 2 || kLanes == 4 || kLanes == 8)),
                "the staged walk alone takes 2, 4 or 8 lanes per channel");
  // A warp's own rows (kWarpChannels of u / delta / z a token) copy as whole 16-byte packs, or
  // (16-bit inputs at 8 lanes: 4 channels) as one 8-byte piece.
  static_assert(kWarpChannels % kPerPack == 0 || kWarpChannels * sizeof(input_t) == 8,
                "own rows of whole 16-byte packs or one 8-byte piece");
};

// Per-thread constants of one (channel, state range).
struct ScanThread {
  int64_t c, h, pidx, g;
  int n0;
  int lane;
  unsigned group_mask;
  int warp_channel;     // the channel's index among its warp's channels (lane / G)
  int warp_live;        // lanes 0..warp_live-1 of this warp own a channel
  unsigned warp_mask;   // and this is their mask
};

template <typename Traits>
__device__ __forceinline__ bool make_scan_thread(const SelectiveScanParams& p,
                                                 const ScanPlan& plan, ScanThread& t) {
  const int G = plan.group_threads;
  t.lane = threadIdx.x & (G - 1);
  t.c = static_cast<int64_t>(blockIdx.y) * (Traits::kThreads / G) + threadIdx.x / G;
  if (t.c >= plan.channels) return false;
  t.h = t.c / p.headdim;
  t.pidx = t.c - t.h * p.headdim;
  t.g = t.h / (p.nheads / p.ngroups);
  t.n0 = t.lane * Traits::kStatesPerThread;
  const unsigned warp_lane = threadIdx.x & 31u;
  t.group_mask =
      G == 32 ? 0xffffffffu : (((1u << G) - 1u) << (warp_lane & ~static_cast<unsigned>(G - 1)));
  // Lanes i * G .. i * G + G - 1 of a warp own channel (warp's first channel + i): the live
  // lanes are a prefix of the warp.
  t.warp_channel = static_cast<int>(warp_lane) / G;
  const int64_t warp_first = t.c - t.warp_channel;
  t.warp_live = G * static_cast<int>(min(static_cast<int64_t>(32 / G), plan.channels - warp_first));
  t.warp_mask = t.warp_live == 32 ? 0xffffffffu : ((1u << t.warp_live) - 1u);
  return true;
}

template <typename Traits>
struct TokenIn {
  Pack<typename Traits::input_t, Traits::kPerPack> B[Traits::kPacks];
  Pack<typename Traits::input_t, Traits::kPerPack> C[Traits::kPacks];
  typename Traits::input_t u, delta, z;
};

template <typename Traits>
__device__ __forceinline__ void load_states_row(
    const typename Traits::input_t* ptr, bool vec, int n0, int64_t dstate,
    Pack<typename Traits::input_t, Traits::kPerPack> (&dst)[Traits::kPacks]) {
  using input_t = typename Traits::input_t;
  constexpr int kPP = Traits::kPerPack;
  // Lanes past dstate (dstate 48 gives G = 4 lanes of 16) take the predicated path.
  if (vec && n0 + kStates <= dstate) {
#pragma unroll
    for (int k = 0; k < Traits::kPacks; ++k) dst[k] = load_pack<input_t, kPP>(ptr + k * kPP);
  } else {
#pragma unroll
    for (int i = 0; i < kStates; ++i) {
      dst[i / kPP].elems[i % kPP] = n0 + i < dstate ? ptr[i] : from_float<input_t>(0.f);
    }
  }
}

// One warp's shared memory in the staged walk (dynamic shared memory, so that cp.async can
// address it), two tile buffers deep. Element offsets, in input_t unless noted:
//   own(buf, stream, row): stream 0 u, 1 delta, 2 z; row = token of the tile, kWarpChannels a row
//   bc(buf, which, row):   which 0 B, 1 C; kStates states a row
//   bcf (16-bit inputs, float): the tile's B | C rows converted once for all 32 lanes, 2 kStates a
//   row (every lane reads every state of B and C per token: converting at the read was ~32 of the
//   walk's instructions per token)
//   dtf (kLanes > 1, float): the tile's (dt, dt * u) pairs, kWarpChannels a row, computed once
//   per (channel, token) for the channel's lanes (one 8-byte load a lane and token)
template <typename Traits>
struct StagedLayout {
  using input_t = typename Traits::input_t;
  static constexpr int kTile = Traits::kTile;
  static constexpr int kRow = Traits::kWarpChannels;
  static constexpr bool kConvertBC = !std::is_same<input_t, float>::value;
  static constexpr int kOwn = kTile * kRow;         // one stream of one buffer
  static constexpr int kBC = kTile * kStates;       // B or C of one buffer
  static constexpr int kOwnBytes = 2 * 3 * kOwn * sizeof(input_t);
  static constexpr int kBCBytes = 2 * 2 * kBC * sizeof(input_t);
  static constexpr int kBCFBytes = kConvertBC ? kTile * 2 * kStates * 4 : 0;
  static constexpr int kDtBytes = Traits::kLanes > 1 ? kTile * 2 * kRow * 4 : 0;
  static constexpr int kWarpBytes = kOwnBytes + kBCBytes + kBCFBytes + kDtBytes;
  static constexpr int kBlockBytes = kWarpBytes * (Traits::kThreads / 32);
  static_assert(kOwnBytes % 16 == 0 && kBCBytes % 16 == 0 && kBCFBytes % 16 == 0 &&
                    kWarpBytes % 16 == 0,
                "every region starts 16-byte aligned");

  input_t* own_base;
  input_t* bc_base;
  float* bcf;
  float* dtf;

  __device__ __forceinline__ explicit StagedLayout(int warp) {
    unsigned char* base = dynamic_smem() + warp * kWarpBytes;
    own_base = reinterpret_cast<input_t*>(base);
    bc_base = reinterpret_cast<input_t*>(base + kOwnBytes);
    bcf = reinterpret_cast<float*>(base + kOwnBytes + kBCBytes);
    dtf = reinterpret_cast<float*>(base + kOwnBytes + kBCBytes + kBCFBytes);
  }
  __device__ __forceinline__ input_t* own(int buf, int stream) const {
    return own_base + (buf * 3 + stream) * kOwn;
  }
  __device__ __forceinline__ input_t* bc(int buf, int which) const {
    return bc_base + (buf * 2 + which) * kBC;
  }
};

// kN floats from shared memory aligned to the access size, as 16-byte loads (8-byte when
// kN % 4 != 0; a warp's lanes all read the same row: broadcasts).
template <int kN>
__device__ __forceinline__ void load_floats(const float* src, float (&dst)[kN]) {
  constexpr int kV = kN % 4 == 0 ? 4 : 2;
  static_assert(kN % kV == 0, "whole 16- or 8-byte loads");
#pragma unroll
  for (int q = 0; q < kN / kV; ++q) {
    float v[kV];
    load_vec<float, kV>(src + kV * q, v);
#pragma unroll
    for (int i = 0; i < kV; ++i) dst[kV * q + i] = v[i];
  }
}

// Loads rows [0, n) of one tile of a warp's own channels (u, delta or z) into `dst` (kTile rows
// of kWarpChannels): with `async`, cp.async of whole rows in 16-byte packs (rows of 8 bytes in
// one piece; the lanes take the pieces in turn), else each live channel's lanes load its own
// elements, a few tokens in flight (lane l of a channel's group takes tokens l, l + G, ...).
// `src` is this lane's channel at the tile's first token; `ch` its index among the warp's
// channels, `gl` the lane's index in the channel's group.
template <typename Traits>
__device__ __forceinline__ void stage_own(typename Traits::input_t* dst,
                                          const typename Traits::input_t* src, int64_t stride,
                                          int n, int lane, int ch, int gl, bool async) {
  using input_t = typename Traits::input_t;
  constexpr int kPP = Traits::kPerPack;
  constexpr int kRow = Traits::kWarpChannels;
  constexpr int kL = Traits::kLanes;
  constexpr int kPiece = kRow < kPP ? kRow : kPP;  // elements a cp.async
  constexpr int kRowPieces = kRow / kPiece;
  constexpr int kPerLane = (Traits::kTile * kRowPieces + 31) / 32;
  if (async) {
    // The warp's first channel: rows aligned to a piece (the plan's own_vec: 16-byte aligned
    // rows of the whole tensor, and the warp's first channel a multiple of kRow).
    const input_t* warp_src = src - ch;
#pragma unroll
    for (int q = 0; q < kPerLane; ++q) {
      const unsigned e = q * 32 + lane;
      const int row = static_cast<int>(e / kRowPieces);
      const int col = static_cast<int>(e % kRowPieces) * kPiece;
      if (row < n) {
        const uint32_t to = smem_address(dst + row * kRow + col);
        const input_t* from = warp_src + row * stride + col;
        if constexpr (kPiece == kPP) {
          cp_async_16(to, from, true);
        } else {
          cp_async_8(to, from, true);
        }
      }
    }
    return;
  }
  constexpr int kBatch = 4;  // loads issued before their shared-memory stores
  for (int k0 = gl; k0 < n; k0 += kBatch * kL) {
    input_t v[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      if (k0 + q * kL < n) v[q] = src[(k0 + q * kL) * stride];
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      if (k0 + q * kL < n) dst[(k0 + q * kL) * kRow + ch] = v[q];
    }
  }
}

// Loads rows [0, n) of one tile of the warp's B or C rows (kStates a row, zeros past dstate)
// over its `live` lanes: with `async` whole 16-byte aligned rows by cp.async, else element by
// element, a few loads in flight per lane.
template <typename Traits>
__device__ __forceinline__ void stage_bc(typename Traits::input_t* dst,
                                         const typename Traits::input_t* src, int64_t stride,
                                         int n, int64_t dstate, int lane, int live, bool async) {
  using input_t = typename Traits::input_t;
  if (async) {
    constexpr int kPP = Traits::kPerPack;
    constexpr int kRowPacks = kStates / kPP;
    for (unsigned e = lane; e < static_cast<unsigned>(n * kRowPacks); e += live) {
      const int row = static_cast<int>(e / kRowPacks);
      const int col = static_cast<int>(e % kRowPacks) * kPP;
      cp_async_16(smem_address(dst + row * kStates + col), src + row * stride + col, true);
    }
    return;
  }
  constexpr int kBatch = 4;
  const int elems = n * kStates;
  for (int e0 = 0; e0 < elems; e0 += kBatch * live) {
    input_t v[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int e = e0 + q * live + lane;
      const int i = e % kStates;
      v[q] = e < elems && i < dstate ? src[(e / kStates) * stride + i] : from_float<input_t>(0.f);
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int e = e0 + q * live + lane;
      if (e < elems) dst[e] = v[q];
    }
  }
}

// y over kL tokens reduce-scattered over a channel's kL lanes: v[j] is this lane's partial sum
// (its states) for token j of the group; lane gl returns token gl's full y. Each step halves
// the vector: a lane keeps the half its bit selects and adds its partner's copy of that half
// (kL - 1 shuffles per kL tokens, where a full reduction per token takes log2 kL each).
template <int kL>
__device__ __forceinline__ float reduce_scatter_y(float (&v)[kL], int gl, unsigned mask) {
#pragma unroll
  for (int half = kL / 2; half >= 1; half /= 2) {
    const bool upper = (gl & half) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(mask, send, half);
    }
  }
  return v[0];
}

// scan_tokens for the staged plan (G = kLanes lanes a channel, the warp's channels in one group,
// dstate <= 16). Per tile: the next tile's loads are issued (cp.async) before this one is
// scanned, so they are in flight during its exp2 stream; a warp waits for its own copies, then
// __syncwarp makes all lanes' copies visible. Buffer reuse: tile i + 1 goes to the buffer that
// tile i - 1 used, whose last reads precede the __syncwarp closing iteration i - 1.
template <typename Traits, bool kOutput>
__device__ __forceinline__ void scan_tokens_staged(
    const SelectiveScanParams& p, const ScanPlan& plan, const SeqView& seqs,
    const ScanThread& th, int64_t b, int64_t t_begin, int64_t t_end,
    const float (&A2)[Traits::kStatesPerThread], float (&h)[Traits::kStatesPerThread],
    float& dt_sum) {
  using input_t = typename Traits::input_t;
  using Layout = StagedLayout<Traits>;
  constexpr int kTile = Traits::kTile;
  constexpr int kL = Traits::kLanes;
  constexpr int kRow = Traits::kWarpChannels;
  constexpr int kSpt = Traits::kStatesPerThread;
  if (t_begin >= t_end) return;
  const int lane = threadIdx.x & 31;
  // The channel among the warp's and the lane in its group (th.warp_channel and th.lane, known
  // at compile time here).
  const int ch = lane / kL;
  const int gl = lane % kL;
  const Layout smem(threadIdx.x >> 5);
  const int64_t at_begin = seqs.addr_token(b, t_begin);  // token addresses are contiguous
  const input_t* u = static_cast<const input_t*>(p.u) + seqs.batch_offset(b, p.u_batch_stride) +
                     th.c + at_begin * p.u_token_stride;
  const input_t* delta = static_cast<const input_t*>(p.delta) +
                         seqs.batch_offset(b, p.delta_batch_stride) + th.h +
                         at_begin * p.delta_token_stride;
  const input_t* Bp = static_cast<const input_t*>(p.B) + seqs.batch_offset(b, p.B_batch_stride) +
                      th.g * p.B_group_stride + at_begin * p.B_token_stride;
  const input_t* Cp = static_cast<const input_t*>(p.C) + seqs.batch_offset(b, p.C_batch_stride) +
                      th.g * p.C_group_stride + at_begin * p.C_token_stride;
  const input_t* z = (kOutput && p.z) ? static_cast<const input_t*>(p.z) +
                                            seqs.batch_offset(b, p.z_batch_stride) + th.c +
                                            at_begin * p.z_token_stride
                                      : nullptr;
  input_t* out = static_cast<input_t*>(p.out) + seqs.batch_offset(b, p.out_batch_stride) + th.c +
                 at_begin * p.out_token_stride;
  const float bias = p.delta_bias ? p.delta_bias[th.h] : 0.f;
  const float Dh = p.D ? p.D[th.h] : 0.f;
  // Row copies need whole aligned rows: all the warp's channels live (own streams) and
  // dstate == kStates (B / C, which the live lanes share out whatever their number).
  const bool own_async = plan.own_vec && th.warp_live == 32;
  const bool bc_async = plan.bc_vec && p.dstate == kStates;
  const int64_t len = t_end - t_begin;

  auto stage = [&](int64_t k0, int buf) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), len - k0));
    stage_own<Traits>(smem.own(buf, 0), u + k0 * p.u_token_stride, p.u_token_stride, n, lane, ch,
                      gl, own_async);
    stage_own<Traits>(smem.own(buf, 1), delta + k0 * p.delta_token_stride, p.delta_token_stride,
                      n, lane, ch, gl, own_async);
    stage_bc<Traits>(smem.bc(buf, 0), Bp + k0 * p.B_token_stride, p.B_token_stride, n, p.dstate,
                     lane, th.warp_live, bc_async);
    if constexpr (kOutput) {
      if (z) {
        stage_own<Traits>(smem.own(buf, 2), z + k0 * p.z_token_stride, p.z_token_stride, n,
                          lane, ch, gl, own_async);
      }
      stage_bc<Traits>(smem.bc(buf, 1), Cp + k0 * p.C_token_stride, p.C_token_stride, n,
                       p.dstate, lane, th.warp_live, bc_async);
    }
    cp_async_commit();
  };

  stage(0, 0);
  for (int64_t k0 = 0, tile = 0; k0 < len; k0 += kTile, ++tile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), len - k0));
    const int buf = static_cast<int>(tile & 1);
    if (k0 + kTile < len) {
      stage(k0 + kTile, buf ^ 1);
      cp_async_wait_group<1>();  // this tile's copies; the next tile's stay in flight
    } else {
      cp_async_wait_group<0>();
    }
    __syncwarp(th.warp_mask);  // every lane's copies and stores of this tile
    const input_t* s_u = smem.own(buf, 0);
    const input_t* s_dt = smem.own(buf, 1);
    const input_t* s_z = smem.own(buf, 2);
    // B (and C) rows as floats: converted once per tile for the warp, or the fp32 tile itself.
    const float* s_B;
    const float* s_C;
    constexpr int kBStride = Layout::kConvertBC ? 2 * kStates : kStates;
    if constexpr (Layout::kConvertBC) {
      constexpr int kPP = Traits::kPerPack;
      constexpr int kRowPacks = kStates / kPP;
      constexpr int kTilePacks = kTile * kRowPacks;  // packs of the tile's B (or C)
      // Unsigned: the divisions by powers of two are shifts and masks.
      for (unsigned e = lane; e < (kOutput ? 2u : 1u) * kTilePacks; e += th.warp_live) {
        const unsigned which = e / kTilePacks;
        const unsigned row = e % kTilePacks / kRowPacks;
        const unsigned col = e % kRowPacks * kPP;
        const Pack<input_t, kPP> v =
            load_pack<input_t, kPP>(smem.bc(buf, which) + row * kStates + col);
        float* dst = smem.bcf + row * 2 * kStates + which * kStates + col;
#pragma unroll
        for (int q = 0; q < kPP / 4; ++q) {
          float f[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) f[i] = to_float(v.elems[4 * q + i]);
          store_vec<float, 4>(dst + 4 * q, f);
        }
      }
      s_B = smem.bcf;
      s_C = smem.bcf + kStates;
    } else {
      s_B = reinterpret_cast<const float*>(smem.bc(buf, 0));
      s_C = reinterpret_cast<const float*>(smem.bc(buf, 1));
    }
    // dt and dt * u once per (channel, token): lane gl of a channel takes tokens gl, gl + kL, ...
    float* s_dtf = smem.dtf;
    if constexpr (kL > 1) {
      for (int k = gl; k < n; k += kL) {
        const float dt = scan_dt<true>(to_float(s_dt[k * kRow + ch]), bias, p.delta_softplus,
                                       p.dt_min, p.dt_max);
        const float pair[2] = {dt, dt * to_float(s_u[k * kRow + ch])};
        store_vec<float, 2>(s_dtf + (k * kRow + ch) * 2, pair);
      }
    }
    if constexpr (Layout::kConvertBC || kL > 1) {
      __syncwarp(th.warp_mask);  // the converted rows, written by other lanes
    }

    if constexpr (kL == 1) {
      input_t* out_k = out + k0 * p.out_token_stride;
      for (int k = 0; k < n; ++k, out_k += p.out_token_stride) {
        const float dt = scan_dt<true>(to_float(s_dt[k * kRow + lane]), bias, p.delta_softplus,
                                       p.dt_min, p.dt_max);
        const float uv = to_float(s_u[k * kRow + lane]);
        const float dtu = dt * uv;
        float Bk[kStates];
        load_floats(s_B + k * kBStride, Bk);
        if constexpr (kOutput) {
          float Ck[kStates];
          load_floats(s_C + k * kBStride, Ck);
          // Two partial sums halve the dependent chain of y's FMAs.
          float y2[2] = {0.f, 0.f};
#pragma unroll
          for (int i = 0; i < kStates; ++i) {
            h[i] = fmaf(h[i], fast_exp2(dt * A2[i]), dtu * Bk[i]);
            y2[i & 1] = fmaf(h[i], Ck[i], y2[i & 1]);
          }
          float y = fmaf(Dh, uv, y2[0] + y2[1]);
          if (z) {
            const float zv = to_float(s_z[k * kRow + lane]);
            y *= sizeof(input_t) == 2 ? silu_fast(zv) : silu(zv);
          }
          *out_k = from_float<input_t>(y);
        } else {
          // Without C, z and y the MUFU unit bounds this pass: kFmaExpStates of the decays go
          // to the FMA pipe.
#pragma unroll
          for (int i = 0; i < kStates; ++i) {
            const float x = dt * A2[i];
            const float dA = i < Traits::kFmaExpStates ? exp2_fma(x) : fast_exp2(x);
            h[i] = fmaf(h[i], dA, dtu * Bk[i]);
          }
          dt_sum += dt;
        }
      }
    } else {
      // kL tokens at a time (n is the same for the whole warp, so every live lane takes part in
      // the shuffles); this lane's states are n0 .. n0 + kSpt - 1 of each B / C row. Whole
      // groups skip the per-token bounds checks; only a tile's last group may be partial.
      // out_g: this lane's output of the group (token kk + gl).
      input_t* out_g = out + (k0 + gl) * p.out_token_stride;
      const int64_t out_step = kL * p.out_token_stride;
      auto scan_group = [&](int kk, auto whole) {
        constexpr bool kWhole = decltype(whole)::value;
        float yp[kL];
#pragma unroll
        for (int j = 0; j < kL; ++j) {
          const int k = kk + j;
          yp[j] = 0.f;
          if (!kWhole && k >= n) continue;
          float dt_dtu[2];
          load_floats(s_dtf + (k * kRow + ch) * 2, dt_dtu);
          const float dt = dt_dtu[0];
          const float dtu = dt_dtu[1];
          float Bk[kSpt];
          load_floats(s_B + k * kBStride + th.n0, Bk);
          if constexpr (kOutput) {
            float Ck[kSpt];
            load_floats(s_C + k * kBStride + th.n0, Ck);
#pragma unroll
            for (int i = 0; i < kSpt; ++i) {
              h[i] = fmaf(h[i], fast_exp2(dt * A2[i]), dtu * Bk[i]);
              yp[j] = fmaf(h[i], Ck[i], yp[j]);
            }
          } else {
#pragma unroll
            for (int i = 0; i < kSpt; ++i) {
              const float x = dt * A2[i];
              const float dA = i < Traits::kFmaExpStates ? exp2_fma(x) : fast_exp2(x);
              h[i] = fmaf(h[i], dA, dtu * Bk[i]);
            }
            dt_sum += dt;
          }
        }
        if constexpr (kOutput) {
          float y = reduce_scatter_y<kL>(yp, gl, th.warp_mask);
          const int k = kk + gl;
          if (kWhole || k < n) {
            y = fmaf(Dh, to_float(s_u[k * kRow + ch]), y);
            if (z) {
              const float zv = to_float(s_z[k * kRow + ch]);
              y *= sizeof(input_t) == 2 ? silu_fast(zv) : silu(zv);
            }
            *out_g = from_float<input_t>(y);
          }
          out_g += out_step;
        }
      };
      const int n_whole = n / kL * kL;
      for (int kk = 0; kk < n_whole; kk += kL) scan_group(kk, std::true_type{});
      if (n_whole < n) scan_group(n_whole, std::false_type{});
    }
    // The next iteration stages into the buffer this one read, and rewrites the converted rows.
    __syncwarp(th.warp_mask);
  }
}

// Scans flat tokens [t_begin, t_end) of sequence b, updating h. kOutput: write y (pass 3);
// otherwise accumulate sum(dt) for the chunk decay (pass 1).
template <typename Traits, bool kOutput>
__device__ __forceinline__ void scan_tokens(const SelectiveScanParams& p, const ScanPlan& plan,
                                            const SeqView& seqs, const ScanThread& th, int64_t b,
                                            int64_t t_begin, int64_t t_end,
                                            const float (&A2)[Traits::kStatesPerThread],
                                            float (&h)[Traits::kStatesPerThread],
                                            float& dt_sum) {
  if constexpr (Traits::kStaged) {
    scan_tokens_staged<Traits, kOutput>(p, plan, seqs, th, b, t_begin, t_end, A2, h, dt_sum);
    return;
  }
  using input_t = typename Traits::input_t;
  constexpr int kPP = Traits::kPerPack;
  if (t_begin >= t_end) return;
  const input_t* u = static_cast<const input_t*>(p.u) + seqs.batch_offset(b, p.u_batch_stride) + th.c;
  const input_t* delta = static_cast<const input_t*>(p.delta) +
                         seqs.batch_offset(b, p.delta_batch_stride) + th.h;
  const input_t* Bp = static_cast<const input_t*>(p.B) + seqs.batch_offset(b, p.B_batch_stride) +
                      th.g * p.B_group_stride + th.n0;
  const input_t* Cp = static_cast<const input_t*>(p.C) + seqs.batch_offset(b, p.C_batch_stride) +
                      th.g * p.C_group_stride + th.n0;
  const input_t* z = p.z ? static_cast<const input_t*>(p.z) +
                               seqs.batch_offset(b, p.z_batch_stride) + th.c
                         : nullptr;
  input_t* out = static_cast<input_t*>(p.out) + seqs.batch_offset(b, p.out_batch_stride) + th.c;
  const float bias = p.delta_bias ? p.delta_bias[th.h] : 0.f;
  const float Dh = p.D ? p.D[th.h] : 0.f;

  auto load = [&](int64_t t, TokenIn<Traits>& in) {
    const int64_t at = seqs.addr_token(b, t);
    in.u = u[at * p.u_token_stride];
    in.delta = delta[at * p.delta_token_stride];
    load_states_row<Traits>(Bp + at * p.B_token_stride, plan.bc_vec, th.n0, p.dstate, in.B);
    if constexpr (kOutput) {
      load_states_row<Traits>(Cp + at * p.C_token_stride, plan.bc_vec, th.n0, p.dstate, in.C);
      if (z) in.z = z[at * p.z_token_stride];
    }
  };

  // One token of look-ahead: the next token's loads are in flight while this one computes.
  TokenIn<Traits> cur, nxt;
  load(t_begin, cur);
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (t + 1 < t_end) load(t + 1, nxt);
    const float dt = scan_dt(to_float(cur.delta), bias, p.delta_softplus, p.dt_min, p.dt_max);
    const float uv = to_float(cur.u);
    const float dtu = dt * uv;
    float y = 0.f;
    float dA_head = 0.f;
    if constexpr (!Traits::kPerStateA) dA_head = exp2f(dt * A2[0]);
#pragma unroll
    for (int i = 0; i < kStates; ++i) {
      float dA;
      if constexpr (Traits::kPerStateA) {
        dA = exp2f(dt * A2[i]);
      } else {
        dA = dA_head;
      }
      h[i] = fmaf(h[i], dA, dtu * to_float(cur.B[i / kPP].elems[i % kPP]));
      if constexpr (kOutput) y = fmaf(h[i], to_float(cur.C[i / kPP].elems[i % kPP]), y);
    }
    if constexpr (kOutput) {
      for (int offset = plan.group_threads / 2; offset > 0; offset /= 2) {
        y += __shfl_xor_sync(th.group_mask, y, offset, plan.group_threads);
      }
      if (th.lane == 0) {
        y = fmaf(Dh, uv, y);
        if (z) y *= silu(to_float(cur.z));
        out[seqs.addr_token(b, t) * p.out_token_stride] = from_float<input_t>(y);
      }
    } else {
      dt_sum += dt;
    }
    cur = nxt;
  }
}

template <typename Traits>
__device__ __forceinline__ void load_a(const SelectiveScanParams& p, const ScanThread& th,
                                       float (&A2)[Traits::kStatesPerThread]) {
  const float* A = p.A + th.h * p.A_head_stride;
#pragma unroll
  for (int i = 0; i < Traits::kStatesPerThread; ++i) {
    if constexpr (Traits::kPerStateA) {
      A2[i] = th.n0 + i < p.dstate ? A[(th.n0 + i) * p.A_state_stride] * kLog2e : 0.f;
    } else {
      A2[i] = A[0] * kLog2e;
    }
  }
}

template <typename Traits>
__device__ __forceinline__ void load_slot_state(const SelectiveScanParams& p, const ScanThread& th,
                                                int64_t slot,
                                                float (&h)[Traits::kStatesPerThread]) {
  using state_t = typename Traits::state_t;
  const state_t* s = static_cast<const state_t*>(p.ssm_states) + slot * p.ssm_states_slot_stride +
                     th.h * p.ssm_states_head_stride + th.pidx * p.ssm_states_dim_stride + th.n0;
#pragma unroll
  for (int i = 0; i < Traits::kStatesPerThread; ++i) {
    h[i] = th.n0 + i < p.dstate ? to_float(s[i]) : 0.f;
  }
}

template <typename Traits>
__device__ __forceinline__ void store_slot_state(const SelectiveScanParams& p,
                                                 const ScanThread& th, int64_t slot,
                                                 const float (&h)[Traits::kStatesPerThread]) {
  using state_t = typename Traits::state_t;
  state_t* s = static_cast<state_t*>(p.ssm_states) + slot * p.ssm_states_slot_stride +
               th.h * p.ssm_states_head_stride + th.pidx * p.ssm_states_dim_stride + th.n0;
#pragma unroll
  for (int i = 0; i < Traits::kStatesPerThread; ++i) {
    if (th.n0 + i < p.dstate) s[i] = from_float<state_t>(h[i]);
  }
}

__device__ __forceinline__ float* ws_row(float* base, const SelectiveScanParams& p,
                                         const ScanPlan& plan, int64_t j, const ScanThread& th) {
  return base + (j * plan.channels + th.c) * p.dstate + th.n0;
}

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocks) void chunk_state_kernel(
    SelectiveScanParams p, ScanPlan plan) {
  const int64_t j = blockIdx.x;
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};
  const StatePiece piece = state_piece(p, plan, seqs, j);
  const int32_t flag = piece.flag;
  if (blockIdx.y == 0 && threadIdx.x == 0) plan.ws_flags[j] = flag;
  if (flag == 0) return;

  ScanThread th;
  if (!make_scan_thread<Traits>(p, plan, th)) return;
  float A2[Traits::kStatesPerThread];
  load_a<Traits>(p, th, A2);
  float h[Traits::kStatesPerThread];
  if (flag == 1 && piece.initial) {
    load_slot_state<Traits>(p, th, piece.slot, h);
  } else {
#pragma unroll
    for (int i = 0; i < Traits::kStatesPerThread; ++i) h[i] = 0.f;
  }
  if (flag == 1) {
    float* I = ws_row(plan.ws_I, p, plan, j, th);
#pragma unroll
    for (int i = 0; i < Traits::kStatesPerThread; ++i) {
      if (th.n0 + i < p.dstate) I[i] = h[i];
    }
  }
  float dt_sum = 0.f;
  scan_tokens<Traits, false>(p, plan, seqs, th, piece.b, max(piece.seq_begin, piece.begin),
                             piece.end, A2, h, dt_sum);
  float* S = ws_row(plan.ws_S, p, plan, j, th);
#pragma unroll
  for (int i = 0; i < Traits::kStatesPerThread; ++i) {
    if (th.n0 + i < p.dstate) S[i] = h[i];
  }
  if (th.pidx == 0) {
    if constexpr (Traits::kPerStateA) {
      float* P = plan.ws_P + (j * p.nheads + th.h) * p.dstate + th.n0;
#pragma unroll
      for (int i = 0; i < Traits::kStatesPerThread; ++i) {
        if (th.n0 + i < p.dstate) P[i] = exp2f(A2[i] * dt_sum);
      }
    } else if (th.lane == 0) {
      plan.ws_P[j * p.nheads + th.h] = exp2f(A2[0] * dt_sum);
    }
  }
}

__global__ __launch_bounds__(256) void chunk_combine_kernel(SelectiveScanParams p, ScanPlan plan,
                                                            bool per_state_a) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row_elems = plan.channels * p.dstate;
  if (idx >= row_elems) return;
  const int64_t c = idx / p.dstate;
  const int64_t n = idx - c * p.dstate;
  const int64_t h = c / p.headdim;
  const int64_t p_stride = per_state_a ? p.nheads * p.dstate : p.nheads;
  const int64_t p_off = per_state_a ? h * p.dstate + n : h;
  float carry = 0.f;
  // Loads do not depend on the carry chain, so unrolling lets them issue ahead of it.
#pragma unroll 4
  for (int64_t j = 0; j < plan.num_chunks; ++j) {
    const int32_t flag = plan.ws_flags[j];
    if (flag == 0) continue;
    float s = plan.ws_S[j * row_elems + idx];
    if (flag == 2) s = fmaf(plan.ws_P[j * p_stride + p_off], carry, s);
    plan.ws_S[j * row_elems + idx] = s;
    carry = s;
  }
}

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocks) void scan_output_kernel(
    SelectiveScanParams p, ScanPlan plan) {
  ScanThread th;
  if (!make_scan_thread<Traits>(p, plan, th)) return;
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};
  float A2[Traits::kStatesPerThread];
  load_a<Traits>(p, th, A2);

  const int64_t j = blockIdx.x;
  const OutputPiece piece = output_piece(p, plan, seqs, j);

  for (int64_t b = piece.b_first; b <= piece.b_last; ++b) {
    const int64_t seq_begin = seqs.begin(b);
    const int64_t seq_end = seqs.end(b);
    if (!piece.visits(seq_begin)) break;
    int64_t slot = 0;
    bool initial = false;
    if (!resolve_slot(p, b, slot, initial)) continue;
    float h[Traits::kStatesPerThread];
    const StartState start = start_state(piece, seq_begin, seq_end, initial);
    if (start == StartState::kCarried || start == StartState::kCopiedInitial) {
      const float* H = start == StartState::kCarried ? ws_row(plan.ws_S, p, plan, j - 1, th)
                                                     : ws_row(plan.ws_I, p, plan, j, th);
#pragma unroll
      for (int i = 0; i < Traits::kStatesPerThread; ++i) {
        h[i] = th.n0 + i < p.dstate ? H[i] : 0.f;
      }
    } else if (start == StartState::kSlot) {
      load_slot_state<Traits>(p, th, slot, h);
    } else {
#pragma unroll
      for (int i = 0; i < Traits::kStatesPerThread; ++i) h[i] = 0.f;
    }
    float unused = 0.f;
    scan_tokens<Traits, true>(p, plan, seqs, th, b, max(seq_begin, piece.begin),
                              min(seq_end, piece.end), A2, h, unused);
    if (seq_end <= piece.end && p.ssm_states) store_slot_state<Traits>(p, th, slot, h);
  }
}

constexpr int64_t kWorkspaceAlign = 256;

inline int64_t align_up(int64_t v) { return ceil_div(v, kWorkspaceAlign) * kWorkspaceAlign; }

struct WorkspaceLayout {
  int64_t S, I, P, flags, total;
};

WorkspaceLayout workspace_layout(const SelectiveScanParams& p, const ScanPlan& plan) {
  WorkspaceLayout w{};
  if (!plan.flat) return w;
  const int64_t states = plan.num_chunks * plan.channels * p.dstate * 4;
  const int64_t decay = plan.num_chunks * p.nheads * (p.a_is_per_state ? p.dstate : 1) * 4;
  w.S = 0;
  w.I = align_up(states);
  w.P = w.I + align_up(states);
  w.flags = w.P + align_up(decay);
  w.total = w.flags + align_up(plan.num_chunks * 4);
  return w;
}

// Whether and how to split the flattened token range over the device. Blocks per sequence is the
// grid's second dimension (channel blocks, or heads for the SSD kernel). One block row per
// sequence while that gives every SM min_blocks_per_sm blocks; else pieces sized for
// target_blocks_per_sm blocks per SM, rounded up to a multiple of `granule`, at least min_piece
// tokens, and only when that makes more pieces than sequences. split_len > 0 forces the split.
struct SplitRule {
  int min_blocks_per_sm;
  int target_blocks_per_sm;
  int64_t min_piece;
  int64_t granule;
};

// The recurrent kernels: light blocks of 4 warps, ~4 per SM; the staged walk's 2-warp blocks
// at the same warps per SM.
constexpr SplitRule kRecurrentSplit{2, 4, 64, 1};
constexpr SplitRule kStagedSplit{4, 8, 64, 1};
// The SSD kernel: two blocks are resident per SM, so one block row per sequence from 2 per SM;
// below, pieces of whole 64-token chunks for ~8 blocks per SM (short pieces balance better; the
// extra state pass covers each piece once).
constexpr SplitRule kSsdSplit{2, 8, 256, 64};

void plan_split(const SelectiveScanParams& p, int64_t blocks_per_seq, int64_t sms,
                const SplitRule& rule, ScanPlan& plan) {
  plan.flat = false;
  if (plan.total_tokens == 0) return;
  if (p.split_len > 0) {
    plan.flat = true;
    plan.chunk_len = p.split_len;
    plan.num_chunks = ceil_div(plan.total_tokens, p.split_len);
    return;
  }
  if (p.batch * blocks_per_seq >= rule.min_blocks_per_sm * sms) return;
  const int64_t per_block =
      ceil_div(plan.total_tokens * blocks_per_seq, rule.target_blocks_per_sm * sms);
  const int64_t piece =
      std::max(rule.min_piece, ceil_div(per_block, rule.granule) * rule.granule);
  const int64_t num_pieces = ceil_div(plan.total_tokens, piece);
  if (num_pieces > p.batch) {
    plan.flat = true;
    plan.chunk_len = piece;
    plan.num_chunks = num_pieces;
  }
}

ScanPlan make_plan(const SelectiveScanParams& p) {
  if (p.dstate <= 0 || p.dstate > 32 * kStates) {
    throw std::runtime_error("tpssm selective_scan: dstate must be in 1..512, got " +
                             std::to_string(p.dstate));
  }
  if (p.ngroups <= 0 || p.nheads % p.ngroups != 0) {
    throw std::runtime_error("tpssm selective_scan: nheads must be a multiple of ngroups");
  }
  const int64_t lanes_asked = p.lanes_per_channel;  // 0, or a power of two up to the most
  if (lanes_asked < 0 || lanes_asked > kMaxStagedLanes || (lanes_asked & (lanes_asked - 1))) {
    throw std::runtime_error(
        "tpssm selective_scan: lanes_per_channel must be 0, 1, 2, 4 or 8, got " +
        std::to_string(p.lanes_per_channel));
  }
  auto lanes_need_staging = [&] {
    throw std::runtime_error(
        "tpssm selective_scan: lanes_per_channel " + std::to_string(p.lanes_per_channel) +
        " needs the staged walk (A of shape (dim, dstate) with dstate <= 16, ngroups 1 or a "
        "multiple of 32 channels a group, algorithm 'auto' or 'recurrent', sm_80 or later)");
  };
  ScanPlan plan{};
  int G = 1;
  while (G * kStates < p.dstate) G *= 2;
  plan.group_threads = G;
  plan.channels = p.nheads * p.headdim;
  plan.total_tokens = p.query_start_loc ? p.seqlen : p.batch * p.seqlen;
  const int64_t sms = current_device_sm_count();
  constexpr int kPerPackMin = 4;  // fp32 B / C: 4 elements per 16 bytes (16-bit: 8)
  const int64_t per_pack = p.act_dtype == DType::kFloat32 ? kPerPackMin : 2 * kPerPackMin;
  // A tensor (or none) every row of which starts 16-byte aligned: an aligned base, token (and,
  // dense, batch) strides of whole packs.
  auto packs_aligned = [&](const void* ptr, int64_t token_stride, int64_t batch_stride) {
    return ptr == nullptr ||
           (is_aligned(ptr, 16) && token_stride % per_pack == 0 &&
            (p.query_start_loc != nullptr || batch_stride % per_pack == 0));
  };
  // The SSD kernel's 16-bit tensor-core operands (decay-weighted B, C and x products) assume
  // decays exp(dt * A) <= 1, as in every Mamba2 model (dt >= 0, A <= 0). Where states grow it
  // loses accuracy: a fuzz case with raw dt down to -0.93 and no softplus came out 2-40% off in
  // fp16 where the recurrence held 1e-3. So 'auto' takes it only where dt >= 0 is certain
  // (softplus, or dt_min >= 0); A <= 0 is the caller's.
  const bool dt_nonnegative = p.delta_softplus || p.dt_min >= 0.f;
  plan.ssd = ((p.algorithm == ScanAlgorithm::kAuto && dt_nonnegative) ||
              p.algorithm == ScanAlgorithm::kSsd) &&
             ssd_supported(p);
  if (plan.ssd) {
    plan_split(p, p.nheads, sms, kSsdSplit, plan);
    // headdim and dstate are multiples of 8, so a head's x / z rows and a group's B / C rows
    // start 16-byte aligned whenever the tensor's rows do.
    plan.ssd_in_vec = p.B_group_stride % per_pack == 0 && p.C_group_stride % per_pack == 0 &&
                      packs_aligned(p.u, p.u_token_stride, p.u_batch_stride) &&
                      packs_aligned(p.z, p.z_token_stride, p.z_batch_stride) &&
                      packs_aligned(p.B, p.B_token_stride, p.B_batch_stride) &&
                      packs_aligned(p.C, p.C_token_stride, p.C_batch_stride);
    plan.ssd_out_vec = packs_aligned(p.out, p.out_token_stride, p.out_batch_stride);
    if (p.lanes_per_channel > 1) lanes_need_staging();
    return plan;
  }
  // Staged tiles: per-state A (the Mamba1 form) with dstate <= 16, and each warp's channels (a
  // block's channels start at a multiple of 64 / L, a warp's at 32 / L) read one group's B / C
  // rows; the tile copies are cp.async (sm_80 and later).
  const int64_t channels_per_group = plan.channels / p.ngroups;
  // kRecurrentDirect forces the direct walk (benchmarks compare the two in one process).
  plan.staged = G == 1 && p.a_is_per_state && (p.ngroups == 1 || channels_per_group % 32 == 0) &&
                p.algorithm != ScanAlgorithm::kRecurrentDirect && current_device_cc_major() >= 8;
  if (p.lanes_per_channel > 1 && !plan.staged) lanes_need_staging();
  if (plan.staged) {
    // The fewest lanes that give one pass (every SM kStagedSplit's blocks). With none: one lane
    // and the chunked plan where the split makes more pieces than sequences, else (many short
    // sequences) the most lanes, in one pass.
    int lanes = p.lanes_per_channel;
    auto blocks_at = [&](int l) { return ceil_div(plan.channels, kStagedThreads / l); };
    if (lanes == 0) {
      lanes = 1;
      if (p.split_len == 0) {
        bool filled = false;
        for (int l = 1; l <= kMaxAutoLanes && !filled; l *= 2) {
          filled = p.batch * blocks_at(l) >= kStagedSplit.min_blocks_per_sm * sms;
          if (filled) lanes = l;
        }
        if (!filled) {
          ScanPlan one_lane = plan;
          plan_split(p, blocks_at(1), sms, kStagedSplit, one_lane);
          if (!one_lane.flat) lanes = kMaxAutoLanes;
        }
      }
    }
    plan.group_threads = lanes;
  }
  plan.channel_blocks = ceil_div(plan.channels, (plan.staged ? kStagedThreads : kScanThreads) /
                                                    plan.group_threads);
  plan_split(p, plan.channel_blocks, sms, plan.staged ? kStagedSplit : kRecurrentSplit, plan);
  plan.bc_vec = p.dstate % kStates == 0 && p.B_group_stride % per_pack == 0 &&
                p.C_group_stride % per_pack == 0 &&
                packs_aligned(p.B, p.B_token_stride, p.B_batch_stride) &&
                packs_aligned(p.C, p.C_token_stride, p.C_batch_stride);
  // A warp's channels of u, delta (one per channel: headdim 1) and z then start aligned to a
  // copy piece for every token: a warp's first channel is a multiple of 32 / L channels, whole
  // 16-byte packs or (16-bit inputs at 8 lanes) one 8-byte piece (ScanTraits' kWarpChannels
  // assertion).
  plan.own_vec = plan.staged && p.headdim == 1 &&
                 packs_aligned(p.u, p.u_token_stride, p.u_batch_stride) &&
                 packs_aligned(p.delta, p.delta_token_stride, p.delta_batch_stride) &&
                 packs_aligned(p.z, p.z_token_stride, p.z_batch_stride);
  return plan;
}

void launch_combine(const SelectiveScanParams& p, const ScanPlan& plan, cudaStream_t stream) {
  const int64_t elems = plan.channels * p.dstate;
  if (ceil_div(elems, 256) > 0x7fffffff) {
    throw std::runtime_error("tpssm selective_scan: too many states for one combine launch");
  }
  chunk_combine_kernel<<<static_cast<unsigned>(ceil_div(elems, 256)), 256, 0, stream>>>(
      p, plan, p.a_is_per_state);
  TPSSM_CHECK_LAUNCH("chunk_combine_kernel");
}

void launch_ssd(const SelectiveScanParams& p, const ScanPlan& plan, cudaStream_t stream) {
  if (plan.flat) {
    launch_ssd_pass(p, plan, /*state_pass=*/true, stream);
    launch_combine(p, plan, stream);
  }
  launch_ssd_pass(p, plan, /*state_pass=*/false, stream);
}

template <typename Traits>
void launch_scan(const SelectiveScanParams& p, ScanPlan plan, cudaStream_t stream) {
  if (plan.channel_blocks > 65535) {
    throw std::runtime_error("tpssm selective_scan: too many channels for one launch");
  }
  if (plan.flat && plan.num_chunks > 0x7fffffff) {
    throw std::runtime_error("tpssm selective_scan: too many pieces for one launch");
  }
  // The staged walk's tile buffers (under the 48 KB a block gets without opting in).
  size_t smem = 0;
  if constexpr (Traits::kStaged) smem = StagedLayout<Traits>::kBlockBytes;
  if (plan.flat) {
    dim3 grid(static_cast<unsigned>(plan.num_chunks), static_cast<unsigned>(plan.channel_blocks));
    chunk_state_kernel<Traits><<<grid, Traits::kThreads, smem, stream>>>(p, plan);
    TPSSM_CHECK_LAUNCH("chunk_state_kernel");
    launch_combine(p, plan, stream);
    scan_output_kernel<Traits><<<grid, Traits::kThreads, smem, stream>>>(p, plan);
    TPSSM_CHECK_LAUNCH("scan_output_kernel");
  } else {
    if (p.batch > 0x7fffffff) throw std::runtime_error("tpssm selective_scan: batch too large");
    dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(plan.channel_blocks));
    scan_output_kernel<Traits><<<grid, Traits::kThreads, smem, stream>>>(p, plan);
    TPSSM_CHECK_LAUNCH("scan_output_kernel");
  }
}

void run_with_plan(const SelectiveScanParams& p, ScanPlan plan, cudaStream_t stream) {
  if (plan.ssd) {
    launch_ssd(p, plan, stream);
    return;
  }
  TPSSM_DTYPE_SWITCH(p.act_dtype, input_t, [&] {
    TPSSM_STATE_DTYPE_SWITCH(p.state_dtype, p.act_dtype, input_t, state_t, [&] {
      if (p.a_is_per_state) {
        if (!plan.staged) {
          launch_scan<ScanTraits<input_t, state_t, true, false>>(p, plan, stream);
        } else if (plan.group_threads == 1) {
          launch_scan<ScanTraits<input_t, state_t, true, true, 1>>(p, plan, stream);
        } else if (plan.group_threads == 2) {
          launch_scan<ScanTraits<input_t, state_t, true, true, 2>>(p, plan, stream);
        } else if (plan.group_threads == 4) {
          launch_scan<ScanTraits<input_t, state_t, true, true, 4>>(p, plan, stream);
        } else {
          launch_scan<ScanTraits<input_t, state_t, true, true, 8>>(p, plan, stream);
        }
      } else {
        launch_scan<ScanTraits<input_t, state_t, false, false>>(p, plan, stream);
      }
    });
  });
}

bool scan_is_empty(const SelectiveScanParams& p) {
  return p.batch == 0 || p.nheads == 0 || p.headdim == 0;
}

}  // namespace

ScanPlan plan_selective_scan(const SelectiveScanParams& p) {
  if (scan_is_empty(p)) return ScanPlan{};
  ScanPlan plan = make_plan(p);
  plan.workspace_bytes = workspace_layout(p, plan).total;
  return plan;
}

void run_selective_scan(const SelectiveScanParams& p, const ScanPlan& built, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  if (scan_is_empty(p)) return;
  if (static_cast<size_t>(built.workspace_bytes) > workspace_bytes ||
      (built.workspace_bytes > 0 && !workspace)) {
    throw std::runtime_error("tpssm selective_scan: workspace of " +
                             std::to_string(workspace_bytes) + " bytes, the plan needs " +
                             std::to_string(built.workspace_bytes));
  }
  ScanPlan plan = built;
  if (plan.flat) {
    const WorkspaceLayout layout = workspace_layout(p, plan);
    char* base = static_cast<char*>(workspace);
    plan.ws_S = reinterpret_cast<float*>(base + layout.S);
    plan.ws_I = reinterpret_cast<float*>(base + layout.I);
    plan.ws_P = reinterpret_cast<float*>(base + layout.P);
    plan.ws_flags = reinterpret_cast<int32_t*>(base + layout.flags);
  }
  run_with_plan(p, plan, stream);
}

void run_selective_scan(const SelectiveScanParams& p, cudaStream_t stream) {
  const ScanPlan plan = plan_selective_scan(p);
  const size_t bytes = static_cast<size_t>(plan.workspace_bytes);
  if (bytes == 0) {
    run_selective_scan(p, plan, nullptr, 0, stream);
    return;
  }
  // Stream-ordered allocation keeps this capturable and sync-free; the torch binding passes a
  // workspace from torch's caching allocator instead.
  void* workspace = nullptr;
  TPSSM_CUDA_CHECK(cudaMallocAsync(&workspace, bytes, stream));
  try {
    run_selective_scan(p, plan, workspace, bytes, stream);
  } catch (...) {
    cudaFreeAsync(workspace, stream);
    throw;
  }
  TPSSM_CUDA_CHECK(cudaFreeAsync(workspace, stream));
}

}  // namespace tpssm
