"""benchmarks/sanitize_cases.py's cases (every CUDA op over boundary paths, then malformed index
values) through the emulated CUDA kernels on the CPU. Built with EMU_ASAN=1 and run with
AddressSanitizer preloaded, it is a CPU memcheck of the kernels' code: torch sizes CPU tensors
exactly, so a read or write past any tensor the ops touch is reported, and the run fails.

    PYTHONPATH=python:tools/cuda_emu python tools/cuda_emu/sanitize.py [GROUP ...]  # no ASan

`make test-cuda-emu-asan` runs the same groups as pytest items (test_sanitize_cases.py) beside
the emulated tests, under AddressSanitizer.

It does not replace compute-sanitizer on a GPU (gpu_check.sh): an access inside another live
allocation, or through a view into a wider buffer, is not seen here.
"""

import importlib.util
import sys
from pathlib import Path

import torch

import build as emu_build

ROOT = Path(__file__).resolve().parents[2]


def load_cases():
    """benchmarks/sanitize_cases.py as a module whose cases run on the CPU (through the emulated
    kernels once build.install() has run)."""
    spec = importlib.util.spec_from_file_location("sanitize_cases",
                                                  ROOT / "benchmarks" / "sanitize_cases.py")
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    # The cases read their device from module globals when they run: the CPU here.
    cases.dev = torch.device("cpu")
    cases.i32 = dict(dtype=torch.int32, device=cases.dev)
    return cases


def main(argv) -> int:
    emu_build.install()
    cases = load_cases()
    names = argv or list(cases.GROUPS)
    unknown = [n for n in names if n not in cases.GROUPS]
    if unknown:
        sys.exit(f"sanitize: unknown groups {unknown}, choose from {list(cases.GROUPS)}")
    for name in names:
        cases.GROUPS[name]()
        print(f"sanitize: {name} ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
