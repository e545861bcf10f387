"""The CPU kernels of the four SSM ops against their pure-PyTorch references, the chunked (SSD)
form of the Mamba2 scan against the reference and the recurrence, and the chunk consistency of the
state cache (one-shot prefill == chunked prefill == prefill + decode)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import (
    EPS,
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
from tpssm.reference import softplus_ref

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
    # 'auto' runs the chunked form for Mamba2 on the CPU; these keep the recurrence covered.
    ("recurrent", dict(algorithm="recurrent")),
    ("recurrent_varlen_padded", dict(algorithm="recurrent", varlen=True, seqlens=(2, 3, 1),
                                     slots=(3, -1, 0), initial=(True, True, False))),
]


def _check_scan_untouched(kw, before, params, defaults):
    """Padded rows' outputs keep SENTINEL; slots no non-padded row uses keep their values."""
    slots = params.get("slots", defaults["slots"])
    seqlens = params.get("seqlens", defaults["seqlens"])
    varlen = params.get("varlen", defaults.get("varlen", False))
    padded = [b for b, s in enumerate(slots or ()) if s == -1]
    if padded:
        rows = _padded_out_rows(kw["out"], seqlens, varlen, padded)
        assert (rows == SENTINEL).all(), "padded output rows were written"
    if kw["ssm_states"] is not None:
        used = slots if slots is not None else range(len(seqlens))
        assert_slots_untouched(kw["ssm_states"], before["ssm_states"], used)


@pytest.mark.parametrize("name,params", SCAN_CASES, ids=_case_ids(SCAN_CASES))
def test_selective_scan(name, params):
    kw = scan_inputs(**params)
    before = run_vs_ref(ops.selective_scan, kw, ("out", "ssm_states"), kw["u"].dtype)
    _check_scan_untouched(kw, before, params, dict(slots=(1, 3), seqlens=(7, 7)))


@pytest.mark.parametrize("algorithm", ["auto", "recurrent"])
def test_selective_scan_16bit_state_rounds_only_when_stored(algorithm):
    """A 16-bit state pool changes only the stored final state: the outputs equal those of an
    fp32 pool holding the same (rounded) initial states."""
    kw16 = scan_inputs(dtype=bf16, state_dtype=bf16, algorithm=algorithm)
    kw32 = dict(kw16, ssm_states=kw16["ssm_states"].float(), out=kw16["out"].clone())
    ops.selective_scan(**kw16)
    ops.selective_scan(**kw32)
    assert torch.equal(kw16["out"], kw32["out"])
    assert torch.equal(kw16["ssm_states"], kw32["ssm_states"].to(bf16))


# ---------------------------------------------------------------------------------------------
# selective_scan, the chunked (SSD) form of the Mamba2 scan. The base case is varlen with an
# empty, a length-1 and chunk-boundary-length sequences (chunk 16: lengths 16, 17, 32), initial
# states from scattered slots; each variation changes one thing. Every case is checked against
# the fp64 reference with conftest's rule (error <= 2x the same-dtype reference's + EPS): the SSD
# form computes in fp32 from the same fp32 dt, so its error is of the order of the fp32
# reference's (different summation order, exps of cumulative sums instead of products of exps),
# and for 16-bit activations far below the 16-bit reference's. It is also checked against the
# recurrence on the same inputs (_assert_matches_recurrent).

SSD_BASE = dict(nheads=4, headdim=64, dstate=64, ngroups=2, varlen=True,
                seqlens=(16, 0, 1, 17, 32, 5), slots=(5, 0, 3, 1, 6, 2), num_slots=8,
                initial=(True, True, False, True, True, False), algorithm="ssd", chunk_size=16)

