// The decode-sized projection: out (M, N) = x (M, K) . weight (N, K)^T (+ bias) for M <= 8 token
// rows. At decode a projection reads its whole weight for a handful of tokens, so its time is the
// weight's bytes over the memory bandwidth plus a launch. This kernel sizes its split of K and
// its rows a block from N and K (bench_projections.py times it against cuBLAS), reads each
// weight byte once, and keeps the weight out of L1 so that the activations every block re-reads
// stay there.
//
// A block's 8 warps form groups of warps_per_row warps; a group owns kR weight rows and deals
// their K range to its lanes in 16-byte chunks (element by element on the scalar path). A lane
// keeps kR x kM fp32 partial sums and has kR x kU weight chunks in flight per step. The sums are
// reduced by shuffles in each warp, then across the group's warps through shared memory in a
// fixed order; one thread per (row, token) adds the bias and stores the result, rounded once.
// kM rounds M up to 1, 2, 4 or 8: the padding rows re-read x's last row and are not stored;
// weight rows past N re-read row N - 1 and are not stored, so every load stays in the tensors.
//
// With a conv epilogue (kConv: p.conv, in_proj of a decode step) the thread that stores a conv
// column also applies the decode conv to it: the column's channel is its own, so in_proj and
// the conv update are one launch. It reads its row's slot before the K loop and the window,
// weights and bias right after it, so their latency overlaps the reductions; the arithmetic is
// causal_conv1d_update's, in its order, on the product rounded to the dtype. A template flag,
// so that the plain projections compile to the code they would have without it.
//
// With a norm prologue (kNorm: p.norm, a decode layer's norm and in_proj in one launch) every
// block normalises x's rows itself into shared memory before the K loop, which then reads them
// there. A row's sum of squares is reduced exactly as add_rms_norm's block would reduce it, so
// the normalised rows, and the product, equal add_rms_norm followed by gemv bit for bit. Each
// block re-reads the rows (a few KB from L2) in exchange for the norm's own launch; block 0
// writes the residual stream, to a buffer of its own since the other blocks still read the old.
#include "gemv_kernels.h"
#include "kernel_utils.cuh"
#include "norm_params.h"
#include "static_switch.h"

namespace tpssm {
namespace {

// The (row, token) a thread stores after the reductions; stores: whether it has one.
struct Finished {
  int m;
  int64_t row;
  bool stores;
};

// A conv column's operands for one (row, token), in fp32 (exact for every dtype, so the window
// goes back to the state unchanged); live: the row has a valid slot (a padded row, pad_slot_id,
// or a slot out of range keeps the plain product).
struct ConvOperands {
  bool live = false;
  float w[4] = {0.f, 0.f, 0.f, 0.f};
  float window[3] = {0.f, 0.f, 0.f};
  float bias = 0.f;
  void* state = nullptr;  // the channel's window in its slot
};

template <typename T>
__device__ __forceinline__ ConvOperands load_conv_operands(const GemvConvParams& cv,
                                                           const Finished& f, int64_t slot) {
  ConvOperands o;
  const int64_t c = f.row - cv.start;
  o.live = f.stores && c >= 0 && c < cv.dim && !(cv.cache_indices && slot == cv.pad_slot_id) &&
           slot >= 0 && slot < cv.num_slots;
  if (!o.live) return o;
  const T* w = static_cast<const T*>(cv.weight) + c * cv.weight_channel_stride;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (k < cv.width) o.w[k] = to_float(w[k * cv.weight_width_stride]);
  }
  if (cv.bias != nullptr) o.bias = to_float(static_cast<const T*>(cv.bias)[c]);
  T* st = static_cast<T*>(cv.state) + slot * cv.state_slot_stride + c * cv.state_channel_stride;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (k < cv.width - 1) o.window[k] = to_float(st[k * cv.state_width_stride]);
  }
  o.state = st;
  return o;
}

