"""The fused norm ops on the CPU - the residual add + RMSNorm (tpssm.ops.add_rms_norm) and the
grouped gated RMSNorm (tpssm.ops.gated_rms_norm): bit for bit against the unfused chains the
models ran, against the float64 references, and their argument errors (the CUDA kernels:
tests/test_norm_ops_cuda.py)."""

import pytest
import torch
import torch.nn.functional as F

from tpssm import ops
from tpssm.models.model import RMSNorm
from tpssm.reference import add_rms_norm_ref, gated_rms_norm_ref, gated_sum_squares_ref

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


# rows x dim x group_size (0: one group): one row, Mamba-2's "whole" norm at a shard width,
# groups of 64 / 250 columns, odd widths, more threads than elements, a prefill tile.
GATED_SHAPES = [(1, 37, 0), (3, 96, 32), (2, 2560, 0), (4, 1000, 250), (33, 256, 64)]


def _gated_inputs(rows, dim, dtype, strided=False, seed=0):
    """x and z as column slices of one in_proj-like buffer when strided (row stride > dim)."""
    g = torch.Generator().manual_seed(seed)
    width = 2 * dim + 3 if strided else dim
    buf = (torch.randn(rows, width, generator=g) * 2).to(dtype)
    zbuf = (torch.randn(rows, width, generator=g) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    if not strided:
        return buf, zbuf, w
    return buf[:, 1:dim + 1], zbuf[:, dim + 2:2 * dim + 2], w


def _unfused_gated(y, z, w, gs, eps):
    """Mamba2Mixer's gated norm as the models ran it in torch before the op."""
    g = y.float() * F.silu(z.float()) if z is not None else y.float()
    T = g.shape[0]
    g3 = g.reshape(T, -1, gs or g.shape[1])
    out = (g3 * torch.rsqrt(g3.pow(2).mean(-1, keepdim=True) + eps)).reshape(T, -1)
    return out.to(y.dtype) if w is None else w * out.to(y.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["gate+weight", "gate", "weight", "plain"])
@pytest.mark.parametrize("shape", GATED_SHAPES)
def test_gated_cpu_op_is_the_unfused_chain_bit_for_bit(shape, variant, dtype):
    rows, dim, gs = shape
    x, z, w = _gated_inputs(rows, dim, dtype, strided=dim % 2 == 0)
    z = z if "gate" in variant else None
    w = w if "weight" in variant else None
    got = ops.gated_rms_norm(x, w, 1e-6, z=z, group_size=gs)
    assert got.is_contiguous() and got.dtype == dtype
    assert torch.equal(got, _unfused_gated(x, z, w, gs, 1e-6))
    ref = gated_rms_norm_ref(x, w, 1e-6, z=z, group_size=gs)
    wmax = 1.0 if w is None else w.float().abs().max()
    # |normed| <= sqrt(group size); two roundings of the stored value at most
    bound = (gs or dim) ** 0.5
    assert (got.float() - ref.float()).abs().max() <= 4 * ULP[dtype] * wmax * bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first,gs,dim", [(40, 16, 72), (8, 16, 40), (16, 16, 48), (5, 3, 11)])
def test_gated_leading_group_is_falcons_dt_b_c_norms(first, gs, dim, dtype):
    """Falcon-Mamba's weightless norms of dt (R columns), B and C (N each) in one launch: the
    same values as F.rms_norm per segment (which the models ran before) up to the summation order
    of the mean, and the float64 reference's within two roundings."""
    x, _, _ = _gated_inputs(6, dim, dtype, strided=True, seed=3)
    got = ops.gated_rms_norm(x, None, 1e-6, group_size=gs, first_group_size=first)
    bounds = [0, first] + list(range(first + gs, dim + 1, gs))
    want = torch.cat([F.rms_norm(x[:, a:b], (b - a,), eps=1e-6)
                      for a, b in zip(bounds, bounds[1:])], 1)
    tol = 4 * ULP[dtype] * max(first, gs) ** 0.5
    assert (got.float() - want.float()).abs().max() <= tol
    ref = gated_rms_norm_ref(x, None, 1e-6, group_size=gs, first_group_size=first)
    assert (got.float() - ref.float()).abs().max() <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [2, 3])
