"""The decode-sized projection op (tpssm.ops.gemv) on the CPU: against the float64 reference, and
its argument errors (the CUDA kernel: tests/test_linear_ops_cuda.py)."""

import pytest
import torch

from tpssm import ops
from tpssm.reference import gemv_ref

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
