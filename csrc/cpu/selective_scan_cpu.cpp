// CPU kernels of selective_scan (prefill) and selective_state_update (decode).
//
// The recurrence (every Mamba1 call, and Mamba2 with algorithm 'recurrent' / 'recurrent_direct'):
// work items are (sequence, head); a head's (headdim, dstate) state stays in a local fp32 buffer
// for the whole sequence and is rounded to the state dtype only when stored.
//
// The chunked state-space-duality form (Mamba2 with algorithm 'auto' / 'ssd'): the scalar decay
// per head turns a chunk of tokens into a few matrix products, run through ATen (BLAS) in fp32.
// See ssd_scan_heads for the algebra.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"
#include "ssm_ops.h"

namespace tpssm {
namespace {

template <typename T, typename S>
void selective_scan_kernel(const SelectiveScanParams& p) {
  const int64_t heads_per_group = p.nheads / p.ngroups;
  at::parallel_for(0, p.batch * p.nheads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(p.headdim * p.dstate), A(p.dstate), dA(p.dstate), dtB(p.dstate),
        Cv(p.dstate);
    const T* u_base = static_cast<const T*>(p.u);
    const T* delta_base = static_cast<const T*>(p.delta);
    const T* B_base = static_cast<const T*>(p.B);
    const T* C_base = static_cast<const T*>(p.C);
    const T* z_base = static_cast<const T*>(p.z);
    T* out_base = static_cast<T*>(p.out);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.nheads;
      const int64_t hd = item % p.nheads;
      const int64_t g = hd / heads_per_group;
      int64_t slot = b;
      if (p.cache_indices != nullptr) {
        slot = p.cache_indices[b];
        if (slot == p.pad_slot_id) continue;
      }
      const int64_t t0 = p.query_start_loc ? p.query_start_loc[b] : 0;
      const int64_t t1 = p.query_start_loc ? p.query_start_loc[b + 1] : p.seqlen;
      S* state = p.ssm_states == nullptr ? nullptr
                                         : static_cast<S*>(p.ssm_states) +
                                               slot * p.ssm_states_slot_stride +
                                               hd * p.ssm_states_head_stride;
      const bool initial =
          state != nullptr && p.has_initial_state != nullptr && p.has_initial_state[b];
      for (int64_t i = 0; i < p.headdim; ++i) {
        for (int64_t n = 0; n < p.dstate; ++n) {
          h[i * p.dstate + n] =
              initial ? cpu::load(state + i * p.ssm_states_dim_stride + n) : 0.0f;
        }
      }
      for (int64_t n = 0; n < p.dstate; ++n) A[n] = p.A[hd * p.A_head_stride + n * p.A_state_stride];
      const float D = p.D ? p.D[hd] : 0.0f;
      const float dt_bias = p.delta_bias ? p.delta_bias[hd] : 0.0f;
      const T* u = u_base + b * p.u_batch_stride + hd * p.headdim;
      const T* z = z_base ? z_base + b * p.z_batch_stride + hd * p.headdim : nullptr;
      T* out = out_base + b * p.out_batch_stride + hd * p.headdim;
      for (int64_t t = t0; t < t1; ++t) {
        float dt = cpu::load(delta_base + b * p.delta_batch_stride + t * p.delta_token_stride + hd);
        if (p.delta_bias) dt += dt_bias;
        if (p.delta_softplus) dt = cpu::softplus(dt);
        dt = cpu::clamp_dt(dt, p.dt_min, p.dt_max);
        const T* Bt = B_base + b * p.B_batch_stride + t * p.B_token_stride + g * p.B_group_stride;
        const T* Ct = C_base + b * p.C_batch_stride + t * p.C_token_stride + g * p.C_group_stride;
        for (int64_t n = 0; n < p.dstate; ++n) {
          dA[n] = std::exp(dt * A[n]);
          dtB[n] = dt * cpu::load(Bt + n);
          Cv[n] = cpu::load(Ct + n);
        }
        for (int64_t i = 0; i < p.headdim; ++i) {
          const float x = cpu::load(u + t * p.u_token_stride + i);
          float* hi = h.data() + i * p.dstate;
          float y = 0.0f;
          for (int64_t n = 0; n < p.dstate; ++n) {
            hi[n] = dA[n] * hi[n] + dtB[n] * x;
            y += hi[n] * Cv[n];
          }
          if (p.D) y += x * D;
          if (z) y *= cpu::silu(cpu::load(z + t * p.z_token_stride + i));
          cpu::store(out + t * p.out_token_stride + i, y);
        }
      }
      if (state == nullptr) continue;
      for (int64_t i = 0; i < p.headdim; ++i) {
        for (int64_t n = 0; n < p.dstate; ++n) {
          cpu::store(state + i * p.ssm_states_dim_stride + n, h[i * p.dstate + n]);
        }
      }
    }
  });
}

