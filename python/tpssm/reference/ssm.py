"""Pure-PyTorch references of the four SSM ops: the oracle of the tests and the baseline of the
benchmarks. They take the same arguments as the ops in tpssm.ops, follow the same semantics
(slots, padding, varlen, in-place state updates) and compute in fp32 (or fp64 with
`compute_dtype=torch.float64`), rounding to the output / state dtype only when storing.

Layouts (token-major, see csrc/kernels/ssm_params.h):
- dense batch: (batch, seqlen, channels); varlen batch: (total_tokens, channels) with
  query_start_loc (int32, [batch + 1]).
- Mamba1 form: u, delta, z: (..., dim); A: (dim, dstate); D, delta_bias: (dim,);
  ssm_states: (num_slots, dim, dstate).
- Mamba2 form: u, z: (..., nheads * headdim); delta: (..., nheads); A, D, delta_bias: (nheads,);
  ssm_states: (num_slots, nheads, headdim, dstate).
- B, C: (..., ngroups, dstate), or (..., dstate) for one group; head h uses group
  h // (nheads // ngroups).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "selective_scan_ref",
    "selective_state_update_ref",
    "softplus_ref",
]

PAD_SLOT_ID = -1


def softplus_ref(x: torch.Tensor) -> torch.Tensor:
    """softplus with the threshold 20 of the reference implementations (identity above it)."""
    return torch.where(x <= 20.0, torch.log1p(torch.exp(x)), x)


def _sequences(x: torch.Tensor, query_start_loc: Optional[torch.Tensor]) -> List[Tuple[int, torch.Tensor]]:
    """(batch row, token-major view) per sequence, for a dense or a varlen batch."""
    if query_start_loc is None:
        return [(b, x[b]) for b in range(x.shape[0])]
    qsl = query_start_loc.tolist()
    return [(b, x[qsl[b]:qsl[b + 1]]) for b in range(len(qsl) - 1)]


def _seq_slice(t: Optional[torch.Tensor], b: int, query_start_loc: Optional[torch.Tensor]):
    if t is None:
        return None
    if query_start_loc is None:
        return t[b]
    qsl = query_start_loc
    return t[int(qsl[b]):int(qsl[b + 1])]


def _slot(indices: Optional[torch.Tensor], b: int) -> int:
    return b if indices is None else int(indices[b])


def _initial(has_initial_state: Optional[torch.Tensor], b: int) -> bool:
    return False if has_initial_state is None else bool(has_initial_state[b])


def _conv_tokens(xs: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    """Conv of tokens xs (L, dim) given the width-1 previous inputs prev (width-1, dim)."""
    width = weight.shape[1]
    full = torch.cat([prev, xs], dim=0)  # (width - 1 + L, dim)
    L = xs.shape[0]
    acc = torch.zeros_like(xs)
    for k in range(width):
        acc = acc + full[k:k + L] * weight[:, k]
    if bias is not None:
        acc = acc + bias
    return F.silu(acc) if silu else acc


def causal_conv1d_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of tpssm.ops.causal_conv1d. x: (batch, seqlen, dim) or (total_tokens, dim);
    weight: (dim, width); conv_states: (num_slots, dim, width - 1), updated in place. chunk_len
    (how the CUDA op splits the work) is accepted and ignored."""
    silu = activation in ("silu", "swish")
    width = weight.shape[1]
    w = weight.to(compute_dtype)
    bz = None if bias is None else bias.to(compute_dtype)
    if out is None:
        out = torch.empty_like(x)
    for b, xs in _sequences(x, query_start_loc):
        slot = _slot(cache_indices, b)
        if cache_indices is not None and slot == pad_slot_id:
            continue
        dim = xs.shape[-1]
        if conv_states is not None and _initial(has_initial_state, b):
            prev = conv_states[slot].to(compute_dtype).t()  # (width - 1, dim)
        else:
            prev = torch.zeros(width - 1, dim, dtype=compute_dtype, device=x.device)
        xs32 = xs.to(compute_dtype)
        y = _conv_tokens(xs32, prev, w, bz, silu)
        _seq_slice(out, b, query_start_loc).copy_(y.to(out.dtype))
        if conv_states is not None:
            tail = torch.cat([prev, xs32], dim=0)[-(width - 1):]
            conv_states[slot].copy_(tail.t().to(conv_states.dtype))
    return out


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    cache_indices: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of tpssm.ops.causal_conv1d_update. x: (batch, dim) or (batch, seqlen, dim);
    conv_state: (num_slots, dim, width - 1), updated in place."""
    silu = activation in ("silu", "swish")
    width = weight.shape[1]
    x3 = x.unsqueeze(1) if x.dim() == 2 else x
    if out is None:
        out = torch.empty_like(x)
    out3 = out.unsqueeze(1) if out.dim() == 2 else out
    w = weight.to(compute_dtype)
    bz = None if bias is None else bias.to(compute_dtype)
    for b in range(x3.shape[0]):
        slot = _slot(cache_indices, b)
        if cache_indices is not None and slot == pad_slot_id:
            continue
        prev = conv_state[slot].to(compute_dtype).t()
        xs = x3[b].to(compute_dtype)
        out3[b].copy_(_conv_tokens(xs, prev, w, bz, silu).to(out.dtype))
        tail = torch.cat([prev, xs], dim=0)[-(width - 1):]
        conv_state[slot].copy_(tail.t().to(conv_state.dtype))
    return out


def _head_form(A: torch.Tensor, dim: int, dstate: int, compute_dtype):
    """(nheads, headdim, A as (nheads, dstate)) for either form."""
    if A.dim() == 2:  # Mamba1: per-channel, per-state A
        return A.shape[0], dim // A.shape[0], A.to(compute_dtype)
    nheads = A.shape[0]
    return nheads, dim // nheads, A.to(compute_dtype)[:, None].expand(nheads, dstate)


def _groups(Bt: torch.Tensor) -> torch.Tensor:
    """B or C of one token range as (L, ngroups, dstate)."""
    return Bt.unsqueeze(-2) if Bt.dim() == 2 else Bt


def selective_scan_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of tpssm.ops.selective_scan (see the module docstring for the shapes).
    ssm_states, when given, holds the initial state of rows with has_initial_state and receives
    every non-padded row's final state. algorithm, chunk_size, split_len and lanes_per_channel
    choose how the op computes, not what: they are accepted and ignored here (the per-token
    recurrence)."""
    dim = u.shape[-1]
    dstate = B.shape[-1]
    nheads, headdim, A_hn = _head_form(A, dim, dstate, compute_dtype)
    if out is None:
        out = torch.empty_like(u)
    for b, us in _sequences(u, query_start_loc):
        slot = _slot(cache_indices, b)
        if cache_indices is not None and slot == pad_slot_id:
            continue
        L = us.shape[0]
        x = us.to(compute_dtype).reshape(L, nheads, headdim)
        # unflatten, not reshape: an empty sequence has no elements to infer the -1 from.
        dt = _seq_slice(delta, b, query_start_loc).to(compute_dtype).unflatten(-1, (nheads, -1))
        dt = dt[..., 0]
        if delta_bias is not None:
            dt = dt + delta_bias.to(compute_dtype)
        if delta_softplus:
            dt = softplus_ref(dt)
        if dt_min is not None or dt_max is not None:
            dt = dt.clamp(dt_min, dt_max)
        Bs = _groups(_seq_slice(B, b, query_start_loc)).to(compute_dtype)
        Cs = _groups(_seq_slice(C, b, query_start_loc)).to(compute_dtype)
        heads_per_group = nheads // Bs.shape[1]
        Bh = Bs.repeat_interleave(heads_per_group, dim=1)  # (L, nheads, dstate)
        Ch = Cs.repeat_interleave(heads_per_group, dim=1)
        if ssm_states is not None and _initial(has_initial_state, b):
            h = ssm_states[slot].to(compute_dtype).reshape(nheads, headdim, dstate).clone()
        else:
            h = torch.zeros(nheads, headdim, dstate, dtype=compute_dtype, device=u.device)
        ys = []
        for t in range(L):
            dA = torch.exp(dt[t][:, None] * A_hn)  # (nheads, dstate)
            dBx = (dt[t][:, None, None] * Bh[t][:, None, :]) * x[t][:, :, None]
            h = dA[:, None, :] * h + dBx
            ys.append(torch.einsum("hpn,hn->hp", h, Ch[t]))
        y = torch.stack(ys) if L else x.new_zeros(0, nheads, headdim)
        if D is not None:
            y = y + x * D.to(compute_dtype).reshape(nheads, -1)
        y = y.reshape(L, dim)
        if z is not None:
            y = y * F.silu(_seq_slice(z, b, query_start_loc).to(compute_dtype))
        _seq_slice(out, b, query_start_loc).copy_(y.to(out.dtype))
        if ssm_states is not None:
            ssm_states[slot].copy_(h.reshape(ssm_states[slot].shape).to(ssm_states.dtype))
    return out


