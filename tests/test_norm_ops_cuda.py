"""The fused norm CUDA kernels (add_rms_norm, gated_rms_norm) against the float64 references and
the CPU ops (on a GPU, or emulated on the CPU: make test-cuda-emu). Skipped without either."""

import pytest
import torch

import tpssm
from test_norm_ops import DTYPES, GATED_SHAPES, SHAPES, ULP, _gated_inputs, _inputs
from tpssm import ops
from tpssm.reference import add_rms_norm_ref, gated_rms_norm_ref, gated_sum_squares_ref

if not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
    pytest.skip("needs a CUDA device and a build with the CUDA kernels", allow_module_level=True)

CUDA = torch.device("cuda")


def assert_norm_close(out, ref, cpu, dtype):
    """Element by element. Against the float64 reference: the kernel and the reference both
    round twice (the normalised value, then its product with the weight), so they may differ by
    two roundings of the result, plus fp32's own error (2^-18 of it). Against the CPU op, which
    does the kernel's fp32 arithmetic in another summation order: one rounding of the result,
    and in 16 bits equal almost everywhere (a row's sum differs in its last bits, which moves an
    element across a rounding boundary rarely; a kernel off by a fraction of a rounding moves
    many)."""
    ulp = ULP[dtype]
    tiny = torch.finfo(dtype).tiny * ulp  # a subnormal result's rounding
    fp32 = 2 ** -18  # fp32's own error: a row's sum of squares over up to 2560 values
    out, ref, cpu = out.double(), ref.double(), cpu.double()
    err = (out - ref).abs()
    bound = (2 * ulp * (1 + ulp) + fp32) * ref.abs() + tiny
    assert bool((err <= bound).all()), f"vs reference: {(err / bound).max().item():.2f} x bound"
    if dtype == torch.float32:
        diff, bound = (out - cpu).abs(), fp32 * cpu.abs() + tiny
    else:
        diff, bound = (out - cpu).abs(), 1.5 * ulp * cpu.abs() + tiny
        # A couple of elements in the smallest shapes (37 of them), 1% in the larger.
        moved = int((out != cpu).sum())
        assert moved <= max(2, 0.01 * out.numel()), f"{moved} elements differ from the CPU op's"
    assert bool((diff <= bound).all()), f"vs CPU op: {(diff / bound).max().item():.2f} x bound"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", ["none", "fp32", "act"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_against_the_reference_and_the_cpu_op(shape, residual, dtype):
    rdt = {"none": None, "fp32": torch.float32, "act": dtype}[residual]
    x, w, r = _inputs(*shape, dtype, rdt, seed=1)
    # The registered CPU op, whatever tpssm.ops dispatches to (the emulator swaps that).
    cpu_r = None if r is None else r.clone()
    cpu = torch.empty_like(x)
    torch.ops.tpssm.add_rms_norm(x, cpu_r, w, 1e-5, cpu)
    dev_r = None if r is None else r.to(CUDA, copy=True)
    dev = ops.add_rms_norm(x.to(CUDA, copy=True), w.to(CUDA, copy=True), 1e-5,
                           residual=dev_r).cpu()
    if r is not None:  # the add is one fp32 operation rounded once, on every device
        assert torch.equal(dev_r.cpu(), cpu_r)
    ref = add_rms_norm_ref(x, w, 1e-5, residual=None if r is None else r.clone())
    assert_norm_close(dev, ref, cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["gate+weight", "gate", "plain"])
@pytest.mark.parametrize("shape", GATED_SHAPES)
def test_gated_cuda_kernel_against_the_reference_and_the_cpu_op(shape, variant, dtype):
    rows, dim, gs = shape
    x, z, w = _gated_inputs(rows, dim, dtype, strided=dim % 2 == 0, seed=1)
    z = z if "gate" in variant else None
    w = w if "weight" in variant else None
    cpu = torch.empty(x.shape, dtype=dtype)
    torch.ops.tpssm.gated_rms_norm(x, z, w, gs, 0, 1e-6, None, 0, cpu)  # the registered CPU op

    def dev(t):
        """t on the device with its strides (a column slice stays a slice of a copied buffer)."""
        if t is None:
            return None
        base = t if t._base is None else t._base
        return base.to(CUDA, copy=True).as_strided(t.shape, t.stride(), t.storage_offset())

    out = ops.gated_rms_norm(dev(x), dev(w), 1e-6, z=dev(z), group_size=gs).cpu()
    ref = gated_rms_norm_ref(x, w, 1e-6, z=z, group_size=gs)
    assert_norm_close(out, ref, cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first,gs,dim", [(40, 16, 72), (5, 3, 11), (256, 16, 288)])
def test_gated_cuda_kernel_leading_group(first, gs, dim, dtype):
    """Falcon-Mamba's dt / B / C norms in one launch: a first group of another width."""
    x, _, _ = _gated_inputs(5, dim, dtype, seed=4)
    out = ops.gated_rms_norm(x.to(CUDA, copy=True), None, 1e-6, group_size=gs,
                             first_group_size=first).cpu()
    cpu = torch.empty_like(x)
    torch.ops.tpssm.gated_rms_norm(x, None, None, gs, first, 1e-6, None, 0, cpu)
    ref = gated_rms_norm_ref(x, None, 1e-6, group_size=gs, first_group_size=first)
    assert_norm_close(out, ref, cpu, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,gs,first", [(96, 0, 0), (2560, 0, 0), (40, 8, 16)])
def test_gated_cuda_kernels_spanning_ranks(dim, gs, first, dtype):
    """gated_sum_squares and gated_rms_norm with reduced sums (groups spanning TP ranks): the sums
    against the float64 reference, the norm from given sums against the reference with the same
    sums and against the CPU op."""
    x, z, w = _gated_inputs(3, dim, dtype, strided=True, seed=9)
    d = lambda t: t.to(CUDA, copy=True)  # noqa: E731 - contiguous copies are fine here
    sums = ops.gated_sum_squares(d(x), z=d(z), group_size=gs, first_group_size=first).cpu()
    ref_sums = gated_sum_squares_ref(x, z=z, group_size=gs, first_group_size=first)
    assert torch.allclose(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)
    total = sums * 2.5  # as if the other ranks held more of the groups
    norm_size = 3 * (gs or dim)
    out = ops.gated_rms_norm(d(x), d(w), 1e-6, z=d(z), group_size=gs, first_group_size=first,
                             sum_sq=d(total), norm_size=norm_size).cpu()
    cpu = torch.empty_like(x)
    torch.ops.tpssm.gated_rms_norm(x, z, w, gs, first, 1e-6, total, norm_size, cpu)
    ref = gated_rms_norm_ref(x, w, 1e-6, z=z, group_size=gs, first_group_size=first,
                             sum_sq=total, norm_size=norm_size)
    assert_norm_close(out, ref, cpu, dtype)
