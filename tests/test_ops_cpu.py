"""The CPU kernels of the four SSM ops against their pure-PyTorch references, and the chunk
consistency of the state cache (one-shot prefill == chunked prefill == prefill + decode)."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    SENTINEL,
    assert_slots_untouched,
    conv_inputs,
    conv_update_inputs,
    query_start_loc,
    run_vs_ref,
    scan_inputs,
    ssu_inputs,
    token_rows,
)
from tpssm import ops

f16, bf16 = torch.float16, torch.bfloat16


def _case_ids(cases):
    return [name for name, _ in cases]


def _padded_out_rows(out, seqlens, varlen, padded_rows):
    if varlen:
        return out[token_rows(seqlens, padded_rows)]
    return out[list(padded_rows)]


# ---------------------------------------------------------------------------------------------
# causal_conv1d

CONV_CASES = [
    ("base", {}),
    ("f16", dict(dtype=f16)),
    ("bf16", dict(dtype=bf16)),
    ("width2", dict(width=2)),
    ("width3", dict(width=3)),
    ("dim1", dict(dim=1)),
    ("dim130", dict(dim=130)),
    ("varlen", dict(varlen=True, seqlens=(5, 1, 0, 2, 7), slots=(0, 2, 4, 1, 3),
                    initial=(True, False, True, True, False))),
    ("varlen_bf16", dict(dtype=bf16, varlen=True, seqlens=(3, 1, 0, 6), slots=(0, 2, 4, 1),
                         initial=(True, True, False, False))),
    ("varlen_all_empty", dict(varlen=True, seqlens=(0, 0), slots=(1, 0),
                              initial=(True, False))),
    ("padded", dict(slots=(3, -1))),
    ("varlen_padded", dict(varlen=True, seqlens=(3, 4, 2), slots=(-1, 0, 2),
                           initial=(True, True, False))),
    ("no_cache_indices", dict(slots=None)),
    ("no_states", dict(states=False, slots=None)),
    ("no_states_padded", dict(states=False, slots=(-1, 0))),
    ("no_bias_no_silu", dict(bias=False, activation=None)),
    ("strided", dict(strided=True)),
    ("weight_transposed", dict(weight_t=True)),
]


@pytest.mark.parametrize("name,params", CONV_CASES, ids=_case_ids(CONV_CASES))
def test_causal_conv1d(name, params):
    kw = conv_inputs(**params)
    before = run_vs_ref(ops.causal_conv1d, kw, ("out", "conv_states"), kw["x"].dtype)
    slots = params.get("slots", (3, 0))
    seqlens = params.get("seqlens", (9, 9))
    padded = [b for b, s in enumerate(slots or ()) if s == -1]
    if padded:
        rows = _padded_out_rows(kw["out"], seqlens, params.get("varlen", False), padded)
        assert (rows == SENTINEL).all(), "padded output rows were written"
    if kw["conv_states"] is not None:
        used = slots if slots is not None else range(len(seqlens))
        assert_slots_untouched(kw["conv_states"], before["conv_states"], used)


def test_causal_conv1d_state_is_exact_copy_of_inputs():
    """The final conv state holds the last width - 1 inputs bit for bit, state included for a
    sequence shorter than width - 1."""
    kw = conv_inputs(dtype=bf16, varlen=True, seqlens=(6, 2), slots=(1, 0),
                     initial=(False, True))
    prev = kw["conv_states"][0].clone()
    ops.causal_conv1d(**kw)
    x = kw["x"]
    assert torch.equal(kw["conv_states"][1], x[3:6].t())
    assert torch.equal(kw["conv_states"][0], torch.cat([prev[:, 2:], x[6:8].t()], dim=1))


# ---------------------------------------------------------------------------------------------
# causal_conv1d_update

CONV_UPDATE_CASES = [
    ("base", {}),
    ("f16", dict(dtype=f16)),
    ("bf16", dict(dtype=bf16)),
    ("width2", dict(width=2)),
    ("width3", dict(width=3)),
    ("dim130", dict(dim=130)),
    ("seqlen3", dict(seqlen=3)),
    ("padded", dict(slots=(4, -1, 2))),
    ("no_cache_indices", dict(slots=None)),
    ("no_bias_no_silu", dict(bias=False, activation=None)),
    ("strided", dict(strided=True, seqlen=2)),
]


@pytest.mark.parametrize("name,params", CONV_UPDATE_CASES, ids=_case_ids(CONV_UPDATE_CASES))
def test_causal_conv1d_update(name, params):
    kw = conv_update_inputs(**params)
    before = run_vs_ref(ops.causal_conv1d_update, kw, ("out", "conv_state"), kw["x"].dtype)
    slots = params.get("slots", (4, 1, 2))
    for b, s in enumerate(slots or ()):
        if s == -1:
            assert (kw["out"][b] == SENTINEL).all(), "padded output row was written"
    used = slots if slots is not None else range(kw["x"].shape[0])
    assert_slots_untouched(kw["conv_state"], before["conv_state"], used)


# ---------------------------------------------------------------------------------------------
# selective_scan

SCAN_CASES = [
    ("base", {}),
    ("f16", dict(dtype=f16)),
    ("bf16", dict(dtype=bf16)),
    ("mamba1", dict(form="mamba1", nheads=7, dstate=5, ngroups=1, group_dim=False)),
    ("mamba1_bf16", dict(form="mamba1", nheads=7, dstate=5, ngroups=1, group_dim=False,
                         dtype=bf16)),
    ("ngroups1", dict(ngroups=1)),
    ("ngroups6", dict(ngroups=6)),
    ("odd_headdim", dict(nheads=3, headdim=5, ngroups=3)),
    ("varlen", dict(varlen=True, seqlens=(4, 1, 0, 3), slots=(0, 2, 3, 1),
                    initial=(True, False, True, False))),
    ("varlen_mamba1", dict(form="mamba1", nheads=5, dstate=4, ngroups=1, group_dim=False,
                           varlen=True, seqlens=(1, 5, 0), slots=(2, 0, 1),
                           initial=(True, True, False))),
    ("varlen_all_empty", dict(varlen=True, seqlens=(0, 0), slots=(1, 0),
                              initial=(True, False))),
    ("padded", dict(slots=(1, -1))),
    ("varlen_padded", dict(varlen=True, seqlens=(2, 3, 1), slots=(3, -1, 0),
                           initial=(True, True, False))),
    ("state_bf16", dict(dtype=bf16, state_dtype=bf16)),
    ("state_f16", dict(dtype=f16, state_dtype=f16)),
    ("no_optional", dict(D=False, z=False, delta_bias=False, delta_softplus=False,
                         states=False, slots=None)),
    ("no_cache_indices", dict(slots=None)),
    ("strided", dict(strided=True)),
    ("strided_varlen", dict(strided=True, varlen=True, seqlens=(3, 0, 4), slots=(2, 0, 1),
                            initial=(False, True, True))),
]


@pytest.mark.parametrize("name,params", SCAN_CASES, ids=_case_ids(SCAN_CASES))
def test_selective_scan(name, params):
    kw = scan_inputs(**params)
    before = run_vs_ref(ops.selective_scan, kw, ("out", "ssm_states"), kw["u"].dtype)
    slots = params.get("slots", (1, 3))
    seqlens = params.get("seqlens", (7, 7))
    padded = [b for b, s in enumerate(slots or ()) if s == -1]
    if padded:
        rows = _padded_out_rows(kw["out"], seqlens, params.get("varlen", False), padded)
        assert (rows == SENTINEL).all(), "padded output rows were written"
    if kw["ssm_states"] is not None:
        used = slots if slots is not None else range(len(seqlens))
        assert_slots_untouched(kw["ssm_states"], before["ssm_states"], used)


def test_selective_scan_16bit_state_rounds_only_when_stored():
    """A 16-bit state pool changes only the stored final state: the outputs equal those of an
    fp32 pool holding the same (rounded) initial states."""
    kw16 = scan_inputs(dtype=bf16, state_dtype=bf16)
    kw32 = dict(kw16, ssm_states=kw16["ssm_states"].float(), out=kw16["out"].clone())
    ops.selective_scan(**kw16)
    ops.selective_scan(**kw32)
    assert torch.equal(kw16["out"], kw32["out"])
    assert torch.equal(kw16["ssm_states"], kw32["ssm_states"].to(bf16))


# ---------------------------------------------------------------------------------------------
# selective_state_update

SSU_CASES = [
    ("base", {}),
    ("f16", dict(dtype=f16)),
    ("bf16", dict(dtype=bf16)),
    ("mamba1", dict(form="mamba1", nheads=7, dstate=5, ngroups=1, group_dim=False)),
    ("mamba1_bf16", dict(form="mamba1", nheads=7, dstate=5, ngroups=1, group_dim=False,
                         dtype=bf16)),
    ("ngroups1", dict(ngroups=1)),
    ("x3d", dict(x3d=True)),
    ("odd_headdim", dict(nheads=3, headdim=5, ngroups=1)),
    ("distinct_dst", dict(dst=(5, 1, 3))),
    ("fork", dict(src=(2, 2, 0), dst=(1, 3, 5))),
    ("padded_src", dict(src=(2, -1, 4))),
    ("padded_dst", dict(dst=(1, -1, 3))),
    ("state_bf16", dict(dtype=bf16, state_dtype=bf16)),
    ("state_f16", dict(dtype=f16, state_dtype=f16)),
    ("no_optional", dict(D=False, z=False, dt_bias=False, dt_softplus=False)),
    ("no_indices", dict(src=None)),
    ("strided", dict(strided=True, x3d=True)),
]


@pytest.mark.parametrize("name,params", SSU_CASES, ids=_case_ids(SSU_CASES))
def test_selective_state_update(name, params):
    kw = ssu_inputs(**params)
    before = run_vs_ref(ops.selective_state_update, kw, ("out", "ssm_state"), kw["x"].dtype)
    src = params.get("src", (2, 0, 4))
    dst = params.get("dst")
    rows = range(kw["x"].shape[0])
    padded = [b for b in rows if (src is not None and src[b] == -1)
              or (dst is not None and dst[b] == -1)]
    for b in padded:
        assert (kw["out"][b] == SENTINEL).all(), "padded output row was written"
    written = [(dst if dst is not None else src or list(rows))[b] for b in rows
               if b not in padded]
    assert_slots_untouched(kw["ssm_state"], before["ssm_state"], written)


# ---------------------------------------------------------------------------------------------
# Chunk consistency: the state cache carries a sequence across calls.

SEQLENS = (9, 6)
SLOTS = (2, 0)


def _assert_same(a, b, what):
    tol = dict(atol=1e-5, rtol=1e-5) if a.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def _split(tokens, seqlens, first):
    """(first parts, rests) of the packed sequences, each packed again."""
    qsl = query_start_loc(seqlens).tolist()
    heads = [tokens[qsl[b]:qsl[b] + first[b]] for b in range(len(seqlens))]
    tails = [tokens[qsl[b] + first[b]:qsl[b + 1]] for b in range(len(seqlens))]
    return torch.cat(heads), torch.cat(tails)


def _merge(heads, tails, first, seqlens):
    rest = [n - f for n, f in zip(seqlens, first)]
    hq, tq = query_start_loc(first).tolist(), query_start_loc(rest).tolist()
    return torch.cat([torch.cat([heads[hq[b]:hq[b + 1]], tails[tq[b]:tq[b + 1]]])
                      for b in range(len(seqlens))])


def _decode_steps(seqlens, first):
    """Per decode step: (batch row -> packed token index or None when that request is done)."""
    qsl = query_start_loc(seqlens).tolist()
    steps = []
    for j in range(max(n - f for n, f in zip(seqlens, first))):
        steps.append([qsl[b] + first[b] + j if first[b] + j < seqlens[b] else None
                      for b in range(len(seqlens))])
    return steps


@pytest.mark.parametrize("first", [(4, 2), (2, 1), (0, 5)], ids=["4_2", "2_1", "0_5"])
def test_causal_conv1d_chunk_consistency(first):
    dim, width = 37, 4
    x = torch.randn(sum(SEQLENS), dim)
    weight, bias = torch.randn(dim, width) * 0.5, torch.randn(dim) * 0.5
    slots = torch.tensor(SLOTS, dtype=torch.int32)
    fresh = torch.zeros(len(SEQLENS), dtype=torch.bool)
    common = dict(weight=weight, bias=bias, cache_indices=slots, activation="silu")

    states_full = torch.randn(3, dim, width - 1)
    out_full = ops.causal_conv1d(x, conv_states=states_full, has_initial_state=fresh,
                                 query_start_loc=query_start_loc(SEQLENS), **common)

    rest = tuple(n - f for n, f in zip(SEQLENS, first))
    x_head, x_tail = _split(x, SEQLENS, first)
    states = torch.randn(3, dim, width - 1)
    out_head = ops.causal_conv1d(x_head, conv_states=states, has_initial_state=fresh,
                                 query_start_loc=query_start_loc(first), **common)
    states_prefill = states.clone()
    out_tail = ops.causal_conv1d(x_tail, conv_states=states, has_initial_state=~fresh,
                                 query_start_loc=query_start_loc(rest), **common)
    _assert_same(_merge(out_head, out_tail, first, SEQLENS), out_full, "chunked prefill out")
    _assert_same(states[list(SLOTS)], states_full[list(SLOTS)], "chunked prefill state")

    states = states_prefill
    decoded = {}
    for step in _decode_steps(SEQLENS, first):
        idx = torch.tensor([SLOTS[b] if t is not None else -1 for b, t in enumerate(step)],
                           dtype=torch.int32)
        xs = torch.stack([x[t] if t is not None else torch.zeros(dim) for t in step])
        ys = ops.causal_conv1d_update(xs, states, weight, bias, activation="silu",
                                      cache_indices=idx)
        for b, t in enumerate(step):
            if t is not None:
                decoded[t] = ys[b]
    tails = torch.stack([decoded[t] for t in sorted(decoded)])
    _assert_same(_merge(out_head, tails, first, SEQLENS), out_full, "prefill + decode out")
    _assert_same(states[list(SLOTS)], states_full[list(SLOTS)], "prefill + decode state")


@pytest.mark.parametrize(
    "form,dtype,first",
    [("mamba2", torch.float32, (4, 2)), ("mamba1", torch.float32, (4, 2)),
     ("mamba2", torch.float32, (0, 1)), ("mamba2", bf16, (3, 5))],
    ids=["mamba2", "mamba1", "mamba2_empty_first", "mamba2_bf16"])
def test_selective_scan_chunk_consistency(form, dtype, first):
    kw = scan_inputs(dtype=dtype, form=form, seqlens=SEQLENS, varlen=True, slots=SLOTS,
                     initial=(False, False), num_slots=3,
                     **(dict(nheads=5, dstate=4, ngroups=1, group_dim=False)
                        if form == "mamba1" else {}))
    packed = ("u", "delta", "B", "C", "z")
    params = {k: kw[k] for k in ("A", "D", "delta_bias", "delta_softplus", "cache_indices")}
    fresh = torch.zeros(len(SEQLENS), dtype=torch.bool)

    states_full = torch.randn_like(kw["ssm_states"])
    out_full = ops.selective_scan(**{k: kw[k] for k in packed}, **params,
                                  ssm_states=states_full, has_initial_state=fresh,
                                  query_start_loc=query_start_loc(SEQLENS))

    rest = tuple(n - f for n, f in zip(SEQLENS, first))
    heads = {k: _split(kw[k], SEQLENS, first)[0] for k in packed}
    tails = {k: _split(kw[k], SEQLENS, first)[1] for k in packed}
    states = torch.randn_like(kw["ssm_states"])
    out_head = ops.selective_scan(**heads, **params, ssm_states=states, has_initial_state=fresh,
                                  query_start_loc=query_start_loc(first))
    states_prefill = states.clone()
    out_tail = ops.selective_scan(**tails, **params, ssm_states=states, has_initial_state=~fresh,
                                  query_start_loc=query_start_loc(rest))
    _assert_same(_merge(out_head, out_tail, first, SEQLENS), out_full, "chunked prefill out")
    _assert_same(states[list(SLOTS)], states_full[list(SLOTS)], "chunked prefill state")

    states = states_prefill
    decoded = {}
    for step in _decode_steps(SEQLENS, first):
        idx = torch.tensor([SLOTS[b] if t is not None else -1 for b, t in enumerate(step)],
                           dtype=torch.int32)
        pick = [t if t is not None else 0 for t in step]
        ys = ops.selective_state_update(
            states, kw["u"][pick], kw["delta"][pick], kw["A"], kw["B"][pick], kw["C"][pick],
            kw["D"], kw["z"][pick], kw["delta_bias"], dt_softplus=kw["delta_softplus"],
            state_batch_indices=idx)
        for b, t in enumerate(step):
            if t is not None:
                decoded[t] = ys[b]
    tails_dec = torch.stack([decoded[t] for t in sorted(decoded)])
    _assert_same(_merge(out_head, tails_dec, first, SEQLENS), out_full, "prefill + decode out")
    _assert_same(states[list(SLOTS)], states_full[list(SLOTS)], "prefill + decode state")
