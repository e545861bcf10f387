"""pytest plugin: runs tests/test_ops_cuda.py on the CPU against the emulated CUDA kernels.
`-p emu_plugin` with tools/cuda_emu on sys.path; EMU_SMS sets the emulated SM count (132)."""

import os

import pytest
import torch

import build as emu_build

EMU = None
NEEDS_REAL_GPU = ("graph", "opcheck")  # CUDA graphs, and opcheck dispatching torch.ops.tpssm


def pytest_configure(config):
    global EMU
    EMU = emu_build.install()
    EMU.set_sm_count(int(os.environ.get("EMU_SMS", "132")))


def _large_check_vs_cpu_op(mod):
    """The large tests compare the op on the device with the CPU op: here, the emulated kernels
    with the real CPU kernels."""
    import tpssm.ops

    def check(op, kw, mutable, dtype):
        kw_emu = {k: mod.to_cuda(v) for k, v in kw.items()}
        op(**kw_emu)
        tpssm.ops._ops = torch.ops.tpssm
        try:
            op(**kw)
        finally:
            tpssm.ops._ops = EMU
        for n in mutable:
            mod.assert_matches_cpu(kw_emu[n], kw[n], dtype, n)
    return check


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "CUDA"):
            mod.CUDA = torch.device("cpu")
            if hasattr(mod, "_large_check") and not getattr(mod, "_emu_patched", False):
                mod._large_check = _large_check_vs_cpu_op(mod)
                mod._emu_patched = True
        (drop if any(k in item.name for k in NEEDS_REAL_GPU) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
