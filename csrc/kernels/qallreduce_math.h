// Scalar numerics of the quantized all-reduce, shared by the CPU and CUDA kernels so that both
// produce the reference's bytes (python/tpssm/reference/qallreduce.py). Every fp32 operation is
// a separately rounded IEEE operation: explicit __f*_rn intrinsics on the device, and the host
// build uses -ffp-contract=off so that no multiply-add is contracted.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/qallreduce_params.h"

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#define TPSSM_QAR_HD __host__ __device__ __forceinline__
#else
#define TPSSM_QAR_HD inline
#endif

namespace tpssm {
namespace qar {

template <QarCodec kCodec> struct CodecTraits;
template <> struct CodecTraits<QarCodec::kInt8> { static constexpr float kQmax = 127.0f; };
template <> struct CodecTraits<QarCodec::kFp8E4M3> { static constexpr float kQmax = 448.0f; };

TPSSM_QAR_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

TPSSM_QAR_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

TPSSM_QAR_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

TPSSM_QAR_HD bool is_nan(float v) { return v != v; }

// Max that propagates NaN whatever the order of the operands, so the group absmax does not depend
// on the reduction order (fmaxf would drop a NaN).
TPSSM_QAR_HD float nan_max(float m, float v) { return (v > m || is_nan(v)) ? v : m; }

TPSSM_QAR_HD float abs_f(float v) {
#if defined(__CUDA_ARCH__)
  return fabsf(v);
#else
  return std::fabs(v);
#endif
}

TPSSM_QAR_HD bool is_finite(float v) { return !is_nan(v) && abs_f(v) <= 3.402823466e38f; }

TPSSM_QAR_HD float canonical_nan() {
#if defined(__CUDA_ARCH__)
  return __int_as_float(0x7fc00000);
#else
  uint32_t bits = 0x7fc00000u;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// Scale stored for a group of absmax a: 0 for tiny groups, a canonical NaN for NaN groups
// (+Inf stays +Inf), a / qmax otherwise.
template <QarCodec kCodec>
TPSSM_QAR_HD float group_scale(float a) {
  if (is_nan(a)) return canonical_nan();
  if (a < kQarTinyAbsmax) return 0.0f;
  return fdiv(a, CodecTraits<kCodec>::kQmax);
}

// Multiplier applied to the values before rounding; 0 when the group quantizes to all-zero codes
// (tiny or non-finite absmax).
template <QarCodec kCodec>
TPSSM_QAR_HD float group_inv(float a) {
  if (!is_finite(a) || a < kQarTinyAbsmax) return 0.0f;
  return fdiv(CodecTraits<kCodec>::kQmax, a);
}

// Round half to even of a finite value with |t| < 2^22 (codes stay within about +-512). On the
// host, adding 1.5 * 2^23 leaves no fraction bits, so the add rounds (to nearest even, the
// default mode) and the subtract is exact - far cheaper than a libm nearbyint call.
TPSSM_QAR_HD float round_half_even(float t) {
#if defined(__CUDA_ARCH__)
  return rintf(t);
#else
  constexpr float kMagic = 12582912.0f;
  return (t + kMagic) - kMagic;
#endif
}

// Host encoder of e4m3fn (bias 7, no infinities, max 448), round to nearest even, for finite
// |f| <= 448; the device uses cuda_fp8.h's saturating converter.
inline uint8_t e4m3_encode_host(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint8_t sign = static_cast<uint8_t>((bits >> 31) << 7);
  bits &= 0x7fffffffu;
  float a;
  std::memcpy(&a, &bits, sizeof(a));
  if (a < 0x1p-6f) {
    // Subnormals are multiples of 2^-9; a rounded count of 8 is the smallest normal, whose code
    // is 0x08, so the count is the code.
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(round_half_even(a * 512.0f)));
  }
  // Keep 3 of the 23 mantissa bits, rounding the 20 dropped ones to nearest even; a carry out of
  // the mantissa correctly bumps the exponent. Then rebias the exponent from 127 to 7.
  bits += 0x7ffffu + ((bits >> 20) & 1u);
  return static_cast<uint8_t>(sign | ((bits >> 20) - ((127u - 7u) << 3)));
}

inline float e4m3_decode_slow(uint8_t code) {
  const int sign = code >> 7;
  const int exp = (code >> 3) & 0xf;
  const int man = code & 0x7;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -9);
  } else if (exp == 0xf && man == 0x7) {
    v = canonical_nan();
  } else {
    v = std::ldexp(static_cast<float>(8 + man), exp - 7 - 3);
  }
  return sign ? -v : v;
}

inline float e4m3_decode_host(uint8_t code) {
  struct Table {
    float v[256];
    Table() {
      for (int c = 0; c < 256; ++c) v[c] = e4m3_decode_slow(static_cast<uint8_t>(c));
    }
  };
  static const Table table;
  return table.v[code];
}

// Code of one value given the group multiplier inv (0 for all-zero groups).
template <QarCodec kCodec>
TPSSM_QAR_HD uint8_t encode(float v, float inv) {
  if (inv == 0.0f) return 0;
  const float t = fmul(v, inv);
  if constexpr (kCodec == QarCodec::kInt8) {
    float r = round_half_even(t);
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    return static_cast<uint8_t>(static_cast<int8_t>(static_cast<int>(r)));
  } else {
    const float c = t > 448.0f ? 448.0f : (t < -448.0f ? -448.0f : t);
#if defined(__CUDA_ARCH__)
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(c, __NV_SATFINITE, __NV_E4M3));
#else
    return e4m3_encode_host(c);
#endif
  }
}

template <QarCodec kCodec>
TPSSM_QAR_HD float decode(uint8_t code) {
  if constexpr (kCodec == QarCodec::kInt8) {
    return static_cast<float>(static_cast<int8_t>(code));
  } else {
#if defined(__CUDA_ARCH__)
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3);
    return __half2float(__half(h));
#else
    return e4m3_decode_host(code);
#endif
  }
}

}  // namespace qar
}  // namespace tpssm
