"""torch.library.opcheck on every op (schema / mutation annotations, fake impls, AOT dispatch) and
one torch.compile(fullgraph=True) test of a small mixer-like function calling the ops."""

from __future__ import annotations

import pytest
import torch

from conftest import conv_inputs, conv_update_inputs, query_start_loc, scan_inputs, ssu_inputs
from tpssm import ops
from tpssm.ops import _silu_flag

_tp = torch.ops.tpssm


def _conv_args(kw):
    return (kw["x"], kw["weight"], kw["bias"], kw["conv_states"], kw["query_start_loc"],
            kw["cache_indices"], kw["has_initial_state"], _silu_flag(kw["activation"]), -1,
            kw["out"])


def _conv_update_args(kw):
    return (kw["x"], kw["conv_state"], kw["weight"], kw["bias"], _silu_flag(kw["activation"]),
            kw["cache_indices"], -1, kw["out"])


def _scan_args(kw):
    return (kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"], kw["delta_bias"],
            kw["delta_softplus"], kw["ssm_states"], kw["query_start_loc"], kw["cache_indices"],
            kw["has_initial_state"], -1, kw["out"])


def _ssu_args(kw):
    return (kw["ssm_state"], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
            kw["dt_bias"], kw.get("dt_proj_weight"), kw["dt_softplus"],
            kw["state_batch_indices"], kw["dst_state_batch_indices"], -1, kw["out"])


def _norm_args(residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g, dtype=torch.bfloat16)
    r = torch.randn(3, 40, generator=g) if residual else None
    return (x, r, torch.rand(40, generator=g, dtype=torch.bfloat16), 1e-5, torch.empty_like(x))


def _gated_norm_args(gate):
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(3, 100, generator=g)  # x and z as column slices of one buffer
    x, z = buf[:, :48], buf[:, 50:98]
    if gate:
        return (x, z, torch.rand(48, generator=g), 16, 0, 1e-6, None, 0, torch.empty(3, 48))
    return (x, None, None, 8, 32, 1e-6, torch.ones(3, 3), 64, torch.empty(3, 48))


def _sum_squares_args():
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(3, 100, generator=g)
    return (buf[:, :48], buf[:, 50:98], 16, 0, torch.empty(3, 3))


def _attention_args(index_dtype):
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(2, 3, 4, 8, 16, generator=g, dtype=torch.float16)  # k, v of 3 slots
    q = torch.randn(2, 2, 16, generator=g, dtype=torch.float16)
    rows = torch.tensor([2, 0], dtype=index_dtype)
    lengths = torch.tensor([3, 8], dtype=index_dtype)
    out = torch.empty(2, 2, 16, dtype=torch.float16)
    # k and v as head slices (strided, offset) of one buffer
    return (q, kv[0, :, ::2], kv[1, :, 1:3], rows, lengths, 0.25, out)


def _gemv_args(bias):
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(3, 50, generator=g, dtype=torch.bfloat16)  # x: a column slice
    w = torch.randn(7, 40, generator=g, dtype=torch.bfloat16)
    b = torch.randn(7, generator=g, dtype=torch.bfloat16) if bias else None
    return (buf[:, 2:42], w, b, torch.empty(3, 7, dtype=torch.bfloat16), 0, 0)


def _gemv_norm_args(residual):
    """The norm prologue's trailing arguments (norm_weight, residual, residual_out, norm_eps)."""
    g = torch.Generator().manual_seed(5)
    nw = torch.randn(40, generator=g, dtype=torch.bfloat16)
    if not residual:
        return (nw, None, None, 1e-5)
    res = torch.randn(3, 40, generator=g)
    return (nw, res, torch.empty_like(res), 1e-6)


def _gemv_conv_update_args(with_slots):
    g = torch.Generator().manual_seed(4)
    x, w, b, _, _, _ = _gemv_args(bias=True)
    conv_w = torch.randn(4, 3, generator=g, dtype=torch.bfloat16)
    conv_b = torch.randn(4, generator=g, dtype=torch.bfloat16) if with_slots else None
    state = torch.randn(5, 4, 2, generator=g, dtype=torch.bfloat16)
    slots = torch.tensor([4, -1, 1], dtype=torch.int32) if with_slots else None
    return (x, w, b, state, conv_w, conv_b, 2, with_slots, slots, -1,
            torch.empty(3, 7, dtype=torch.bfloat16), 0, 0)