def selective_state_update_ref(
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
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of tpssm.ops.selective_state_update: one token per request. x, z:
    (batch, dim) or (batch, nheads, headdim); dt: (batch, dim) (Mamba1) or (batch, nheads);
    B, C: (batch, ngroups, dstate) or (batch, dstate); ssm_state (num_slots, dim, dstate) or
    (num_slots, nheads, headdim, dstate) is read at state_batch_indices[b] and written at
    dst_state_batch_indices[b].

    With dt_proj_weight (dim, dt_rank), dt is the low-rank dt (batch, dt_rank) and is projected
    first: dt @ dt_proj_weight.T computed in compute_dtype, then rounded to x's dtype as the ops
    round it (the output of the dt_proj GEMM they replace). The rounding is kept even in fp64:
    without it the fp64 reference would miss the 16-bit rounding of dt that every implementation
    of the model performs, and the tolerance rule would compare against a different function."""
    batch = x.shape[0]
    dim = x[0].numel()
    dstate = B.shape[-1]
    nheads, headdim, A_hn = _head_form(A, dim, dstate, compute_dtype)
    if out is None:
        out = torch.empty_like(x)
    # Read every source state first: a row's destination may be another row's source.
    updates = []
    for b in range(batch):
        src = _slot(state_batch_indices, b)
        dst = src if dst_state_batch_indices is None else int(dst_state_batch_indices[b])
        if (state_batch_indices is not None and src == pad_slot_id) or (
                dst_state_batch_indices is not None and dst == pad_slot_id):
            continue
        xb = x[b].to(compute_dtype).reshape(nheads, headdim)
        if dt_proj_weight is not None:
            dtb = (dt_proj_weight.to(compute_dtype) @ dt[b].to(compute_dtype))
            dtb = dtb.to(x.dtype).to(compute_dtype)
        else:
            dtb = dt[b].to(compute_dtype).reshape(nheads, -1)[:, 0]
        if dt_bias is not None:
            dtb = dtb + dt_bias.to(compute_dtype)
        if dt_softplus:
            dtb = softplus_ref(dtb)
        Bb = _groups(B[b:b + 1])[0].to(compute_dtype)
        Cb = _groups(C[b:b + 1])[0].to(compute_dtype)
        per = nheads // Bb.shape[0]
        Bh = Bb.repeat_interleave(per, dim=0)
        Ch = Cb.repeat_interleave(per, dim=0)
        h = ssm_state[src].to(compute_dtype).reshape(nheads, headdim, dstate)
        dA = torch.exp(dtb[:, None] * A_hn)
        h = dA[:, None, :] * h + (dtb[:, None, None] * Bh[:, None, :]) * xb[:, :, None]
        y = torch.einsum("hpn,hn->hp", h, Ch)
        if D is not None:
            y = y + xb * D.to(compute_dtype).reshape(nheads, -1)
        y = y.reshape(x[b].shape)
        if z is not None:
            y = y * F.silu(z[b].to(compute_dtype))
        out[b].copy_(y.to(out.dtype))
        updates.append((dst, h))
    for dst, h in updates:
        ssm_state[dst].copy_(h.reshape(ssm_state[dst].shape).to(ssm_state.dtype))
    return out
