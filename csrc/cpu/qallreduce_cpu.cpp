// CPU kernels of the quantized two-shot all-reduce; bit-exact with the CUDA kernels and with the
// reference in python/tpssm/reference/qallreduce.py (shared scalar numerics in
// kernels/qallreduce_math.h). One group of G values is the unit of parallel work.
#include <algorithm>
#include <cstring>
#include <optional>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kernels/qallreduce_math.h"
#include "kernels/qallreduce_switch.h"
#include "qallreduce_ops.h"

namespace tpssm {

namespace {

constexpr int kMaxGroupSize = 256;
// Groups per parallel_for task: small enough to spread a decode-sized message over threads.
constexpr int64_t kGrainGroups = 64;

template <QarCodec kCodec>
void quantize_group(const float* v, int64_t G, uint8_t* codes, uint8_t* scale_slot) {
  float a = 0.0f;
  for (int64_t i = 0; i < G; ++i) a = qar::nan_max(a, qar::abs_f(v[i]));
  const float s = qar::group_scale<kCodec>(a);
  const float inv = qar::group_inv<kCodec>(a);
  for (int64_t i = 0; i < G; ++i) codes[i] = qar::encode<kCodec>(v[i], inv);
  std::memcpy(scale_slot, &s, sizeof(float));
}

// Zeroes the byte padding after the scales (and after the codes, empty for G >= 16) of a chunk.
void zero_chunk_padding(uint8_t* chunk, const QarLayout& l) {
  const int64_t codes_end = l.groups_per_chunk * l.group_size;
  std::memset(chunk + codes_end, 0, l.values_bytes - codes_end);
  const int64_t scales_end = l.values_bytes + l.groups_per_chunk * 4;
  std::memset(chunk + scales_end, 0, l.chunk_bytes - scales_end);
}

template <QarCodec kCodec, typename T>
void quantize_pack_impl(const QarQuantizePackParams& p) {
  const QarLayout& l = p.layout;
  const int64_t G = l.group_size, sg = l.groups_per_chunk;
  const T* x = static_cast<const T*>(p.x);
  at::parallel_for(0, l.world_size * sg, kGrainGroups, [&](int64_t begin, int64_t end) {
    float v[kMaxGroupSize];
    for (int64_t g = begin; g < end; ++g) {
      uint8_t* chunk = p.send + (g / sg) * l.chunk_bytes;
      const int64_t j = g % sg;
      if (g < l.num_groups) {
        for (int64_t i = 0; i < G; ++i) v[i] = static_cast<float>(x[g * G + i]);
      } else {
        std::fill(v, v + G, 0.0f);
      }
      quantize_group<kCodec>(v, G, chunk + j * G, chunk + l.values_bytes + j * 4);
    }
  });
  for (int64_t k = 0; k < l.world_size; ++k) zero_chunk_padding(p.send + k * l.chunk_bytes, l);
}

template <QarCodec kCodec>
void reduce_impl(const QarReduceParams& p) {
  const QarLayout& l = p.layout;
  const int64_t G = l.group_size, sg = l.groups_per_chunk;
  at::parallel_for(0, sg, kGrainGroups, [&](int64_t begin, int64_t end) {
    float acc[kMaxGroupSize];
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc, acc + G, 0.0f);
      for (int64_t r = 0; r < l.world_size; ++r) {
        const uint8_t* chunk = p.recv + r * l.chunk_bytes;
        float s;
        std::memcpy(&s, chunk + l.values_bytes + j * 4, sizeof(float));
        const uint8_t* codes = chunk + j * G;
        for (int64_t i = 0; i < G; ++i) {
          acc[i] = qar::fadd(acc[i], qar::fmul(qar::decode<kCodec>(codes[i]), s));
        }
      }
      quantize_group<kCodec>(acc, G, p.mine + j * G, p.mine + l.values_bytes + j * 4);
    }
  });
  zero_chunk_padding(p.mine, l);
}