OPCHECK_CASES = [
    ("conv_full", _tp.causal_conv1d.default, lambda: _conv_args(conv_inputs(
        varlen=True, seqlens=(3, 0, 2), slots=(1, -1, 0), initial=(True, False, False)))),
    ("conv_none", _tp.causal_conv1d.default, lambda: _conv_args(conv_inputs(
        states=False, slots=None, bias=False, activation=None))),
    ("conv_update", _tp.causal_conv1d_update.default,
     lambda: _conv_update_args(conv_update_inputs(slots=(4, -1, 2)))),
    ("conv_update_none", _tp.causal_conv1d_update.default,
     lambda: _conv_update_args(conv_update_inputs(slots=None, bias=False, activation=None))),
    ("scan_full", _tp.selective_scan.default, lambda: _scan_args(scan_inputs(
        varlen=True, seqlens=(3, 0, 2), slots=(1, -1, 0), initial=(True, False, False)))),
    ("scan_none", _tp.selective_scan.default, lambda: _scan_args(scan_inputs(
        D=False, z=False, delta_bias=False, states=False, slots=None))),
    ("ssu_full", _tp.selective_state_update.default,
     lambda: _ssu_args(ssu_inputs(dst=(5, -1, 3)))),
    ("ssu_none", _tp.selective_state_update.default,
     lambda: _ssu_args(ssu_inputs(src=None, D=False, z=False, dt_bias=False))),
    ("ssu_dt_proj", _tp.selective_state_update.default,
     lambda: _ssu_args(ssu_inputs(form="mamba1", nheads=6, dstate=8, ngroups=1,
                                  group_dim=False, dt_rank=5, dst=(5, -1, 3)))),
    ("add_rms_norm", _tp.add_rms_norm.default, lambda: _norm_args(residual=True)),
    ("add_rms_norm_none", _tp.add_rms_norm.default, lambda: _norm_args(residual=False)),
    ("gated_rms_norm", _tp.gated_rms_norm.default, lambda: _gated_norm_args(gate=True)),
    ("gated_rms_norm_none", _tp.gated_rms_norm.default, lambda: _gated_norm_args(gate=False)),
    ("gated_sum_squares", _tp.gated_sum_squares.default, _sum_squares_args),
    ("gemv", _tp.gemv.default, lambda: _gemv_args(bias=True)),
    ("gemv_none", _tp.gemv.default, lambda: _gemv_args(bias=False)),
    ("gemv_conv_update", _tp.gemv_conv_update.default, lambda: _gemv_conv_update_args(True)),
    ("gemv_conv_update_none", _tp.gemv_conv_update.default,
     lambda: _gemv_conv_update_args(False)),
    ("gemv_norm", _tp.gemv.default, lambda: _gemv_args(bias=True) + _gemv_norm_args(False)),
    ("gemv_norm_residual", _tp.gemv.default,
     lambda: _gemv_args(bias=False) + _gemv_norm_args(True)),
    ("gemv_conv_update_norm_residual", _tp.gemv_conv_update.default,
     lambda: _gemv_conv_update_args(True) + _gemv_norm_args(True)),
    ("decode_attention", _tp.decode_attention.default, lambda: _attention_args(torch.int64)),
    ("decode_attention_int32", _tp.decode_attention.default,
     lambda: _attention_args(torch.int32)),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,op,make_args", OPCHECK_CASES,
                         ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(name, op, make_args):
    torch.library.opcheck(op, make_args())


def _mixer_step(x, conv_weight, conv_state, A, D, dt_bias, ssm_state, qsl, slots, has_init,
                x_dec, dt_dec, B_dec, C_dec, dim, nheads, dstate):
    """Prefill then one decode step of a small Mamba-2-like block (token-major, no transposes)."""
    xbc = ops.causal_conv1d(x, conv_weight, conv_states=conv_state, query_start_loc=qsl,
                            cache_indices=slots, has_initial_state=has_init, activation="silu")
    u, B, C = torch.split(xbc, [dim, dstate, dstate], dim=-1)
    dt = x[:, :nheads]
    y = ops.selective_scan(u, dt, A, B, C, D, None, dt_bias, delta_softplus=True,
                           ssm_states=ssm_state, query_start_loc=qsl, cache_indices=slots,
                           has_initial_state=has_init)
    y_dec = ops.selective_state_update(ssm_state, x_dec, dt_dec, A, B_dec, C_dec, D, None,
                                       dt_bias, dt_softplus=True, state_batch_indices=slots)
    return y.sum(-1), y_dec


@pytest.mark.timeout(600)
def test_torch_compile_fullgraph():
    nheads, headdim, dstate, width = 2, 3, 4, 4
    dim = nheads * headdim
    channels = dim + 2 * dstate
    seqlens = (5, 3)
    args = (
        torch.randn(sum(seqlens), channels), torch.randn(channels, width) * 0.5,
        torch.randn(3, channels, width - 1), -torch.rand(nheads), torch.randn(nheads),
        torch.randn(nheads), torch.randn(3, nheads, headdim, dstate), query_start_loc(seqlens),
        torch.tensor([2, 0], dtype=torch.int32), torch.tensor([True, False]),
        torch.randn(2, dim), torch.randn(2, nheads), torch.randn(2, dstate),
        torch.randn(2, dstate),
    )
    sizes = (dim, nheads, dstate)
    eager_args = [a.clone() for a in args]
    expected = _mixer_step(*eager_args, *sizes)
    compiled = torch.compile(_mixer_step, fullgraph=True)
    got = compiled(*args, *sizes)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    # The state pools are mutated in place under compile exactly as in eager mode.
    torch.testing.assert_close(args[2], eager_args[2])
    torch.testing.assert_close(args[6], eager_args[6])
