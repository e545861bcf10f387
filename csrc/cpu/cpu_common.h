// Helpers shared by the CPU kernels: runtime dtype -> C++ type dispatch, fp32 loads and stores,
// and the scalar activations with the reference implementations' exact definitions.
#pragma once

#include <cmath>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "kernels/ssm_params.h"

namespace tpssm {
namespace cpu {

template <typename T>
inline float load(const T* p) {
  return static_cast<float>(*p);
}

template <typename T>
inline void store(T* p, float v) {
  *p = static_cast<T>(v);  // round to nearest even, as torch's .to(dtype)
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// softplus with the threshold 20 of the reference implementations (identity above it).
inline float softplus(float v) { return v <= 20.0f ? std::log1p(std::exp(v)) : v; }

// The scan's dt limits, by comparisons so that a NaN stays NaN (as torch.clamp leaves it).
inline float clamp_dt(float dt, float lo, float hi) {
  if (dt < lo) dt = lo;
  if (dt > hi) dt = hi;
  return dt;
}

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
inline void dispatch_dtype(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return;
    case DType::kFloat16: f(c10::Half{}); return;
    case DType::kBFloat16: f(c10::BFloat16{}); return;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", static_cast<int>(dtype));
}

// Calls f(act_t{}, state_t{}); the state is float32 or the activation dtype.
template <typename F>
inline void dispatch_act_state(DType act, DType state, const char* op, F&& f) {
  dispatch_dtype(act, op, [&](auto act_tag) {
    using act_t = decltype(act_tag);
    if (state == DType::kFloat32) {
      f(act_t{}, float{});
    } else {
      TORCH_CHECK(state == act, op, ": the state dtype must be float32 or the activation dtype");
      f(act_t{}, act_t{});
    }
  });
}

}  // namespace cpu
}  // namespace tpssm
