// Validation of the four SSM ops and the filling of their params structs (csrc/kernels/ssm_params.h).
// Shared by the CPU and CUDA bindings: every rule an op documents is checked here, once, and every
// error names the op, the argument and the rule.
//
// Value checks (slot ranges, distinct write slots, query_start_loc monotonicity) need the index
// values on the host: the caller says whether to run them (check_index_values). The CPU ops always
// do, since their kernels trust the values; the CUDA ops only with TPSSM_DEBUG_CHECKS=1, because
// reading the values back is a host synchronisation that the decode hot path (and CUDA-graph
// capture) cannot afford - their kernels range-check every index on the device instead.
//
// The buffer rules (buffer_rules.h) are checked whatever the device, from pointers and sizes only:
// no buffer an op writes (out, the state pools) may share a byte with itself, with any tensor it
// reads, index tensors included, or with another buffer it writes; and no argument may require
// grad under grad mode.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "ssm_ops.h"

#include "buffer_rules.h"

#include <ATen/core/Tensor.h>

#include <utility>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <string>
#include <limits>
#include <unordered_set>
#include <vector>

namespace tpssm {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

const char* dtype_str(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kDouble: return "float64";
    default: return c10::toString(st);
  }
}

DType activation_dtype(const char* op, const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  dtype_str(t.scalar_type()));
  }
  return DType::kFloat32;
}

void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", dtype_str(want), ", got ",
              dtype_str(t.scalar_type()));
}

void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", dtype_str(ref.scalar_type()), "), got ", dtype_str(t.scalar_type()));
}

void check_device(const char* op, const OptTensor& t, const char* name, const at::Tensor& ref,
                  const char* ref_name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name,
              " (", ref.device(), "), got ", t->device());
}

void check_shape(const char* op, const at::Tensor& t, const char* name,
                 const std::vector<int64_t>& want, const char* desc) {
  TORCH_CHECK(t.sizes().equals(want), op, ": ", name, " must have shape ", desc, " = ",
              c10::IntArrayRef(want), ", got ", t.sizes());
}

// The last dimension (channels, or dstate) must be dense: kernels index it with stride 1.
void check_last_stride1(const char* op, const at::Tensor& t, const char* name, const char* what) {
  if (t.dim() == 0 || t.size(-1) <= 1) return;
  TORCH_CHECK(t.stride(-1) == 1, op, ": ", name, " must have stride 1 in its last dimension (",
              what, "), got strides ", t.strides());
}

// Dimensions [first, dim) must flatten to one channel axis of stride 1.
void check_channels_dense(const char* op, const at::Tensor& t, const char* name, int64_t first) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) == expected, op, ": ", name,
                " must have dense channels (stride 1 over the channel dimensions), got shape ",
                t.sizes(), " and strides ", t.strides());
    expected *= t.size(d);
  }
}

void check_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
}

void check_fits_int32(const char* op, int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= kInt32Max, op, ": ", what, " must fit in int32, got ", v);
}

void check_pad_slot_id(const char* op, int64_t pad_slot_id) {
  TORCH_CHECK(pad_slot_id >= std::numeric_limits<int32_t>::min() && pad_slot_id <= kInt32Max, op,
              ": pad_slot_id must fit in int32 (slots are int32), got ", pad_slot_id);
}

// Index tensors: int32, 1-D of the batch size, contiguous.
void check_index_tensor(const char* op, const OptTensor& t, const char* name, int64_t batch) {
  if (!t.has_value()) return;
  check_dtype(op, *t, name, at::kInt);
  check_shape(op, *t, name, {batch}, "(batch,)");
  check_contiguous(op, *t, name);
}

void check_has_initial_state(const char* op, const OptTensor& t, int64_t batch,
                             bool has_states, const char* states_name) {
  if (!t.has_value()) return;
  check_dtype(op, *t, "has_initial_state", at::kBool);
  check_shape(op, *t, "has_initial_state", {batch}, "(batch,)");
  check_contiguous(op, *t, "has_initial_state");
  TORCH_CHECK(has_states, op, ": has_initial_state requires ", states_name,
              " (the initial states are read from it)");
}

std::vector<int32_t> host_int32(const at::Tensor& t) {
  at::Tensor h = t.is_cpu() ? t : t.to(at::kCPU);
  h = h.contiguous();
  const int32_t* p = h.data_ptr<int32_t>();
  return std::vector<int32_t>(p, p + h.numel());
}

void check_query_start_loc_values(const char* op, const at::Tensor& qsl, int64_t total_tokens) {
  const std::vector<int32_t> v = host_int32(qsl);
  TORCH_CHECK(!v.empty() && v.front() == 0, op, ": query_start_loc must start at 0, got ",
              v.empty() ? -1 : v.front());
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    TORCH_CHECK(v[i] <= v[i + 1], op, ": query_start_loc must be non-decreasing, got ",
                "query_start_loc[", i, "] = ", v[i], " > query_start_loc[", i + 1, "] = ",
                v[i + 1]);
  }
  TORCH_CHECK(v.back() == total_tokens, op,
              ": query_start_loc must end at total_tokens (x.size(0) = ", total_tokens, "), got ",
              v.back());
}

