// Shared helpers of the standalone microbenchmarks (no torch, no Python): argument parsing, host
// <-> device buffers in the activation dtypes, median timing with CUDA events, error checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "ssm_params.h"

namespace bench {

#define BENCH_CHECK(EXPR)                                                                  \
  do {                                                                                     \
    cudaError_t err_ = (EXPR);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_),       \
                   __FILE__, __LINE__, #EXPR);                                             \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

struct Args {
  std::vector<std::string> argv;
  Args(int argc, char** a) : argv(a + 1, a + argc) {}
  bool has(const std::string& name) const {
    return std::find(argv.begin(), argv.end(), name) != argv.end();
  }
  std::string get(const std::string& name, const std::string& fallback) const {
    for (size_t i = 0; i + 1 < argv.size(); ++i) {
      if (argv[i] == name) return argv[i + 1];
    }
    return fallback;
  }
  int64_t get_int(const std::string& name, int64_t fallback) const {
    return std::stoll(get(name, std::to_string(fallback)));
  }
};

inline tpssm::DType parse_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return tpssm::DType::kFloat32;
  if (s == "f16" || s == "float16") return tpssm::DType::kFloat16;
  if (s == "bf16" || s == "bfloat16") return tpssm::DType::kBFloat16;
  std::fprintf(stderr, "unknown dtype %s (f32, f16, bf16)\n", s.c_str());
  std::exit(2);
}

inline size_t dtype_size(tpssm::DType t) { return t == tpssm::DType::kFloat32 ? 4 : 2; }

// Rounds v to dtype t and back, so host references see exactly the device inputs.
inline float round_to(tpssm::DType t, float v) {
  switch (t) {
    case tpssm::DType::kFloat16: return __half2float(__float2half_rn(v));
    case tpssm::DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(v));
    default: return v;
  }
}

// A device buffer holding `host` (fp32 values) converted to dtype t.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  tpssm::DType dtype = tpssm::DType::kFloat32;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void upload(tpssm::DType t, const std::vector<float>& host) {
    dtype = t;
    if (ptr) BENCH_CHECK(cudaFree(ptr));
    bytes = std::max<size_t>(host.size() * dtype_size(t), 16);
    BENCH_CHECK(cudaMalloc(&ptr, bytes));
    std::vector<uint8_t> raw(bytes, 0);
    for (size_t i = 0; i < host.size(); ++i) {
      if (t == tpssm::DType::kFloat32) {
        std::memcpy(raw.data() + 4 * i, &host[i], 4);
      } else if (t == tpssm::DType::kFloat16) {
        __half h = __float2half_rn(host[i]);
        std::memcpy(raw.data() + 2 * i, &h, 2);
      } else {
        __nv_bfloat16 h = __float2bfloat16_rn(host[i]);
        std::memcpy(raw.data() + 2 * i, &h, 2);
      }
    }
    BENCH_CHECK(cudaMemcpy(ptr, raw.data(), bytes, cudaMemcpyHostToDevice));
  }
  std::vector<float> download(size_t count) const {
    std::vector<uint8_t> raw(bytes);
    BENCH_CHECK(cudaMemcpy(raw.data(), ptr, bytes, cudaMemcpyDeviceToHost));
    std::vector<float> host(count);
    for (size_t i = 0; i < count; ++i) {
      if (dtype == tpssm::DType::kFloat32) {
        std::memcpy(&host[i], raw.data() + 4 * i, 4);
      } else if (dtype == tpssm::DType::kFloat16) {
        __half h;
        std::memcpy(&h, raw.data() + 2 * i, 2);
        host[i] = __half2float(h);
      } else {
        __nv_bfloat16 h;
        std::memcpy(&h, raw.data() + 2 * i, 2);
        host[i] = __bfloat162float(h);
      }
    }
    return host;
  }
};

inline std::vector<float> random_vector(size_t n, float lo, float hi, uint64_t seed,
                                        tpssm::DType round_dtype) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& e : v) e = round_to(round_dtype, dist(gen));
  return v;
}

// Median of `iterations` timed runs (CUDA events) after `warmup` untimed ones. `reset` runs
// before every run, outside the timed region (state the kernel mutates).
inline float median_ms(const std::function<void()>& run, const std::function<void()>& reset,
                       int warmup, int iterations) {
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmup; ++i) {
    reset();
    run();
  }
  BENCH_CHECK(cudaDeviceSynchronize());
  std::vector<float> times;
  for (int i = 0; i < iterations; ++i) {
    reset();
    BENCH_CHECK(cudaEventRecord(start));
    run();
    BENCH_CHECK(cudaEventRecord(stop));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    BENCH_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  BENCH_CHECK(cudaEventDestroy(start));
  BENCH_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times.empty() ? 0.f : times[times.size() / 2];
}

// ||got - ref|| / ||ref|| over the entries selected by `use`, with the largest abs error.
struct Compare {
  double rel_l2 = 0.0;
  double max_abs = 0.0;
  bool finite = true;
};

inline Compare compare(const std::vector<float>& got, const std::vector<float>& ref,
                       const std::vector<char>& use) {
  double num = 0.0, den = 0.0;
  Compare c;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!use.empty() && !use[i]) continue;
    if (!std::isfinite(got[i])) c.finite = false;
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
    c.max_abs = std::max(c.max_abs, std::fabs(d));
  }
  c.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
  return c;
}

inline double tolerance(tpssm::DType t) {
  // fp32 kernels use exp2f / __expf; 16-bit outputs carry one rounding of the output dtype.
  return t == tpssm::DType::kFloat32 ? 1e-4 : (t == tpssm::DType::kFloat16 ? 2e-3 : 1e-2);
}

inline bool report_check(const char* what, const Compare& c, tpssm::DType t) {
  const bool ok = c.finite && c.rel_l2 <= tolerance(t);
  std::printf("check %-22s rel_l2 %.3e  max_abs %.3e  (tol %.1e)  %s\n", what, c.rel_l2,
              c.max_abs, tolerance(t), ok ? "PASS" : "FAIL");
  return ok;
}

inline void print_timing(const char* what, float ms, double bytes) {
  std::printf("time  %-22s median %9.3f us  %10.1f MB  %8.1f GB/s\n", what, ms * 1e3,
              bytes / 1e6, bytes / (ms * 1e-3) / 1e9);
}

}  // namespace bench