// Default SSD chunk length on the CPU. Per token and head the intra-chunk product costs
// O(chunk) multiply-adds and the state products O(dstate): a longer chunk only adds work (and its
// (heads, chunk, chunk) scores outgrow the core's cache), while a much shorter one leaves BLAS
// too little to run at speed. Measured on 2 cores (headdim 64 / 128, dstate 64 / 128, 16-80
// heads, bf16): 32, 48 and 64 within noise of each other, 128 1.2-2x and 256 2-4x slower.
constexpr int64_t kCpuSsdChunk = 64;

// Decays below exp(kMinLogDecay) ~ 1e-26 are flushed to exact zeros. Such terms are far below
// fp32 resolution next to any O(1) term, and left in they reach the denormal range in the
// products, where x86 arithmetic takes a microcode path many times slower.
constexpr float kMinLogDecay = -60.0f;

// Elements of the (heads, q, q) score tensors built at once (4 MiB of fp32): bounds the
// temporaries when chunk_size is large (at 4096 a single head's scores are 64 MiB).
constexpr int64_t kScoreElems = int64_t{1} << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// exp of log-decays with the flush above; a NaN stays NaN, as in the recurrence.
at::Tensor decay_exp(const at::Tensor& log_decay) {
  return log_decay.masked_fill(log_decay < kMinLogDecay, -std::numeric_limits<float>::infinity())
      .exp_();
}

// Tokens of a chunk before its first non-finite input (x (q, nh, P), B (q, N), dt (nh, q)); q when
// all are finite. The chunk's products zero the terms of later tokens by multiplication, and
// 0 * NaN is NaN: a NaN or inf must start a chunk of its own, or it reaches earlier outputs.
int64_t finite_prefix(const at::Tensor& x, const at::Tensor& B, const at::Tensor& dt) {
  const at::Tensor finite =
      at::isfinite(x).flatten(1).all(1) & at::isfinite(B).all(1) & at::isfinite(dt).all(0);
  if (finite.all().item<bool>()) return x.size(0);
  return finite.logical_not().to(at::kByte).argmax().item<int64_t>();
}

