"""The fused residual add + RMSNorm CUDA kernel against the float64 reference and the CPU op (on a
GPU, or emulated on the CPU: make test-cuda-emu). Skipped without either."""

import pytest
import torch

import tpssm
from test_norm_ops import SHAPES, ULP, DTYPES, _inputs
from tpssm import ops
from tpssm.reference import add_rms_norm_ref

if not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
    pytest.skip("needs a CUDA device and a build with the CUDA kernels", allow_module_level=True)

CUDA = torch.device("cuda")


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
    tol = 4 * ULP[dtype] * (w.float().abs().max() * 6)
    assert (dev.float() - ref.float()).abs().max() <= tol
    assert (dev.float() - cpu.float()).abs().max() <= tol