template <QarCodec kCodec, typename T>
void dequant_impl(const QarDequantParams& p) {
  const QarLayout& l = p.layout;
  const int64_t G = l.group_size, sg = l.groups_per_chunk;
  T* out = static_cast<T*>(p.out);
  const T* res = static_cast<const T*>(p.residual);
  at::parallel_for(0, l.num_groups, kGrainGroups, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* chunk = p.gathered + (g / sg) * l.chunk_bytes;
      const int64_t j = g % sg;
      float s;
      std::memcpy(&s, chunk + l.values_bytes + j * 4, sizeof(float));
      const uint8_t* codes = chunk + j * G;
      for (int64_t i = 0; i < G; ++i) {
        float y = qar::fmul(qar::decode<kCodec>(codes[i]), s);
        if (res != nullptr) y = qar::fadd(y, static_cast<float>(res[g * G + i]));
        out[g * G + i] = static_cast<T>(y);
      }
    }
  });
}

void run_quantize_pack(const QarQuantizePackParams& p) {
  qar_dispatch_codec(p.codec, [&](auto codec) {
    qar_dispatch_dtype<float, c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
      quantize_pack_impl<decltype(codec)::value, decltype(tag)>(p);
    });
  });
}

void run_reduce(const QarReduceParams& p) {
  qar_dispatch_codec(p.codec, [&](auto codec) { reduce_impl<decltype(codec)::value>(p); });
}

void run_dequant(const QarDequantParams& p) {
  qar_dispatch_codec(p.codec, [&](auto codec) {
    qar_dispatch_dtype<float, c10::Half, c10::BFloat16>(p.dtype, [&](auto tag) {
      dequant_impl<decltype(codec)::value, decltype(tag)>(p);
    });
  });
}

void qar_quantize_pack_cpu(const at::Tensor& x, int64_t world_size, int64_t group_size,
                           int64_t codec, const at::Tensor& send) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  run_quantize_pack(make_qar_quantize_pack_params(x, world_size, group_size, codec, send));
}

void qar_reduce_requant_cpu(const at::Tensor& recv, int64_t numel, int64_t world_size,
                            int64_t group_size, int64_t codec, const at::Tensor& mine) {
  run_reduce(make_qar_reduce_params(recv, numel, world_size, group_size, codec, mine));
}

void qar_dequant_cpu(const at::Tensor& gathered, int64_t world_size, int64_t group_size,
                     int64_t codec, const std::optional<at::Tensor>& residual,
                     const at::Tensor& out) {
  run_dequant(make_qar_dequant_params(gathered, world_size, group_size, codec, residual, out));
}

// N simulated ranks in one process: the all-to-all and the all-gather become memcpys.
void qar_loopback_cpu(const at::Tensor& xs, int64_t group_size, int64_t codec,
                      const std::optional<at::Tensor>& residual, const at::Tensor& send,
                      const at::Tensor& recv, const at::Tensor& mine, const at::Tensor& gathered,
                      const at::Tensor& out) {
  const QarLayout l =
      check_qar_loopback_args(xs, group_size, codec, residual, send, recv, mine, gathered, out);
  const int64_t n = l.world_size, cb = l.chunk_bytes;
  const int64_t rank_bytes = l.numel * xs.element_size();
  const DType dtype = qar_dtype(xs, "xs");
  const QarCodec c = static_cast<QarCodec>(codec);
  uint8_t* send_p = send.data_ptr<uint8_t>();
  uint8_t* recv_p = recv.data_ptr<uint8_t>();
  uint8_t* mine_p = mine.data_ptr<uint8_t>();
  uint8_t* gath_p = gathered.data_ptr<uint8_t>();
  for (int64_t r = 0; r < n; ++r) {
    run_quantize_pack({dtype, c, l, static_cast<const uint8_t*>(xs.data_ptr()) + r * rank_bytes,
                       send_p + r * n * cb});
  }
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(recv_p + k * n * cb + r * cb, send_p + r * n * cb + k * cb, cb);
    }
    run_reduce({c, l, recv_p + k * n * cb, mine_p + k * cb});
  }
  const void* res = residual.has_value() ? residual->data_ptr() : nullptr;
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(gath_p + r * n * cb, mine_p, n * cb);
    run_dequant({dtype, c, l, gath_p + r * n * cb, res,
                 static_cast<uint8_t*>(out.data_ptr()) + r * rank_bytes});
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CPU, m) {
  m.impl("qar_quantize_pack", &qar_quantize_pack_cpu);
  m.impl("qar_reduce_requant", &qar_reduce_requant_cpu);
  m.impl("qar_dequant", &qar_dequant_cpu);
  m.impl("qar_loopback", &qar_loopback_cpu);
}

}  // namespace tpssm