// A non-owning tensor over the op's memory with the params' element strides (the kernel writes
// only through the views of out and ssm_states).
template <typename T>
at::Tensor strided_view(T* data, at::IntArrayRef sizes, at::IntArrayRef strides) {
  using scalar_t = std::remove_const_t<T>;
  return at::from_blob(const_cast<scalar_t*>(data), sizes, strides,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// One sequence b, heads [h0, h0 + nh) of group g, chunk by chunk (Q tokens; chunks restart at
// the sequence start, the last may be shorter). Per chunk and head, with a_t = dt_t * A and
// c_t = a_1 + ... + a_t (inclusive, within the chunk):
//   y_t   = sum_{s<=t} (C_t . B_s) exp(c_t - c_s) dt_s x_s   + exp(c_t) C_t H_prev + D x_t
//   H_new = exp(c_last) H_prev + sum_t exp(c_last - c_t) dt_t x_t B_t^T
// which is the recurrence unrolled over the chunk. The decays are exps of differences of the
// cumulative sums, all <= 0 for A < 0 and dt >= 0: exp(c_t) * exp(-c_s) would overflow on long
// chunks. C B^T depends on the group only and is shared by the block's heads.
template <typename T, typename S>
void ssd_scan_heads(const SelectiveScanParams& p, int64_t b, int64_t g, int64_t h0, int64_t nh,
                    int64_t Q) {
  const int64_t slot = p.cache_indices ? p.cache_indices[b] : b;  // padded rows have no items
  // The ATen calls below run on worker threads, which do not inherit the caller's dispatch
  // state: skip autograd and version counting explicitly.
  c10::InferenceMode inference;
  const int64_t P = p.headdim;
  const int64_t N = p.dstate;
  const int64_t t0 = p.query_start_loc ? p.query_start_loc[b] : 0;
  const int64_t L = (p.query_start_loc ? p.query_start_loc[b + 1] : p.seqlen) - t0;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  at::Tensor state;  // (nh, P, N) in the slot, the state dtype
  if (p.ssm_states != nullptr) {
    S* base = static_cast<S*>(p.ssm_states) + slot * p.ssm_states_slot_stride +
              h0 * p.ssm_states_head_stride;
    state = strided_view(base, {nh, P, N}, {p.ssm_states_head_stride, p.ssm_states_dim_stride, 1});
  }
  // Contiguous: the state products view it as one (nh * P, N) matrix.
  at::Tensor H = at::zeros({nh, P, N}, f32);
  if (state.defined() && p.has_initial_state != nullptr && p.has_initial_state[b]) {
    H.copy_(state);
  }

  // Token-major views of the sequence: (L, nh, P) for the head channels, (L, N) for the group.
  const T* u = static_cast<const T*>(p.u) + b * p.u_batch_stride + t0 * p.u_token_stride;
  const at::Tensor u_seq = strided_view(u + h0 * P, {L, nh, P}, {p.u_token_stride, P, 1});
  const T* Bp = static_cast<const T*>(p.B) + b * p.B_batch_stride + t0 * p.B_token_stride +
                g * p.B_group_stride;
  const at::Tensor B_seq = strided_view(Bp, {L, N}, {p.B_token_stride, 1});
  const T* Cp = static_cast<const T*>(p.C) + b * p.C_batch_stride + t0 * p.C_token_stride +
                g * p.C_group_stride;
  const at::Tensor C_seq = strided_view(Cp, {L, N}, {p.C_token_stride, 1});
  at::Tensor z_seq;
  if (p.z != nullptr) {
    const T* z = static_cast<const T*>(p.z) + b * p.z_batch_stride + t0 * p.z_token_stride;
    z_seq = strided_view(z + h0 * P, {L, nh, P}, {p.z_token_stride, P, 1});
  }
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + t0 * p.out_token_stride + h0 * P;
  const at::Tensor out_seq = strided_view(out, {L, nh, P}, {p.out_token_stride, P, 1});
  at::Tensor D;
  if (p.D != nullptr) D = strided_view(p.D + h0, {1, nh, 1}, {0, 1, 0});
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_batch_stride;

  for (int64_t c0 = 0, q = 0; c0 < L; c0 += q) {
    q = std::min(Q, L - c0);
    // dt exactly as the recurrence computes it (same scalar helpers), and its decay cumsum.
    at::Tensor dt = at::empty({nh, q}, f32);
    at::Tensor cum = at::empty({nh, q}, f32);
    float* dt_p = dt.data_ptr<float>();
    float* cum_p = cum.data_ptr<float>();
    for (int64_t j = 0; j < nh; ++j) {
      const int64_t hd = h0 + j;
      const float A = p.A[hd * p.A_head_stride];
      const float bias = p.delta_bias ? p.delta_bias[hd] : 0.0f;
      float c = 0.0f;
      for (int64_t s = 0; s < q; ++s) {
        float v = cpu::load(delta + (t0 + c0 + s) * p.delta_token_stride + hd);
        if (p.delta_bias) v += bias;
        if (p.delta_softplus) v = cpu::softplus(v);
        v = cpu::clamp_dt(v, p.dt_min, p.dt_max);
        dt_p[j * q + s] = v;
        c += v * A;
        cum_p[j * q + s] = c;
      }
    }
    at::Tensor x = u_seq.narrow(0, c0, q).to(at::kFloat);  // (q, nh, P)
    at::Tensor Bc = B_seq.narrow(0, c0, q).to(at::kFloat);  // (q, N)
    at::Tensor Cc = C_seq.narrow(0, c0, q).to(at::kFloat);
    const int64_t finite = finite_prefix(x, Bc, dt);
    if (finite < q) {  // end the chunk before the token (or, when it is the first, after it)
      q = std::max<int64_t>(finite, 1);
      x = x.narrow(0, 0, q);
      Bc = Bc.narrow(0, 0, q);
      Cc = Cc.narrow(0, 0, q);
      dt = dt.narrow(1, 0, q);
      cum = cum.narrow(1, 0, q);
    }

    const at::Tensor xdt = x * dt.t().unsqueeze(2);  // dt_s x_s, (q, nh, P)

    // Inter-chunk: every head's entering state in one product, C (q, N) x H^T (N, nh * P).
    at::Tensor y = at::mm(Cc, H.view({nh * P, N}).t()).view({q, nh, P});
    y.mul_(decay_exp(cum).t().unsqueeze(2));

    // Intra-chunk: (C B^T o decay) (dt x), in head slices of bounded size. Above the diagonal
    // the exponent is positive, maybe inf; tril_ zeroes it.
    const at::Tensor CB = at::mm(Cc, Bc.t());
    const int64_t slice = std::max<int64_t>(1, kScoreElems / (q * q));
    for (int64_t j = 0; j < nh; j += slice) {
      const int64_t m = std::min(slice, nh - j);
      const at::Tensor c = cum.narrow(0, j, m);
      const at::Tensor scores = decay_exp(c.unsqueeze(2) - c.unsqueeze(1)).tril_().mul_(CB);
      y.narrow(1, j, m).add_(at::bmm(scores, xdt.narrow(1, j, m).transpose(0, 1)).transpose(0, 1));
    }
    if (D.defined()) y.add_(x * D);
    if (z_seq.defined()) y.mul_(at::silu(z_seq.narrow(0, c0, q).to(at::kFloat)));
    out_seq.narrow(0, c0, q).copy_(y);

    // State at the chunk end: decay the entering state, add the chunk's inputs decayed to it.
    const at::Tensor c_last = cum.narrow(1, q - 1, 1);  // (nh, 1)
    const at::Tensor xw = (xdt * decay_exp(c_last - cum).t().unsqueeze(2)).reshape({q, nh * P});
    H.mul_(decay_exp(c_last).unsqueeze(2));
    H.view({nh * P, N}).addmm_(xw.t(), Bc);
  }
  if (state.defined()) state.copy_(H);
}

// A work item of the SSD kernel: heads [h0, h0 + nh) of group g over sequence b.
struct SsdItem {
  int64_t b, g, h0, nh;
  int64_t cost;  // tokens x heads
};

template <typename T, typename S>
void selective_scan_ssd_kernel(const SelectiveScanParams& p) {
  const int64_t Q = p.chunk_size > 0 ? p.chunk_size : kCpuSsdChunk;
  const int64_t heads_per_group = p.nheads / p.ngroups;
  const int64_t num_threads = at::get_num_threads();
  auto seq_len = [&](int64_t b) {
    return p.query_start_loc ? p.query_start_loc[b + 1] - p.query_start_loc[b] : p.seqlen;
  };
  int64_t total_cost = 0;
  for (int64_t b = 0; b < p.batch; ++b) total_cost += seq_len(b) * p.nheads;
  // A whole group shares C B^T best; a (sequence, group) pair costing more than a thread's share
  // (few or very unequal sequences) is split into head blocks so that no thread waits on one
  // long item.
  const int64_t share = std::max<int64_t>(1, ceil_div(total_cost, num_threads));
  std::vector<SsdItem> items;
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.cache_indices != nullptr && p.cache_indices[b] == p.pad_slot_id) continue;
    const int64_t len = seq_len(b);
    const int64_t split =
        std::clamp<int64_t>(ceil_div(len * heads_per_group, share), 1, heads_per_group);
    const int64_t block_heads = ceil_div(heads_per_group, split);
    for (int64_t g = 0; g < p.ngroups; ++g) {
      for (int64_t first = 0; first < heads_per_group; first += block_heads) {
        const int64_t nh = std::min(block_heads, heads_per_group - first);
        items.push_back({b, g, g * heads_per_group + first, nh, len * nh});
      }
    }
  }
  // Costliest first, each thread taking the next item when done: no thread is left with a long
  // item at the end.
  std::stable_sort(items.begin(), items.end(),
                   [](const SsdItem& x, const SsdItem& y) { return x.cost > y.cost; });
  std::atomic<size_t> next_item{0};
  at::parallel_for(0, num_threads, 1, [&](int64_t, int64_t) {
    for (size_t i = next_item++; i < items.size(); i = next_item++) {
      const SsdItem& it = items[i];
      ssd_scan_heads<T, S>(p, it.b, it.g, it.h0, it.nh, Q);
    }
  });
}