// Each entry is pad_slot_id or a slot in [0, num_slots); num_slots < 0 means no state pool (then
// the indices only mark padding rows). Non-padded rows must use distinct slots when `distinct`,
// because the kernels process the rows concurrently.
std::vector<int32_t> check_slot_values(const char* op, const at::Tensor& idx, const char* name,
                                       int64_t num_slots, int64_t pad_slot_id, bool distinct) {
  const std::vector<int32_t> v = host_int32(idx);
  std::unordered_set<int32_t> seen;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] == pad_slot_id) continue;
    const bool in_range = v[i] >= 0 && (num_slots < 0 || v[i] < num_slots);
    TORCH_CHECK(in_range, op, ": ", name, "[", i, "] = ", v[i],
                " is out of range: a slot must satisfy 0 <= slot < num_slots (",
                num_slots < 0 ? std::string("no state pool") : std::to_string(num_slots),
                ") or equal pad_slot_id (", pad_slot_id, ")");
    if (distinct) {
      TORCH_CHECK(seen.insert(v[i]).second, op, ": ", name,
                  " must be distinct among non-padded rows, slot ", v[i], " appears twice");
    }
  }
  return v;
}

// Without an index tensor, row b uses slot b.
void check_implicit_slots(const char* op, int64_t batch, int64_t num_slots,
                          const char* states_name) {
  TORCH_CHECK(batch <= num_slots, op, ": without cache indices row b uses slot b, so ",
              states_name, " needs at least batch (", batch, ") slots, got ", num_slots);
}

// The token range of a batch: dense (batch, seqlen, channels) or varlen (total_tokens, channels).
struct BatchShape {
  bool varlen;
  int64_t batch;
  int64_t seqlen;  // dense: tokens per sequence; varlen: total tokens
};

BatchShape batch_shape(const char* op, const at::Tensor& x, const char* name,
                       const OptTensor& query_start_loc) {
  if (query_start_loc.has_value()) {
    TORCH_CHECK(x.dim() == 2, op, ": ", name,
                " must be 2-D (total_tokens, channels) when query_start_loc is given, got shape ",
                x.sizes());
    check_dtype(op, *query_start_loc, "query_start_loc", at::kInt);
    TORCH_CHECK(query_start_loc->dim() == 1 && query_start_loc->size(0) >= 1, op,
                ": query_start_loc must be 1-D (batch + 1,), got shape ",
                query_start_loc->sizes());
    check_contiguous(op, *query_start_loc, "query_start_loc");
    return {true, query_start_loc->size(0) - 1, x.size(0)};
  }
  TORCH_CHECK(x.dim() == 3, op, ": ", name,
              " must be 3-D (batch, seqlen, channels) without query_start_loc, got shape ",
              x.sizes());
  return {false, x.size(0), x.size(1)};
}

// The token-major shape of a per-token tensor with `inner` trailing dims, as in the batch of x.
std::vector<int64_t> token_shape(const BatchShape& bs, std::vector<int64_t> inner) {
  std::vector<int64_t> s;
  if (!bs.varlen) s.push_back(bs.batch);
  s.push_back(bs.seqlen);
  s.insert(s.end(), inner.begin(), inner.end());
  return s;
}

// The decode conv's state pool (num_slots, dim, width - 1) in ref's dtype and its slot per row
// (cache_indices, or slot b for row b); returns num_slots. dim_name names dim in the message.
int64_t check_conv_state_slots(const char* op, const at::Tensor& conv_state,
                               const at::Tensor& ref, const char* ref_name, int64_t dim,
                               const char* dim_name, int64_t width,
                               const OptTensor& cache_indices, int64_t rows, int64_t pad_slot_id,
                               bool check_index_values) {
  check_same_dtype(op, conv_state, "conv_state", ref, ref_name);
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(1) == dim &&
                  conv_state.size(2) == width - 1,
              op, ": conv_state must have shape (num_slots, ", dim_name, ", width - 1) = (*, ", dim,
              ", ", width - 1, "), got ", conv_state.sizes());
  const int64_t num_slots = conv_state.size(0);
  check_fits_int32(op, num_slots, "num_slots");
  check_index_tensor(op, cache_indices, "cache_indices", rows);
  if (cache_indices.has_value()) {
    if (check_index_values) {
      check_slot_values(op, *cache_indices, "cache_indices", num_slots, pad_slot_id, true);
    }
  } else {
    check_implicit_slots(op, rows, num_slots, "conv_state");
  }
  return num_slots;
}

// The conv ops' weight (dim, width) and optional bias (dim,), both in x's dtype; returns width.
int64_t check_conv_weight_bias(const char* op, const at::Tensor& weight, const OptTensor& bias,
                               const at::Tensor& x, int64_t dim) {
  check_same_dtype(op, weight, "weight", x, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim, op,
              ": weight must have shape (dim, width) with dim = ", dim, ", got ", weight.sizes());
  const int64_t width = weight.size(1);
  TORCH_CHECK(width >= 2 && width <= 4, op, ": weight width must be 2, 3 or 4, got ", width);
  if (bias.has_value()) {
    check_same_dtype(op, *bias, "bias", x, "x");
    check_shape(op, *bias, "bias", {dim}, "(dim,)");
    check_contiguous(op, *bias, "bias");
  }
  return width;
}

// The batch-description rules the two prefill ops share: the index tensors, the initial-state
// flags (they need a state pool) and, when check_values, query_start_loc's values and the slots of
// a state pool.
void check_prefill_batch(const char* op, const BatchShape& bs, const OptTensor& query_start_loc,
                         const OptTensor& cache_indices, const OptTensor& has_initial_state,
                         const char* states_name, bool has_states, int64_t num_slots,
                         int64_t pad_slot_id, bool check_values) {
  check_index_tensor(op, cache_indices, "cache_indices", bs.batch);
  check_has_initial_state(op, has_initial_state, bs.batch, has_states, states_name);
  if (bs.varlen && check_values) check_query_start_loc_values(op, *query_start_loc, bs.seqlen);
  if (cache_indices.has_value()) {
    if (check_values) {
      check_slot_values(op, *cache_indices, "cache_indices", has_states ? num_slots : -1,
                        pad_slot_id, has_states);
    }
  } else if (has_states) {
    check_implicit_slots(op, bs.batch, num_slots, states_name);
  }
}

