// Plain parameter structs of the quantized two-shot all-reduce (design: docs/qallreduce.md).
// Torch-free: the CPU kernels, the CUDA kernels and standalone benchmarks consume these;
// csrc/qallreduce_ops.cpp fills them from tensors after validating every rule.
//
// Payload layout (shared by every buffer): M = numel elements, ng = M / G groups of G contiguous
// elements, sg = ceil(ng / N) groups per chunk; chunk k carries groups [k*sg, (k+1)*sg) (groups
// >= ng are zero padding) as
//     [sg*G one-byte codes | pad to 16 B | sg fp32 scales | pad to 16 B]
// and an N-chunk buffer is the concatenation of chunks 0..N-1 (chunk k at byte k * chunk_bytes).
// Every chunk offset is a multiple of 16 bytes, so all accesses can be 128 bits wide.
#pragma once

#include <cstdint>

#include "kernels/ssm_params.h"  // DType

namespace tpssm {

enum class QarCodec : int32_t { kInt8 = 0, kFp8E4M3 = 1 };

inline const char* qar_codec_name(QarCodec c) {
  switch (c) {
    case QarCodec::kInt8: return "int8";
    case QarCodec::kFp8E4M3: return "fp8_e4m3";
  }
  return "unknown";
}

// Groups whose absmax is below this quantize to zero (q = 0, s = 0): it keeps qmax / absmax
// finite in fp32 for both codecs (448 * 2^118 < 2^127).
constexpr float kQarTinyAbsmax = 0x1p-118f;
constexpr int kQarAlignBytes = 16;

struct QarLayout {
  int64_t numel = 0;             // M
  int32_t world_size = 1;        // N
  int32_t group_size = 128;      // G: 32, 64, 128 or 256
  int64_t num_groups = 0;        // ng = M / G
  int64_t groups_per_chunk = 0;  // sg = ceil(ng / N)
  int64_t values_bytes = 0;      // round_up(sg * G, 16): byte offset of the scales in a chunk
  int64_t chunk_bytes = 0;       // values_bytes + round_up(sg * 4, 16)
};

inline int64_t qar_round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Callers validate numel % group_size == 0 and world_size >= 1 first.
inline QarLayout qar_make_layout(int64_t numel, int32_t world_size, int32_t group_size) {
  QarLayout l;
  l.numel = numel;
  l.world_size = world_size;
  l.group_size = group_size;
  l.num_groups = numel / group_size;
  l.groups_per_chunk = (l.num_groups + world_size - 1) / world_size;
  l.values_bytes = qar_round_up(l.groups_per_chunk * group_size, kQarAlignBytes);
  l.chunk_bytes = l.values_bytes + qar_round_up(l.groups_per_chunk * 4, kQarAlignBytes);
  return l;
}

// Step 1: quantize x and scatter it into one chunk per owner.
struct QarQuantizePackParams {
  DType dtype;
  QarCodec codec;
  QarLayout layout;
  const void* x;  // (numel,) contiguous, 16-byte aligned
  uint8_t* send;  // (world_size * chunk_bytes,) 16-byte aligned; chunk k goes to rank k
};

// Step 3: dequantize the N chunks received for this rank's stripe, sum them in rank order in fp32
// (products and sums rounded separately), requantize into one chunk.
struct QarReduceParams {
  QarCodec codec;
  QarLayout layout;
  const uint8_t* recv;  // (world_size * chunk_bytes,): chunk r came from rank r
  uint8_t* mine;        // (chunk_bytes,)
};

// Step 5: dequantize the all-gathered chunks into out, optionally adding a residual in fp32
// before the one rounding to the output dtype.
struct QarDequantParams {
  DType dtype;  // of out and residual
  QarCodec codec;
  QarLayout layout;
  const uint8_t* gathered;  // (world_size * chunk_bytes,)
  const void* residual;     // (numel,) contiguous, or nullptr
  void* out;                // (numel,) contiguous
};

}  // namespace tpssm