SSD_CASES = [
    ("base", {}),
    ("f16", dict(dtype=f16)),
    ("bf16", dict(dtype=bf16)),
    ("state_bf16", dict(dtype=bf16, state_dtype=bf16)),
    ("state_f16", dict(dtype=f16, state_dtype=f16)),
    ("headdim128", dict(headdim=128)),
    ("dstate128", dict(dstate=128)),
    ("ngroups1", dict(ngroups=1)),
    ("ngroups8", dict(nheads=8, ngroups=8)),
    ("chunk4", dict(chunk_size=4)),
    # The default chunk (64 on the CPU): lengths Q, Q + 1, 2Q and a short one.
    ("default_chunk", dict(chunk_size=0, seqlens=(64, 65, 128, 3), slots=(2, 7, 0, 4),
                           initial=(True, False, True, True))),
    # Decays far below fp32 resolution within a chunk (dt >= 1: a <= -1 per token).
    ("strong_decay", dict(chunk_size=0, seqlens=(64, 65, 128, 3), slots=(2, 7, 0, 4),
                          initial=(True, False, True, True), dt_min=1.0)),
    ("dt_limits", dict(dt_min=0.25, dt_max=0.4)),
    ("dense", dict(varlen=False, seqlens=(40, 40), slots=(3, 6), initial=(True, False))),
    ("dense_padded", dict(varlen=False, seqlens=(20, 20), slots=(-1, 2), initial=(True, True))),
    ("padded", dict(slots=(5, -1, 3, -1, 6, 2))),
    ("all_empty", dict(seqlens=(0, 0), slots=(1, 4), initial=(True, False))),
    ("empty_batch", dict(seqlens=(), slots=(), initial=())),
    ("no_softplus", dict(delta_softplus=False)),
    ("no_optional", dict(D=False, z=False, delta_bias=False, delta_softplus=False, states=False,
                         slots=None)),
    ("no_cache_indices", dict(slots=None)),
    ("strided", dict(strided=True)),
    # One sequence costs more than a thread's share: its group's heads split into blocks (3 + 2).
    ("split_heads", dict(nheads=5, ngroups=1, seqlens=(37,), slots=(3,), initial=(True,),
                         threads=2)),
]


def _dt_of(kw):
    dt = kw["delta"].double()
    if kw["delta_bias"] is not None:
        dt = dt + kw["delta_bias"].double()
    return softplus_ref(dt) if kw["delta_softplus"] else dt


def _assert_matches_recurrent(actual, recurrent, dtype, what):
    """Both forms compute in fp32 and differ only in the order of their sums (a few fp32 ulps of
    the result's scale), so the stored values are at most about one rounding of the stored dtype
    apart: EPS[dtype] relative to the result's magnitude (1e-5 for fp32)."""
    if actual.numel() == 0:
        return
    err = (actual.double() - recurrent.double()).abs().max().item()
    bound = EPS[dtype] * max(1.0, recurrent.double().abs().max().item())
    assert err <= bound, f"{what}: SSD vs recurrence max difference {err:.3g} > {bound:.3g}"


@contextlib.contextmanager
def _num_threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("name,params", SSD_CASES, ids=_case_ids(SSD_CASES))
def test_selective_scan_ssd(name, params):
    params = dict(params)
    threads = params.pop("threads", None)
    with _num_threads(threads) if threads else contextlib.nullcontext():
        kw = scan_inputs(**{**SSD_BASE, **params})
        if "dt_max" in params:  # the limits must bind, or the case tests nothing
            dt = _dt_of(kw)
            assert (dt < params["dt_min"]).any() and (dt > params["dt_max"]).any()
        dtype = kw["u"].dtype
        before = run_vs_ref(ops.selective_scan, kw, ("out", "ssm_states"), dtype)
        _check_scan_untouched(kw, before, params, SSD_BASE)

        rec = dict(kw, algorithm="recurrent", out=before["out"].clone())
        if kw["ssm_states"] is not None:
            rec["ssm_states"] = before["ssm_states"].clone()
        ops.selective_scan(**rec)
        _assert_matches_recurrent(kw["out"], rec["out"], dtype, "out")
        states = kw["ssm_states"]
        if states is not None:
            _assert_matches_recurrent(states, rec["ssm_states"], states.dtype, "ssm_states")