void check_sizes_int32(const char* op, const BatchShape& bs, int64_t channels) {
  check_fits_int32(op, bs.batch, "the batch size");
  check_fits_int32(op, bs.seqlen, bs.varlen ? "total_tokens" : "seqlen");
  check_fits_int32(op, channels, "the channel count");
}

void check_out(const char* op, const at::Tensor& out, const at::Tensor& x, const char* x_name) {
  check_same_dtype(op, out, "out", x, x_name);
  TORCH_CHECK(out.sizes().equals(x.sizes()), op, ": out must have the shape of ", x_name, " (",
              x.sizes(), "), got ", out.sizes());
}

DType state_dtype_of(const char* op, const at::Tensor& state, const char* name,
                     const at::Tensor& act, DType act_dtype) {
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == act.scalar_type(), op,
              ": ", name, " must be float32 or the activation dtype (",
              dtype_str(act.scalar_type()), "), got ", dtype_str(state.scalar_type()));
  return state.scalar_type() == at::kFloat ? DType::kFloat32 : act_dtype;
}

// The SSM head form shared by the scan and the state update (see ssm_params.h).
struct HeadForm {
  int64_t nheads;
  int64_t headdim;
  int64_t dstate;
  int64_t ngroups;
  bool a_is_per_state;
};

// A is (nheads, dstate) (Mamba1 form, nheads == dim for Mamba1 itself) or (nheads,) (Mamba2).
HeadForm head_form(const char* op, const at::Tensor& A, int64_t dim, const at::Tensor& B,
                   int64_t B_group_dim) {
  check_dtype(op, A, "A", at::kFloat);
  TORCH_CHECK(A.dim() == 1 || A.dim() == 2, op,
              ": A must be 2-D (dim, dstate) (Mamba1) or 1-D (nheads,) (Mamba2), got shape ",
              A.sizes());
  HeadForm f{};
  f.a_is_per_state = A.dim() == 2;
  f.nheads = A.size(0);
  TORCH_CHECK(f.nheads > 0 && dim % f.nheads == 0, op, ": dim (", dim,
              ") must be divisible by nheads (A.size(0) = ", f.nheads, ")");
  f.headdim = dim / f.nheads;
  f.dstate = B.size(-1);
  f.ngroups = B.dim() == B_group_dim + 2 ? B.size(B_group_dim) : 1;
  TORCH_CHECK(f.ngroups > 0 && f.nheads % f.ngroups == 0, op, ": nheads (", f.nheads,
              ") must be divisible by ngroups (", f.ngroups, ")");
  if (f.a_is_per_state) {
    TORCH_CHECK(A.size(1) == f.dstate, op, ": A must have shape (dim, dstate) with dstate = ",
                "B.size(-1) = ", f.dstate, ", got ", A.sizes());
  }
  TORCH_CHECK(f.dstate > 0, op, ": dstate (B.size(-1)) must be positive");
  check_fits_int32(op, f.dstate, "dstate");
  return f;
}

void check_per_head_param(const char* op, const OptTensor& t, const char* name, int64_t nheads) {
  if (!t.has_value()) return;
  check_dtype(op, *t, name, at::kFloat);
  check_shape(op, *t, name, {nheads}, "(nheads,)");
  check_contiguous(op, *t, name);
}

// ssm state pools: (num_slots, nheads, headdim, dstate), or (num_slots, dim, dstate).
void fill_state_layout(const char* op, const at::Tensor& s, const char* name, const HeadForm& f,
                       int64_t* num_slots, int64_t* slot_stride, int64_t* head_stride,
                       int64_t* dim_stride) {
  const int64_t dim = f.nheads * f.headdim;
  if (s.dim() == 4) {
    TORCH_CHECK(s.size(1) == f.nheads && s.size(2) == f.headdim && s.size(3) == f.dstate, op,
                ": ", name, " must have shape (num_slots, nheads, headdim, dstate) = (*, ",
                f.nheads, ", ", f.headdim, ", ", f.dstate, "), got ", s.sizes());
    *head_stride = s.stride(1);
    *dim_stride = s.stride(2);
  } else {
    TORCH_CHECK(s.dim() == 3 && s.size(1) == dim && s.size(2) == f.dstate, op, ": ", name,
                " must have shape (num_slots, dim, dstate) = (*, ", dim, ", ", f.dstate,
                ") or (num_slots, nheads, headdim, dstate), got ", s.sizes());
    *head_stride = s.stride(1) * f.headdim;
    *dim_stride = s.stride(1);
  }
  *num_slots = s.size(0);
  check_fits_int32(op, *num_slots, "num_slots");
  check_last_stride1(op, s, name, "dstate");
  *slot_stride = s.stride(0);
}

}  // namespace