template <typename T, typename S>
void selective_state_update_kernel(const SelectiveStateUpdateParams& p) {
  const int64_t heads_per_group = p.nheads / p.ngroups;
  at::parallel_for(0, p.batch * p.nheads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dA(p.dstate), dtB(p.dstate), Cv(p.dstate);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.nheads;
      const int64_t hd = item % p.nheads;
      const int64_t g = hd / heads_per_group;
      const int64_t src = p.state_batch_indices ? p.state_batch_indices[b] : b;
      const int64_t dst = p.dst_state_batch_indices ? p.dst_state_batch_indices[b] : src;
      if ((p.state_batch_indices && src == p.pad_slot_id) ||
          (p.dst_state_batch_indices && dst == p.pad_slot_id)) {
        continue;
      }
      const S* s_in = static_cast<const S*>(p.state) + src * p.state_slot_stride +
                      hd * p.state_head_stride;
      S* s_out = static_cast<S*>(p.state) + dst * p.state_slot_stride + hd * p.state_head_stride;
      const T* dt_b = static_cast<const T*>(p.dt) + b * p.dt_batch_stride;
      float dt;
      if (p.dt_proj_weight) {
        // The fused dt_proj: fp32 accumulation rounded to the activation dtype, as the GEMM it
        // replaces stores its output.
        const T* w = static_cast<const T*>(p.dt_proj_weight) + hd * p.dt_proj_row_stride;
        float acc = 0.0f;
        for (int64_t r = 0; r < p.dt_rank; ++r) acc += cpu::load(w + r) * cpu::load(dt_b + r);
        dt = static_cast<float>(static_cast<T>(acc));
      } else {
        dt = cpu::load(dt_b + hd);
      }
      if (p.dt_bias) dt += p.dt_bias[hd];
      if (p.dt_softplus) dt = cpu::softplus(dt);
      const T* Bb = static_cast<const T*>(p.B) + b * p.B_batch_stride + g * p.B_group_stride;
      const T* Cb = static_cast<const T*>(p.C) + b * p.C_batch_stride + g * p.C_group_stride;
      for (int64_t n = 0; n < p.dstate; ++n) {
        dA[n] = std::exp(dt * p.A[hd * p.A_head_stride + n * p.A_state_stride]);
        dtB[n] = dt * cpu::load(Bb + n);
        Cv[n] = cpu::load(Cb + n);
      }
      const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + hd * p.headdim;
      const T* z =
          p.z ? static_cast<const T*>(p.z) + b * p.z_batch_stride + hd * p.headdim : nullptr;
      T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + hd * p.headdim;
      for (int64_t i = 0; i < p.headdim; ++i) {
        const float xv = cpu::load(x + i);
        const S* hi_in = s_in + i * p.state_dim_stride;
        S* hi_out = s_out + i * p.state_dim_stride;
        float y = 0.0f;
        for (int64_t n = 0; n < p.dstate; ++n) {
          const float hv = dA[n] * cpu::load(hi_in + n) + dtB[n] * xv;
          y += hv * Cv[n];
          cpu::store(hi_out + n, hv);
        }
        if (p.D) y += xv * p.D[hd];
        if (z) y *= cpu::silu(cpu::load(z + i));
        cpu::store(out + i, y);
      }
    }
  });
}

