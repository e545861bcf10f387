// Depthwise causal conv1d over token-major activations: the prefill kernel (dense and varlen,
// initial / final state through slots) and the decode update kernel (state updated in place).
//
// Prefill: many short-lived, low-register blocks. A block owns kTileChannels channels of a chunk
// of the flattened token range and walks it in tiles of kTileTokens tokens. Each tile, plus the
// width-1 token halo before it, is loaded with 16-byte loads (scalar where alignment forbids)
// into a shared tile; every thread then computes one channel over the tile's tokens from shared
// memory, writing each result over the input it no longer needs, and the tile is stored back with
// 16-byte stores. Loads of the whole tile are in flight at once, and a block holds ~40 registers,
// so a dozen blocks share an SM and hide each other's load / compute / store phases. A tile may
// straddle sequence boundaries: the window restarts at each sequence start (from the slot's conv
// state or zeros), and rows of padded sequences or of no sequence are not stored. Final states are
// written by a second small kernel: the tile holding a sequence start reads the initial state
// from the slot, and a write from the tile holding the sequence end would race with that read.
//
// Decode update: a thread owns one batch row and kVec adjacent channels (16-byte accesses of x and
// out; the conv-state rows of those channels are one contiguous run of 16-byte loads when the
// state is laid out (slots, dim, width-1)). A block holds several batch rows of the same channels
// and stages their weights and bias in shared memory once.
#include "kernel_utils.cuh"
#include "mma_sm80.cuh"
#include "ssm_kernels.h"
#include "static_switch.h"