def test_selective_scan_cpu_algorithm_selection():
    """'auto' is the SSD form for Mamba2 and the recurrence for Mamba1; chunk_size reaches the
    SSD form; split_len and lanes_per_channel change nothing on the CPU. (The two forms sum in
    different orders, so their fp32 results differ in the last bits: bit equality tells which
    form ran.)"""
    def run(kw, **options):
        k = dict(kw, out=kw["out"].clone(), ssm_states=kw["ssm_states"].clone(), **options)
        ops.selective_scan(**k)
        return torch.cat([k["out"].flatten(), k["ssm_states"].flatten()])

    m2 = scan_inputs(nheads=4, headdim=16, dstate=16, seqlens=(40, 40))
    ssd = run(m2, algorithm="ssd")
    recurrent = run(m2, algorithm="recurrent")
    assert not torch.equal(ssd, recurrent)
    assert torch.equal(run(m2), ssd)
    assert torch.equal(run(m2, algorithm="ssd", split_len=3), ssd)
    assert torch.equal(run(m2, algorithm="recurrent_direct"), recurrent)
    assert not torch.equal(run(m2, algorithm="ssd", chunk_size=8), ssd)
    m1 = scan_inputs(form="mamba1", nheads=7, dstate=5, ngroups=1, group_dim=False,
                     seqlens=(40, 40))
    assert torch.equal(run(m1), run(m1, algorithm="recurrent"))
    assert torch.equal(run(m1, lanes_per_channel=4), run(m1))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("poisoned", ["u", "B", "delta"])
def test_ssd_keeps_a_non_finite_token_out_of_earlier_outputs(poisoned, value):
    """A NaN or inf at token s of a sequence reaches no output before s: the SSD form's outputs
    are non-finite where the recurrence's are, and its values elsewhere. (Its chunk products
    zeroed the later tokens' terms by multiplication, and 0 * NaN is NaN: every earlier output
    of the chunk was NaN.)"""
    kw = scan_inputs(nheads=4, headdim=8, dstate=16, seqlens=(21, 13), varlen=True,
                     chunk_size=8)
    # Token 11 of the first sequence (a chunk's fourth), tokens 4 and 5 of the second (the
    # second starting a chunk of its own).
    for t in (11, 21 + 4, 21 + 5):
        kw[poisoned][t].fill_(value)
    runs = {}
    for algorithm in ("ssd", "recurrent"):
        k = dict(kw, algorithm=algorithm, out=kw["out"].clone(),
                 ssm_states=kw["ssm_states"].clone())
        ops.selective_scan(**k)
        runs[algorithm] = k["out"]
    ssd, rec = runs["ssd"], runs["recurrent"]
    finite = rec.isfinite()
    assert torch.equal(ssd.isfinite(), finite)
    assert finite[:11].all() and finite[21:25].all()
    assert not finite[11:21].any()  # the poisoned tokens and what follows them
    _assert_matches_recurrent(ssd[finite], rec[finite], torch.float32, "out")


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


# The fused dt_proj (dt_proj_weight, Mamba-1 form): dt is the low-rank dt, a column slice of an
# x_proj-like buffer. dt_rank 1, odd 7 (the kernels' scalar tail), 16 and 160 (Mamba 2.8B).
DT_M1 = dict(form="mamba1", dstate=16, ngroups=1, group_dim=False)
SSU_DT_PROJ_CASES = [
    ("dtp_r16", dict(DT_M1, nheads=37, dt_rank=16)),
    ("dtp_r1", dict(DT_M1, nheads=37, dt_rank=1)),
    ("dtp_r7_bf16", dict(DT_M1, nheads=37, dt_rank=7, dtype=bf16)),
    ("dtp_r160_bf16_dim130", dict(DT_M1, nheads=130, dt_rank=160, dtype=bf16)),
    ("dtp_r16_f16_state_f16", dict(DT_M1, nheads=130, dt_rank=16, dtype=f16, state_dtype=f16)),
    ("dtp_r7_bf16_state_bf16_padded", dict(DT_M1, nheads=130, dt_rank=7, dtype=bf16,
                                           state_dtype=bf16, batch=5, num_slots=8,
                                           src=(2, -1, 0, 7, 4), dst=(1, 3, -1, 5, 6))),
    ("dtp_strided_f16", dict(DT_M1, nheads=37, dt_rank=16, dtype=f16, strided=True)),
    ("dtp_no_optional", dict(DT_M1, nheads=37, dt_rank=16, D=False, z=False, dt_bias=False,
                             dt_softplus=False)),
]


