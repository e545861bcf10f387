// Plain fp32 C++ references of the kernels the microbenchmarks time (dense, contiguous layouts
// only: the binaries build exactly these). The Python package has its own references
// (tpssm.reference); these keep the binaries free of Python.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace bench {

inline float ref_silu(float x) { return x / (1.f + std::exp(-x)); }
inline float ref_softplus(float x) { return x <= 20.f ? std::log1p(std::exp(x)) : x; }

// x (batch, seqlen, dim), weight (dim, width), state (batch, dim, width-1) initial -> final.
inline void conv_ref(const std::vector<float>& x, const std::vector<float>& weight,
                     const std::vector<float>& bias, std::vector<float>& state,
                     std::vector<float>& out, int64_t batch, int64_t seqlen, int64_t dim,
                     int width, bool silu) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < dim; ++c) {
      std::vector<float> full(width - 1 + seqlen);
      for (int k = 0; k < width - 1; ++k) full[k] = state[(b * dim + c) * (width - 1) + k];
      for (int64_t t = 0; t < seqlen; ++t) full[width - 1 + t] = x[(b * seqlen + t) * dim + c];
      for (int64_t t = 0; t < seqlen; ++t) {
        float acc = bias[c];
        for (int k = 0; k < width; ++k) acc += weight[c * width + k] * full[t + k];
        out[(b * seqlen + t) * dim + c] = silu ? ref_silu(acc) : acc;
      }
      for (int k = 0; k < width - 1; ++k) {
        state[(b * dim + c) * (width - 1) + k] = full[seqlen + k];
      }
    }
  }
}

struct ScanShape {
  int64_t batch, seqlen, nheads, headdim, dstate, ngroups;
  bool per_state_a;  // Mamba1 A (nheads, dstate) vs Mamba2 A (nheads,)
};

// One channel c of every sequence: u, z, out (batch, seqlen, nheads*headdim); delta (batch,
// seqlen, nheads); B, C (batch, seqlen, ngroups, dstate); state (batch, nheads, headdim, dstate)
// initial -> final. delta_softplus is always on, D, z and delta_bias always given.
inline void scan_ref_channel(const ScanShape& s, int64_t c, const std::vector<float>& u,
                             const std::vector<float>& delta, const std::vector<float>& A,
                             const std::vector<float>& B, const std::vector<float>& C,
                             const std::vector<float>& D, const std::vector<float>& z,
                             const std::vector<float>& delta_bias, std::vector<float>& state,
                             std::vector<float>& out) {
  const int64_t dim = s.nheads * s.headdim;
  const int64_t h = c / s.headdim;
  const int64_t g = h / (s.nheads / s.ngroups);
  for (int64_t b = 0; b < s.batch; ++b) {
    float* st = &state[(b * dim + c) * s.dstate];
    for (int64_t t = 0; t < s.seqlen; ++t) {
      const int64_t tok = b * s.seqlen + t;
      const float dt = ref_softplus(delta[tok * s.nheads + h] + delta_bias[h]);
      const float uv = u[tok * dim + c];
      float y = 0.f;
      for (int64_t n = 0; n < s.dstate; ++n) {
        const float a = s.per_state_a ? A[h * s.dstate + n] : A[h];
        const int64_t bc = (tok * s.ngroups + g) * s.dstate + n;
        st[n] = std::exp(dt * a) * st[n] + dt * B[bc] * uv;
        y += st[n] * C[bc];
      }
      y += D[h] * uv;
      y *= ref_silu(z[tok * dim + c]);
      out[tok * dim + c] = y;
    }
  }
}

// One decode step for every (row, head, headdim) with the Mamba shapes above (seqlen 1), state
// (batch, nheads, headdim, dstate) updated in place.
inline void state_update_ref(const ScanShape& s, const std::vector<float>& x,
                             const std::vector<float>& dt_in, const std::vector<float>& A,
                             const std::vector<float>& B, const std::vector<float>& C,
                             const std::vector<float>& D, const std::vector<float>& z,
                             const std::vector<float>& dt_bias, std::vector<float>& state,
                             std::vector<float>& out) {
  const int64_t dim = s.nheads * s.headdim;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t c = 0; c < dim; ++c) {
      const int64_t h = c / s.headdim;
      const int64_t g = h / (s.nheads / s.ngroups);
      const float dt = ref_softplus(dt_in[b * s.nheads + h] + dt_bias[h]);
      const float xv = x[b * dim + c];
      float* st = &state[(b * dim + c) * s.dstate];
      float y = 0.f;
      for (int64_t n = 0; n < s.dstate; ++n) {
        const float a = s.per_state_a ? A[h * s.dstate + n] : A[h];
        const int64_t bc = (b * s.ngroups + g) * s.dstate + n;
        st[n] = std::exp(dt * a) * st[n] + dt * B[bc] * xv;
        y += st[n] * C[bc];
      }
      y += D[h] * xv;
      out[b * dim + c] = y * ref_silu(z[b * dim + c]);
    }
  }
}

}  // namespace bench
