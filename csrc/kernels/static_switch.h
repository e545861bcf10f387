// Runtime -> compile-time dispatch for the CUDA kernels. Every switch covers exactly the values the
// kernels are instantiated for and throws on anything else, so an unsupported combination fails
// loudly at the launcher instead of silently running a wrong instantiation.
//
// Usage: TPSSM_DTYPE_SWITCH(params.dtype, input_t, [&] { launch<input_t>(params, stream); });
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "ssm_params.h"

namespace tpssm {

[[noreturn]] inline void throw_unsupported(const char* what, const std::string& value) {
  throw std::runtime_error(std::string("tpssm CUDA kernels: unsupported ") + what + " " + value);
}

}  // namespace tpssm

// Activation dtype: float32, float16 or bfloat16.
#define TPSSM_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                                   \
  [&] {                                                                              \
    switch (DTYPE) {                                                                 \
      case ::tpssm::DType::kFloat32: {                                               \
        using TYPE_NAME = float;                                                     \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::tpssm::DType::kFloat16: {                                               \
        using TYPE_NAME = __half;                                                    \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::tpssm::DType::kBFloat16: {                                              \
        using TYPE_NAME = __nv_bfloat16;                                             \
        return __VA_ARGS__();                                                        \
      }                                                                              \
    }                                                                                \
    ::tpssm::throw_unsupported("dtype", std::to_string(static_cast<int>(DTYPE)));    \
  }()

// State dtype: float32, or the activation dtype ACT_TYPE (the only two the ops accept).
#define TPSSM_STATE_DTYPE_SWITCH(STATE_DTYPE, ACT_DTYPE, ACT_TYPE, TYPE_NAME, ...)     \
  [&] {                                                                              \
    if ((STATE_DTYPE) == ::tpssm::DType::kFloat32) {                                 \
      using TYPE_NAME = float;                                                       \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    if ((STATE_DTYPE) == (ACT_DTYPE)) {                                              \
      using TYPE_NAME = ACT_TYPE;                                                    \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    ::tpssm::throw_unsupported(                                                      \
        "state dtype (must be float32 or the activation dtype)",                     \
        ::tpssm::dtype_name(STATE_DTYPE));                                           \
  }()

// Conv width 2..4.
#define TPSSM_WIDTH_SWITCH(WIDTH, CONST_NAME, ...)                                   \
  [&] {                                                                              \
    switch (WIDTH) {                                                                 \
      case 2: {                                                                      \
        constexpr int CONST_NAME = 2;                                                \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case 3: {                                                                      \
        constexpr int CONST_NAME = 3;                                                \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case 4: {                                                                      \
        constexpr int CONST_NAME = 4;                                                \
        return __VA_ARGS__();                                                        \
      }                                                                              \
    }                                                                                \
    ::tpssm::throw_unsupported("conv width (must be 2..4)", std::to_string(WIDTH));  \
  }()

#define TPSSM_BOOL_SWITCH(COND, CONST_NAME, ...)                                     \
  [&] {                                                                              \
    if (COND) {                                                                      \
      constexpr bool CONST_NAME = true;                                              \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    constexpr bool CONST_NAME = false;                                               \
    return __VA_ARGS__();                                                            \
  }()

// 16-bit activation dtype: float16 or bfloat16 (the tensor-core kernels).
#define TPSSM_HALF_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                              \
  [&] {                                                                              \
    switch (DTYPE) {                                                                 \
      case ::tpssm::DType::kFloat16: {                                               \
        using TYPE_NAME = __half;                                                    \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      case ::tpssm::DType::kBFloat16: {                                              \
        using TYPE_NAME = __nv_bfloat16;                                             \
        return __VA_ARGS__();                                                        \
      }                                                                              \
      default:                                                                       \
        break;                                                                       \
    }                                                                                \
    ::tpssm::throw_unsupported("dtype (must be float16 or bfloat16)",               \
                               ::tpssm::dtype_name(DTYPE));                          \
  }()

// A power-of-two size among 64 and 128 (the SSD kernel's headdim and dstate).
#define TPSSM_64_128_SWITCH(VALUE, CONST_NAME, ...)                                  \
  [&] {                                                                              \
    if ((VALUE) == 64) {                                                             \
      constexpr int CONST_NAME = 64;                                                 \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    if ((VALUE) == 128) {                                                            \
      constexpr int CONST_NAME = 128;                                                \
      return __VA_ARGS__();                                                          \
    }                                                                                \
    ::tpssm::throw_unsupported("size (must be 64 or 128)", std::to_string(VALUE));   \
  }()
