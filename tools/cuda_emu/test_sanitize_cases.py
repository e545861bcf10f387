"""benchmarks/sanitize_cases.py's groups (every op's boundary paths, then malformed slots and
query_start_loc) as pytest items, run with `-p emu_plugin` through the emulated kernels.
`make test-cuda-emu-asan` runs them under AddressSanitizer beside the emulated tests, so that
pytest's workers (-n) share them out; an access past a tensor aborts the process running the
group, which fails the run."""

import os
from unittest import mock

import pytest

import sanitize

# Loading the cases drops TPSSM_DEBUG_CHECKS from the environment, as their script must; the
# tests that share this process keep their environment, and each group drops it for itself.
with mock.patch.dict(os.environ):
    CASES = sanitize.load_cases()


@pytest.mark.parametrize("group", list(CASES.GROUPS))
def test_sanitize_cases(group, monkeypatch):
    # The index values are not checked on the host, as in production: the kernels must stay in
    # bounds whatever they are.
    monkeypatch.delenv("TPSSM_DEBUG_CHECKS", raising=False)
    CASES.GROUPS[group]()