// causal_conv1d_update's arithmetic in its order - bias, the window's taps, then the new input
// v (the product rounded to the dtype) - stored at dst; the window shifts by one, v appended.
template <typename T>
__device__ __forceinline__ void apply_conv(const GemvConvParams& cv, const ConvOperands& o, T v,
                                           T* dst) {
  float a = o.bias;
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    if (k < cv.width - 1) a = fmaf(o.w[k], o.window[k], a);
  }
#pragma unroll
  for (int k = 1; k < 4; ++k) {
    if (k == cv.width - 1) a = fmaf(o.w[k], to_float(v), a);
  }
  *dst = from_float<T>(cv.silu ? silu(a) : a);
  T* st = static_cast<T*>(o.state);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    if (k < cv.width - 2) st[k * cv.state_width_stride] = from_float<T>(o.window[k + 1]);
  }
  st[(cv.width - 2) * cv.state_width_stride] = v;
}

// Row m's normalised input h at column i in fp32, add_rms_norm's arithmetic: x, or with a
// residual s = residual + x rounded to the residual's dtype (written to residual_out when
// write_residual), then rounded to the dtype.
template <typename T>
__device__ __forceinline__ float norm_input(const GemvParams& p, int m, int64_t i,
                                            bool write_residual) {
  const GemvNormParams& nm = p.norm;
  const float v = to_float(static_cast<const T*>(p.x)[m * p.x_row_stride + i]);
  if (nm.residual == nullptr) return v;
  const int64_t at = m * nm.residual_row_stride + i;
  const int64_t at_out = m * nm.residual_out_row_stride + i;
  if (nm.residual_fp32) {
    const float s = static_cast<const float*>(nm.residual)[at] + v;
    if (write_residual) static_cast<float*>(nm.residual_out)[at_out] = s;
    return to_float(from_float<T>(s));
  }
  const T s = from_float<T>(to_float(static_cast<const T*>(nm.residual)[at]) + v);
  if (write_residual) static_cast<T*>(nm.residual_out)[at_out] = s;
  return to_float(s);
}

// Bytes of the norm prologue's warp sums at the start of its shared memory (a multiple of 16, so
// that the normalised rows after them keep 16-byte alignment).
constexpr int kNormSumsBytes = kGemvMaxRows * 32 * sizeof(float);

// The norm prologue: xs (rows x K, the dtype) = norm.weight * rms_norm(h) of every row, rounded
// as add_rms_norm rounds. The sum of squares of a row is the one add_rms_norm's block of
// R = norm.reduce_threads threads computes: its thread v sums columns v, v + R, ... in order, each
// warp's sums meet in the same shuffle butterfly and the warp sums add in warp order. This block
// plays those R threads, thread t as v = t, t + blockDim.x, ...: R and blockDim.x are whole warps,
// so every shuffle has its full warp. Block 0 writes the residual stream.
template <typename T>
__device__ void normalise_rows(const GemvParams& p, float* sums, T* xs) {
  const GemvNormParams& nm = p.norm;
  const int64_t K = p.in_features;
  const int R = nm.reduce_threads;
  for (int m = 0; m < p.rows; ++m) {
    for (int v = threadIdx.x; v < R; v += blockDim.x) {
      float ss = 0.f;
      for (int64_t i = v; i < K; i += R) {
        const float h = norm_input<T>(p, m, i, false);
        ss += h * h;
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        ss += __shfl_xor_sync(0xffffffffu, ss, offset);
      }
      if (threadIdx.x % 32 == 0) sums[m * 32 + v / 32] = ss;
    }
  }
  __syncthreads();
  const bool write_residual = nm.residual_out != nullptr && blockIdx.x == 0;
  const T* w = static_cast<const T*>(nm.weight);
  for (int m = 0; m < p.rows; ++m) {
    float total = 0.f;
    for (int k = 0; k < R / 32; ++k) total += sums[m * 32 + k];
    const float inv = rsqrtf(total / static_cast<float>(K) + nm.eps);
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const T normed = from_float<T>(norm_input<T>(p, m, i, write_residual) * inv);
      xs[m * K + i] = from_float<T>(to_float(w[i]) * to_float(normed));
    }
  }
  __syncthreads();
}

