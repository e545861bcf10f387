// Runtime -> compile-time dispatch of the quantized all-reduce kernels (dtype and codec). Torch-
// free; callers have validated the values, so an unsupported one is a bug and throws.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/qallreduce_params.h"

namespace tpssm {

// fn(T{}) with T the element type of `dtype`, given the caller's float32 / float16 / bfloat16
// types (c10 types on the host, cuda_fp16 / cuda_bf16 types in CUDA code).
template <typename F32, typename F16, typename BF16, typename Fn>
void qar_dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(F32{}); return;
    case DType::kFloat16: fn(F16{}); return;
    case DType::kBFloat16: fn(BF16{}); return;
  }
  throw std::invalid_argument("tpssm qallreduce: unsupported dtype " +
                              std::to_string(static_cast<int>(dtype)));
}

template <QarCodec kCodec>
using QarCodecTag = std::integral_constant<QarCodec, kCodec>;

// fn(QarCodecTag<codec>{}): the codec becomes a constant expression decltype(tag)::value.
template <typename Fn>
void qar_dispatch_codec(QarCodec codec, Fn&& fn) {
  switch (codec) {
    case QarCodec::kInt8: fn(QarCodecTag<QarCodec::kInt8>{}); return;
    case QarCodec::kFp8E4M3: fn(QarCodecTag<QarCodec::kFp8E4M3>{}); return;
  }
  throw std::invalid_argument("tpssm qallreduce: unsupported codec " +
                              std::to_string(static_cast<int>(codec)));
}

}  // namespace tpssm
