"""Programmatic dependent launch of the decode-step kernels (tpssm.ops.set_programmatic_launch):
every kernel gives the same bits with it on as off, eagerly and replayed from a CUDA graph, and
(in the kernel emulator, which counts them) each of those launches carries the attribute. On a
GPU, or emulated on the CPU: make test-cuda-emu. Skipped without either."""

import pytest
import torch

import tpssm
from conftest import conv_update_inputs, ssu_inputs
from test_linear_ops import gemv_inputs
from tpssm import ops

if not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
    pytest.skip("needs a CUDA device and a build with the CUDA kernels", allow_module_level=True)

CUDA = torch.device("cuda")


@pytest.fixture
def programmatic():
    """Yields a setter; the setting is off again after the test."""
    yield ops.set_programmatic_launch
    ops.set_programmatic_launch(False)


def _counted_launches():
    take = getattr(ops._ops, "take_programmatic_launches", None)  # the emulator only
    return None if take is None else take()


def _dev(kw):
    return {k: v.to(CUDA, copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in kw.items()}


def _decode_ops():
    """(name, make kwargs, call, written tensor names) of each decode-step op."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 200, generator=g).to(torch.bfloat16)
    w = torch.rand(200, generator=g).to(torch.bfloat16)
    gx, gw, gb = gemv_inputs(3, 50, 200, torch.bfloat16, seed=8)
    return [
        ("add_rms_norm",
         lambda: dict(x=x, weight=w, residual=torch.randn(3, 200, generator=g),
                      out=torch.empty_like(x)),
         lambda kw: ops.add_rms_norm(kw["x"], kw["weight"], 1e-5, residual=kw["residual"],
                                     out=kw["out"]), ("residual", "out")),
        ("gated_rms_norm",
         lambda: dict(x=x, z=x.flip(1).contiguous(), weight=w, out=torch.empty_like(x)),
         lambda kw: ops.gated_rms_norm(kw["x"], kw["weight"], 1e-6, z=kw["z"], group_size=50,
                                       out=kw["out"]), ("out",)),
        ("causal_conv1d_update",
         lambda: conv_update_inputs(dtype=torch.bfloat16),
         lambda kw: ops.causal_conv1d_update(**kw), ("conv_state", "out")),
        ("selective_state_update",
         lambda: ssu_inputs(dtype=torch.bfloat16, form="mamba1", nheads=40, dt_rank=5),
         lambda kw: ops.selective_state_update(**kw), ("ssm_state", "out")),
        ("gemv",
         lambda: dict(x=gx, weight=gw, bias=gb, out=torch.empty(3, 50, dtype=torch.bfloat16)),
         lambda kw: ops.gemv(kw["x"], kw["weight"], kw["bias"], out=kw["out"]), ("out",)),
        ("gemv_norm_prologue",
         lambda: dict(x=gx, weight=gw, norm_weight=gw[0], residual=torch.randn(3, 200),
                      residual_out=torch.empty(3, 200),
                      out=torch.empty(3, 50, dtype=torch.bfloat16)),
         lambda kw: ops.gemv(kw["x"], kw["weight"], norm_weight=kw["norm_weight"],
                             residual=kw["residual"], residual_out=kw["residual_out"],
                             out=kw["out"]), ("residual_out", "out")),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _decode_ops()])
def test_each_kernel_gives_the_same_bits(case, programmatic):
    name, make, call, written = _decode_ops()[case]
    base = make()
    runs = []
    _counted_launches()
    for enabled in (False, True):
        programmatic(enabled)
        kw = _dev(base)
        call(kw)
        runs.append({n: kw[n].cpu() for n in written})
        counted = _counted_launches()
        if counted is not None:
            assert counted == (1 if enabled else 0), (name, enabled, counted)
    for n in written:
        assert torch.equal(runs[0][n], runs[1][n]), f"{name}: {n} differs"


def test_setting_round_trips(programmatic):
    assert programmatic(True) is False
    assert programmatic(True) is True
    assert programmatic(False) is True


def test_decode_chain_graph_equals_eager(programmatic):
    """norm -> gemv -> conv update -> gemv -> state update -> gemv captured with programmatic
    launch on (each kernel reads the one before it) equals the chain run eagerly with it off."""
    g = torch.Generator().manual_seed(9)
    D, E, R, N, B = 64, 96, 8, 16, 2
    p = {
        "norm_w": torch.rand(D, generator=g) + 0.5,
        "in_w": torch.randn(2 * E, D, generator=g) / D ** 0.5,
        "conv_w": torch.randn(E, 4, generator=g) * 0.5,
        "x_w": torch.randn(R + 2 * N, E, generator=g) / E ** 0.5,
        "dt_w": torch.randn(E, R, generator=g) / R ** 0.5,
        "A": -torch.rand(E, N, generator=g) - 0.5,
        "D": torch.randn(E, generator=g),
        "dt_b": torch.randn(E, generator=g) * 0.1,
        "out_w": torch.randn(D, E, generator=g) / E ** 0.5,
    }
    p = {k: v.to(CUDA) for k, v in p.items()}
    for k in ("norm_w", "in_w", "conv_w", "x_w", "dt_w", "out_w"):
        p[k] = p[k].to(torch.bfloat16)
    h0 = torch.randn(B, D, generator=g).to(torch.bfloat16).to(CUDA)
    res0 = torch.randn(B, D, generator=g).to(CUDA)
    conv0 = torch.randn(B, E, 3, generator=g).to(torch.bfloat16).to(CUDA)
    ssm0 = torch.randn(B, E, N, generator=g).to(CUDA)

    def chain(h, res, conv, ssm):
        normed = ops.add_rms_norm(h, p["norm_w"], 1e-5, residual=res)
        xz = ops.gemv(normed, p["in_w"])
        x = ops.causal_conv1d_update(xz[:, :E], conv, p["conv_w"], activation="silu")
        dbl = ops.gemv(x, p["x_w"])
        y = ops.selective_state_update(ssm, x, dbl[:, :R], p["A"], dbl[:, R:R + N],
                                       dbl[:, R + N:], p["D"], xz[:, E:], p["dt_b"],
                                       dt_proj_weight=p["dt_w"], dt_softplus=True)
        return ops.gemv(y, p["out_w"])

    state = [t.clone() for t in (res0, conv0, ssm0)]
    want = chain(h0, *state)
    torch.cuda.synchronize()
    want_state = [t.clone() for t in state]

    programmatic(True)
    live = [t.clone() for t in (res0, conv0, ssm0)]
    h = h0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(h, *[t.clone() for t in live])  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(h, *live)
    for t, t0 in zip(live, (res0, conv0, ssm0)):
        t.copy_(t0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    for a, b in zip(live, want_state):
        assert torch.equal(a, b)


def test_graph_replays_order_reads_and_writes_under_programmatic_launch(programmatic):
    """A long norm (65536 row blocks: its last rows are read and written last) followed by a gemv
    that reads the norm's last output rows and writes over the norm's last input rows: without
    the wait the gemv would read rows not yet written or overwrite rows not yet read. Captured
    with programmatic launch on, every one of 50 replays equals the chain run with it off."""
    g = torch.Generator().manual_seed(10)
    rows, dim = 65536, 256
    h0 = torch.randn(rows, dim, generator=g).to(torch.bfloat16).to(CUDA)
    w_norm = (torch.rand(dim, generator=g) + 0.5).to(torch.bfloat16).to(CUDA)
    w = (torch.randn(dim, dim, generator=g) / 16).to(torch.bfloat16).to(CUDA)

    def chain(h, normed):
        h.copy_(h0)  # a plain torch kernel: the graph starts from the same input every replay
        ops.add_rms_norm(h, w_norm, 1e-5, out=normed)
        ops.gemv(normed[-8:], w, out=h[-8:])

    h, normed = torch.empty_like(h0), torch.empty_like(h0)
    chain(h, normed)
    torch.cuda.synchronize()
    want_h, want_normed = h.clone(), normed.clone()

    programmatic(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(h, normed)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(h, normed)
    for _ in range(50):
        normed.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(normed, want_normed)
        assert torch.equal(h, want_h)
