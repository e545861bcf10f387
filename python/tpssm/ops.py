"""Typed wrappers of the tpssm SSM ops (torch.ops.tpssm.*) and their fake implementations.

Layout: activations are token-major with channel stride 1 - a dense batch is
(batch, seqlen, channels), a packed varlen batch is (total_tokens, channels) described by
`query_start_loc` (int32, [batch + 1], cumulative token offsets). Token and batch strides are
free, so column slices of a fused projection output (in_proj's x | z, or Mamba-2's x | B | C) go
in without copies, and the outputs feed out_proj directly: a TP mixer needs no transposes.

State pools are addressed by slot: `cache_indices` (int32, [batch]) gives each request's slot, a
slot equal to `pad_slot_id` (-1) marks a padding row that is skipped entirely (no state read or
written, its output rows left untouched). Without `cache_indices`, row b uses slot b.

Mamba1 and Mamba2 share one head form: channels = nheads * headdim.
- Mamba1: A (dim, dstate) per channel and state, delta / dt (..., dim), D and the delta bias (dim,),
  SSM state (num_slots, dim, dstate).
- Mamba2: A (nheads,) per head, delta / dt (..., nheads), D and the bias (nheads,),
  SSM state (num_slots, nheads, headdim, dstate).
- B, C: (..., ngroups, dstate) (or (..., dstate) for one group); head h uses group
  h // (nheads // ngroups).
A, D and the delta bias are float32; activations float32, float16 or bfloat16; SSM states float32
(default) or the activation dtype; conv weights, bias and conv states the activation dtype.

Each wrapper allocates `out` when not given and returns it. The C++ ops validate every argument
and raise errors that name the argument and the rule.

Memory rule, checked on every call from pointers and sizes (no host synchronisation): no buffer an
op writes (`out`, the state pools) may share a byte with any tensor it reads - index tensors
included - or with another buffer it writes ("<written> must not overlap <input>"), compared by
address whatever storage object holds them; nor with itself ("<written> must not overlap itself":
taken by increasing stride, each dimension's stride must reach past the extent of the ones before
it). Column slices of one buffer interleave and count as overlapping; disjoint parts of one
storage are fine.

No backward: the ops write in place, so under grad mode no argument may require grad
("<name> requires grad"); the models run under torch.no_grad().

Value checks - slots in range (0 <= slot < num_slots or == pad_slot_id), distinct slots among the
non-padded rows (the rows run concurrently; for selective_state_update: distinct write slots, and
no row writes a slot another row reads), and query_start_loc starting at 0, non-decreasing and
ending at total_tokens - need the index values on the host. The CPU ops always run them and raise
an error naming the index tensor, the entry and the rule. The CUDA ops run them only when the
environment variable TPSSM_DEBUG_CHECKS=1 is set, because reading the indices back is a host
synchronisation (and breaks CUDA-graph capture). Without it the CUDA kernels never read or write
outside the tensors whatever the index values, with these results:
- a row whose slot (cache_indices[b], state_batch_indices[b] or dst_state_batch_indices[b]) is
  neither pad_slot_id nor in [0, num_slots) is a padded row: no slot read or written, its out rows
  left untouched (without a state pool, cache_indices only mark padding);
- query_start_loc entries act clamped to [0, total_tokens], and a sequence whose (clamped) end
  precedes its start is empty. When the clamped starts are non-decreasing the result is that of the
  clamped query_start_loc, and tokens outside every sequence (before the first start, after the
  last end) keep their out rows. Otherwise (sequences out of order or overlapping) the out rows and
  final states of the rows involved are unspecified, but nothing outside their token rows and slots
  is written;
- slots repeated among non-padded rows (or a write slot another row reads): the results of those
  rows are unspecified (the rows race), other rows and slots are unaffected.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Optional

import torch

import tpssm  # noqa: F401  (loads the extension that registers torch.ops.tpssm)

__all__ = [
    "PAD_SLOT_ID",
    "SCAN_ALGORITHMS",
    "add_rms_norm",
    "causal_conv1d",
    "causal_conv1d_update",
    "decode_attention",
    "decode_attention_splits",
    "gated_rms_norm",
    "gated_sum_squares",
    "gemv",
    "gemv_conv_update",
    "GEMV_MAX_ROWS",
    "index_values_checked",
    "selective_scan",
    "selective_state_update",
    "set_programmatic_launch",
]

PAD_SLOT_ID = -1

# gemv's largest M (token rows); larger batches are GEMMs.
GEMV_MAX_ROWS = 8

# selective_scan's `algorithm` values (see its docstring).
SCAN_ALGORITHMS = ("auto", "recurrent", "recurrent_direct", "ssd")

_ops = torch.ops.tpssm


def _silu_flag(activation: Optional[str]) -> bool:
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    conv_states: Optional[torch.Tensor] = None,
    query_start_loc: Optional[torch.Tensor] = None,
    cache_indices: Optional[torch.Tensor] = None,
    has_initial_state: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: Optional[torch.Tensor] = None,
    chunk_len: int = 0,
) -> torch.Tensor:
    """Prefill depthwise causal conv1d (optionally fused SiLU).

    x: (batch, seqlen, dim) dense, or (total_tokens, dim) with query_start_loc (batch + 1,).
    weight: (dim, width), width 2..4 (Hugging Face stores (dim, 1, width): squeeze dim 1).
    bias: (dim,) or None.
    conv_states: (num_slots, dim, width - 1) or None. Rows with has_initial_state[b] start from
      conv_states[cache_indices[b]] (zeros otherwise); every non-padded row's last width - 1
      inputs are written back to its slot.
    cache_indices: (batch,) int32 slots, distinct among non-padded rows; has_initial_state:
      (batch,) bool, only together with conv_states.
    out and conv_states must not overlap any input or each other. Returns out, shaped like x.
    chunk_len: tokens per CUDA block of the flattened token range (every value >= 1 is valid;
      0 = one tile). A block walks its chunk in shared-memory tiles of 128 channels x 64 tokens
      (16-bit) / 32 tokens (fp32), re-reading the width - 1 tokens before each tile; tests force
      small values so that short inputs cross tile boundaries, benchmarks larger ones to trade
      blocks for the halo re-read. The result does not depend on it; the CPU ignores it.
    """
    if out is None:
        out = torch.empty_like(x)
    _ops.causal_conv1d(x, weight, bias, conv_states, query_start_loc, cache_indices,
                       has_initial_state, _silu_flag(activation), pad_slot_id, out, chunk_len)
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    cache_indices: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode conv: one token per request, (batch, dim), or a few, (batch, seqlen, dim).

    conv_state: (num_slots, dim, width - 1), updated in place to the last width - 1 inputs.
    weight: (dim, width); bias: (dim,) or None; cache_indices: (batch,) int32 or None.
    out and conv_state must not overlap any input or each other.
    Returns out, shaped like x. No allocation when out is given (CUDA-graph capturable).
    """
    if out is None:
        out = torch.empty_like(x)
    _ops.causal_conv1d_update(x, conv_state, weight, bias, _silu_flag(activation), cache_indices,
                              pad_slot_id, out)
    return out


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    *,
    delta_softplus: bool = False,
    ssm_states: Optional[torch.Tensor] = None,
    query_start_loc: Optional[torch.Tensor] = None,
    cache_indices: Optional[torch.Tensor] = None,
    has_initial_state: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: Optional[torch.Tensor] = None,
    dt_min: Optional[float] = None,
    dt_max: Optional[float] = None,
    algorithm: str = "auto",
    chunk_size: int = 0,
    split_len: int = 0,
    lanes_per_channel: int = 0,
) -> torch.Tensor:
    """Prefill selective scan (Mamba1 or Mamba2 form, see the module docstring).

    dt = softplus(delta + delta_bias) (threshold 20) when delta_softplus, else delta + delta_bias,
    then clamped to [dt_min, dt_max] (None: no limit);
    state = exp(dt * A) * state + dt * B * u; y = <state, C> + D * u; y *= silu(z) when z given.
    u, z: (batch, seqlen, dim) or (total_tokens, dim) with query_start_loc.
    delta: like u (Mamba1) or (..., nheads) (Mamba2).
    B, C: (..., ngroups, dstate) or (..., dstate).
    ssm_states: (num_slots, dim, dstate) or (num_slots, nheads, headdim, dstate), float32 or
      u's dtype, or None: read for rows with has_initial_state, written with every non-padded
      row's final state (the state is carried in fp32 and rounded only when stored).
    cache_indices: (batch,) int32 slots, distinct among non-padded rows; has_initial_state:
      (batch,) bool, only together with ssm_states.
    out and ssm_states must not overlap any input or each other. Returns out, shaped like u.

    Algorithm (the results agree to rounding; see tests/test_ops_*.py for the tolerances):
    algorithm: 'auto' (the chunked SSD form for the Mamba2 form where supported, else the
      recurrence), 'recurrent' (per-token recurrence), 'recurrent_direct' (CUDA Mamba1: the walk
      without staged token tiles, for comparison) or 'ssd' (chunked state-space-duality form;
      Mamba2 form only; on CUDA it needs bf16 / fp16 activations, headdim 64 or 128, dstate 64 or
      128 and sm_80 or later, and otherwise runs the recurrence). The CUDA SSD kernel multiplies
      16-bit operands and is accurate where decays exp(dt * A) stay <= 1 (dt >= 0, A <= 0, as in
      Mamba2 models); 'auto' takes it on CUDA only where dt >= 0 is certain (delta_softplus, or
      dt_min >= 0), else the recurrence.
    chunk_size: tokens per SSD chunk, 0 for the kernel's default (64; the CPU takes 1..4096,
      CUDA 64 only).
    split_len: 0 lets the launcher decide how to split long sequences over the device; n > 0
      forces the split plan with n-token pieces (tests use it to cross piece boundaries).
    lanes_per_channel: threads per channel of the CUDA Mamba1 form's staged walk, each taking
      dstate / L of the states: 0 lets the launcher pick the fewest of 1, 2, 4 that fill the
      device in one pass (a tensor-parallel shard has fewer channels), else 1, 2, 4 or 8 forces
      it (a value > 1 needs the staged walk: A of shape (dim, dstate), dstate <= 16, sm_80 or
      later; the launcher never picks 8 itself: benchmarks compare it with the chunked plan on
      batch-1 prompts). The CPU op accepts and ignores it.
    """
    if out is None:
        out = torch.empty_like(u)
    _ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_states,
                        query_start_loc, cache_indices, has_initial_state, pad_slot_id, out,
                        dt_min, dt_max, algorithm, chunk_size, split_len, lanes_per_channel)
    return out


