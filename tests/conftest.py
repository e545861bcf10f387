"""Shared helpers of the tpssm test suite: the per-dtype tolerances (declared once, here), input
builders of the four SSM ops and the comparison against their references.

Tolerance rule (docs/conventions.md): a kernel's error against the fp64 reference must be at most
twice the error of the same reference computed in the kernel's dtype, plus a small epsilon (one
rounding of the stored value, relative to the magnitude of the result).
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterable, Optional, Sequence

import pytest
import torch

import tpssm  # noqa: F401  (registers torch.ops.tpssm)
from tpssm import ops
from tpssm.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f16", "bf16")

# One rounding of a stored value, relative to max(1, |result|).
EPS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Padded rows of `out` must keep this value (exactly representable in every dtype).
SENTINEL = 7.0

# Rank processes - the suite's own and those of the command lines it runs - forked from a server
# that imported torch once, not each importing it anew (a few CPU seconds a rank; the suite
# starts hundreds). tests/test_launch.py runs both start methods explicitly.
os.environ.setdefault("TPSSM_START_METHOD", "forkserver")

@contextlib.contextmanager
def on_cpu_kernels():
    """tpssm.ops on the compiled CPU kernels inside the block. The CUDA emulation
    (tools/cuda_emu) points tpssm.ops at the emulated CUDA kernels, which run on CPU tensors
    too: a test comparing a kernel with "the CPU op" would otherwise compare it with itself."""
    saved = ops._ops
    ops._ops = torch.ops.tpssm
    try:
        yield
    finally:
        ops._ops = saved


OP_REFS = {
    ops.causal_conv1d: causal_conv1d_ref,
    ops.causal_conv1d_update: causal_conv1d_update_ref,
    ops.selective_scan: selective_scan_ref,
    ops.selective_state_update: selective_state_update_ref,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_close_to_ref(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor,
                        dtype: torch.dtype, what: str = "") -> None:
    """|actual - truth| <= 2 |baseline - truth| + EPS[dtype] * max(1, |truth|), in max norm."""
    assert actual.shape == truth.shape, f"{what}: shape {actual.shape} != {truth.shape}"
    if actual.numel() == 0:
        return
    a, t, b = actual.double(), truth.double(), baseline.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - t).abs().max().item()
    base = (b - t).abs().max().item()
    bound = 2 * base + EPS[dtype] * max(1.0, t.abs().max().item())
    assert err <= bound, (f"{what}: max error {err:.3g} > bound {bound:.3g} "
                          f"(2 x baseline error {base:.3g} + eps, dtype {dtype})")


def run_vs_ref(op, kwargs: Dict, mutable: Sequence[str], dtype: torch.dtype) -> Dict:
    """Runs `op(**kwargs)` in place and its reference twice (fp64 = truth, `dtype` = baseline) on
    copies of the mutable tensors; asserts every mutable tensor matches. Returns the values the
    mutable tensors had before the call."""
    ref = OP_REFS[op]
    before = {n: kwargs[n].clone() for n in mutable if kwargs.get(n) is not None}
    results = {}
    for label, compute_dtype in (("truth", torch.float64), ("baseline", dtype)):
        kw = dict(kwargs)
        kw.update({n: t.clone() for n, t in before.items()})
        ref(**kw, compute_dtype=compute_dtype)
        results[label] = kw
    op(**kwargs)
    for n in before:
        assert_close_to_ref(kwargs[n], results["truth"][n], results["baseline"][n], dtype, n)
    return before


def assert_slots_untouched(after: torch.Tensor, before: torch.Tensor,
                           used: Iterable[int]) -> None:
    """Slots no non-padded row uses must be bit-identical to their values before the call."""
    used = {int(s) for s in used if int(s) >= 0}
    for slot in range(after.shape[0]):
        if slot not in used:
            assert torch.equal(after[slot], before[slot]), f"slot {slot} was modified"


def place_overlapping(k, first, second, overlap=True):
    """Moves k[first] and k[second] (values kept, made contiguous) into one byte buffer: second
    starts at the last 16-byte boundary inside first (they share 1 to 16 bytes), or with
    overlap=False at the first boundary after it (one storage, disjoint bytes). second is written
    last, so index tensors keep valid values."""
    a, b = k[first].contiguous(), k[second].contiguous()
    if overlap:
        off = (a.nbytes - 1) // 16 * 16
    else:
        off = (a.nbytes + 15) // 16 * 16
    buf = torch.zeros(off + b.nbytes + a.nbytes, dtype=torch.uint8)
    va = buf[:a.nbytes].view(a.dtype).view(a.shape)
    vb = buf[off:off + b.nbytes].view(b.dtype).view(b.shape)
    va.copy_(a)
    vb.copy_(b)
    k[first], k[second] = va, vb


def token_rows(seqlens: Sequence[int], rows: Iterable[int]) -> torch.Tensor:
    """Packed token indices of the given batch rows of a varlen batch."""
    starts = [0]
    for n in seqlens:
        starts.append(starts[-1] + n)
    idx = [t for b in rows for t in range(starts[b], starts[b + 1])]
    return torch.tensor(idx, dtype=torch.long)


def query_start_loc(seqlens: Sequence[int]) -> torch.Tensor:
    qsl = [0]
    for n in seqlens:
        qsl.append(qsl[-1] + n)
    return torch.tensor(qsl, dtype=torch.int32)


def _tokens(shape_tokens, channels, dtype, strided, scale=1.0, offset=0.0):
    """A token-major activation; when strided, a column slice of a wider tensor (as a TP mixer
    passes the pieces of its in_proj output)."""
    if strided:
        wide = torch.randn(*shape_tokens, channels + 5) * scale + offset
        return wide.to(dtype)[..., 3:3 + channels]
    return (torch.randn(*shape_tokens, channels) * scale + offset).to(dtype)


def _index(values: Optional[Sequence], dtype=torch.int32):
    return None if values is None else torch.tensor(values, dtype=dtype)


def conv_inputs(dtype=torch.float32, dim=37, width=4, seqlens=(9, 9), varlen=False,
                num_slots=5, slots=(3, 0), initial=(True, False), bias=True, states=True,
                activation="silu", strided=False, weight_t=False) -> Dict:
    """kwargs of ops.causal_conv1d. Dense batches need equal seqlens. weight_t: the weight is a
    transposed view (strides (1, dim))."""
    batch = len(seqlens)
    tok = (sum(seqlens),) if varlen else (batch, seqlens[0])
    if not varlen:
        assert len(set(seqlens)) == 1
    x = _tokens(tok, dim, dtype, strided)
    out = _tokens(tok, dim, dtype, strided).fill_(SENTINEL)
    return dict(
        x=x,
        weight=(torch.randn(width, dim).t() if weight_t else torch.randn(dim, width)).to(dtype)
        * 0.5,
        bias=(torch.randn(dim) * 0.5).to(dtype) if bias else None,
        conv_states=torch.randn(num_slots, dim, width - 1).to(dtype) if states else None,
        query_start_loc=query_start_loc(seqlens) if varlen else None,
        cache_indices=_index(slots),
        has_initial_state=_index(initial, torch.bool) if states else None,
        activation=activation,
        out=out,
    )


def _conv_state(num_slots, dim, width, dtype, layout="contiguous"):
    """A (num_slots, dim, width - 1) conv state: contiguous; "transposed", a view of a
    (num_slots, width - 1, dim) tensor; or "offset", contiguous rows one element past a 16-byte
    boundary (a slice of a flat buffer)."""
    if layout == "transposed":
        return torch.randn(num_slots, width - 1, dim).to(dtype).transpose(1, 2)
    if layout == "offset":
        n = num_slots * dim * (width - 1)
        return torch.randn(n + 1).to(dtype)[1:].view(num_slots, dim, width - 1)
    assert layout == "contiguous", layout
    return torch.randn(num_slots, dim, width - 1).to(dtype)


def conv_update_inputs(dtype=torch.float32, dim=37, width=4, batch=3, seqlen=None,
                       num_slots=5, slots=(4, 1, 2), bias=True, activation="silu",
                       strided=False, state_layout="contiguous", weight_t=False) -> Dict:
    """kwargs of ops.causal_conv1d_update; seqlen None means x is (batch, dim). state_layout: see
    _conv_state; weight_t: the weight is a transposed view (strides (1, dim))."""
    tok = (batch,) if seqlen is None else (batch, seqlen)
    x = _tokens(tok, dim, dtype, strided)
    return dict(
        x=x,
        conv_state=_conv_state(num_slots, dim, width, dtype, state_layout),
        weight=(torch.randn(width, dim).t() if weight_t else torch.randn(dim, width)).to(dtype)
        * 0.5,
        bias=(torch.randn(dim) * 0.5).to(dtype) if bias else None,
        activation=activation,
        cache_indices=_index(slots),
        out=_tokens(tok, dim, dtype, strided).fill_(SENTINEL),
    )


def _ssm_params(form, nheads, dstate):
    """A, D, delta bias of either form (Mamba1: nheads == dim, A (dim, dstate))."""
    if form == "mamba1":
        A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(nheads, 1) * 0.3
        A = A * (1 + 0.1 * torch.rand(nheads, dstate))
    else:
        A = -torch.exp(torch.rand(nheads))
    return A, torch.randn(nheads), torch.randn(nheads) * 0.5 - 1.0


def scan_inputs(dtype=torch.float32, form="mamba2", nheads=6, headdim=3, ngroups=2, dstate=8,
                seqlens=(7, 7), varlen=False, num_slots=4, slots=(1, 3), initial=(True, False),
                D=True, z=True, delta_bias=True, delta_softplus=True, states=True,
                state_dtype=torch.float32, group_dim=True, strided=False, **options) -> Dict:
    """kwargs of ops.selective_scan. Mamba1: form="mamba1" (headdim forced to 1). `options`
    (algorithm, chunk_size, split_len, lanes_per_channel, dt_min, dt_max) pass through to the
    op."""
    if form == "mamba1":
        headdim = 1
    dim = nheads * headdim
    batch = len(seqlens)
    tok = (sum(seqlens),) if varlen else (batch, seqlens[0])
    if not varlen:
        assert len(set(seqlens)) == 1
    A, Dv, db = _ssm_params(form, nheads, dstate)
    bc_ch = ngroups * dstate

    def bc():
        t = _tokens(tok, bc_ch, dtype, strided)
        return t.unflatten(-1, (ngroups, dstate)) if group_dim else t

    if not group_dim:
        assert ngroups == 1
    state_shape = (num_slots, dim, dstate) if form == "mamba1" else (
        num_slots, nheads, headdim, dstate)
    return dict(
        u=_tokens(tok, dim, dtype, strided),
        delta=_tokens(tok, nheads, dtype, strided, scale=0.5, offset=0.0 if delta_softplus else 0.5),
        A=A,
        B=bc(),
        C=bc(),
        D=Dv if D else None,
        z=_tokens(tok, dim, dtype, strided) if z else None,
        delta_bias=db if delta_bias else None,
        delta_softplus=delta_softplus,
        ssm_states=torch.randn(state_shape).to(state_dtype) if states else None,
        query_start_loc=query_start_loc(seqlens) if varlen else None,
        cache_indices=_index(slots),
        has_initial_state=_index(initial, torch.bool) if states else None,
        out=_tokens(tok, dim, dtype, strided).fill_(SENTINEL),
        **options,
    )


def ssu_inputs(dtype=torch.float32, form="mamba2", batch=3, nheads=4, headdim=3, ngroups=2,
               dstate=8, num_slots=6, src=(2, 0, 4), dst=None, D=True, z=True, dt_bias=True,
               dt_softplus=True, state_dtype=torch.float32, x3d=False, group_dim=True,
               strided=False, a_per_state=False, dt_rank=None) -> Dict:
    """kwargs of ops.selective_state_update. a_per_state: the Mamba2 form with an A per head and
    state, (nheads, dstate), as Mamba1's A with headdim > 1. dt_rank: the fused dt_proj - dt is
    the low-rank dt, the first dt_rank columns of an x_proj-like (batch, dt_rank + 2 dstate)
    buffer, with dt_proj_weight (dim, dt_rank); strided moves both off 16-byte alignment (a
    column slice at offset 3 of a wider buffer), which takes the kernel's scalar projection."""
    if form == "mamba1":
        headdim = 1
    dim = nheads * headdim
    A, Dv, db = _ssm_params(form, nheads, dstate)
    if a_per_state:
        A = _ssm_params("mamba1", nheads, dstate)[0]

    def act(channels, **kw):
        return _tokens((batch,), channels, dtype, strided, **kw)

    def heads(t):
        return t.unflatten(-1, (nheads, headdim)) if x3d else t

    def bc():
        t = act(ngroups * dstate)
        return t.unflatten(-1, (ngroups, dstate)) if group_dim else t

    state_shape = (num_slots, dim, dstate) if form == "mamba1" else (
        num_slots, nheads, headdim, dstate)
    extra = {}
    if dt_rank is None:
        dt = act(nheads, scale=0.5, offset=0.0 if dt_softplus else 0.5)
    else:
        # Projected dt ~ N(0, 0.25) (+ 0.5 without softplus), as the unfused inputs' dt.
        off = 3 if strided else 0
        x_dbl = torch.randn(batch, off + dt_rank + 2 * dstate)
        if not dt_softplus:
            x_dbl[:, off] += 2.0 * dt_rank ** 0.5
        dt = x_dbl.to(dtype)[:, off:off + dt_rank]
        w = torch.randn(dim, off + dt_rank + (1 if strided else 0)) * (0.5 / dt_rank ** 0.5)
        if not dt_softplus:
            w[:, off] = 0.25 / dt_rank ** 0.5
        extra["dt_proj_weight"] = w.to(dtype)[:, off:off + dt_rank]
    return dict(
        ssm_state=torch.randn(state_shape).to(state_dtype),
        x=heads(act(dim)),
        dt=dt,
        **extra,
        A=A,
        B=bc(),
        C=bc(),
        D=Dv if D else None,
        z=heads(act(dim)) if z else None,
        dt_bias=db if dt_bias else None,
        dt_softplus=dt_softplus,
        state_batch_indices=_index(src),
        dst_state_batch_indices=_index(dst),
        out=heads(act(dim)).fill_(SENTINEL),
    )