bool cuda_index_values_checked_on_host() {
  const char* v = std::getenv("TPSSM_DEBUG_CHECKS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

CausalConv1dParams make_causal_conv1d_params(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
    const OptTensor& conv_states, const OptTensor& query_start_loc,
    const OptTensor& cache_indices, const OptTensor& has_initial_state, bool silu,
    int64_t pad_slot_id, const at::Tensor& out, int64_t chunk_len, bool check_index_values) {
  const char* op = "causal_conv1d";
  CausalConv1dParams p{};
  TORCH_CHECK(chunk_len >= 0, op, ": chunk_len must be >= 0 (0: the launcher decides), got ",
              chunk_len);
  p.chunk_len = chunk_len;
  p.dtype = activation_dtype(op, x, "x");
  check_device(op, weight, "weight", x, "x");
  check_device(op, bias, "bias", x, "x");
  check_device(op, conv_states, "conv_states", x, "x");
  check_device(op, query_start_loc, "query_start_loc", x, "x");
  check_device(op, cache_indices, "cache_indices", x, "x");
  check_device(op, has_initial_state, "has_initial_state", x, "x");
  check_device(op, out, "out", x, "x");

  const BatchShape bs = batch_shape(op, x, "x", query_start_loc);
  const int64_t dim = x.size(-1);
  check_sizes_int32(op, bs, dim);
  check_pad_slot_id(op, pad_slot_id);
  check_last_stride1(op, x, "x", "channels");

  const int64_t width = check_conv_weight_bias(op, weight, bias, x, dim);
  check_out(op, out, x, "x");
  check_last_stride1(op, out, "out", "channels");

  p.num_slots = 0;
  if (conv_states.has_value()) {
    const at::Tensor& s = *conv_states;
    check_same_dtype(op, s, "conv_states", x, "x");
    TORCH_CHECK(s.dim() == 3 && s.size(1) == dim && s.size(2) == width - 1, op,
                ": conv_states must have shape (num_slots, dim, width - 1) = (*, ", dim, ", ",
                width - 1, "), got ", s.sizes());
    p.num_slots = s.size(0);
    check_fits_int32(op, p.num_slots, "num_slots");
    p.conv_states = s.data_ptr();
    p.conv_states_slot_stride = s.stride(0);
    p.conv_states_channel_stride = s.stride(1);
    p.conv_states_width_stride = s.stride(2);
  }
  check_buffer_rules(op, {named(out, "out"), named(conv_states, "conv_states")},
                     {named(x, "x"), named(weight, "weight"), named(bias, "bias"),
                      named(query_start_loc, "query_start_loc"),
                      named(cache_indices, "cache_indices"),
                      named(has_initial_state, "has_initial_state")});
  check_prefill_batch(op, bs, query_start_loc, cache_indices, has_initial_state, "conv_states",
                      conv_states.has_value(), p.num_slots, pad_slot_id, check_index_values);

  p.batch = bs.batch;
  p.dim = dim;
  p.seqlen = bs.seqlen;
  p.width = static_cast<int32_t>(width);
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_batch_stride = bs.varlen ? 0 : x.stride(0);
  p.x_token_stride = x.stride(-2);
  p.weight = weight.data_ptr();
  p.weight_channel_stride = weight.stride(0);
  p.weight_width_stride = weight.stride(1);
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_batch_stride = bs.varlen ? 0 : out.stride(0);
  p.out_token_stride = out.stride(-2);
  p.query_start_loc = bs.varlen ? query_start_loc->data_ptr<int32_t>() : nullptr;
  p.cache_indices = cache_indices.has_value() ? cache_indices->data_ptr<int32_t>() : nullptr;
  p.has_initial_state =
      has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  p.pad_slot_id = static_cast<int32_t>(pad_slot_id);
  return p;
}

CausalConv1dUpdateParams make_causal_conv1d_update_params(
    const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
    const OptTensor& bias, bool silu, const OptTensor& cache_indices, int64_t pad_slot_id,
    const at::Tensor& out, bool check_index_values) {
  const char* op = "causal_conv1d_update";
  CausalConv1dUpdateParams p{};
  p.dtype = activation_dtype(op, x, "x");
  check_device(op, conv_state, "conv_state", x, "x");
  check_device(op, weight, "weight", x, "x");
  check_device(op, bias, "bias", x, "x");
  check_device(op, cache_indices, "cache_indices", x, "x");
  check_device(op, out, "out", x, "x");

  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op,
              ": x must be 2-D (batch, dim) or 3-D (batch, seqlen, dim), got shape ", x.sizes());
  const int64_t batch = x.size(0);
  const int64_t seqlen = x.dim() == 3 ? x.size(1) : 1;
  const int64_t dim = x.size(-1);
  check_sizes_int32(op, BatchShape{false, batch, seqlen}, dim);
  check_pad_slot_id(op, pad_slot_id);
  check_last_stride1(op, x, "x", "channels");

  const int64_t width = check_conv_weight_bias(op, weight, bias, x, dim);
  p.num_slots = check_conv_state_slots(op, conv_state, x, "x", dim, "dim", width, cache_indices,
                                       batch, pad_slot_id, check_index_values);
  check_out(op, out, x, "x");
  check_last_stride1(op, out, "out", "channels");
  check_buffer_rules(op, {named(out, "out"), named(conv_state, "conv_state")},
                     {named(x, "x"), named(weight, "weight"), named(bias, "bias"),
                      named(cache_indices, "cache_indices")});

  p.batch = batch;
  p.dim = dim;
  p.seqlen = seqlen;
  p.width = static_cast<int32_t>(width);
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_token_stride = x.dim() == 3 ? x.stride(1) : 0;
  p.weight = weight.data_ptr();
  p.weight_channel_stride = weight.stride(0);
  p.weight_width_stride = weight.stride(1);
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_token_stride = out.dim() == 3 ? out.stride(1) : 0;
  p.conv_state = conv_state.data_ptr();
  p.conv_state_slot_stride = conv_state.stride(0);
  p.conv_state_channel_stride = conv_state.stride(1);
  p.conv_state_width_stride = conv_state.stride(2);
  p.cache_indices = cache_indices.has_value() ? cache_indices->data_ptr<int32_t>() : nullptr;
  p.pad_slot_id = static_cast<int32_t>(pad_slot_id);
  return p;
}

GemvConvParams make_gemv_conv_params(const at::Tensor& out, int64_t conv_start,
                                     const at::Tensor& conv_state, const at::Tensor& conv_weight,
                                     const OptTensor& conv_bias, bool silu,
                                     const OptTensor& cache_indices, int64_t pad_slot_id,
                                     bool check_index_values) {
  const char* op = "gemv_conv_update";
  check_device(op, conv_state, "conv_state", out, "out");
  check_device(op, conv_weight, "conv_weight", out, "out");
  check_device(op, conv_bias, "conv_bias", out, "out");
  check_device(op, cache_indices, "cache_indices", out, "out");
  check_pad_slot_id(op, pad_slot_id);
  const int64_t rows = out.size(0), n = out.size(1);

  check_same_dtype(op, conv_weight, "conv_weight", out, "out");
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) >= 1, op,
              ": conv_weight must have shape (conv_dim, width) with conv_dim >= 1, got ",
              conv_weight.sizes());
  const int64_t dim = conv_weight.size(0), width = conv_weight.size(1);
  TORCH_CHECK(width >= 2 && width <= 4, op, ": conv_weight width must be 2, 3 or 4, got ", width);
  TORCH_CHECK(conv_start >= 0 && conv_start <= n - dim, op,
              ": the conv columns [conv_start, conv_start + conv_dim) = [", conv_start, ", ",
              conv_start + dim, ") must lie inside the product's ", n, " columns");
  if (conv_bias.has_value()) {
    check_same_dtype(op, *conv_bias, "conv_bias", out, "out");
    check_shape(op, *conv_bias, "conv_bias", {dim}, "(conv_dim,)");
    check_contiguous(op, *conv_bias, "conv_bias");
  }
  const int64_t num_slots =
      check_conv_state_slots(op, conv_state, out, "out", dim, "conv_dim", width, cache_indices,
                             rows, pad_slot_id, check_index_values);

  GemvConvParams c;
  c.start = conv_start;
  c.dim = dim;
  c.width = static_cast<int32_t>(width);
  c.silu = silu;
  c.weight = conv_weight.data_ptr();
  c.weight_channel_stride = conv_weight.stride(0);
  c.weight_width_stride = conv_weight.stride(1);
  c.bias = conv_bias.has_value() ? conv_bias->data_ptr() : nullptr;
  c.state = conv_state.data_ptr();
  c.num_slots = num_slots;
  c.state_slot_stride = conv_state.stride(0);
  c.state_channel_stride = conv_state.stride(1);
  c.state_width_stride = conv_state.stride(2);
  c.cache_indices = cache_indices.has_value() ? cache_indices->data_ptr<int32_t>() : nullptr;
  c.pad_slot_id = static_cast<int32_t>(pad_slot_id);
  return c;
}