def test_gated_norm_spanning_ranks_is_the_unfused_chain(tp, dtype):
    """One norm group over every rank's columns (Mamba-2's "whole" norm at tp > 1): each rank's
    gated_sum_squares, summed over the ranks, then gated_rms_norm with sum_sq and norm_size -
    bit for bit the torch chain the mixer ran, and within two roundings of the float64
    reference of the whole row."""
    rows, dim = 5, 96
    x, z, w = _gated_inputs(rows, dim, dtype, strided=True, seed=6)
    cuts = [round(dim * r / tp) for r in range(tp + 1)]
    parts = [(x[:, a:b], z[:, a:b], w[a:b]) for a, b in zip(cuts, cuts[1:])]
    sums = [ops.gated_sum_squares(xl, z=zl) for xl, zl, _ in parts]
    for (xl, zl, _), ss in zip(parts, sums):
        g = xl.float() * F.silu(zl.float())
        assert ss.shape == (rows, 1) and ss.dtype == torch.float32
        assert torch.equal(ss, g.pow(2).sum(-1, keepdim=True))
    total = sum(sums)  # the all-reduce
    got = []
    for xl, zl, wl in parts:
        out = ops.gated_rms_norm(xl, wl, 1e-5, z=zl, sum_sq=total, norm_size=dim)
        g = xl.float() * F.silu(zl.float())
        assert torch.equal(out, wl * (g * torch.rsqrt(total / dim + 1e-5)).to(dtype))
        got.append(out)
    ref = gated_rms_norm_ref(x, w, 1e-5, z=z)
    bound = 4 * ULP[dtype] * w.float().abs().max() * dim ** 0.5
    assert (torch.cat(got, 1).float() - ref.float()).abs().max() <= bound


def test_gated_sum_squares_groups_and_out_slice():
    """Sums per group (a leading group of another width too), written into a column slice of a
    wider buffer, against the float64 reference."""
    x, z, _ = _gated_inputs(4, 40, torch.float32, strided=True, seed=8)
    buf = torch.full((4, 9), -1.0)
    got = ops.gated_sum_squares(x, z=z, group_size=8, first_group_size=16, out=buf[:, 2:6])
    assert got.data_ptr() == buf[:, 2:6].data_ptr()
    ref = gated_sum_squares_ref(x, z=z, group_size=8, first_group_size=16)
    assert torch.allclose(buf[:, 2:6].double(), ref, rtol=1e-5)
    assert (buf[:, :2] == -1).all() and (buf[:, 6:] == -1).all()


def test_gated_writes_into_out_and_leaves_inputs():
    x, z, w = _gated_inputs(3, 64, torch.float32, strided=True)
    x0, z0 = x.clone(), z.clone()
    out = torch.full((3, 64), float("nan"))
    assert ops.gated_rms_norm(x, w, 1e-5, z=z, group_size=16, out=out) is out
    assert torch.equal(out, _unfused_gated(x, z, w, 16, 1e-5))
    assert torch.equal(x, x0) and torch.equal(z, z0)


def test_gated_argument_errors_name_the_rule():
    x, z, w = _gated_inputs(2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="the groups must tile dim \\(8\\)"):
        ops.gated_rms_norm(x, w, 1e-5, group_size=3)
    with pytest.raises(RuntimeError, match="the groups must tile dim \\(8\\)"):
        ops.gated_rms_norm(x, w, 1e-5, group_size=4, first_group_size=3)
    with pytest.raises(RuntimeError, match="the groups must tile dim \\(8\\)"):
        ops.gated_rms_norm(x, w, 1e-5, group_size=2, first_group_size=10)
    with pytest.raises(RuntimeError, match="group_size and first_group_size must be >= 0"):
        ops.gated_rms_norm(x, w, 1e-5, group_size=-2)
    with pytest.raises(RuntimeError, match="z must have x's dtype"):
        ops.gated_rms_norm(x, w, 1e-5, z=z.half())
    with pytest.raises(RuntimeError, match="z must have shape \\(rows, dim\\)"):
        ops.gated_rms_norm(x, w, 1e-5, z=z[:1])
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(dim,\\)"):
        ops.gated_rms_norm(x, w[:4], 1e-5)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        ops.gated_rms_norm(x, w.half(), 1e-5)
    with pytest.raises(RuntimeError, match="out must not overlap z"):
        ops.gated_rms_norm(x, w, 1e-5, z=z, out=z)
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        ops.gated_rms_norm(x, w, 1e-5, out=x)
    with pytest.raises(RuntimeError, match="x must have a contiguous last dim"):
        ops.gated_rms_norm(x.t().contiguous().t(), w, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ops.gated_rms_norm(x, w, -1.0)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.gated_rms_norm(x.double(), None, 1e-5)
    ss = torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="norm_size .* must be >= 1 with sum_sq"):
        ops.gated_rms_norm(x, w, 1e-5, sum_sq=ss)
    with pytest.raises(RuntimeError, match="norm_size applies with sum_sq only"):
        ops.gated_rms_norm(x, w, 1e-5, norm_size=8)
    with pytest.raises(RuntimeError, match="sum_sq must have shape \\(rows, groups\\) = \\(2, 2\\)"):
        ops.gated_rms_norm(x, w, 1e-5, group_size=4, sum_sq=ss, norm_size=8)
    with pytest.raises(RuntimeError, match="sum_sq must be float32"):
        ops.gated_rms_norm(x, w, 1e-5, sum_sq=ss.double(), norm_size=8)
    with pytest.raises(RuntimeError, match="gated_sum_squares: out must be float32"):
        ops.gated_sum_squares(x, out=torch.empty(2, 1, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="gated_sum_squares: out must not overlap x"):
        ops.gated_sum_squares(x, out=x[:, :1])
