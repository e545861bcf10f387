#include "qallreduce_ops.h"

#include <cstdint>

#include <c10/util/Exception.h>

#include "buffer_rules.h"

namespace tpssm {

namespace {

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % kQarAlignBytes == 0;
}

void check_activation(const at::Tensor& t, const char* name, int64_t group_size) {
  qar_dtype(t, name);
  TORCH_CHECK(t.dim() >= 1, name, " must have at least one dimension, got a scalar");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.size(-1) % group_size == 0, "group_size (", group_size,
              ") must divide the hidden (last) dim of ", name, ", got shape ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || aligned16(t), name,
              " must have a 16-byte aligned data pointer (the kernels use 128-bit accesses)");
}

}  // namespace

DType qar_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void qar_check_common(int64_t world_size, int64_t group_size, int64_t codec) {
  TORCH_CHECK(world_size >= 1 && world_size <= 1024, "world_size must be in [1, 1024], got ",
              world_size);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256,
              "group_size must be 32, 64, 128 or 256, got ", group_size);
  TORCH_CHECK(codec == 0 || codec == 1, "codec must be 0 (int8) or 1 (fp8 e4m3), got ", codec);
}

QarLayout qar_checked_layout(int64_t numel, int64_t world_size, int64_t group_size) {
  TORCH_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
  TORCH_CHECK(numel % group_size == 0, "numel (", numel, ") must be a multiple of group_size (",
              group_size, ")");
  return qar_make_layout(numel, static_cast<int32_t>(world_size),
                         static_cast<int32_t>(group_size));
}

void qar_check_buffer(const at::Tensor& buf, const char* name, int64_t min_bytes,
                      const at::Tensor& like) {
  TORCH_CHECK(buf.scalar_type() == at::kByte, name, " must be uint8, got ", buf.scalar_type());
  TORCH_CHECK(buf.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(buf.device() == like.device(), name, " must be on the device of the data (",
              like.device(), "), got ", buf.device());
  TORCH_CHECK(buf.numel() >= min_bytes, name, " must hold at least ", min_bytes,
              " bytes for this message, got ", buf.numel(), " (buffer capacity)");
  TORCH_CHECK(buf.numel() == 0 || aligned16(buf), name,
              " must have a 16-byte aligned data pointer");
}

QarQuantizePackParams make_qar_quantize_pack_params(const at::Tensor& x, int64_t world_size,
                                                    int64_t group_size, int64_t codec,
                                                    const at::Tensor& send) {
  qar_check_common(world_size, group_size, codec);
  check_activation(x, "x", group_size);
  QarQuantizePackParams p;
  p.dtype = qar_dtype(x, "x");
  p.codec = static_cast<QarCodec>(codec);
  p.layout = qar_checked_layout(x.numel(), world_size, group_size);
  qar_check_buffer(send, "send", world_size * p.layout.chunk_bytes, x);
  check_buffer_rules("qar_quantize_pack", {named(send, "send")}, {named(x, "x")});
  p.x = x.data_ptr();
  p.send = send.data_ptr<uint8_t>();
  return p;
}

QarReduceParams make_qar_reduce_params(const at::Tensor& recv, int64_t numel, int64_t world_size,
                                       int64_t group_size, int64_t codec, const at::Tensor& mine) {
  qar_check_common(world_size, group_size, codec);
  QarReduceParams p;
  p.codec = static_cast<QarCodec>(codec);
  p.layout = qar_checked_layout(numel, world_size, group_size);
  qar_check_buffer(recv, "recv", world_size * p.layout.chunk_bytes, recv);
  qar_check_buffer(mine, "mine", p.layout.chunk_bytes, recv);
  check_buffer_rules("qar_reduce_requant", {named(mine, "mine")}, {named(recv, "recv")});
  p.recv = recv.data_ptr<uint8_t>();
  p.mine = mine.data_ptr<uint8_t>();
  return p;
}

QarDequantParams make_qar_dequant_params(const at::Tensor& gathered, int64_t world_size,
                                         int64_t group_size, int64_t codec,
                                         const std::optional<at::Tensor>& residual,
                                         const at::Tensor& out) {
  qar_check_common(world_size, group_size, codec);
  check_activation(out, "out", group_size);
  QarDequantParams p;
  p.dtype = qar_dtype(out, "out");
  p.codec = static_cast<QarCodec>(codec);
  p.layout = qar_checked_layout(out.numel(), world_size, group_size);
  qar_check_buffer(gathered, "gathered", world_size * p.layout.chunk_bytes, out);
  p.residual = nullptr;
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == out.sizes(), "residual must have the shape of out ", out.sizes(),
                ", got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == out.scalar_type(), "residual must have the dtype of out (",
                out.scalar_type(), "), got ", r.scalar_type());
    TORCH_CHECK(r.device() == out.device(), "residual must be on the device of out");
    check_activation(r, "residual", group_size);
    p.residual = r.data_ptr();
  }
  check_buffer_rules("qar_dequant", {named(out, "out")},
                     {named(gathered, "gathered"), named(residual, "residual")});
  p.gathered = gathered.data_ptr<uint8_t>();
  p.out = out.data_ptr();
  return p;
}

QarLayout check_qar_loopback_args(const at::Tensor& xs, int64_t group_size, int64_t codec,
                                  const std::optional<at::Tensor>& residual,
                                  const at::Tensor& send, const at::Tensor& recv,
                                  const at::Tensor& mine, const at::Tensor& gathered,
                                  const at::Tensor& out) {
  TORCH_CHECK(xs.dim() >= 2, "xs must have shape (world_size, ..., hidden), got ", xs.sizes());
  const int64_t n = xs.size(0);
  qar_check_common(n, group_size, codec);
  check_activation(xs, "xs", group_size);
  TORCH_CHECK(out.sizes() == xs.sizes() && out.scalar_type() == xs.scalar_type(),
              "out must have the shape and dtype of xs (", xs.sizes(), ", ", xs.scalar_type(),
              "), got (", out.sizes(), ", ", out.scalar_type(), ")");
  TORCH_CHECK(out.device() == xs.device(), "out must be on the device of xs");
  check_activation(out, "out", group_size);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == xs.sizes().slice(1),
                "residual must have the per-rank shape xs.shape[1:] = ", xs.sizes().slice(1),
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == xs.scalar_type(),
                "residual must have the dtype of xs (", xs.scalar_type(), "), got ",
                residual->scalar_type());
    TORCH_CHECK(residual->device() == xs.device(), "residual must be on the device of xs");
    check_activation(*residual, "residual", group_size);
  }
  const QarLayout lay = qar_checked_layout(xs.numel() / n, n, group_size);
  qar_check_buffer(send, "send", n * n * lay.chunk_bytes, xs);
  qar_check_buffer(recv, "recv", n * n * lay.chunk_bytes, xs);
  qar_check_buffer(mine, "mine", n * lay.chunk_bytes, xs);
  qar_check_buffer(gathered, "gathered", n * n * lay.chunk_bytes, xs);
  check_buffer_rules("qar_loopback",
                     {named(send, "send"), named(recv, "recv"), named(mine, "mine"),
                      named(gathered, "gathered"), named(out, "out")},
                     {named(xs, "xs"), named(residual, "residual")});
  return lay;
}

}  // namespace tpssm