void selective_scan_cpu(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                        const OptTensor& z, const OptTensor& delta_bias, bool delta_softplus,
                        const OptTensor& ssm_states, const OptTensor& query_start_loc,
                        const OptTensor& cache_indices, const OptTensor& has_initial_state,
                        int64_t pad_slot_id, const at::Tensor& out,
                        std::optional<double> dt_min, std::optional<double> dt_max,
                        c10::string_view algorithm, int64_t chunk_size, int64_t split_len,
                        int64_t lanes_per_channel) {
  const SelectiveScanParams p = make_selective_scan_params(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_states, query_start_loc,
      cache_indices, has_initial_state, pad_slot_id, out, dt_min, dt_max, algorithm, chunk_size,
      split_len, lanes_per_channel, /*check_index_values=*/true);
  // split_len and lanes_per_channel plan work over a CUDA device; the CPU kernels have no use
  // for them.
  const bool ssd = !p.a_is_per_state && (p.algorithm == ScanAlgorithm::kAuto ||
                                         p.algorithm == ScanAlgorithm::kSsd);
  cpu::dispatch_act_state(p.act_dtype, p.state_dtype, "selective_scan", [&](auto t, auto s) {
    if (ssd) {
      selective_scan_ssd_kernel<decltype(t), decltype(s)>(p);
    } else {
      selective_scan_kernel<decltype(t), decltype(s)>(p);
    }
  });
}

void selective_state_update_cpu(const at::Tensor& ssm_state, const at::Tensor& x,
                                const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                const OptTensor& dt_bias, const OptTensor& dt_proj_weight,
                                bool dt_softplus, const OptTensor& state_batch_indices,
                                const OptTensor& dst_state_batch_indices, int64_t pad_slot_id,
                                const at::Tensor& out) {
  const SelectiveStateUpdateParams p = make_selective_state_update_params(
      ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight, dt_softplus,
      state_batch_indices, dst_state_batch_indices, pad_slot_id, out,
      /*check_index_values=*/true);
  cpu::dispatch_act_state(p.act_dtype, p.state_dtype, "selective_state_update",
                          [&](auto t, auto s) {
                            selective_state_update_kernel<decltype(t), decltype(s)>(p);
                          });
}

}  // namespace
}  // namespace tpssm

TORCH_LIBRARY_IMPL(tpssm, CPU, m) {
  m.impl("selective_scan", &tpssm::selective_scan_cpu);
  m.impl("selective_state_update", &tpssm::selective_state_update_cpu);
}
