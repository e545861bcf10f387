"""The gemv CUDA kernel (tpssm.ops.gemv) against the float64 reference and the CPU op, over
dtypes, token counts 1-8, odd sizes, every launch option, strided and misaligned operands; its
conv epilogue (gemv_conv_update) against gemv followed by the CUDA conv update op, and its norm
prologue against add_rms_norm followed by gemv, bit for bit (on a GPU, or emulated on the CPU:
make test-cuda-emu). Skipped without either."""

import pytest
import torch

import tpssm
from conftest import on_cpu_kernels
from test_linear_ops import (DTYPES, assert_conv_update_matches, assert_gemv_close,
                             conv_update_inputs, gemv_inputs, norm_inputs)
from tpssm import ops

if not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
    pytest.skip("needs a CUDA device and a build with the CUDA kernels", allow_module_level=True)

CUDA = torch.device("cuda")


def _dev(t):
    return None if t is None else t.to(CUDA, copy=True)


def _check(x, w, b, **options):
    got = ops.gemv(_dev(x), _dev(w), _dev(b), **options).cpu()
    assert_gemv_close(got, x, w, b)
    cpu = torch.empty_like(got)
    torch.ops.tpssm.gemv(x, w, b, cpu, 0, 0)  # the registered CPU op
    assert_gemv_close(cpu, x, w, b)