namespace {

ScanAlgorithm scan_algorithm_of(const char* op, c10::string_view name) {
  if (name == "auto") return ScanAlgorithm::kAuto;
  if (name == "recurrent") return ScanAlgorithm::kRecurrent;
  if (name == "recurrent_direct") return ScanAlgorithm::kRecurrentDirect;
  if (name == "ssd") return ScanAlgorithm::kSsd;
  TORCH_CHECK(false, op,
              ": algorithm must be 'auto', 'recurrent', 'recurrent_direct' or 'ssd', got '",
              std::string(name.data(), name.size()), "'");
  return ScanAlgorithm::kAuto;
}

// The SSD kernel of the CUDA op is compiled for one chunk length.
constexpr int64_t kCudaSsdChunk = 64;
constexpr int64_t kMaxSsdChunk = 4096;

void fill_scan_options(const char* op, const at::Tensor& u, const HeadForm& f,
                       std::optional<double> dt_min, std::optional<double> dt_max,
                       c10::string_view algorithm, int64_t chunk_size, int64_t split_len,
                       int64_t lanes_per_channel, SelectiveScanParams& p) {
  // None: no limit.
  const double lo = dt_min.value_or(-std::numeric_limits<double>::infinity());
  const double hi = dt_max.value_or(std::numeric_limits<double>::infinity());
  TORCH_CHECK(!std::isnan(lo) && !std::isnan(hi) && lo <= hi, op,
              ": dt_min must be <= dt_max (neither NaN), got dt_min = ", lo, ", dt_max = ", hi);
  p.dt_min = static_cast<float>(lo);
  p.dt_max = static_cast<float>(hi);
  p.algorithm = scan_algorithm_of(op, algorithm);
  TORCH_CHECK(p.algorithm != ScanAlgorithm::kSsd || !f.a_is_per_state, op,
              ": algorithm 'ssd' needs the Mamba2 form (A of shape (nheads,)); A here is per state");
  TORCH_CHECK(chunk_size >= 0 && chunk_size <= kMaxSsdChunk, op,
              ": chunk_size must be 0 (the kernel's default) or 1..", kMaxSsdChunk, ", got ",
              chunk_size);
  TORCH_CHECK(!u.is_cuda() || chunk_size == 0 || chunk_size == kCudaSsdChunk, op,
              ": chunk_size must be 0 or ", kCudaSsdChunk,
              " on CUDA (the SSD kernel's chunk), got ", chunk_size);
  p.chunk_size = chunk_size;
  TORCH_CHECK(split_len >= 0, op, ": split_len must be >= 0 (0: the launcher decides), got ",
              split_len);
  p.split_len = split_len;
  TORCH_CHECK(lanes_per_channel == 0 || lanes_per_channel == 1 || lanes_per_channel == 2 ||
                  lanes_per_channel == 4 || lanes_per_channel == 8,
              op, ": lanes_per_channel must be 0 (the launcher decides), 1, 2, 4 or 8, got ",
              lanes_per_channel);
  p.lanes_per_channel = lanes_per_channel;
}

}  // namespace

