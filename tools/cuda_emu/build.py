"""Builds the host emulation of the CUDA kernels (see README.md) and returns the module.

The kernel sources are copied to build/cuda_emu/kernels with every `kernel<<<cfg>>>(args)` launch
rewritten as `emu_launch(&kernel, cfg, args)` and the 16- and 8-byte accesses of
kernel_utils.cuh routed through alignment-checking helpers; nothing in csrc/ changes."""

from __future__ import annotations

import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "build" / "cuda_emu"
KERNELS = ("causal_conv1d", "selective_scan", "ssd_scan", "selective_state_update", "rms_norm",
           "attention", "gemv")
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)


def transform() -> None:
    src = ROOT / "csrc" / "kernels"
    dst = OUT / "kernels"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in ("ssm_params.h", "norm_params.h", "attention_params.h", "gemv_params.h"):
            # One definition of the params structs: csrc/ssm_ops.h / norm_ops.h /
            # attention_ops.h / linear_ops.h include the originals.
            text = f'#include "{f}"\n'
        elif f.name == "mma_sm80.cuh":
            # Tensor-core and async-copy primitives: the host emulation of the same functions.
            text = '#include "emu_mma.h"\n'
        else:
            text = f.read_text()
            text = LAUNCH.sub(lambda m: f"emu_launch(&{m.group(1)}, {m.group(2)}, {m.group(3)});",
                              text)
            text = text.replace("*reinterpret_cast<const uint4*>(ptr)", "emu_ld<uint4>(ptr)")
            text = text.replace("*reinterpret_cast<const Raw*>(ptr)", "emu_ld<Raw>(ptr)")
            text = text.replace("*reinterpret_cast<uint4*>(ptr) =", "emu_st<uint4>(ptr) =")
            text = text.replace("*reinterpret_cast<Raw*>(ptr) =", "emu_st<Raw>(ptr) =")
            text = text.replace("extern __shared__ __align__(16) unsigned char tpssm_dynamic_smem[];",
                                "unsigned char* tpssm_dynamic_smem = emu_dynamic_smem();")
            if f.suffix in (".cu", ".cuh"):
                text = '#include "emu_shim.h"\n' + text
        out = dst / f.name
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
    for name in KERNELS:
        tu = OUT / f"emu_{name}.cpp"
        text = f'#include "{name}.cu"\n'
        # Rewritten only when different: a fresh mtime would make ninja rebuild the unit.
        if not tu.exists() or tu.read_text() != text:
            tu.write_text(text)


def build(verbose: bool = False):
    import torch.utils.cpp_extension as ce

    transform()
    # EMU_ASAN=1: AddressSanitizer build (run Python with the runtime preloaded, as the
    # Makefile's test-cuda-emu-asan does): catches accesses past a tensor's allocation, which
    # torch makes exactly sized. Line tables only (-g1): reports keep file:line, and the build
    # takes a third less time than with full debug information.
    asan = os.environ.get("EMU_ASAN") == "1"
    obj = OUT / ("obj_asan" if asan else "obj")
    obj.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "emu_ops.cpp", ROOT / "csrc" / "ssm_ops.cpp",
               ROOT / "csrc" / "norm_ops.cpp", ROOT / "csrc" / "attention_ops.cpp",
               ROOT / "csrc" / "linear_ops.cpp"] + [
        OUT / f"emu_{n}.cpp" for n in KERNELS]
    return ce.load(name="tpssm_cuda_emu", sources=[str(s) for s in sources],
                   extra_include_paths=[str(OUT), str(OUT / "kernels"), str(HERE),
                                        str(ROOT / "csrc"), "/usr/local/cuda/include"],
                   extra_cflags=["-O1", "-include", "cstring"]
                   + (["-g1", "-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []),
                   extra_ldflags=["-fsanitize=address"] if asan else [],
                   build_directory=str(obj), verbose=verbose)


def install():
    """Builds the emulation and points tpssm.ops at it, with torch and tpssm told that CUDA
    kernels are there (their device is the CPU); returns the module."""
    import torch

    import tpssm
    import tpssm.ops

    emu = build()
    tpssm.ops._ops = emu
    tpssm.has_cuda_kernels = lambda: True
    torch.cuda.is_available = lambda: True
    return emu


if __name__ == "__main__":
    print(build(verbose=True))