template <typename T, int kM, int kR, int kN, bool kConv, bool kNorm>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(GemvParams p, int warps_per_row, bool prefetch) {
  constexpr int kU = kR >= 4 ? 1 : 4 / kR;  // chunks of each row a lane has in flight
  __shared__ float partial[kGemvWarps][kR * kM];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = kGemvWarps / warps_per_row;
  const int group = warp / warps_per_row;
  const int group_lane = (warp % warps_per_row) * 32 + lane;
  const int group_threads = warps_per_row * 32;
  const int64_t block_row0 = static_cast<int64_t>(blockIdx.x) * groups * kR;
  const int64_t last_row = p.out_features - 1;

  const T* wrow[kR];
  const T* xrow[kM];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int64_t row = min(block_row0 + group * kR + r, last_row);
    wrow[r] = static_cast<const T*>(p.weight) + row * p.weight_row_stride;
  }
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const int64_t row = min(static_cast<int64_t>(m), p.rows - 1);
    xrow[m] = static_cast<const T*>(p.x) + row * p.x_row_stride;
  }
  // Under programmatic launch (prefetch) the previous kernel may still be running: the weight
  // rows go into L2 meanwhile (a prefetch returns no data, so it cannot read anything stale).
  if (prefetch) {
    const int64_t row_lines = (p.in_features * static_cast<int64_t>(sizeof(T)) + 127) / 128;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      for (int64_t l = group_lane; l < row_lines; l += group_threads) {
        prefetch_l2(reinterpret_cast<const char*>(wrow[r]) + l * 128);
      }
    }
  }
  pdl_wait();
  pdl_launch_dependents();
  if constexpr (kNorm) {
    unsigned char* smem = dynamic_smem();
    T* xs = reinterpret_cast<T*>(smem + kNormSumsBytes);
    normalise_rows<T>(p, reinterpret_cast<float*>(smem), xs);
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      xrow[m] = xs + min(static_cast<int64_t>(m), p.rows - 1) * p.in_features;
    }
  }

  // The conv epilogue's view of the (row, token) this thread stores after the reductions, if
  // any: thread t takes row t / kM of the block and token t % kM, i.e. t = (g * kR + r) * kM + m.
  // Worked out where it is used, so that only the conv slot stays live across the K loop.
  const auto finished = [&] {
    const int t = threadIdx.x;
    const int64_t row = block_row0 + t / kM;
    return Finished{t % kM, row, t < groups * kR * kM && row <= last_row && t % kM < p.rows};
  };
  const GemvConvParams& cv = p.conv;
  int64_t slot = -1;
  if constexpr (kConv) {
    const Finished f = finished();
    const int64_t c = f.row - cv.start;
    if (f.stores && c >= 0 && c < cv.dim) slot = cv.cache_indices ? cv.cache_indices[f.m] : f.m;
  }

  float acc[kR][kM];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[r][m] = 0.f;
  }
  const int64_t chunks = p.in_features / kN;  // the vector path needs K % kN == 0
  for (int64_t c0 = group_lane; c0 < chunks; c0 += kU * group_threads) {
    Pack<T, kN> wv[kU][kR];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t c = c0 + u * group_threads;
      if (c < chunks) {
#pragma unroll
        for (int r = 0; r < kR; ++r) wv[u][r] = load_pack_streaming<T, kN>(wrow[r] + c * kN);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t c = c0 + u * group_threads;
      if (c < chunks) {
        float wf[kR][kN];
#pragma unroll
        for (int r = 0; r < kR; ++r) {
#pragma unroll
          for (int e = 0; e < kN; ++e) wf[r][e] = to_float(wv[u][r].elems[e]);
        }
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          const Pack<T, kN> xv = load_pack<T, kN>(xrow[m] + c * kN);
#pragma unroll
          for (int e = 0; e < kN; ++e) {
            const float xf = to_float(xv.elems[e]);
#pragma unroll
            for (int r = 0; r < kR; ++r) acc[r][m] = fmaf(wf[r][e], xf, acc[r][m]);
          }
        }
      }
    }
  }

  ConvOperands conv;
  if constexpr (kConv) conv = load_conv_operands<T>(cv, finished(), slot);