namespace tpssm {
namespace {

// ---------------------------------------------------------------------------------------------
// Prefill

// One sequence's part of a tile, for the compute phase: token rows [lo, hi) of the tile (0 =
// its first token), how many of the window's width-1 earlier inputs lie inside the sequence
// (the halo rows before lo), and where the slot's state starts (-1: zeros before the sequence).
struct alignas(16) ConvSegment {
  int16_t lo, hi;
  int32_t avail;
  int64_t state_off;
};
static_assert(sizeof(ConvSegment) == 16, "one 16-byte shared-memory load per segment");

// The per-tile tables in static shared memory, next to the tile.
template <int kRows, int kTokens>
struct ConvTileTables {
  int64_t x_off[kRows];        // element offset of tile row r in x; -1: before token 0
  int64_t out_off[kTokens];    // element offset of token row r (tile row r + width-1) in out
  ConvSegment segs[kTokens];   // the segments of the tile, in token order
  uint64_t store_mask;         // bit r: token row r belongs to a segment (is stored)
  int num_segs;
};

template <typename input_t_, int kWidth_, int kVec_>
struct ConvTileTraits {
  using input_t = input_t_;
  static constexpr int kWidth = kWidth_;
  // Channels per global access in the load and store phases: 16 bytes, or 1 when dim, strides or
  // pointers do not allow 16-byte access.
  static constexpr int kVec = kVec_;
  static constexpr int kThreads = 128;
  // One channel per thread in the compute phase: a warp reads 32 adjacent channels of one token
  // row, consecutive shared-memory words, so the tile needs no padding against bank conflicts
  // (the 16-byte phases also walk along rows).
  static constexpr int kTileChannels = kThreads;
  // ~16 KB of inputs per tile (64 tokens of 16-bit, 32 of fp32): about a dozen blocks per SM by
  // shared memory (228 KB on sm_90), each with a whole tile of loads in flight, far more than the
  // ~20-30 KB per SM that Little's law asks of HBM3 (bandwidth x latency / SMs, derived). The
  // halo re-read costs (width-1)/kTileTokens of the input, mostly L2 hits. Tile size not yet
  // measured against 32 / 128 tokens.
  static constexpr int kTileTokens =
      16 * 1024 / (kTileChannels * static_cast<int>(sizeof(input_t)));
  static constexpr int kTileRows = kTileTokens + kWidth - 1;
  static constexpr int kChunksPerRow = kTileChannels / kVec;
  // Rows that one pass of 16-byte accesses by the block covers.
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static constexpr int kTileBytes = kTileRows * kTileChannels * static_cast<int>(sizeof(input_t));
  using Tables = ConvTileTables<kTileRows, kTileTokens>;
  // Blocks per SM that shared memory allows on sm_90 (228 KB per SM, 1 KB reserved per block):
  // the register cap (65536 / (11 * 128) -> 40 per thread) that keeps them all resident. fp32
  // takes 10 (48 registers): its IEEE division in silu spills under a cap of 40 (ptxas, sm_90).
  static constexpr int kMinBlocksPerSm = sizeof(input_t) == 4 ? 10 : 11;
  static_assert(kWidth >= 2 && kWidth <= 4, "conv width must be 2..4");
  static_assert(kVec == 1 || kVec * sizeof(input_t) == 16, "kVec must fill 16 bytes or be 1");
  static_assert(kThreads % 32 == 0, "whole warps");
  static_assert(kTileChannels % kVec == 0 && kThreads % kChunksPerRow == 0,
                "a pass of 16-byte accesses covers whole tile rows");
  static_assert(kTileTokens >= 1 && kTileTokens <= 64, "the store mask is one 64-bit word");
  static_assert(kTileRows <= kThreads, "one thread per tile row builds the row table");
  static_assert(kTileChannels * sizeof(input_t) % 16 == 0, "tile rows stay 16-byte aligned");
  static_assert(kTileBytes <= 48 * 1024, "no opt-in shared-memory limit needed");
  static_assert(kMinBlocksPerSm * kThreads <= 1536, "resident threads per SM (sm_86: 1536)");
  static_assert(kMinBlocksPerSm * (kTileBytes + sizeof(Tables) + 1024) <= 228 * 1024,
                "the register cap does not ask for more blocks than shared memory holds");
};

// The launch plan of the prefill kernel (host-computed, passed by value).
struct ConvTilePlan {
  int64_t total_tokens;
  int64_t chunk_len;        // tokens per block, walked in tiles of kTileTokens
  uint32_t channel_tiles;   // blocks along the channels; blockIdx.x = chunk * channel_tiles + tile
  bool index32;             // total_tokens < 2^31: dense token -> row division in 32 bits
};

// The dense batch row of flat token `flat`.
__device__ __forceinline__ int64_t dense_row_of(int64_t flat, int64_t seqlen, bool index32) {
  return index32 ? static_cast<int64_t>(static_cast<uint32_t>(flat) / static_cast<uint32_t>(seqlen))
                 : flat / seqlen;
}

// The segments of the sequences that tile [t0, t0 + num_tokens) meets, in order, skipping
// empty ones and padded rows (slot == pad_slot_id, or out of range when there are states: an
// out-of-range slot cannot be validated without a host sync, so the row is skipped rather than
// touch memory outside the pool). `window` = width - 1. Returns the count; bit r of *store_mask
// marks the token rows that are computed and stored. Well-formed sequences are disjoint, so
// there are at most max_segments (= the tile's tokens); overlapping malformed ones are cut off
// there (their results are unspecified, their accesses in bounds).
__device__ int build_segments(const CausalConv1dParams& p, const ConvTilePlan& plan, int64_t t0,
                              int num_tokens, int window, ConvSegment* segs, int max_segments,
                              uint64_t* store_mask) {
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};
  const int64_t t1 = t0 + num_tokens;
  int n = 0;
  uint64_t mask = 0;
  int64_t b = p.query_start_loc ? seqs.seq_of(t0) : dense_row_of(t0, p.seqlen, plan.index32);
  for (; b < p.batch && n < max_segments; ++b) {
    const int64_t seq_begin = seqs.begin(b);
    if (seq_begin >= t1) break;
    const int64_t seq_end = seqs.end(b);
    if (seq_end <= t0 || seq_end <= seq_begin) continue;
    const int64_t slot = p.cache_indices ? p.cache_indices[b] : b;
    if (p.cache_indices && slot == p.pad_slot_id) continue;
    if (p.conv_states && (slot < 0 || slot >= p.num_slots)) continue;
    const bool initial = p.conv_states && p.has_initial_state && p.has_initial_state[b];
    ConvSegment seg;
    seg.lo = static_cast<int16_t>(max(seq_begin - t0, int64_t{0}));
    seg.hi = static_cast<int16_t>(min(seq_end - t0, int64_t{num_tokens}));
    seg.avail = static_cast<int32_t>(min(max(t0 - seq_begin, int64_t{0}), int64_t{window}));
    seg.state_off = initial ? slot * p.conv_states_slot_stride : -1;
    segs[n++] = seg;
    mask |= (seg.hi == 64 ? ~uint64_t{0} : (uint64_t{1} << seg.hi) - 1) &
            ~((uint64_t{1} << seg.lo) - 1);
  }
  *store_mask = mask;
  return n;
}

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
void causal_conv1d_tile_kernel(CausalConv1dParams p, ConvTilePlan plan) {
  using input_t = typename Traits::input_t;
  constexpr int kW = Traits::kWidth;
  constexpr int kV = Traits::kVec;
  constexpr int kTokens = Traits::kTileTokens;
  constexpr int kRows = Traits::kTileRows;
  constexpr int kRowStep = Traits::kRowStep;
  constexpr int kPasses = (kRows + kRowStep - 1) / kRowStep;
  constexpr int kRowBytes = Traits::kTileChannels * sizeof(input_t);

  // Row r of the tile holds flat token t0 - (kW-1) + r; results overwrite rows kW-1 .. . In
  // dynamic shared memory: cp.async addresses it there.
  auto s_tile = reinterpret_cast<input_t (*)[Traits::kTileChannels]>(dynamic_smem());
  __shared__ typename Traits::Tables s_tab;
  int64_t* s_x_off = s_tab.x_off;
  int64_t* s_out_off = s_tab.out_off;

  const int tid = threadIdx.x;
  const uint32_t tile_c = blockIdx.x % plan.channel_tiles;
  const int64_t chunk = blockIdx.x / plan.channel_tiles;
  // dim fits int32 (the binding checks it): channel indices are 32-bit.
  const int c_base = static_cast<int>(tile_c) * Traits::kTileChannels;
  const int c = c_base + tid;  // this thread's channel in the compute phase
  const bool active = c < p.dim;
  // The channels of this thread's 16-byte accesses in the load / store phases.
  const int col = tid % Traits::kChunksPerRow;
  const int row0 = tid / Traits::kChunksPerRow;
  const int c_vec = c_base + col * kV;
  const bool vec_active = c_vec < p.dim;

  float w[kW];
  float bias = 0.f;
  if (active) {
    const input_t* weight = static_cast<const input_t*>(p.weight) + c * p.weight_channel_stride;
#pragma unroll
    for (int k = 0; k < kW; ++k) w[k] = to_float(weight[k * p.weight_width_stride]);
    if (p.bias) bias = to_float(static_cast<const input_t*>(p.bias)[c]);
  }

  const input_t* x = static_cast<const input_t*>(p.x);
  input_t* out = static_cast<input_t*>(p.out);
  const input_t* conv_states = static_cast<const input_t*>(p.conv_states);
  // 16-bit results are rounded right after: the fast division's 2 ulp do not show.
  constexpr bool kFastSilu = sizeof(input_t) == 2;

  const int64_t chunk_begin = chunk * plan.chunk_len;
  const int64_t chunk_end = min(chunk_begin + plan.chunk_len, plan.total_tokens);
  for (int64_t t0 = chunk_begin; t0 < chunk_end; t0 += kTokens) {
    const int num_tokens = static_cast<int>(min(chunk_end - t0, int64_t{kTokens}));
    const int num_rows = num_tokens + kW - 1;

    // Phase 0: per-row offsets, one dense row division per row instead of one per access.
    if (tid < num_rows) {
      const int64_t flat = t0 - (kW - 1) + tid;
      int64_t x_off = -1, out_off = 0;
      if (flat >= 0) {
        if (p.query_start_loc) {
          x_off = flat * p.x_token_stride;
          out_off = flat * p.out_token_stride;
        } else {
          const int64_t b = dense_row_of(flat, p.seqlen, plan.index32);
          const int64_t t = flat - b * p.seqlen;
          x_off = b * p.x_batch_stride + t * p.x_token_stride;
          out_off = b * p.out_batch_stride + t * p.out_token_stride;
        }
      }
      s_x_off[tid] = x_off;
      if (tid >= kW - 1) s_out_off[tid - (kW - 1)] = out_off;
    }
    __syncthreads();

    // Phase 1: the tile and its halo. 16-byte rows go global -> shared without registers, so
    // the whole tile's loads are in flight at once; meanwhile thread 0 lists the segments.
    if constexpr (kV > 1) {
      if (vec_active) {
        const uint32_t base = smem_address(&s_tile[row0][col * kV]);
#pragma unroll 3
        for (int i = 0; i < kPasses; ++i) {
          const int r = row0 + i * kRowStep;
          if (r < num_rows) {
            const int64_t off = s_x_off[r];
            if (off >= 0) cp_async_16(base + i * kRowStep * kRowBytes, x + off + c_vec, true);
          }
        }
      }
    } else {
      if (active) {
        // Groups of kScalarBatch loads in flight: a whole tile's would take a register each.
        constexpr int kScalarBatch = 4;
        for (int r0 = 0; r0 < num_rows; r0 += kScalarBatch) {
          input_t vals[kScalarBatch];
#pragma unroll
          for (int i = 0; i < kScalarBatch; ++i) {
            const int r = r0 + i;
            if (r < num_rows && s_x_off[r] >= 0) vals[i] = x[s_x_off[r] + c];
          }
#pragma unroll
          for (int i = 0; i < kScalarBatch; ++i) {
            const int r = r0 + i;
            if (r < num_rows && s_x_off[r] >= 0) s_tile[r][tid] = vals[i];
          }
        }
      }
    }
    if (tid == 0) {
      uint64_t mask;
      s_tab.num_segs = build_segments(p, plan, t0, num_tokens, kW - 1, s_tab.segs, kTokens, &mask);
      s_tab.store_mask = mask;
    }
    if constexpr (kV > 1) cp_async_wait_all();
    __syncthreads();

    // Phase 2: each thread computes its channel over the segments, from shared memory, writing
    // each result over the input it no longer needs (row r is read before it is written, and
    // the rows before a segment are read first, into the window).
    if (active) {
      const int num_segs = s_tab.num_segs;
      for (int i = 0; i < num_segs; ++i) {
        const ConvSegment seg = s_tab.segs[i];
        float win[kW - 1];  // inputs of tokens lo - (kW-1) .. lo - 1 = tile rows lo .. lo+kW-2
#pragma unroll
        for (int k = 0; k < kW - 1; ++k) {
          if (k >= kW - 1 - seg.avail) {
            win[k] = to_float(s_tile[seg.lo + k][tid]);
          } else if (seg.state_off >= 0) {
            win[k] = to_float(conv_states[seg.state_off +
                                          static_cast<int64_t>(c) * p.conv_states_channel_stride +
                                          (k + seg.avail) * p.conv_states_width_stride]);
          } else {
            win[k] = 0.f;
          }
        }
        for (int r = seg.lo + kW - 1; r < seg.hi + kW - 1; ++r) {
          const float xv = to_float(s_tile[r][tid]);
          float a = bias;
#pragma unroll
          for (int k = 0; k < kW - 1; ++k) a = fmaf(w[k], win[k], a);
          a = fmaf(w[kW - 1], xv, a);
          if (p.silu) a = kFastSilu ? silu_fast(a) : silu(a);
          s_tile[r][tid] = from_float<input_t>(a);
#pragma unroll
          for (int k = 0; k < kW - 2; ++k) win[k] = win[k + 1];
          win[kW - 2] = xv;
        }
      }
    }
    __syncthreads();

    // Phase 3: the results of stored rows, 16 bytes at a time.
    const uint64_t mask = s_tab.store_mask;
    if constexpr (kV > 1) {
      if (vec_active) {
#pragma unroll 2
        for (int i = 0; i < (kTokens + kRowStep - 1) / kRowStep; ++i) {
          const int r = row0 + i * kRowStep;
          if (r < num_tokens && ((mask >> r) & 1)) {
            store_pack<input_t, kV>(out + s_out_off[r] + c_vec,
                                    load_pack<input_t, kV>(&s_tile[r + kW - 1][col * kV]));
          }
        }
      }
    } else {
      if (active) {
#pragma unroll 8
        for (int r = 0; r < num_tokens; ++r) {
          if ((mask >> r) & 1) out[s_out_off[r] + c] = s_tile[r + kW - 1][tid];
        }
      }
    }
    if (t0 + kTokens < chunk_end) __syncthreads();  // the next tile reuses the shared arrays
  }
}

// Final conv state of every non-padded sequence: the last width-1 inputs of (state ++ x). Runs
// after the prefill kernel, which is the only reader of the initial states.
template <typename input_t, int kWidth>
__global__ __launch_bounds__(128) void causal_conv1d_final_state_kernel(CausalConv1dParams p) {
  const int64_t b = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  const int64_t slot = p.cache_indices ? p.cache_indices[b] : b;
  if (p.cache_indices && slot == p.pad_slot_id) return;
  if (slot < 0 || slot >= p.num_slots) return;
  const bool initial = p.has_initial_state && p.has_initial_state[b];
  const SeqView seqs{p.query_start_loc, p.batch, p.seqlen};
  const int64_t seq_begin = seqs.begin(b);
  const int64_t seq_end = seqs.end(b);
  const int64_t len = seq_end - seq_begin;
  const input_t* x = static_cast<const input_t*>(p.x) + seqs.batch_offset(b, p.x_batch_stride) + c;
  input_t* st = static_cast<input_t*>(p.conv_states) + slot * p.conv_states_slot_stride +
                c * p.conv_states_channel_stride;
  // Read everything before writing: short sequences shift old state columns into new places.
  input_t vals[kWidth - 1];
#pragma unroll
  for (int j = 0; j < kWidth - 1; ++j) {
    const int64_t pos = seq_end - (kWidth - 1) + j;
    if (pos >= seq_begin) {
      vals[j] = x[seqs.addr_token(b, pos) * p.x_token_stride];
    } else {
      vals[j] = initial ? st[(len + j) * p.conv_states_width_stride] : from_float<input_t>(0.f);
    }
  }
#pragma unroll
  for (int j = 0; j < kWidth - 1; ++j) st[j * p.conv_states_width_stride] = vals[j];
}

template <typename input_t, int kWidth, int kVec>
void launch_causal_conv1d_tiles(const CausalConv1dParams& p, int64_t total_tokens,
                                cudaStream_t stream) {
  using Traits = ConvTileTraits<input_t, kWidth, kVec>;
  constexpr int64_t kMaxBlocks = 0x7fffffff;  // grid.x limit
  const int64_t channel_tiles = ceil_div(p.dim, Traits::kTileChannels);
  const int64_t max_chunks = kMaxBlocks / channel_tiles;
  int64_t chunk_len = p.chunk_len;
  if (chunk_len == 0) {
    // One tile per block; more only when the grid would exceed its limit.
    chunk_len = Traits::kTileTokens *
                ceil_div(ceil_div(total_tokens, Traits::kTileTokens), max_chunks);
  }
  const int64_t num_chunks = ceil_div(total_tokens, chunk_len);
  if (num_chunks > max_chunks) {
    throw std::runtime_error("tpssm causal_conv1d: chunk_len = " + std::to_string(chunk_len) +
                             " needs more than 2^31-1 blocks for this input; use a larger "
                             "chunk_len or 0");
  }
  ConvTilePlan plan;
  plan.total_tokens = total_tokens;
  plan.chunk_len = chunk_len;
  plan.channel_tiles = static_cast<uint32_t>(channel_tiles);
  plan.index32 = total_tokens <= 0x7fffffff;
  const dim3 grid(static_cast<unsigned>(num_chunks * channel_tiles));
  causal_conv1d_tile_kernel<Traits>
      <<<grid, Traits::kThreads, Traits::kTileBytes, stream>>>(p, plan);
  TPSSM_CHECK_LAUNCH("causal_conv1d_tile_kernel");
}

// ---------------------------------------------------------------------------------------------
// Decode update

template <typename input_t_, int kWidth_, int kVec_>
struct ConvUpdateTraits {
  using input_t = input_t_;
  static constexpr int kWidth = kWidth_;
  static constexpr int kVec = kVec_;  // channels per thread: 16 bytes, or 1 (scalar fallback)
  static constexpr int kThreads = 128;
  // A warp per batch row: its 32 threads cover 32 adjacent channel groups, so x / out accesses
  // of a warp are contiguous and the state runs of a warp are one contiguous range. Four rows
  // share one staging of the weights (not yet measured against 2 or 8).
  static constexpr int kRowsPerBlock = kThreads / 32;
  static constexpr int kGroups = 32;
  static constexpr int kChannels = kGroups * kVec;  // channels per block
  // A decode step is a few microseconds of dependent loads (slot, then state): residency is
  // what hides them. 6 blocks (80 registers) is the most the 16-byte width-4 kernel takes
  // without spilling (ptxas, sm_90; a cap of 8 spills): a batch of 256 rows x 5120 bf16
  // channels (1280 blocks) is then ~1.6 waves on 132 SMs (derived). Not yet measured.
  static constexpr int kMinBlocksPerSm = 6;
  static_assert(kWidth >= 2 && kWidth <= 4, "conv width must be 2..4");
  static_assert(kVec == 1 || kVec * sizeof(input_t) == 16, "kVec must fill 16 bytes or be 1");
  static_assert(kGroups == 32 && kRowsPerBlock * kGroups == kThreads,
                "a warp per row: threads = rows x 32 channel groups");
  static_assert(kMinBlocksPerSm * kThreads <= 1536, "resident threads per SM (sm_86: 1536)");
};

struct ConvUpdatePlan {
  uint32_t channel_blocks;  // blockIdx.x = row block * channel_blocks + channel block
  // conv_state is (slots, dim, width-1) with the last two dims contiguous and 16-byte aligned
  // slots: a thread's kVec channels are (width-1) contiguous 16-byte packs.
  bool state_vec;
};

// store_pack for a 16-byte pack, a plain store for one element (the scalar instantiation
// compiles the 16-byte branch too).
template <typename T, int kN>
__device__ __forceinline__ void store_pack_any(T* ptr, const Pack<T, kN>& pack) {
  if constexpr (kN == 1) {
    ptr[0] = pack.elems[0];
  } else {
    store_pack<T, kN>(ptr, pack);
  }
}

template <typename Traits>
__global__ __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
void causal_conv1d_update_kernel(CausalConv1dUpdateParams p, ConvUpdatePlan plan) {
  using input_t = typename Traits::input_t;
  constexpr int kW = Traits::kWidth;
  constexpr int kV = Traits::kVec;
  constexpr int kGroups = Traits::kGroups;
  using pack_t = Pack<input_t, kV>;

  // Weights and bias of the block's channels in their own dtype (exact), one pack per channel
  // group and tap: a thread reads its group's with kW + 1 conflict-free 16-byte loads.
  __shared__ pack_t s_w[kW][kGroups];
  __shared__ pack_t s_bias[kGroups];
  pdl_wait();  // programmatic launch: nothing before it reads memory
  pdl_launch_dependents();

  const int tid = threadIdx.x;
  const uint32_t cblock = blockIdx.x % plan.channel_blocks;
  const int64_t row = static_cast<int64_t>(blockIdx.x / plan.channel_blocks) *
                          Traits::kRowsPerBlock + tid / kGroups;
  // dim fits int32 (the binding checks it): channel indices are 32-bit.
  const int c_block = static_cast<int>(cblock) * Traits::kChannels;
  const int g = tid % kGroups;
  const int c0 = c_block + g * kV;
  const bool active = row < p.batch && c0 < p.dim;

  // The slot index and the first token do not depend on the weights: issue them first.
  int64_t slot = 0;
  pack_t x_first;
  const input_t* x = static_cast<const input_t*>(p.x) + row * p.x_batch_stride + c0;
  if (active) {
    slot = p.cache_indices ? p.cache_indices[row] : row;
    x_first = load_pack<input_t, kV>(x);
  }

  const input_t* weight = static_cast<const input_t*>(p.weight);
  const input_t* bias = static_cast<const input_t*>(p.bias);
  for (int e = tid; e < kW * Traits::kChannels; e += Traits::kThreads) {
    const int ch = e / kW, k = e % kW;  // consecutive threads: consecutive weight elements
    const int cc = c_block + ch;
    s_w[k][ch / kV].elems[ch % kV] =
        cc < p.dim ? weight[static_cast<int64_t>(cc) * p.weight_channel_stride +
                            k * p.weight_width_stride]
                   : from_float<input_t>(0.f);
  }
  for (int ch = tid; ch < Traits::kChannels; ch += Traits::kThreads) {
    const int cc = c_block + ch;
    s_bias[ch / kV].elems[ch % kV] = bias && cc < p.dim ? bias[cc] : from_float<input_t>(0.f);
  }
  __syncthreads();

  if (!active) return;
  if (p.cache_indices && slot == p.pad_slot_id) return;
  if (slot < 0 || slot >= p.num_slots) return;  // out of range: a padded row, nothing written

  // The window of the kV channels, raw: element v * (kW-1) + k is column k of channel v, the
  // order of a (slots, dim, width-1) state, so the 16-byte path moves it as (kW-1) packs. Its
  // values are inputs, exact in input_t.
  input_t* st = static_cast<input_t*>(p.conv_state) + slot * p.conv_state_slot_stride;
  pack_t win[kW - 1];
  bool state_vec = false;
  if constexpr (kV > 1) state_vec = plan.state_vec;
  if (state_vec) {
#pragma unroll
    for (int j = 0; j < kW - 1; ++j) {
      win[j] = load_pack<input_t, kV>(st + static_cast<int64_t>(c0) * (kW - 1) + j * kV);
    }
  } else {
#pragma unroll
    for (int v = 0; v < kV; ++v) {
#pragma unroll
      for (int k = 0; k < kW - 1; ++k) {
        const int e = v * (kW - 1) + k;
        win[e / kV].elems[e % kV] = st[static_cast<int64_t>(c0 + v) * p.conv_state_channel_stride +
                                       k * p.conv_state_width_stride];
      }
    }
  }

  pack_t wp[kW];
#pragma unroll
  for (int k = 0; k < kW; ++k) wp[k] = s_w[k][g];
  const pack_t bp = s_bias[g];

  input_t* out = static_cast<input_t*>(p.out) + row * p.out_batch_stride + c0;
  // Decode steps are mostly one token: the loop stays rolled rather than hold several tokens'
  // registers.
#pragma unroll 1
  for (int64_t t = 0; t < p.seqlen; ++t) {
    const pack_t xp = t == 0 ? x_first : load_pack<input_t, kV>(x + t * p.x_token_stride);
    float res[kV];
#pragma unroll
    for (int v = 0; v < kV; ++v) {
      float a = to_float(bp.elems[v]);
#pragma unroll
      for (int k = 0; k < kW - 1; ++k) {
        const int e = v * (kW - 1) + k;
        a = fmaf(to_float(wp[k].elems[v]), to_float(win[e / kV].elems[e % kV]), a);
      }
      a = fmaf(to_float(wp[kW - 1].elems[v]), to_float(xp.elems[v]), a);
      res[v] = p.silu ? silu(a) : a;
#pragma unroll
      for (int k = 0; k < kW - 2; ++k) {
        const int e = v * (kW - 1) + k;
        win[e / kV].elems[e % kV] = win[(e + 1) / kV].elems[(e + 1) % kV];
      }
      const int last = v * (kW - 1) + kW - 2;
      win[last / kV].elems[last % kV] = xp.elems[v];
    }
    store_vec<input_t, kV>(out + t * p.out_token_stride, res);
  }

  if (state_vec) {
#pragma unroll
    for (int j = 0; j < kW - 1; ++j) {
      store_pack_any<input_t, kV>(st + static_cast<int64_t>(c0) * (kW - 1) + j * kV, win[j]);
    }
  } else {
#pragma unroll
    for (int v = 0; v < kV; ++v) {
#pragma unroll
      for (int k = 0; k < kW - 1; ++k) {
        const int e = v * (kW - 1) + k;
        st[static_cast<int64_t>(c0 + v) * p.conv_state_channel_stride +
           k * p.conv_state_width_stride] = win[e / kV].elems[e % kV];
      }
    }
  }
}

template <typename input_t, int kWidth, int kVec>
void launch_causal_conv1d_update(const CausalConv1dUpdateParams& p, cudaStream_t stream) {
  using Traits = ConvUpdateTraits<input_t, kWidth, kVec>;
  const int64_t channel_blocks = ceil_div(p.dim, Traits::kChannels);
  const int64_t row_blocks = ceil_div(p.batch, Traits::kRowsPerBlock);
  if (row_blocks > 0x7fffffff / channel_blocks) {
    throw std::runtime_error("tpssm causal_conv1d_update: batch x dim too large for one grid");
  }
  ConvUpdatePlan plan;
  plan.channel_blocks = static_cast<uint32_t>(channel_blocks);
  plan.state_vec = kVec > 1 && p.conv_state_width_stride == 1 &&
                   p.conv_state_channel_stride == kWidth - 1 &&
                   p.conv_state_slot_stride % kVec == 0 && is_aligned(p.conv_state, 16);
  const dim3 grid(static_cast<unsigned>(row_blocks * channel_blocks));
  launch_programmatic(causal_conv1d_update_kernel<Traits>, grid, dim3(Traits::kThreads), 0,
                      stream, "causal_conv1d_update_kernel", p, plan);
}

}  // namespace