# (M, N, K): K a multiple of 16 bytes or not (the element path), N below and above a block's
# rows, one lane's chunks in flight and several trips of the K loop.
SHAPES = [(1, 37, 64), (3, 5, 100), (8, 70, 2048), (5, 300, 40), (2, 1, 1), (7, 19, 776)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_against_the_reference_and_the_cpu_op(m, n, k, bias, dtype):
    _check(*gemv_inputs(m, n, k, dtype, bias, seed=2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("rows_per_warp", [1, 2, 4])
@pytest.mark.parametrize("warps_per_row", [1, 2, 4, 8])
def test_every_launch_option(warps_per_row, rows_per_warp, m, dtype):
    # 45 rows: no block size divides it; K = 2056: 257 16-byte chunks of bf16 (a part trip).
    x, w, b = gemv_inputs(m, 45, 2056, dtype, bias=m != 3, seed=3)
    _check(x, w, b, warps_per_row=warps_per_row, rows_per_warp=rows_per_warp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_operands(dtype):
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(4, 304, generator=g).to(dtype)  # rows 16-byte aligned in every dtype
    ws = (torch.randn(23, 280, generator=g) / 16).to(dtype)
    bias = torch.randn(20, generator=g).to(dtype)
    for x0, w0 in [(8, 16), (1, 16), (8, 3)]:  # aligned; x misaligned; weight misaligned
        x, w = xs[:, x0:x0 + 256], ws[1:21, w0:w0 + 256]
        buf = torch.full((6, 40), 3.0, dtype=dtype, device=CUDA)
        dx = xs.to(CUDA)[:, x0:x0 + 256]
        dw = ws.to(CUDA)[1:21, w0:w0 + 256]
        ops.gemv(dx, dw, bias.to(CUDA), out=buf[1:5, 5:25])
        plan = getattr(ops._ops, "gemv_plan", None)  # the emulator shows which path ran
        if plan is not None:
            vectorized = plan(dx, dw, None, buf[1:5, 5:25], 0, 0)[2]
            assert vectorized == (x0 == 8 and w0 == 16), (x0, w0, vectorized)
        got = buf.cpu()
        assert_gemv_close(got[1:5, 5:25], x, w, bias)
        untouched = torch.full((6, 40), 3.0, dtype=dtype)
        untouched[1:5, 5:25] = got[1:5, 5:25]
        assert torch.equal(got, untouched), "gemv wrote outside out"


def test_empty_sizes():
    b = torch.randn(3, device=CUDA)
    assert ops.gemv(torch.empty(0, 6, device=CUDA), torch.randn(3, 6, device=CUDA)).shape == (0, 3)
    assert ops.gemv(torch.randn(2, 6, device=CUDA), torch.empty(0, 6, device=CUDA)).shape == (2, 0)
    got = ops.gemv(torch.empty(2, 0, device=CUDA), torch.empty(3, 0, device=CUDA), b)
    assert torch.equal(got.cpu(), b.cpu().expand(2, 3))


def test_automatic_plan():
    """The plan's rule (emulated kernels only: the plan is not exposed by the torch op)."""
    plan = getattr(ops._ops, "gemv_plan", None)
    if plan is None:
        pytest.skip("the launch plan is visible in the kernel emulator only")

    def pick(m, n, k, dtype=torch.bfloat16, x_offset=0):
        x = torch.zeros(m, k + x_offset, dtype=dtype)[:, x_offset:]
        w = torch.zeros(n, k, dtype=dtype)
        return tuple(plan(x, w, None, torch.empty(m, n, dtype=dtype), 0, 0))

    # (warps_per_row, rows_per_warp, vectorized, blocks) on the emulator's 132 SMs.
    assert pick(1, 192, 5120) == (8, 1, True, 192)        # mamba-2.8b x_proj: all warps on K
    assert pick(1, 10240, 2560) == (4, 4, True, 1280)     # its in_proj: 4 rows a warp
    assert pick(8, 2560, 5120) == (8, 4, True, 640)       # its out_proj
    assert pick(1, 5120, 160) == (1, 2, True, 320)        # dt_proj: one warp a row group
    assert pick(2, 300, 100, torch.float16) == (1, 1, False, 38)  # K % 8: element loads
    assert pick(1, 64, 256, x_offset=1) == (2, 1, False, 16)      # misaligned x
    assert pick(1, 64, 256, torch.float32) == (1, 1, True, 8)     # 64 chunks: one warp


def test_graph_replay_equals_eager():
    x, w, b = gemv_inputs(4, 96, 512, torch.bfloat16, seed=5)
    dx, dw, db = _dev(x), _dev(w), _dev(b)
    eager = ops.gemv(dx, dw, db)
    out = torch.empty_like(eager)
    ops.gemv(dx, dw, db, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gemv(dx, dw, db, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("n,k", [(10240, 2560), (192, 5120), (2560, 5120), (12565, 2560)])
def test_large_preset_shapes(n, k, m):
    """mamba-2.8b's decode projections at tp 1 (in_proj, x_proj, out_proj) and a tp 4 head."""
    _check(*gemv_inputs(m, n, k, torch.bfloat16, bias=False, seed=6))


# --- gemv_conv_update: the conv epilogue


def _conv_update_both_ways(x, w, b, cw, cb, state, start, silu, ci, **options):
    """(fused out, its state, separate out, its state): gemv_conv_update against gemv and then
    causal_conv1d_update of the conv columns, on the device at the same launch options."""
    act = "silu" if silu else None
    dx, dw, db, dcw, dcb, dci = (_dev(t) for t in (x, w, b, cw, cb, ci))
    fused_state = _dev(state)
    fused = ops.gemv_conv_update(dx, dw, db, fused_state, dcw, dcb, conv_start=start,
                                 activation=act, cache_indices=dci, **options)
    sep_state = _dev(state)
    sep = ops.gemv(dx, dw, db, **options)
    cols = sep[:, start:start + cw.shape[0]]
    conv = ops.causal_conv1d_update(cols.clone(), sep_state, dcw, dcb, activation=act,
                                    cache_indices=dci)
    valid = (torch.arange(x.shape[0]) if ci is None else ci.long()) >= 0
    cols[valid.to(cols.device)] = conv[valid.to(conv.device)]
    return fused.cpu(), fused_state.cpu(), sep.cpu(), sep_state.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("m,n,k,start,dim,bias,conv_bias,slots", [
    (1, 70, 2048, 0, 35, True, False, [4]),       # the conv columns first (Mamba)
    (3, 45, 100, 9, 24, False, True, [3, -1, 0]),  # element path (K % 8); a padded row
    (8, 96, 136, 40, 56, True, True, [7, 1, 2, 3, 0, 5, -1, 9]),  # to the last column (Mamba-2)
    (5, 19, 776, 18, 1, False, False, None),      # one channel; row m uses slot m
])
def test_conv_epilogue_equals_gemv_then_conv_update(m, n, k, start, dim, bias, conv_bias, slots,
                                                    width, dtype):
    x, w, b, cw, cb, state = conv_update_inputs(m, n, k, dim, width, dtype, bias, conv_bias,
                                                seed=width + m)
    ci = None if slots is None else torch.tensor(slots, dtype=torch.int32)
    for silu in (True, False):
        fused, fstate, sep, sstate = _conv_update_both_ways(x, w, b, cw, cb, state, start, silu,
                                                            ci)
        assert torch.equal(fused, sep) and torch.equal(fstate, sstate)
        product = ops.gemv(_dev(x), _dev(w), _dev(b)).cpu()
        assert_conv_update_matches(fused, fstate, product, start, state, cw, cb, silu, ci)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("rows_per_warp", [1, 2, 4])
@pytest.mark.parametrize("warps_per_row", [1, 2, 4, 8])
def test_conv_epilogue_at_every_launch_option(warps_per_row, rows_per_warp, m):
    # 45 rows, conv over 29 of them from row 11: conv columns start and end inside blocks.
    x, w, b, cw, cb, state = conv_update_inputs(m, 45, 2056, 29, 4, torch.bfloat16, seed=m)
    ci = torch.tensor([9, 2, 0, 4, 1, 3, 7, 8][:m], dtype=torch.int32)
    fused, fstate, sep, sstate = _conv_update_both_ways(
        x, w, b, cw, cb, state, 11, True, ci, warps_per_row=warps_per_row,
        rows_per_warp=rows_per_warp)
    assert torch.equal(fused, sep) and torch.equal(fstate, sstate)


def test_conv_epilogue_skips_rows_with_bad_slots(monkeypatch):
    """Without TPSSM_DEBUG_CHECKS the CUDA op does not read the indices on the host: a slot out
    of range (either side) acts as padding - the product stays, no state is touched."""
    monkeypatch.delenv("TPSSM_DEBUG_CHECKS", raising=False)
    x, w, b, cw, cb, state = conv_update_inputs(4, 40, 64, 16, 4, torch.float32, num_slots=5)
    ci = torch.tensor([2, 5, -7, 0], dtype=torch.int32)
    dstate = _dev(state)
    buf = torch.full((6, 50), 3.0, device=CUDA)
    ops.gemv_conv_update(_dev(x), _dev(w), _dev(b), dstate, _dev(cw), _dev(cb), conv_start=8,
                         activation="silu", cache_indices=_dev(ci), out=buf[1:5, 4:44])
    got = buf.cpu()
    # rows 1 and 2: the product alone, bit for bit the device gemv's (the same launch plan; the
    # CPU op sums in another order)
    product = ops.gemv(_dev(x), _dev(w), _dev(b)).cpu()
    assert torch.equal(got[2:4, 4:44], product[1:3])
    untouched = torch.full((6, 50), 3.0)
    untouched[1:5, 4:44] = got[1:5, 4:44]
    assert torch.equal(got, untouched), "wrote outside out"
    assert torch.equal(dstate.cpu()[[1, 3, 4]], state[[1, 3, 4]])  # slots no valid row uses
    # The valid rows as the CPU op computes them with those rows marked as padding.
    cpu_state = state.clone()
    with on_cpu_kernels():
        want = ops.gemv_conv_update(x, w, b, cpu_state, cw, cb, conv_start=8,
                                    activation="silu",
                                    cache_indices=torch.tensor([2, -1, -1, 0], dtype=torch.int32))
    assert torch.allclose(got[1:5, 4:44], want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dstate.cpu(), cpu_state, rtol=1e-5, atol=1e-5)


def test_conv_epilogue_graph_replay_equals_eager():
    x, w, b, cw, cb, state = conv_update_inputs(2, 96, 512, 64, 4, torch.bfloat16, seed=8)
    dx, dw, db, dcw, dcb = (_dev(t) for t in (x, w, b, cw, cb))
    ci = torch.tensor([3, 6], dtype=torch.int32, device=CUDA)
    eager_state = _dev(state)
    eager = ops.gemv_conv_update(dx, dw, db, eager_state, dcw, dcb, conv_start=16,
                                 activation="silu", cache_indices=ci)
    graph_state, out = _dev(state), torch.empty_like(eager)
    warm = _dev(state)
    ops.gemv_conv_update(dx, dw, db, warm, dcw, dcb, conv_start=16, activation="silu",
                         cache_indices=ci, out=out)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gemv_conv_update(dx, dw, db, graph_state, dcw, dcb, conv_start=16,
                             activation="silu", cache_indices=ci, out=out)
    graph_state.copy_(_dev(state))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(graph_state, eager_state)


# --- the norm prologue: add_rms_norm inside the projection's launch


def _norm_both_ways(x, w, b, nw, res, eps, conv=None, **options):
    """(fused out, its residual_out, separate out, its stream): the product with the norm
    prologue against add_rms_norm and then the same product op, on the device at the same launch
    options. conv: (conv_weight, conv_bias, state, conv_start, cache_indices) for
    gemv_conv_update (the states are compared by the caller through the returned outs)."""
    dx, dw, db, dnw = (_dev(t) for t in (x, w, b, nw))
    dres = _dev(res)
    res_out = None if res is None else torch.full_like(dres, float("nan"))
    stream = _dev(res)
    if conv is None:
        fused = ops.gemv(dx, dw, db, norm_weight=dnw, residual=dres, residual_out=res_out,
                         norm_eps=eps, **options)
        h = ops.add_rms_norm(dx, dnw, eps, residual=stream)
        sep = ops.gemv(h, dw, db, **options)
    else:
        cw, cb, state, start, ci = conv
        fstate, sstate = _dev(state), _dev(state)
        kw = dict(conv_start=start, activation="silu", cache_indices=_dev(ci), **options)
        fused = ops.gemv_conv_update(dx, dw, db, fstate, _dev(cw), _dev(cb), norm_weight=dnw,
                                     residual=dres, residual_out=res_out, norm_eps=eps, **kw)
        h = ops.add_rms_norm(dx, dnw, eps, residual=stream)
        sep = ops.gemv_conv_update(h, dw, db, sstate, _dev(cw), _dev(cb), **kw)
        assert torch.equal(fstate.cpu(), sstate.cpu())
    if res is not None:
        assert torch.equal(dres.cpu(), res), "the residual is only read"
    return (fused.cpu(), None if res is None else res_out.cpu(), sep.cpu(),
            None if res is None else stream.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", ["fp32", "same", None])
@pytest.mark.parametrize("m,n,k", [
    (1, 70, 2048),   # norm block of 256 threads: one reduce thread a thread
    (3, 45, 100),    # element path (K % 8); 32 reduce threads, most of the block idle
    (3, 9, 5000),    # 1024 reduce threads: four a thread
    (5, 19, 776),    # 5 rows: 3 padding rows of the kernel's 8
])
def test_norm_prologue_equals_add_rms_norm_then_gemv(m, n, k, residual, dtype):
    rdtype = {"fp32": torch.float32, "same": dtype, None: None}[residual]
    _, w, b = gemv_inputs(m, n, k, dtype, seed=k)
    x, nw, res = norm_inputs(m, k, dtype, rdtype, seed=m)
    fused, res_out, sep, stream = _norm_both_ways(x, w, b, nw, res, 1e-5)
    assert torch.equal(fused, sep)
    if res is not None:
        assert torch.equal(res_out, stream)
    # and the CPU op, within the sums' order
    cpu_out = None if res is None else torch.empty_like(res)
    with on_cpu_kernels():
        cpu = ops.gemv(x, w, b, norm_weight=nw, residual=res, residual_out=cpu_out)
    assert torch.allclose(fused.double(), cpu.double(), rtol=4 * 2 ** -7, atol=1e-3)
    if res is not None:
        assert torch.equal(res_out, cpu_out)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("rows_per_warp", [1, 2, 4])
@pytest.mark.parametrize("warps_per_row", [1, 2, 4, 8])
def test_norm_prologue_with_the_conv_epilogue_at_every_launch_option(warps_per_row,
                                                                     rows_per_warp, m):
    _, w, b, cw, cb, state = conv_update_inputs(m, 45, 2056, 29, 4, torch.bfloat16, seed=m)
    x, nw, res = norm_inputs(m, 2056, torch.bfloat16, torch.float32, seed=m)
    ci = torch.tensor([9, 2, 0, 4, 1, 3, 7, 8][:m], dtype=torch.int32)
    fused, res_out, sep, stream = _norm_both_ways(
        x, w, b, nw, res, 1e-6, conv=(cw, cb, state, 11, ci), warps_per_row=warps_per_row,
        rows_per_warp=rows_per_warp)
    assert torch.equal(fused, sep) and torch.equal(res_out, stream)


def test_norm_prologue_strided_operands_and_shared_memory_limit():
    """x, the residual and residual_out as column slices (misaligned x: the prologue reads it by
    element, the K loop still takes 16-byte loads from shared memory); nothing written outside
    residual_out; rows past 48 KB of shared memory; an error past the device's limit."""
    g = torch.Generator().manual_seed(9)
    k = 256
    xs = torch.randn(4, k + 3, generator=g).to(torch.bfloat16)
    _, w, b = gemv_inputs(4, 30, k, torch.bfloat16, seed=9)
    nw = (1 + torch.randn(k, generator=g) / 4).to(torch.bfloat16)
    res_buf = torch.randn(4, k + 8, generator=g)
    dout_res = torch.full((6, k + 10), 5.0, device=CUDA)
    dx = _dev(xs)[:, 1:k + 1]
    fused = ops.gemv(dx, _dev(w), _dev(b), norm_weight=_dev(nw),
                     residual=_dev(res_buf)[:, 4:k + 4], residual_out=dout_res[1:5, 2:k + 2])
    plan = getattr(ops._ops, "gemv_plan", None)
    if plan is not None:
        # gemv_plan takes no norm: with x this misaligned a plain gemv would take element loads
        assert not plan(dx, _dev(w), None, fused, 0, 0)[2]
    stream = res_buf[:, 4:k + 4].clone()
    h = ops.add_rms_norm(_dev(xs)[:, 1:k + 1].contiguous(), _dev(nw), 1e-5,
                         residual=_dev(stream))
    assert torch.equal(fused.cpu(), ops.gemv(h, _dev(w), _dev(b)).cpu())
    got = dout_res.cpu()
    assert torch.equal(got[1:5, 2:k + 2], stream + xs[:, 1:k + 1].float())
    untouched = torch.full((6, k + 10), 5.0)
    untouched[1:5, 2:k + 2] = got[1:5, 2:k + 2]
    assert torch.equal(got, untouched), "wrote outside residual_out"

    # 8 rows x 4096 bf16 = 64 KB (+ 1 KB of sums): past the 48 KB a launch gets without opting in
    _, w, b = gemv_inputs(8, 24, 4096, torch.bfloat16, seed=10)
    x, nw, res = norm_inputs(8, 4096, torch.bfloat16, torch.float32, seed=10)
    fused, res_out, sep, stream = _norm_both_ways(x, w, b, nw, res, 1e-5)
    assert torch.equal(fused, sep) and torch.equal(res_out, stream)
    # 8 x 8192 fp32 = 256 KB: more than any GPU gives a block
    x = torch.randn(8, 8192, device=CUDA)
    with pytest.raises(RuntimeError, match="more than a block of this device may have"):
        ops.gemv(x, torch.randn(4, 8192, device=CUDA), norm_weight=torch.ones(8192, device=CUDA))


def test_norm_prologue_graph_replay_equals_eager():
    _, w, b, cw, cb, state = conv_update_inputs(2, 96, 512, 64, 4, torch.bfloat16, seed=11)
    x, nw, res = norm_inputs(2, 512, torch.bfloat16, torch.float32, seed=11)
    dx, dw, db, dcw, dcb, dnw, dres = (_dev(t) for t in (x, w, b, cw, cb, nw, res))
    ci = torch.tensor([3, 6], dtype=torch.int32, device=CUDA)
    kw = dict(conv_start=16, activation="silu", cache_indices=ci, norm_weight=dnw, residual=dres)
    eager_state, eager_res = _dev(state), torch.empty_like(dres)
    eager = ops.gemv_conv_update(dx, dw, db, eager_state, dcw, dcb, residual_out=eager_res, **kw)
    graph_state, graph_res, out = _dev(state), torch.empty_like(dres), torch.empty_like(eager)
    ops.gemv_conv_update(dx, dw, db, _dev(state), dcw, dcb, residual_out=graph_res, out=out,
                         **kw)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.gemv_conv_update(dx, dw, db, graph_state, dcw, dcb, residual_out=graph_res, out=out,
                             **kw)
    graph_state.copy_(_dev(state))
    out.zero_()
    graph_res.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(graph_state, eager_state)
    assert torch.equal(graph_res, eager_res)