SelectiveScanParams make_selective_scan_params(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    bool delta_softplus, const OptTensor& ssm_states, const OptTensor& query_start_loc,
    const OptTensor& cache_indices, const OptTensor& has_initial_state, int64_t pad_slot_id,
    const at::Tensor& out, std::optional<double> dt_min, std::optional<double> dt_max,
    c10::string_view algorithm, int64_t chunk_size, int64_t split_len, int64_t lanes_per_channel,
    bool check_index_values) {
  const char* op = "selective_scan";
  SelectiveScanParams p{};
  p.act_dtype = activation_dtype(op, u, "u");
  check_device(op, delta, "delta", u, "u");
  check_device(op, A, "A", u, "u");
  check_device(op, B, "B", u, "u");
  check_device(op, C, "C", u, "u");
  check_device(op, D, "D", u, "u");
  check_device(op, z, "z", u, "u");
  check_device(op, delta_bias, "delta_bias", u, "u");
  check_device(op, ssm_states, "ssm_states", u, "u");
  check_device(op, query_start_loc, "query_start_loc", u, "u");
  check_device(op, cache_indices, "cache_indices", u, "u");
  check_device(op, has_initial_state, "has_initial_state", u, "u");
  check_device(op, out, "out", u, "u");

  const BatchShape bs = batch_shape(op, u, "u", query_start_loc);
  const int64_t dim = u.size(-1);
  check_sizes_int32(op, bs, dim);
  check_pad_slot_id(op, pad_slot_id);
  check_last_stride1(op, u, "u", "channels");

  // B / C: token-major (..., ngroups, dstate) or (..., dstate).
  const int64_t tok_dims = bs.varlen ? 1 : 2;
  check_same_dtype(op, B, "B", u, "u");
  check_same_dtype(op, C, "C", u, "u");
  TORCH_CHECK(B.dim() == tok_dims + 1 || B.dim() == tok_dims + 2, op, ": B must be ",
              bs.varlen ? "(total_tokens, ngroups, dstate) or (total_tokens, dstate)"
                        : "(batch, seqlen, ngroups, dstate) or (batch, seqlen, dstate)",
              ", got shape ", B.sizes());
  const HeadForm f = head_form(op, A, dim, B, tok_dims);
  const std::vector<int64_t> bc_inner =
      B.dim() == tok_dims + 2 ? std::vector<int64_t>{f.ngroups, f.dstate}
                              : std::vector<int64_t>{f.dstate};
  const char* bc_desc = bs.varlen ? "(total_tokens, [ngroups,] dstate) matching u"
                                  : "(batch, seqlen, [ngroups,] dstate) matching u";
  check_shape(op, B, "B", token_shape(bs, bc_inner), bc_desc);
  check_shape(op, C, "C", token_shape(bs, bc_inner), bc_desc);
  check_last_stride1(op, B, "B", "dstate");
  check_last_stride1(op, C, "C", "dstate");

  check_same_dtype(op, delta, "delta", u, "u");
  check_shape(op, delta, "delta", token_shape(bs, {f.nheads}),
              bs.varlen ? "(total_tokens, nheads)" : "(batch, seqlen, nheads)");
  check_last_stride1(op, delta, "delta", "heads");
  check_per_head_param(op, D, "D", f.nheads);
  check_per_head_param(op, delta_bias, "delta_bias", f.nheads);
  if (z.has_value()) {
    check_same_dtype(op, *z, "z", u, "u");
    TORCH_CHECK(z->sizes().equals(u.sizes()), op, ": z must have the shape of u (", u.sizes(),
                "), got ", z->sizes());
    check_last_stride1(op, *z, "z", "channels");
  }

  check_out(op, out, u, "u");
  check_last_stride1(op, out, "out", "channels");

  p.num_slots = 0;
  p.state_dtype = DType::kFloat32;
  if (ssm_states.has_value()) {
    p.state_dtype = state_dtype_of(op, *ssm_states, "ssm_states", u, p.act_dtype);
    fill_state_layout(op, *ssm_states, "ssm_states", f, &p.num_slots, &p.ssm_states_slot_stride,
                      &p.ssm_states_head_stride, &p.ssm_states_dim_stride);
    p.ssm_states = ssm_states->data_ptr();
  }
  check_buffer_rules(op, {named(out, "out"), named(ssm_states, "ssm_states")},
                     {named(u, "u"), named(delta, "delta"), named(A, "A"), named(B, "B"),
                      named(C, "C"), named(D, "D"), named(z, "z"),
                      named(delta_bias, "delta_bias"),
                      named(query_start_loc, "query_start_loc"),
                      named(cache_indices, "cache_indices"),
                      named(has_initial_state, "has_initial_state")});
  check_prefill_batch(op, bs, query_start_loc, cache_indices, has_initial_state, "ssm_states",
                      ssm_states.has_value(), p.num_slots, pad_slot_id, check_index_values);

  p.batch = bs.batch;
  p.seqlen = bs.seqlen;
  p.nheads = f.nheads;
  p.headdim = f.headdim;
  p.dstate = f.dstate;
  p.ngroups = f.ngroups;
  p.a_is_per_state = f.a_is_per_state;
  p.delta_softplus = delta_softplus;
  p.u = u.data_ptr();
  p.u_batch_stride = bs.varlen ? 0 : u.stride(0);
  p.u_token_stride = u.stride(tok_dims - 1);
  p.delta = delta.data_ptr();
  p.delta_batch_stride = bs.varlen ? 0 : delta.stride(0);
  p.delta_token_stride = delta.stride(tok_dims - 1);
  p.A = A.data_ptr<float>();
  p.A_head_stride = A.stride(0);
  p.A_state_stride = f.a_is_per_state ? A.stride(1) : 0;
  p.B = B.data_ptr();
  p.B_batch_stride = bs.varlen ? 0 : B.stride(0);
  p.B_token_stride = B.stride(tok_dims - 1);
  p.B_group_stride = B.dim() == tok_dims + 2 ? B.stride(tok_dims) : 0;
  p.C = C.data_ptr();
  p.C_batch_stride = bs.varlen ? 0 : C.stride(0);
  p.C_token_stride = C.stride(tok_dims - 1);
  p.C_group_stride = C.dim() == tok_dims + 2 ? C.stride(tok_dims) : 0;
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.z_batch_stride = z.has_value() && !bs.varlen ? z->stride(0) : 0;
  p.z_token_stride = z.has_value() ? z->stride(tok_dims - 1) : 0;
  p.delta_bias = delta_bias.has_value() ? delta_bias->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_batch_stride = bs.varlen ? 0 : out.stride(0);
  p.out_token_stride = out.stride(tok_dims - 1);
  p.query_start_loc = bs.varlen ? query_start_loc->data_ptr<int32_t>() : nullptr;
  p.cache_indices = cache_indices.has_value() ? cache_indices->data_ptr<int32_t>() : nullptr;
  p.has_initial_state =
      has_initial_state.has_value() ? has_initial_state->data_ptr<bool>() : nullptr;
  p.pad_slot_id = static_cast<int32_t>(pad_slot_id);
  fill_scan_options(op, u, f, dt_min, dt_max, algorithm, chunk_size, split_len,
                    lanes_per_channel, p);
  return p;
}

