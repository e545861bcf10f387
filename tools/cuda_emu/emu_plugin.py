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


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "CUDA"):
            mod.CUDA = torch.device("cpu")
        (drop if any(k in item.name for k in NEEDS_REAL_GPU) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
