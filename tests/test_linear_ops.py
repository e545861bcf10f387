"""The decode-sized projection ops (tpssm.ops.gemv, gemv_conv_update) on the CPU, with their norm
prologue and conv epilogue: against the float64 reference, and their argument errors (the CUDA
kernel: tests/test_linear_ops_cuda.py)."""

import pytest
import torch

from tpssm import ops
from tpssm.reference import (add_rms_norm_ref, causal_conv1d_update_ref, gemv_conv_update_ref,
                             gemv_ref)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def gemv_inputs(m, n, k, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def gemv_tolerance(x, w, b, ref):
    """Elementwise bound for fp32 sums rounded once: one rounding of the result (ULP of its
    dtype) plus fp32 accumulation over K terms (K * 2^-24 of the sum of magnitudes)."""
    mag = x.double().abs() @ w.double().abs().t()
    if b is not None:
        mag = mag + b.double().abs()
    k = x.shape[1]
    return ULP[x.dtype] * ref.double().abs() + (k + 1) * 2 ** -24 * mag + 1e-30


def assert_gemv_close(got, x, w, b):
    ref = gemv_ref(x, w, b)
    err = (got.double() - ref.double()).abs()
    tol = gemv_tolerance(x, w, b, ref)
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert bool((err <= tol).all()), f"max error {err.max().item()} over {tol.min().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (3, 5, 100), (8, 70, 2048), (2, 1, 1)])
def test_cpu_op_against_the_reference(m, n, k, bias, dtype):
    x, w, b = gemv_inputs(m, n, k, dtype, bias)
    assert_gemv_close(ops.gemv(x, w, b), x, w, b)


def test_strided_rows_and_empty_sizes():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(4, 30, generator=g)
    ws = torch.randn(9, 40, generator=g)
    out = torch.full((4, 20), 7.0)
    x, w = xs[:, 5:25], ws[:, 3:23]            # row strides 30 and 40
    ops.gemv(x, w, None, out=out[:, 2:11])     # out: a column slice
    assert_gemv_close(out[:, 2:11], x, w, None)
    assert torch.equal(out[:, :2], torch.full((4, 2), 7.0))  # columns outside left alone
    assert torch.equal(out[:, 11:], torch.full((4, 9), 7.0))
    assert ops.gemv(torch.empty(0, 6), torch.randn(3, 6)).shape == (0, 3)
    assert ops.gemv(torch.randn(2, 6), torch.empty(0, 6)).shape == (2, 0)
    b = torch.randn(3)
    assert torch.equal(ops.gemv(torch.empty(2, 0), torch.empty(3, 0), b), b.expand(2, 3))


def test_argument_errors_name_the_rule():
    x, w, b = gemv_inputs(2, 6, 16, torch.float32)
    with pytest.raises(RuntimeError, match="x may have at most 8 rows"):
        ops.gemv(torch.randn(9, 16), w)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(N, K\)"):
        ops.gemv(x, torch.randn(6, 15))
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ops.gemv(x, w.half())
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous \(N,\)"):
        ops.gemv(x, w, torch.randn(5))
    with pytest.raises(RuntimeError, match="bias must have x's dtype"):
        ops.gemv(x, w, b.double())
    with pytest.raises(RuntimeError, match="x must have a contiguous last dim"):
        ops.gemv(torch.randn(16, 2).t(), w)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.gemv(x.double(), w.double())
    with pytest.raises(RuntimeError, match=r"out must have shape \(M, N\)"):
        ops.gemv(x, w, out=torch.empty(2, 5))
    with pytest.raises(RuntimeError, match="warps_per_row must be 0 \\(automatic\\), 1, 2, 4"):
        ops.gemv(x, w, warps_per_row=3)
    with pytest.raises(RuntimeError, match="rows_per_warp must be 0 \\(automatic\\), 1, 2 or 4"):
        ops.gemv(x, w, rows_per_warp=8)
    # out sharing bytes with an input
    buf = torch.randn(2, 40)
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        ops.gemv(buf[:, :16], w, out=buf[:, 16:22])
    wbuf = torch.randn(6, 16)
    with pytest.raises(RuntimeError, match="out must not overlap weight"):
        ops.gemv(x, wbuf, out=wbuf[:2, :6])
    bb = torch.randn(6)
    with pytest.raises(RuntimeError, match="out must not overlap bias"):
        ops.gemv(x[:1], w, bb, out=bb.view(1, 6))


# --- gemv_conv_update: the product, then the decode conv of its conv columns in place


def conv_update_inputs(m, n, k, dim, width, dtype, bias=True, conv_bias=True, num_slots=11,
                       seed=0):
    """gemv inputs plus a conv (weight, bias, state pool) over `dim` of the n columns."""
    x, w, b = gemv_inputs(m, n, k, dtype, bias, seed)
    g = torch.Generator().manual_seed(seed + 100)
    cw = (torch.randn(dim, width, generator=g) / 2).to(dtype)
    cb = torch.randn(dim, generator=g).to(dtype) if conv_bias else None
    state = torch.randn(num_slots, dim, width - 1, generator=g).to(dtype)
    return x, w, b, cw, cb, state


def conv_of_product(product, start, state, cw, cb, silu, cache_indices):
    """The separate ops' result: the product with its conv columns replaced by the reference
    conv update of them (padded rows keep the product), and the state it leaves."""
    want, state = product.clone(), state.clone()
    cols = want[:, start:start + cw.shape[0]]
    causal_conv1d_update_ref(cols.clone(), state, cw, cb, activation="silu" if silu else None,
                             cache_indices=cache_indices, out=cols)
    return want, state


def assert_conv_update_matches(got, got_state, product, start, state0, cw, cb, silu, ci):
    """got: the fused op's out given the product it computed (checked against the float64
    reference by the gemv tests); the conv columns within a few units of the dtype's last
    place of the reference conv of that product; the state exactly its shifted window."""
    want, want_state = conv_of_product(product, start, state0, cw, cb, silu, ci)
    assert torch.equal(got_state, want_state)
    tol = 4 * ULP[got.dtype] * (want.double().abs() + 1)
    assert bool(((got.double() - want.double()).abs() <= tol).all()), \
        (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("m,start,dim,bias,conv_bias,silu,slots", [
    (1, 0, 24, True, False, True, [4]),                 # Mamba: the conv columns first
    (3, 10, 24, False, True, True, [3, -1, 0]),         # Mamba-2: after z; a padded row
    (8, 26, 24, True, True, False, [7, 1, 2, 3, 0, 5, -1, 9]),  # the last columns
    (2, 5, 1, False, False, True, None),                # one channel; row m uses slot m
])
def test_conv_update_cpu_against_the_reference(m, start, dim, bias, conv_bias, silu, slots,
                                               width, dtype):
    x, w, b, cw, cb, state = conv_update_inputs(m, 50, 40, dim, width, dtype, bias, conv_bias,
                                                seed=width)
    ci = None if slots is None else torch.tensor(slots, dtype=torch.int32)
    act = "silu" if silu else None
    state0 = state.clone()
    got = ops.gemv_conv_update(x, w, b, state, cw, cb, conv_start=start, activation=act,
                               cache_indices=ci)
    product = ops.gemv(x, w, b)
    assert_gemv_close(product, x, w, b)
    assert_conv_update_matches(got, state, product, start, state0, cw, cb, silu, ci)
    # Columns outside the conv, and a padded row's conv columns, are the plain product.
    outside = torch.ones(50, dtype=torch.bool)
    outside[start:start + dim] = False
    assert torch.equal(got[:, outside], product[:, outside])
    for row, slot in enumerate(slots or []):
        if slot == -1:
            assert torch.equal(got[row], product[row])
    # The reference (the models' reference backend): its product is the float64 one rounded
    # once, so it may differ from the op's by a unit in the last place before the conv.
    ref_state = state0.clone()
    ref = gemv_conv_update_ref(x, w, b, ref_state, cw, cb, conv_start=start, activation=act,
                               cache_indices=ci)
    assert ref.shape == got.shape and ref.dtype == got.dtype
    for a, r in ((got, ref), (state, ref_state)):
        tol = 8 * ULP[dtype] * (r.double().abs() + 1)
        assert bool(((a.double() - r.double()).abs() <= tol).all())


def test_conv_update_argument_errors_name_the_rule():
    x, w, b, cw, cb, state = conv_update_inputs(2, 30, 16, 12, 4, torch.float32)
    ci = torch.tensor([1, 0], dtype=torch.int32)

    def call(**kw):
        args = dict(x=x, weight=w, bias=b, conv_state=state, conv_weight=cw, conv_bias=cb,
                    conv_start=4, activation="silu", cache_indices=ci)
        args.update(kw)
        return ops.gemv_conv_update(**args)

    with pytest.raises(RuntimeError, match=r"conv columns \[conv_start, conv_start \+ conv_dim\)"):
        call(conv_start=19)
    with pytest.raises(RuntimeError, match="conv columns"):
        call(conv_start=-1)
    with pytest.raises(RuntimeError, match="conv_weight width must be 2, 3 or 4"):
        call(conv_weight=torch.randn(12, 5), conv_state=torch.randn(3, 12, 4))
    with pytest.raises(RuntimeError, match="conv_weight must have the dtype of out"):
        call(conv_weight=cw.half())
    with pytest.raises(RuntimeError, match=r"conv_bias must have shape \(conv_dim,\)"):
        call(conv_bias=torch.randn(11))
    with pytest.raises(RuntimeError, match=r"conv_state must have shape \(num_slots, conv_dim"):
        call(conv_state=torch.randn(3, 12, 2))
    with pytest.raises(RuntimeError, match="conv_state must have the dtype of out"):
        call(conv_state=state.double())
    with pytest.raises(RuntimeError, match=r"cache_indices must have shape \(batch,\)"):
        call(cache_indices=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cache_indices must be int32"):
        call(cache_indices=ci.long())
    with pytest.raises(RuntimeError, match=r"cache_indices\[1\] = 11 is out of range"):
        call(cache_indices=torch.tensor([1, 11], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must be distinct among non-padded rows"):
        call(cache_indices=torch.tensor([2, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="needs at least batch"):
        call(cache_indices=None, conv_state=torch.randn(1, 12, 3))
    with pytest.raises(RuntimeError, match="gemv_conv_update: x may have at most 8 rows"):
        call(x=torch.randn(9, 16), cache_indices=None)
    # The state pool may not share bytes with anything the op reads or with out.
    pool = torch.randn(1000)
    with pytest.raises(RuntimeError, match="conv_state must not overlap weight"):
        call(conv_state=pool[:144].view(4, 12, 3), weight=pool[100:580].view(30, 16))
    with pytest.raises(RuntimeError, match="conv_state must not overlap conv_weight"):
        call(conv_state=pool[:144].view(4, 12, 3), conv_weight=pool[140:188].view(12, 4))
    with pytest.raises(RuntimeError, match="conv_state must not overlap x"):
        call(conv_state=pool[:144].view(4, 12, 3), x=pool[130:162].view(2, 16))
    call(conv_state=pool[:144].view(4, 12, 3), x=pool[144:176].view(2, 16))  # disjoint: fine
    with pytest.raises(RuntimeError, match="out must not overlap conv_state"):
        call(out=state.view(-1)[:60].view(2, 30))
    idx = torch.arange(64, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="out must not overlap cache_indices"):
        call(cache_indices=idx[1:3], out=idx[2:].view(torch.float32)[:60].view(2, 30))


# --- the norm prologue: the product of add_rms_norm(x, ...) (a decode layer's norm and in_proj)


def norm_inputs(m, k, dtype, residual_dtype, seed=0):
    """x (the previous layer's output), the norm weight, and a residual stream (or None)."""
    g = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(m, k, generator=g).to(dtype)
    nw = (1 + torch.randn(k, generator=g) / 4).to(dtype)
    res = (None if residual_dtype is None
           else (3 * torch.randn(m, k, generator=g)).to(residual_dtype))
    return x, nw, res


def normed_ref(x, nw, eps, res):
    """(h, residual + x) as the float64 reference computes them."""
    stream = None if res is None else res.clone()
    return add_rms_norm_ref(x, nw, eps, residual=stream), stream


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", ["fp32", "same", None])
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (3, 5, 100), (8, 70, 2056)])
def test_norm_prologue_cpu(m, n, k, residual, dtype):
    rdtype = {"fp32": torch.float32, "same": dtype, None: None}[residual]
    _, w, b = gemv_inputs(m, n, k, dtype, seed=k)
    x, nw, res = norm_inputs(m, k, dtype, rdtype, seed=m)
    res0 = None if res is None else res.clone()
    res_out = None if res is None else torch.full_like(res, float("nan"))
    got = ops.gemv(x, w, b, norm_weight=nw, residual=res, residual_out=res_out, norm_eps=1e-5)
    # The composition of the two ops: add_rms_norm on a copy of the stream, then gemv.
    stream = None if res is None else res0.clone()
    h = ops.add_rms_norm(x, nw, 1e-5, residual=stream)
    assert torch.equal(got, ops.gemv(h, w, b))
    if res is not None:
        assert torch.equal(res, res0), "the residual is only read"
        assert torch.equal(res_out, stream)
    # Against the float64 reference: the normalised input may differ from it by one unit in the
    # last place (fp32 norm vs float64), so the product by that much of |h| . |w| more.
    h_ref, stream_ref = normed_ref(x, nw, 1e-5, res0)
    ref = gemv_ref(h_ref, w, b)
    slack = 2 * ULP[dtype] * (h_ref.double().abs() @ w.double().abs().t())
    err = (got.double() - ref.double()).abs()
    assert bool((err <= gemv_tolerance(h_ref, w, b, ref) + slack).all()), err.max().item()
    if res is not None:
        tol = ULP[rdtype] * stream_ref.double().abs()
        assert bool(((res_out.double() - stream_ref.double()).abs() <= tol).all())
    # The reference op takes the same arguments.
    ref_out = None if res is None else torch.empty_like(res)
    got_ref = gemv_ref(x, w, b, norm_weight=nw, residual=res0, residual_out=ref_out)
    assert torch.equal(got_ref, ref)
    if res is not None:
        assert torch.equal(ref_out, stream_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_prologue_with_the_conv_epilogue_cpu(dtype):
    x0, w, b, cw, cb, state = conv_update_inputs(3, 50, 40, 24, 4, dtype, seed=5)
    x, nw, res = norm_inputs(3, 40, dtype, torch.float32, seed=6)
    ci = torch.tensor([3, -1, 0], dtype=torch.int32)
    state0, res_out = state.clone(), torch.empty_like(res)
    got = ops.gemv_conv_update(x, w, b, state, cw, cb, conv_start=10, activation="silu",
                               cache_indices=ci, norm_weight=nw, residual=res,
                               residual_out=res_out, norm_eps=1e-6)
    stream = res.clone()
    h = ops.add_rms_norm(x, nw, 1e-6, residual=stream)
    want_state = state0.clone()
    want = ops.gemv_conv_update(h, w, b, want_state, cw, cb, conv_start=10, activation="silu",
                                cache_indices=ci)
    assert torch.equal(got, want) and torch.equal(state, want_state)
    assert torch.equal(res_out, stream)
    ref_state, ref_out = state0.clone(), torch.empty_like(res)
    ref = gemv_conv_update_ref(x, w, b, ref_state, cw, cb, conv_start=10, activation="silu",
                               cache_indices=ci, norm_weight=nw, residual=res,
                               residual_out=ref_out, norm_eps=1e-6)
    for a, r in ((got, ref), (state, ref_state)):
        tol = 8 * ULP[dtype] * (r.double().abs() + 1)
        assert bool(((a.double() - r.double()).abs() <= tol).all())


def test_norm_prologue_argument_errors_name_the_rule():
    x, w, b = gemv_inputs(2, 6, 16, torch.float32)
    _, nw, res = norm_inputs(2, 16, torch.float32, torch.float32)
    out_res = torch.empty_like(res)

    def call(**kw):
        args = dict(norm_weight=nw, residual=res, residual_out=out_res)
        args.update(kw)
        return ops.gemv(x, w, b, **args)

    with pytest.raises(RuntimeError, match="residual and residual_out belong to the norm"):
        call(norm_weight=None)
    with pytest.raises(RuntimeError, match="residual and residual_out come together"):
        call(residual_out=None)
    with pytest.raises(RuntimeError, match="residual and residual_out come together"):
        call(residual=None)
    with pytest.raises(RuntimeError, match=r"norm_weight must be a contiguous \(K,\)"):
        call(norm_weight=torch.randn(15))
    with pytest.raises(RuntimeError, match="norm_weight must have x's dtype"):
        call(norm_weight=nw.half())
    with pytest.raises(RuntimeError, match="norm_eps must be >= 0"):
        call(norm_eps=-1.0)
    with pytest.raises(RuntimeError, match=r"needs at least one weight row \(N >= 1\)"):
        ops.gemv(x, torch.empty(0, 16), norm_weight=nw, residual=res, residual_out=out_res)
    with pytest.raises(RuntimeError, match=r"residual must have shape \(M, K\)"):
        call(residual=torch.randn(3, 16))
    with pytest.raises(RuntimeError, match="residual must be float32 or x's dtype"):
        ops.gemv(x.half(), w.half(), None, norm_weight=nw.half(), residual=res.double(),
                 residual_out=out_res.double())
    with pytest.raises(RuntimeError, match="residual_out must have residual's dtype"):
        call(residual_out=out_res.half())
    # residual_out is written while every block reads x, residual and the norm weight
    buf = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="residual_out must not overlap residual"):
        call(residual=buf[:2], residual_out=buf[1:3])
    with pytest.raises(RuntimeError, match="residual_out must not overlap x"):
        call(residual_out=x)
    with pytest.raises(RuntimeError, match="out must not overlap residual"):
        call(out=res[:, :6])
    with pytest.raises(RuntimeError, match="out must not overlap residual_out"):
        call(out=out_res[:, :6])
    # and the conv epilogue's state: no byte in common with the stream either way
    _, _, _, cw, cb, state = conv_update_inputs(2, 6, 16, 4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="conv_state must not overlap residual"):
        ops.gemv_conv_update(x, w, b, res.view(-1)[:24].view(2, 4, 3), cw, cb, conv_start=0,
                             norm_weight=nw, residual=res, residual_out=out_res)
    with pytest.raises(RuntimeError, match="residual_out must not overlap conv_state|"
                                           "conv_state must not overlap residual_out"):
        ops.gemv_conv_update(x, w, b, out_res.view(-1)[:24].view(2, 4, 3), cw, cb,
                             conv_start=0, norm_weight=nw, residual=res, residual_out=out_res)


def test_gemv_row_does_not_depend_on_its_batch():
    """A row's product is the same bits whatever the rows around it (a graph replays a padded
    batch): the CPU op multiplies one row at a time, as the CUDA kernel's rows are independent."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(8, 64, generator=g)
    alone = [ops.gemv(x[i:i + 1], w, b) for i in range(8)]
    for rows in range(2, 9):
        assert torch.equal(ops.gemv(x[:rows], w, b), torch.cat(alone[:rows]))