def selective_state_update(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    *,
    dt_proj_weight: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
    dst_state_batch_indices: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode step: one token per request, state updated in place.

    x, z: (batch, dim) or (batch, nheads, headdim); dt: (batch, dim) (Mamba1) or (batch, nheads);
    B, C: (batch, ngroups, dstate) or (batch, dstate).
    dt_proj_weight (Mamba1 form only: A (dim, dstate)): (dim, dt_rank) in x's dtype, last
    dimension dense. dt is then the low-rank dt, (batch, dt_rank) with a dense last dimension
    (x_proj's first dt_rank columns, a column slice), and the op computes Mamba1's dt_proj inside
    the kernel: dt[b, c] = sum_r dt_proj_weight[c, r] * dt[b, r], accumulated in fp32 and rounded
    to x's dtype (as the dt_proj GEMM's output), before dt_bias and the softplus.
    ssm_state: (num_slots, dim, dstate) or (num_slots, nheads, headdim, dstate). Row b reads slot
    state_batch_indices[b] and writes slot dst_state_batch_indices[b] (the same slot when None):
    a state can be forked without copies. A write slot must not be another row's read slot.
    out and ssm_state must not overlap any input or each other.
    Returns out, shaped like x. No allocation when out is given (CUDA-graph capturable).
    """
    if out is None:
        out = torch.empty_like(x)
    _ops.selective_state_update(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight,
                                dt_softplus, state_batch_indices, dst_state_batch_indices,
                                pad_slot_id, out)
    return out


def add_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused residual add + RMSNorm (one kernel on CUDA): with `residual`, residual += x in the
    residual's dtype (fp32 or x's; updated in place) and the norm reads the result rounded to x's
    dtype; without, the norm of x. out = weight * rms_norm(h) with torch's rounding: normalised
    in fp32, rounded to x's dtype, multiplied by weight in x's dtype.
    x, out: (rows, dim), float32 / float16 / bfloat16, last dim contiguous; weight: (dim,) of
    x's dtype; residual: (rows, dim). out and residual must not overlap any argument or each other.
    Returns out (allocated when not given). The CPU op is bit-identical to the unfused ATen
    chain; the CUDA kernel sums the squares in another order.
    """
    if out is None:
        out = torch.empty_like(x)
    _ops.add_rms_norm(x, residual, weight, eps, out)
    return out


def gated_rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    z: Optional[torch.Tensor] = None,
    group_size: int = 0,
    first_group_size: int = 0,
    sum_sq: Optional[torch.Tensor] = None,
    norm_size: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Grouped RMSNorm of x * silu(z) (one kernel on CUDA): Mamba-2's gated norm (the gate before
    the norm), and without z and weight a weightless RMSNorm (Falcon-Mamba's dt / B / C norms).
    A row's columns form groups of `group_size` adjacent columns (0: one group of all of them),
    the first of `first_group_size` columns when given (> 0); the groups must tile the row.
    Per row and group: v = x * silu(z) in fp32; out = weight * round(v * rsqrt(mean(v^2) + eps)), rounded to x's dtype
    before the weight multiply (in x's dtype), as the models' torch code rounds.
    x, out: (rows, dim), float32 / float16 / bfloat16, last dim contiguous (column slices of a wider
    buffer are fine); z: like x, or None; weight: (dim,) of x's dtype, or None.
    Groups spanning tensor-parallel ranks: sum_sq, float32 (rows, groups), the groups' sums of
    squares reduced over the ranks (gated_sum_squares, then an all-reduce), replaces the local
    sums, and the mean divides by norm_size (the groups' width over all ranks).
    out must not overlap any input. Returns out (allocated when not given). The CPU op is
    bit-identical to the unfused ATen chain; the CUDA kernel sums in another order.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops.gated_rms_norm(x, z, weight, group_size, first_group_size, eps, sum_sq, norm_size, out)
    return out


def gated_sum_squares(
    x: torch.Tensor,
    *,
    z: Optional[torch.Tensor] = None,
    group_size: int = 0,
    first_group_size: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The first half of gated_rms_norm for groups that span ranks: float32 (rows, groups), each
    group's sum of (x * silu(z))^2 (fp32) over this rank's columns. x, z and the groups as in
    gated_rms_norm; out may be a column slice of a wider (rows, all groups) buffer."""
    if out is None:
        rows, dim = x.shape if x.dim() == 2 else (0, 0)
        group = group_size or dim
        first = first_group_size or group
        # Sizes the op refuses get an empty placeholder, so that its own error names the rule.
        groups = 1 + (dim - first) // group if 0 < first <= dim and group > 0 else 0
        out = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    _ops.gated_sum_squares(x, z, group_size, first_group_size, out)
    return out


def _product_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """gemv's (M, N) out when none is given; empty for an x or weight the op refuses, so that its
    own error names the argument."""
    m = x.shape[0] if x.dim() == 2 else 0
    n = weight.shape[0] if weight.dim() == 2 else 0
    return torch.empty(m, n, dtype=x.dtype, device=x.device)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    out: Optional[torch.Tensor] = None,
    warps_per_row: int = 0,
    rows_per_warp: int = 0,
    norm_weight: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """The decode-sized projection: out = x @ weight.T (+ bias) for at most GEMV_MAX_ROWS (8)
    token rows, summed in fp32 and rounded once to x's dtype (F.linear's result up to the order
    of the sums). On CUDA one kernel streams the weight once with 16-byte loads (element loads
    when K or an address does not allow them).
    x: (M, K), M <= 8; weight: (N, K); bias: (N,) contiguous, or None; out: (M, N). One dtype
    (float32 / float16 / bfloat16) and one device for all; last dims contiguous, row strides free
    (a column slice of a wider buffer is fine). out must not overlap any input.
    warps_per_row (1, 2, 4, 8) and rows_per_warp (1, 2, 4) fix the CUDA launch (0: the plan
    picks; see csrc/kernels/gemv_kernels.h); the CPU op ignores them after checking them.
    Norm prologue (a decode layer's norm and in_proj in one launch): with norm_weight (K,) the
    product reads add_rms_norm(x, norm_weight, norm_eps, residual=...)'s output instead of x -
    bit for bit on CUDA, the kernel reduces the squares in add_rms_norm's order. With residual
    (M, K) float32 or x's dtype, the updated stream residual + x goes to residual_out (same
    shape and dtype, disjoint from every input and from out) and residual itself is only read:
    every block reads it while one block writes the new stream. On CUDA the normalised rows live
    in shared memory, M x K x element size bytes (an error past the device's limit).
    Returns out (allocated when not given).
    """
    if out is None:
        out = _product_out(x, weight)
    _ops.gemv(x, weight, bias, out, warps_per_row, rows_per_warp, norm_weight, residual,
              residual_out, norm_eps)
    return out


def gemv_conv_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor] = None,
    *,
    conv_start: int,
    activation: Optional[str] = None,
    cache_indices: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: Optional[torch.Tensor] = None,
    warps_per_row: int = 0,
    rows_per_warp: int = 0,
    norm_weight: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_out: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """A decode step's in_proj and its conv in one launch: gemv's product out = x @ weight.T
    (+ bias; with gemv's norm prologue when norm_weight is given, the layer's norm too), then
    causal_conv1d_update (one token a row) applied in place to its columns
    [conv_start, conv_start + conv_dim) - in_proj's conv channels (Mamba: x; Mamba-2: x | B | C).
    x, weight, bias, out, warps_per_row, rows_per_warp, norm_weight, residual, residual_out,
    norm_eps: as in gemv (M <= 8 rows).
    conv_weight: (conv_dim, width 2..4); conv_bias: (conv_dim,) or None; conv_state: (num_slots,
    conv_dim, width - 1), updated in place; cache_indices: (M,) int32 slots or None (row m uses
    slot m). All in x's dtype on x's device. Rows whose slot is pad_slot_id (or, on CUDA without
    TPSSM_DEBUG_CHECKS, out of range) keep the plain product in the conv columns and leave the
    state alone. out and conv_state must not overlap any input or each other.
    Equal to gemv followed by causal_conv1d_update of the conv columns (bit for bit on CUDA at the
    same launch options: the kernel rounds the product to the dtype before the conv, as the
    separate ops do). Returns out (allocated when not given).
    """
    if out is None:
        out = _product_out(x, weight)
    _ops.gemv_conv_update(x, weight, bias, conv_state, conv_weight, conv_bias, conv_start,
                          _silu_flag(activation), cache_indices, pad_slot_id, out, warps_per_row,
                          rows_per_warp, norm_weight, residual, residual_out, norm_eps)
    return out


def index_values_checked(device: torch.device) -> bool:
    """Whether the ops check index values for tensors on `device` (see "Value checks" above):
    always on the CPU, on CUDA only with TPSSM_DEBUG_CHECKS=1. Callers with rules of their own
    on the same values follow it, so that no CUDA path adds a host synchronisation."""
    return torch.device(device).type == "cpu" or os.environ.get("TPSSM_DEBUG_CHECKS") == "1"


def set_programmatic_launch(enabled: bool) -> bool:
    """Programmatic dependent launch of the decode-step kernels (add_rms_norm, gated_rms_norm,
    causal_conv1d_update, selective_state_update, gemv and gemv_conv_update) on sm_90+ GPUs:
    each may be scheduled while the kernel before it in the stream still runs, waits for it
    before touching memory, and meanwhile prefetches its weights into L2 (gemv), so the gaps
    between the small kernels of a decode step shrink. Results are unchanged. Process-wide, off
    by default; works inside CUDA graphs. Returns the previous setting."""
    return bool(_ops.set_programmatic_launch(bool(enabled)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    out: Optional[torch.Tensor] = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Decode attention read in place from a slot-indexed KV cache: for every row b and head h,
    out[b, h] = softmax(scale * K[rows[b], h, :n] q[b, h]) V[rows[b], h, :n] with
    n = min(lengths[b], max_len), fp32 accumulation. Only the keys a row holds are read (no
    gather of the slot, no mask).
    q, out: (B, H, head_dim), float32 / float16 / bfloat16; k_cache, v_cache: (num_slots, H,
    max_len, head_dim) of q's dtype; every head_dim contiguous (other strides free: a head or
    column slice of a wider cache is fine), head_dim <= 256; rows, lengths: (B,) int64 or int32.
    Values are never checked on the host (no sync; CUDA-graph capturable), on the CPU as on CUDA:
    a row outside [0, num_slots) or a length <= 0 gives out[b] = 0, and lengths clamp to
    max_len. out must not overlap any input. Returns out (allocated when not given).
    num_splits (CUDA): blocks per (row, head), each over an equal share of the row's keys, merged
    by a second kernel (flash-decoding) - 0 picks them from the heads, max_len and the SM count
    (decode_attention_splits). Results agree to fp32 rounding whatever the count; the CPU op
    ignores it.
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _ops.decode_attention(q, k_cache, v_cache, rows, lengths, scale, out, num_splits)
    return out


def decode_attention_splits(heads: int, max_len: int, sm_count: int) -> int:
    """The key splits decode_attention's automatic plan (num_splits=0) gives a cache of `heads`
    heads and `max_len` keys a row on a device of `sm_count` SMs: about four blocks an SM for one
    row, shares of at least 64 of the cache's keys, at most 32; never the batch, so that a row's
    result does not depend on the rows beside it."""
    return int(_ops.decode_attention_splits(int(heads), int(max_len), int(sm_count)))


# Fake implementations: the ops return nothing and only mutate `out` and the states, so tracing
# needs no shape logic; they check the rules a traced graph could otherwise get wrong silently
# (out shaped and typed like the input it mirrors; every tensor on one device - a call with one
# meta tensor among CPU or CUDA ones lands here too, where nothing would run). The real ops
# check everything else.
def _register_fake(name: str):
    def register(fake):
        signature = inspect.signature(fake)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = [(n, v) for n, v in signature.bind(*args, **kwargs).arguments.items()
                       if isinstance(v, torch.Tensor)]
            first, dev = tensors[0][0], tensors[0][1].device
            for n, v in tensors[1:]:
                torch._check(v.device == dev, lambda: f"{name}: {n} must be on the device of "
                                                      f"{first} ({dev}), got {v.device}")
            return fake(*args, **kwargs)

        return torch.library.register_fake(f"tpssm::{name}")(checked)

    return register


def _check_out_like(op: str, out: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    torch._check(out.dtype == ref.dtype,
                 lambda: f"{op}: out must have the dtype of {ref_name} ({ref.dtype}), got {out.dtype}")
    torch._check(out.shape == ref.shape,
                 lambda: f"{op}: out must have the shape of {ref_name} ({tuple(ref.shape)}), "
                         f"got {tuple(out.shape)}")


@_register_fake("causal_conv1d")
def _causal_conv1d_fake(x, weight, bias, conv_states, query_start_loc, cache_indices,
                        has_initial_state, silu, pad_slot_id, out, chunk_len=0) -> None:
    _check_out_like("causal_conv1d", out, x, "x")


@_register_fake("causal_conv1d_update")
def _causal_conv1d_update_fake(x, conv_state, weight, bias, silu, cache_indices, pad_slot_id,
                               out) -> None:
    _check_out_like("causal_conv1d_update", out, x, "x")


@_register_fake("selective_scan")
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_states,
                         query_start_loc, cache_indices, has_initial_state, pad_slot_id,
                         out, dt_min=None, dt_max=None, algorithm="auto", chunk_size=0,
                         split_len=0, lanes_per_channel=0) -> None:
    _check_out_like("selective_scan", out, u, "u")


@_register_fake("selective_state_update")
def _selective_state_update_fake(ssm_state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight,
                                 dt_softplus, state_batch_indices, dst_state_batch_indices,
                                 pad_slot_id, out) -> None:
    _check_out_like("selective_state_update", out, x, "x")


@_register_fake("add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps, out) -> None:
    _check_out_like("add_rms_norm", out, x, "x")


@_register_fake("gated_rms_norm")
def _gated_rms_norm_fake(x, z, weight, group_size, first_group_size, eps, sum_sq, norm_size,
                         out) -> None:
    _check_out_like("gated_rms_norm", out, x, "x")


@_register_fake("gated_sum_squares")
def _gated_sum_squares_fake(x, z, group_size, first_group_size, out) -> None:
    torch._check(out.dtype == torch.float32,
                 lambda: f"gated_sum_squares: out must be float32, got {out.dtype}")


@_register_fake("decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, rows, lengths, scale, out, num_splits=0
                           ) -> None:
    _check_out_like("decode_attention", out, q, "q")


def _check_gemv_out(op: str, x, weight, out) -> None:
    torch._check(out.dtype == x.dtype,
                 lambda: f"{op}: out must have the dtype of x ({x.dtype}), got {out.dtype}")
    torch._check(tuple(out.shape) == (x.shape[0], weight.shape[0]),
                 lambda: f"{op}: out must have shape (M, N) = ({x.shape[0]}, {weight.shape[0]}), "
                         f"got {tuple(out.shape)}")


def _check_gemv_residual_out(op: str, residual, residual_out) -> None:
    if residual is not None and residual_out is not None:
        torch._check(residual_out.shape == residual.shape and
                     residual_out.dtype == residual.dtype,
                     lambda: f"{op}: residual_out must have residual's shape and dtype")


@_register_fake("gemv")
def _gemv_fake(x, weight, bias, out, warps_per_row=0, rows_per_warp=0, norm_weight=None,
               residual=None, residual_out=None, norm_eps=1e-5) -> None:
    _check_gemv_out("gemv", x, weight, out)
    _check_gemv_residual_out("gemv", residual, residual_out)


@_register_fake("gemv_conv_update")
def _gemv_conv_update_fake(x, weight, bias, conv_state, conv_weight, conv_bias, conv_start, silu,
                           cache_indices, pad_slot_id, out, warps_per_row=0, rows_per_warp=0,
                           norm_weight=None, residual=None, residual_out=None,
                           norm_eps=1e-5) -> None:
    _check_gemv_out("gemv_conv_update", x, weight, out)
    _check_gemv_residual_out("gemv_conv_update", residual, residual_out)
