#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "attention_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "arg_checks.h"
#include "buffer_rules.h"

namespace tpssm {
namespace {

constexpr const char* kOp = "decode_attention";

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, kOp, ": ", name,
              " must have a contiguous last dim (head_dim), got strides ", t.strides());
}

void check_index(const at::Tensor& t, const char* name, int64_t batch, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, kOp, ": ", name,
              " must be int64 or int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, kOp, ": ", name, " must have shape (B,) = (",
              batch, ",), got ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " must be on q's device (", q.device(),
              "), got ", t.device());
}

}  // namespace

DecodeAttentionParams make_decode_attention_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& v_cache,
                                                   const at::Tensor& rows,
                                                   const at::Tensor& lengths, double scale,
                                                   const at::Tensor& out, int64_t num_splits) {
  TORCH_CHECK(q.dim() == 3, kOp, ": q must be 3-D (B, H, head_dim), got shape ", q.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), hd = q.size(2);
  TORCH_CHECK(hd >= 1 && hd <= kDecodeAttentionMaxHeadDim, kOp, ": head_dim must be in [1, ",
              kDecodeAttentionMaxHeadDim, "], got ", hd);
  DecodeAttentionParams p;
  p.dtype = float_dtype(kOp, q, "q");
  check_last_dim_contiguous(q, "q");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(1) == heads && k_cache.size(3) == hd, kOp,
              ": k_cache must have shape (num_slots, H, max_len, head_dim) with H = ", heads,
              " and head_dim = ", hd, " (q's), got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp,
              ": v_cache must have k_cache's shape (", k_cache.sizes(), "), got ",
              v_cache.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), kOp, ": out must have q's shape (", q.sizes(),
              "), got ", out.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&k_cache, "k_cache"},
                                {&v_cache, "v_cache"}, {&out, "out"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype (",
                q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), kOp, ": ", name, " must be on q's device (",
                q.device(), "), got ", t->device());
    check_last_dim_contiguous(*t, name);
  }
  // Distinct (b, h) rows of out (the kernel's blocks write them concurrently): sufficient for
  // non-negative strides, and what any slice of a contiguous buffer satisfies.
  TORCH_CHECK((heads <= 1 || out.stride(1) >= hd) &&
                  (batch <= 1 || out.stride(0) >= (heads - 1) * out.stride(1) + hd),
              kOp, ": out's (batch, head) rows must not overlap each other, got strides ",
              out.strides());
  TORCH_CHECK(num_splits >= 0 && num_splits <= kDecodeAttentionMaxSplits, kOp,
              ": num_splits must be in [0, ", kDecodeAttentionMaxSplits,
              "] (0: automatic), got ", num_splits);
  TORCH_CHECK(batch * heads <= 0x7fffffff, kOp, ": B x H must be at most 2^31 - 1 (the grid's "
              "x dimension: one block per (row, head)), got ", batch * heads);
  check_index(rows, "rows", batch, q);
  check_index(lengths, "lengths", batch, q);
  check_buffer_rules(kOp, {named(out, "out")},
                     {named(q, "q"), named(k_cache, "k_cache"), named(v_cache, "v_cache"),
                      named(rows, "rows"), named(lengths, "lengths")});
  p.batch = batch;
  p.heads = heads;
  p.head_dim = hd;
  p.num_slots = k_cache.size(0);
  p.max_len = k_cache.size(2);
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_slot_stride = k_cache.stride(0);
  p.k_head_stride = k_cache.stride(1);
  p.k_seq_stride = k_cache.stride(2);
  p.v_slot_stride = v_cache.stride(0);
  p.v_head_stride = v_cache.stride(1);
  p.v_seq_stride = v_cache.stride(2);
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.rows_stride = rows.stride(0);
  p.lengths_stride = lengths.stride(0);
  p.rows_int32 = rows.scalar_type() == at::kInt;
  p.lengths_int32 = lengths.scalar_type() == at::kInt;
  p.scale = static_cast<float>(scale);
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.rows = rows.data_ptr();
  p.lengths = lengths.data_ptr();
  p.out = out.data_ptr();
  p.num_splits = num_splits;
  return p;
}

at::Tensor plan_decode_attention_splits(DecodeAttentionParams& p, int64_t sm_count,
                                        const at::Tensor& q) {
  if (p.num_splits == 0) p.num_splits = decode_attention_auto_splits(p.heads, p.max_len, sm_count);
  if (p.num_splits <= 1 || p.batch * p.heads == 0) {
    p.num_splits = 1;
    return at::Tensor();
  }
  at::Tensor partials = at::empty({p.batch * p.heads * p.num_splits * (p.head_dim + 2)},
                                  q.options().dtype(at::kFloat));
  p.partials = partials.data_ptr<float>();
  return partials;
}

}  // namespace tpssm
