"""The CUDA emulator's own rules (tools/cuda_emu): barriers and warp shuffles give the values a GPU
would, and a thread that never reaches a barrier, a shuffle missing a mask member, cp.async copies
never waited for and an oversized block are reported, not hung on or ignored. The emulated kernel
tests rely on these reports to show a kernel's synchronisation faults."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tools" / "cuda_emu"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

EXPECTED = [
    "barrier_and_warp_sum ok",
    "barrier_and_warp_sum values right",
    "half_warp_shuffle ok",
    "half_warp_shuffle values right",
    "early_exit_before_barrier error: emu: __syncthreads deadlock: a thread of the block never "
    "arrived",
    "shuffle_member_missing error: emu: shuffle deadlock: a mask member never arrived",
    "cp_async_never_waited error: emu: a thread ended with cp.async copies it never waited for",
    # Twice, with a new value each launch: a race reads the fresh entry in thread order and the
    # previous launch's in reverse order (EMU_THREAD_ORDER=reverse, to expose missing barriers).
    "read_without_barrier ok",
    "read_without_barrier sees {seen} entries",
    "read_without_barrier ok",
    "read_without_barrier sees {seen} entries",
    # Past a barrier every thread goes on in the scheduler's order (the last arrival too).
    "read_after_barrier_without_barrier ok",
    "read_after_barrier_without_barrier sees {seen} entries",
    "read_after_barrier_without_barrier ok",
    "read_after_barrier_without_barrier sees {seen} entries",
    # Blocks follow the same order as threads, so a block reading another's output of the same
    # launch sees it fresh in one order and stale in the other.
    "read_other_block ok",
    "read_other_block: every block ran, sees {seen} entries",
    "read_other_block ok",
    "read_other_block: every block ran, sees {seen} entries",
    "rounding_mode_per_thread ok",
    "rounding_mode_per_thread: thread 0 upward, thread 1 nearest, host nearest",
    "block_of_1025_threads error: emu: invalid launch configuration",
    "barrier_after_faults ok",
    "two_host_threads_launch values right",
]


@pytest.mark.skipif(shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_runtime.h").exists(),
                    reason="needs g++ and the CUDA toolkit's headers")
@pytest.mark.parametrize("context", ["native", "ucontext", "native_asan"])
def test_emulator_synchronisation_rules(tmp_path, context):
    """native: the shim's own context switch (x86-64); ucontext: the portable one; native_asan:
    built with AddressSanitizer, as CI's second emulated pass (its fiber-switch annotations)."""
    exe = tmp_path / "shim_selftest"
    flags = {"native": [], "ucontext": ["-DEMU_UCONTEXT"],
             "native_asan": ["-g", "-fsanitize=address"]}[context]
    subprocess.run(["g++", "-std=c++20", "-O1", "-include", "cstring", *flags, f"-I{EMU}",
                    f"-I{CUDA_INCLUDE}", str(EMU / "shim_selftest.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    for order, seen in (("forward", "fresh"), ("reverse", "stale")):
        # A deadlock must be reported at once, never waited out (the timeout is the hang guard).
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True,
                             env={**os.environ, "EMU_THREAD_ORDER": order,
                                  "ASAN_OPTIONS": "detect_leaks=0"})
        assert run.stdout.splitlines() == [line.format(seen=seen) for line in EXPECTED], order