void run_causal_conv1d(const CausalConv1dParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return;
  const int64_t total_tokens = p.query_start_loc ? p.seqlen : p.batch * p.seqlen;
  TPSSM_DTYPE_SWITCH(p.dtype, input_t, [&] {
    TPSSM_WIDTH_SWITCH(p.width, kWidth, [&] {
      if (total_tokens > 0) {
        constexpr int kVecFull = 16 / sizeof(input_t);
        // The 16-byte path loads with cp.async (sm_80 and later).
        const bool vec_ok = current_device_cc_major() >= 8 && p.dim % kVecFull == 0 &&
                            is_aligned(p.x, 16) &&
                            is_aligned(p.out, 16) && p.x_token_stride % kVecFull == 0 &&
                            p.out_token_stride % kVecFull == 0 &&
                            (p.query_start_loc != nullptr ||
                             (p.x_batch_stride % kVecFull == 0 &&
                              p.out_batch_stride % kVecFull == 0));
        if (vec_ok) {
          launch_causal_conv1d_tiles<input_t, kWidth, kVecFull>(p, total_tokens, stream);
        } else {
          launch_causal_conv1d_tiles<input_t, kWidth, 1>(p, total_tokens, stream);
        }
      }
      if (p.conv_states) {
        const int64_t channel_blocks = ceil_div(p.dim, 128);
        if (p.batch > 0x7fffffff || channel_blocks > 65535) {
          throw std::runtime_error("tpssm causal_conv1d: batch or dim too large");
        }
        dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(channel_blocks));
        causal_conv1d_final_state_kernel<input_t, kWidth><<<grid, 128, 0, stream>>>(p);
        TPSSM_CHECK_LAUNCH("causal_conv1d_final_state_kernel");
      }
    });
  });
}

void run_causal_conv1d_update(const CausalConv1dUpdateParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.dim == 0) return;
  TPSSM_DTYPE_SWITCH(p.dtype, input_t, [&] {
    TPSSM_WIDTH_SWITCH(p.width, kWidth, [&] {
      constexpr int kVecFull = 16 / sizeof(input_t);
      const bool vec_ok = p.dim % kVecFull == 0 && is_aligned(p.x, 16) && is_aligned(p.out, 16) &&
                          p.x_batch_stride % kVecFull == 0 && p.out_batch_stride % kVecFull == 0 &&
                          p.x_token_stride % kVecFull == 0 && p.out_token_stride % kVecFull == 0;
      if (vec_ok) {
        launch_causal_conv1d_update<input_t, kWidth, kVecFull>(p, stream);
      } else {
        launch_causal_conv1d_update<input_t, kWidth, 1>(p, stream);
      }
    });
  });
}

}  // namespace tpssm
