// CPU kernels of selective_scan (prefill) and selective_state_update (decode). Work items are
// (sequence, head): a head's (headdim, dstate) state stays in a local fp32 buffer for the whole
// sequence and is rounded to the state dtype only when stored.
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
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
      float dt = cpu::load(static_cast<const T*>(p.dt) + b * p.dt_batch_stride + hd);
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
                        c10::string_view algorithm, int64_t chunk_size, int64_t split_len) {
  const SelectiveScanParams p = make_selective_scan_params(
      u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_states, query_start_loc,
      cache_indices, has_initial_state, pad_slot_id, out, dt_min, dt_max, algorithm, chunk_size,
      split_len);
  cpu::dispatch_act_state(p.act_dtype, p.state_dtype, "selective_scan", [&](auto t, auto s) {
    selective_scan_kernel<decltype(t), decltype(s)>(p);
  });
}

void selective_state_update_cpu(const at::Tensor& ssm_state, const at::Tensor& x,
                                const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                const OptTensor& dt_bias, bool dt_softplus,
                                const OptTensor& state_batch_indices,
                                const OptTensor& dst_state_batch_indices, int64_t pad_slot_id,
                                const at::Tensor& out) {
  const SelectiveStateUpdateParams p = make_selective_state_update_params(
      ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
      dst_state_batch_indices, pad_slot_id, out);
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
