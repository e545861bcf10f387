"""The fused residual add + RMSNorm op (tpssm.ops.add_rms_norm) on the CPU: bit for bit against the
unfused chain the models ran, against the float64 reference, and its argument errors (the CUDA
kernel: tests/test_norm_ops_cuda.py)."""

import pytest
import torch

from tpssm import ops
from tpssm.models.model import RMSNorm
from tpssm.reference import add_rms_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# rows x dim: one row, odd widths, more threads than elements, a decode batch, a prefill tile
SHAPES = [(1, 37), (3, 64), (2, 1000), (8, 2560), (33, 256)]
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def _inputs(rows, dim, dtype, residual_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    r = None if residual_dtype is None else (torch.randn(rows, dim, generator=g) * 3).to(
        residual_dtype)
    return x, w, r


def _unfused(x, w, r, eps):
    """What SSMBlock / RMSNorm computed before the op: residual + out, then the next norm."""
    norm = RMSNorm(x.shape[-1], eps, x.dtype, "cpu")
    norm.weight.data.copy_(w)
    if r is None:
        return norm(x), None
    new_r = r + x
    return norm(new_r.to(x.dtype)), new_r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", ["none", "fp32", "act"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_op_is_the_unfused_chain_bit_for_bit(shape, residual, dtype):
    rdt = {"none": None, "fp32": torch.float32, "act": dtype}[residual]
    x, w, r = _inputs(*shape, dtype, rdt)
    want, want_r = _unfused(x, w, None if r is None else r.clone(), 1e-5)
    got = ops.add_rms_norm(x, w, 1e-5, residual=r)
    assert torch.equal(got, want)
    if r is not None:
        assert torch.equal(r, want_r)
    # Against the float64 reference: at most one rounding of each stored value apart.
    x2, w2, r2 = _inputs(*shape, dtype, rdt)
    ref = add_rms_norm_ref(x2, w2, 1e-5, residual=r2)
    tol = 4 * ULP[dtype] * (w2.float().abs().max() * 6)
    assert (got.float() - ref.float()).abs().max() <= tol


def test_argument_errors_name_the_rule():
    x, w, r = _inputs(2, 8, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(dim,\\)"):
        ops.add_rms_norm(x, w[:4], 1e-5)
    with pytest.raises(RuntimeError, match="residual must be float32 or x's dtype"):
        ops.add_rms_norm(x.half(), w.half(), 1e-5, residual=r.bfloat16())
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        ops.add_rms_norm(x, w, 1e-5, out=x)
    with pytest.raises(RuntimeError, match="residual must not overlap x"):
        ops.add_rms_norm(x, w, 1e-5, residual=x)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.add_rms_norm(x[0], w, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ops.add_rms_norm(x, w, -1.0)