#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float v = acc[r][m];
      for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
      }
      if (lane == 0) partial[warp][r * kM + m] = v;
    }
  }
  __syncthreads();
  const int t = threadIdx.x;  // stores (row, token m) as `finished` says
  if (t < groups * kR * kM) {
    const int g = t / (kR * kM), idx = t % (kR * kM);
    const int r = idx / kM, m = idx % kM;
    const int64_t row = block_row0 + g * kR + r;
    if (row <= last_row && m < p.rows) {
      float sum = 0.f;
      for (int i = 0; i < warps_per_row; ++i) sum += partial[g * warps_per_row + i][idx];
      if (p.bias != nullptr) sum += to_float(static_cast<const T*>(p.bias)[row]);
      T* dst = static_cast<T*>(p.out) + m * p.out_row_stride + row;
      if constexpr (kConv) {
        if (conv.live) {
          apply_conv<T>(cv, conv, from_float<T>(sum), dst);
          return;
        }
      }
      *dst = from_float<T>(sum);
    }
  }
}

int elems_per_chunk(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

// The norm prologue's normalised rows live in shared memory, so only the weight's layout and K
// decide the vector path there.
bool vector_path_ok(const GemvParams& p) {
  const int64_t n = elems_per_chunk(p.dtype);
  const int64_t esize = 16 / n;
  const bool x_ok = p.norm.weight != nullptr ||
                    (is_aligned(p.x, 16) && (p.rows <= 1 || (p.x_row_stride * esize) % 16 == 0));
  return p.in_features % n == 0 && x_ok && is_aligned(p.weight, 16) &&
         (p.out_features <= 1 || (p.weight_row_stride * esize) % 16 == 0);
}

// Dynamic shared memory of a launch: the norm prologue's warp sums and normalised rows.
int64_t gemv_smem_bytes(const GemvParams& p) {
  if (p.norm.weight == nullptr) return 0;
  const int64_t esize = p.dtype == DType::kFloat32 ? 4 : 2;
  return kNormSumsBytes + p.rows * p.in_features * esize;
}

template <typename T, int kM, int kR, int kN, bool kConv, bool kNorm>
void launch(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream) {
  constexpr auto kernel = gemv_kernel<T, kM, kR, kN, kConv, kNorm>;
  const int64_t smem = gemv_smem_bytes(p);
  if constexpr (kNorm) {
    // A block's static `partial` counts against the same limits as the dynamic rows.
    constexpr int64_t kStatic = sizeof(float) * kGemvWarps * kR * kM;
    const int64_t most = current_device_max_smem_per_block();
    if (smem + kStatic > most) {
      throw std::runtime_error(
          "tpssm gemv: the norm prologue keeps the " + std::to_string(p.rows) + " x " +
          std::to_string(p.in_features) + " normalised input in shared memory (" +
          std::to_string(smem + kStatic) + " bytes with the block's sums), more than a block of "
          "this device may have (" + std::to_string(most) + ")");
    }
    if (smem + kStatic > 48 * 1024) allow_dynamic_smem<kernel>(static_cast<int>(most - kStatic));
  }
  // The kernel prefetches its weight only when launched programmatically: one decision for both.
  const bool programmatic = programmatic_launch_active(reinterpret_cast<const void*>(kernel));
  launch_kernel(kernel, programmatic, dim3(static_cast<unsigned>(plan.blocks)),
                dim3(kGemvWarps * 32), static_cast<size_t>(smem), stream, "gemv_kernel", p,
                plan.warps_per_row, programmatic);
}

template <typename T, int kM, bool kConv, bool kNorm>
void dispatch_rows(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (!plan.vectorized) {
    launch<T, kM, 1, 1, kConv, kNorm>(p, plan, stream);
  } else if (plan.rows_per_warp == 4) {
    launch<T, kM, 4, kVec, kConv, kNorm>(p, plan, stream);
  } else if (plan.rows_per_warp == 2) {
    launch<T, kM, 2, kVec, kConv, kNorm>(p, plan, stream);
  } else {
    launch<T, kM, 1, kVec, kConv, kNorm>(p, plan, stream);
  }
}

// The prologue and epilogue are template flags: a plain projection compiles to the code it
// would have without them.
template <typename T, int kM>
void dispatch_fusions(const GemvParams& p, const GemvPlan& plan, cudaStream_t stream) {
  const bool conv = p.conv.dim > 0, norm = p.norm.weight != nullptr;
  if (conv && norm) {
    dispatch_rows<T, kM, true, true>(p, plan, stream);
  } else if (conv) {
    dispatch_rows<T, kM, true, false>(p, plan, stream);
  } else if (norm) {
    dispatch_rows<T, kM, false, true>(p, plan, stream);
  } else {
    dispatch_rows<T, kM, false, false>(p, plan, stream);
  }
}

}  // namespace

