"""benchmarks/sanitize_cases.py's groups (every op's boundary paths, then malformed slots and
query_start_loc) as pytest items, run with `-p emu_plugin` through the emulated kernels.
`make test-cuda-emu-asan` runs them under AddressSanitizer beside the emulated tests, so that
pytest's workers (-n) share them out; an access past a tensor aborts the process running the
group, which fails the run. That abort is the test: the cases assert nothing of the results
(tests/test_ops_cuda.py checks what malformed indices give), so they are skipped unless the
emulated kernels run under AddressSanitizer."""

import os
from unittest import mock

import pytest
import torch

import sanitize
from tpssm import ops


def _asan_loaded() -> bool:
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()

# Loading the cases drops TPSSM_DEBUG_CHECKS from the environment, as their script must; the
# tests that share this process keep their environment, and each group drops it for itself.
with mock.patch.dict(os.environ):
    CASES = sanitize.load_cases()


@pytest.mark.parametrize("group", list(CASES.GROUPS))
def test_sanitize_cases(group, monkeypatch):
    if os.environ.get("EMU_ASAN") != "1":
        pytest.skip("memory checks only: run under AddressSanitizer (make test-cuda-emu-asan)")
    # The ASan build, loaded and in place of the CUDA ops: otherwise nothing here could fail.
    assert _asan_loaded(), "EMU_ASAN=1 without the AddressSanitizer runtime in the process"
    assert ops._ops is not torch.ops.tpssm, "the emulated kernels are not installed (-p emu_plugin)"
    # The index values are not checked on the host, as in production: the kernels must stay in
    # bounds whatever they are.
    monkeypatch.delenv("TPSSM_DEBUG_CHECKS", raising=False)
    CASES.GROUPS[group]()