@pytest.mark.parametrize("name,params", SSU_DT_PROJ_CASES, ids=_case_ids(SSU_DT_PROJ_CASES))
def test_selective_state_update_dt_proj(name, params):
    test_selective_state_update(name, params)


def _project_sequential(dt, w):
    """dt @ w.T accumulated in fp32 one rank at a time (each product rounded to fp32, then added:
    the CPU kernel's order) and rounded to the activation dtype."""
    acc = torch.zeros(dt.shape[0], w.shape[0])
    for r in range(w.shape[1]):
        acc = acc + dt[:, r:r + 1].float() * w[:, r].float()
    return acc.to(dt.dtype)


@pytest.mark.parametrize("name,params", SSU_DT_PROJ_CASES, ids=_case_ids(SSU_DT_PROJ_CASES))
def test_selective_state_update_dt_proj_matches_unfused(name, params):
    """The fused op equals the unfused path: bit for bit when the unfused dt is accumulated in the
    CPU kernel's order; within the tolerance rule when it comes from F.linear (whose summation
    order differs, so a 16-bit dt may round the other way)."""
    kw = ssu_inputs(**params)
    dtype = kw["x"].dtype

    def run(dt, w):
        k = {n: (v.clone() if n in ("out", "ssm_state") else v) for n, v in kw.items()}
        k["dt"], k["dt_proj_weight"] = dt, w
        ops.selective_state_update(**k)
        return k["out"], k["ssm_state"]

    fused = run(kw["dt"], kw["dt_proj_weight"])
    same_order = run(_project_sequential(kw["dt"], kw["dt_proj_weight"]), None)
    assert torch.equal(fused[0], same_order[0]) and torch.equal(fused[1], same_order[1])
    linear = run(torch.nn.functional.linear(kw["dt"], kw["dt_proj_weight"]), None)
    for a, b, n in zip(fused, linear, ("out", "ssm_state")):
        bound = 2 * EPS[dtype] * max(1.0, b.float().abs().max().item())
        err = (a.float() - b.float()).abs().max().item()
        assert err <= bound, f"{n}: fused vs F.linear path {err:.3g} > {bound:.3g}"


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


# Mamba2 runs the SSD form unless told otherwise; with chunk_size 4 the 9- and 6-token
# sequences span several chunks and the splits fall inside and on chunk boundaries.
SCAN_CONSISTENCY_CASES = [
    ("mamba2", "mamba2", torch.float32, (4, 2), {}),
    ("mamba1", "mamba1", torch.float32, (4, 2), {}),
    ("mamba2_empty_first", "mamba2", torch.float32, (0, 1), {}),
    ("mamba2_bf16", "mamba2", bf16, (3, 5), {}),
    ("ssd_chunk4", "mamba2", torch.float32, (5, 2), dict(chunk_size=4)),
    ("ssd_chunk4_on_boundary", "mamba2", torch.float32, (8, 4), dict(chunk_size=4)),
    ("ssd_chunk3_bf16", "mamba2", bf16, (7, 1), dict(chunk_size=3)),
    ("recurrent", "mamba2", torch.float32, (4, 2), dict(algorithm="recurrent")),
]


@pytest.mark.parametrize("name,form,dtype,first,options", SCAN_CONSISTENCY_CASES,
                         ids=_case_ids([(c[0], None) for c in SCAN_CONSISTENCY_CASES]))
def test_selective_scan_chunk_consistency(name, form, dtype, first, options):
    kw = scan_inputs(dtype=dtype, form=form, seqlens=SEQLENS, varlen=True, slots=SLOTS,
                     initial=(False, False), num_slots=3,
                     **(dict(nheads=5, dstate=4, ngroups=1, group_dim=False)
                        if form == "mamba1" else {}))
    packed = ("u", "delta", "B", "C", "z")
    params = {k: kw[k] for k in ("A", "D", "delta_bias", "delta_softplus", "cache_indices")}
    params.update(options)
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