GemvPlan plan_gemv(const GemvParams& p, int sm_count) {
  // The torch op checks these with its own message; C++ callers get this one.
  if (p.warps_per_row < 0 || p.warps_per_row > kGemvWarps ||
      (p.warps_per_row & (p.warps_per_row - 1)) != 0 || p.rows_per_warp < 0 ||
      p.rows_per_warp > 4 || (p.rows_per_warp & (p.rows_per_warp - 1)) != 0) {
    throw std::runtime_error("tpssm gemv: warps_per_row must be 0, 1, 2, 4 or 8 and "
                             "rows_per_warp 0, 1, 2 or 4");
  }
  GemvPlan plan;
  plan.vectorized = vector_path_ok(p);
  const int64_t chunks = plan.vectorized ? p.in_features / elems_per_chunk(p.dtype)
                                         : p.in_features;
  int w = p.warps_per_row;
  if (w == 0) {  // the fewest warps that give each lane at most 4 chunks of K
    w = 1;
    while (w < kGemvWarps && chunks > static_cast<int64_t>(w) * 32 * 4) w *= 2;
  }
  int r = plan.vectorized ? p.rows_per_warp : 1;
  if (r == 0) {  // the most rows a group that still leave two blocks an SM
    r = 1;
    for (int cand : {4, 2}) {
      if (ceil_div(p.out_features, static_cast<int64_t>(kGemvWarps / w) * cand) >=
          2 * static_cast<int64_t>(sm_count)) {
        r = cand;
        break;
      }
    }
  }
  plan.warps_per_row = w;
  plan.rows_per_warp = r;
  plan.blocks = ceil_div(p.out_features, static_cast<int64_t>(kGemvWarps / w) * r);
  return plan;
}

void run_gemv(const GemvParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.out_features == 0) return;
  if (p.rows > kGemvMaxRows) throw std::runtime_error("tpssm gemv: more than 8 rows");
  const GemvPlan plan = plan_gemv(p, current_device_sm_count());
  if (plan.blocks > 0x7fffffff) throw std::runtime_error("tpssm gemv: too many weight rows");
  if (p.norm.weight != nullptr && p.norm.reduce_threads != norm_block_threads(p.in_features)) {
    throw std::runtime_error("tpssm gemv: norm.reduce_threads must be "
                             "norm_block_threads(in_features), add_rms_norm's block size");
  }
  TPSSM_DTYPE_SWITCH(p.dtype, T, [&] {
    if (p.rows == 1) {
      dispatch_fusions<T, 1>(p, plan, stream);
    } else if (p.rows == 2) {
      dispatch_fusions<T, 2>(p, plan, stream);
    } else if (p.rows <= 4) {
      dispatch_fusions<T, 4>(p, plan, stream);
    } else {
      dispatch_fusions<T, 8>(p, plan, stream);
    }
  });
}

}  // namespace tpssm