SelectiveStateUpdateParams make_selective_state_update_params(
    const at::Tensor& ssm_state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
    const OptTensor& dt_bias, const OptTensor& dt_proj_weight, bool dt_softplus,
    const OptTensor& state_batch_indices, const OptTensor& dst_state_batch_indices,
    int64_t pad_slot_id, const at::Tensor& out, bool check_index_values) {
  const char* op = "selective_state_update";
  SelectiveStateUpdateParams p{};
  p.act_dtype = activation_dtype(op, x, "x");
  check_device(op, ssm_state, "ssm_state", x, "x");
  check_device(op, dt, "dt", x, "x");
  check_device(op, A, "A", x, "x");
  check_device(op, B, "B", x, "x");
  check_device(op, C, "C", x, "x");
  check_device(op, D, "D", x, "x");
  check_device(op, z, "z", x, "x");
  check_device(op, dt_bias, "dt_bias", x, "x");
  check_device(op, dt_proj_weight, "dt_proj_weight", x, "x");
  check_device(op, state_batch_indices, "state_batch_indices", x, "x");
  check_device(op, dst_state_batch_indices, "dst_state_batch_indices", x, "x");
  check_device(op, out, "out", x, "x");

  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op,
              ": x must be 2-D (batch, dim) or 3-D (batch, nheads, headdim), got shape ",
              x.sizes());
  const int64_t batch = x.size(0);
  const int64_t dim = x.dim() == 3 ? x.size(1) * x.size(2) : x.size(1);
  check_sizes_int32(op, BatchShape{false, batch, 1}, dim);
  check_pad_slot_id(op, pad_slot_id);
  check_channels_dense(op, x, "x", 1);

  check_same_dtype(op, B, "B", x, "x");
  check_same_dtype(op, C, "C", x, "x");
  TORCH_CHECK(B.dim() == 2 || B.dim() == 3, op,
              ": B must be (batch, ngroups, dstate) or (batch, dstate), got shape ", B.sizes());
  const HeadForm f = head_form(op, A, dim, B, 1);
  if (x.dim() == 3) {
    TORCH_CHECK(x.size(1) == f.nheads, op, ": x of shape (batch, nheads, headdim) must have ",
                "nheads = A.size(0) = ", f.nheads, ", got ", x.sizes());
  }
  const std::vector<int64_t> bc_shape =
      B.dim() == 3 ? std::vector<int64_t>{batch, f.ngroups, f.dstate}
                   : std::vector<int64_t>{batch, f.dstate};
  check_shape(op, B, "B", bc_shape, "(batch, [ngroups,] dstate)");
  check_shape(op, C, "C", bc_shape, "(batch, [ngroups,] dstate) matching B");
  check_last_stride1(op, B, "B", "dstate");
  check_last_stride1(op, C, "C", "dstate");

  check_same_dtype(op, dt, "dt", x, "x");
  int64_t dt_rank = 0;
  if (dt_proj_weight.has_value()) {
    // The kernels project per channel inside the flat (Mamba-1) tiling; a Mamba-2 head's dt is
    // one value per head and comes straight from in_proj.
    TORCH_CHECK(f.a_is_per_state && f.headdim == 1, op,
                ": dt_proj_weight requires the Mamba-1 form (A of shape (dim, dstate), headdim 1),"
                " got A of shape ", A.sizes(), " and headdim ", f.headdim);
    check_same_dtype(op, *dt_proj_weight, "dt_proj_weight", x, "x");
    TORCH_CHECK(dt_proj_weight->dim() == 2 && dt_proj_weight->size(0) == f.nheads, op,
                ": dt_proj_weight must have shape (nheads, dt_rank) = (", f.nheads,
                ", dt.size(1)), got ", dt_proj_weight->sizes());
    dt_rank = dt_proj_weight->size(1);
    check_fits_int32(op, dt_rank, "dt_rank");
    check_last_stride1(op, *dt_proj_weight, "dt_proj_weight", "dt_rank");
    check_shape(op, dt, "dt", {batch, dt_rank}, "(batch, dt_rank) with dt_proj_weight");
    check_last_stride1(op, dt, "dt", "dt_rank");
  } else {
    check_shape(op, dt, "dt", {batch, f.nheads}, "(batch, nheads)");
    check_last_stride1(op, dt, "dt", "heads");
  }
  check_per_head_param(op, D, "D", f.nheads);
  check_per_head_param(op, dt_bias, "dt_bias", f.nheads);
  if (z.has_value()) {
    check_same_dtype(op, *z, "z", x, "x");
    TORCH_CHECK(z->sizes().equals(x.sizes()), op, ": z must have the shape of x (", x.sizes(),
                "), got ", z->sizes());
    check_channels_dense(op, *z, "z", 1);
  }

  p.state_dtype = state_dtype_of(op, ssm_state, "ssm_state", x, p.act_dtype);
  fill_state_layout(op, ssm_state, "ssm_state", f, &p.num_slots, &p.state_slot_stride,
                    &p.state_head_stride, &p.state_dim_stride);

  check_out(op, out, x, "x");
  check_channels_dense(op, out, "out", 1);

  check_index_tensor(op, state_batch_indices, "state_batch_indices", batch);
  check_index_tensor(op, dst_state_batch_indices, "dst_state_batch_indices", batch);
  check_buffer_rules(op, {named(out, "out"), named(ssm_state, "ssm_state")},
                     {named(x, "x"), named(dt, "dt"), named(A, "A"), named(B, "B"),
                      named(C, "C"), named(D, "D"), named(z, "z"), named(dt_bias, "dt_bias"),
                      named(dt_proj_weight, "dt_proj_weight"),
                      named(state_batch_indices, "state_batch_indices"),
                      named(dst_state_batch_indices, "dst_state_batch_indices")});
  if (!state_batch_indices.has_value()) {
    check_implicit_slots(op, batch, p.num_slots, "ssm_state");
  }
  if (check_index_values) {
    // Rows run concurrently: a row may not write a slot that another row reads or writes.
    std::vector<int32_t> src(batch), dst;
    for (int64_t b = 0; b < batch; ++b) src[b] = static_cast<int32_t>(b);
    if (state_batch_indices.has_value()) {
      src = check_slot_values(op, *state_batch_indices, "state_batch_indices", p.num_slots,
                              pad_slot_id, false);
    }
    if (dst_state_batch_indices.has_value()) {
      dst = check_slot_values(op, *dst_state_batch_indices, "dst_state_batch_indices",
                              p.num_slots, pad_slot_id, false);
    } else {
      dst = src;
    }
    auto padded = [&](int64_t b) {
      return (state_batch_indices.has_value() && src[b] == pad_slot_id) ||
             (dst_state_batch_indices.has_value() && dst[b] == pad_slot_id);
    };
    std::unordered_set<int32_t> written;
    for (int64_t b = 0; b < batch; ++b) {
      if (padded(b)) continue;
      TORCH_CHECK(written.insert(dst[b]).second, op,
                  ": write slots must be distinct among non-padded rows, slot ", dst[b],
                  " is written twice");
    }
    for (int64_t b = 0; b < batch; ++b) {
      if (padded(b) || src[b] == dst[b]) continue;
      TORCH_CHECK(!written.count(src[b]), op, ": row ", b, " reads slot ", src[b],
                  " that another row writes (a write slot must not be another row's read slot)");
    }
  }

  p.batch = batch;
  p.nheads = f.nheads;
  p.headdim = f.headdim;
  p.dstate = f.dstate;
  p.ngroups = f.ngroups;
  p.a_is_per_state = f.a_is_per_state;
  p.dt_softplus = dt_softplus;
  p.state = ssm_state.data_ptr();
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.dt = dt.data_ptr();
  p.dt_batch_stride = dt.stride(0);
  p.dt_proj_weight = dt_proj_weight.has_value() ? dt_proj_weight->data_ptr() : nullptr;
  p.dt_rank = dt_rank;
  p.dt_proj_row_stride = dt_proj_weight.has_value() ? dt_proj_weight->stride(0) : 0;
  p.A = A.data_ptr<float>();
  p.A_head_stride = A.stride(0);
  p.A_state_stride = f.a_is_per_state ? A.stride(1) : 0;
  p.B = B.data_ptr();
  p.B_batch_stride = B.stride(0);
  p.B_group_stride = B.dim() == 3 ? B.stride(1) : 0;
  p.C = C.data_ptr();
  p.C_batch_stride = C.stride(0);
  p.C_group_stride = C.dim() == 3 ? C.stride(1) : 0;
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.z = z.has_value() ? z->data_ptr() : nullptr;
  p.z_batch_stride = z.has_value() ? z->stride(0) : 0;
  p.dt_bias = dt_bias.has_value() ? dt_bias->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.state_batch_indices =
      state_batch_indices.has_value() ? state_batch_indices->data_ptr<int32_t>() : nullptr;
  p.dst_state_batch_indices = dst_state_batch_indices.has_value()
                                  ? dst_state_batch_indices->data_ptr<int32_t>()
                                  : nullptr;
  p.pad_slot_id = static_cast<int32_t>(pad_slot_id);
  return p;
}

}  // namespace tpssm
