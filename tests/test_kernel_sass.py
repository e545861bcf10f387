"""The compiled code of the decode-step kernels keeps programmatic dependent launch's rule
(csrc/kernels/kernel_utils.cuh): in the sm_90 SASS of every instantiation, no global, shared or
atomic memory access and no exit comes before the grid-dependency wait (ACQBULK, from
griddepcontrol.wait), only L2 prefetches (CCTL); the trigger (PREEXIT) follows the wait. A
compiler that hoisted a load above the wait would break the ordering with the previous kernel
without any test on a GPU noticing reliably. Needs a build with the CUDA kernels and cuobjdump
(the CUDA toolkit's, or the copy the triton wheel ships); runs without a GPU."""

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import tpssm

KERNELS = ("gemv_kernel", "add_rms_norm_kernel", "gated_rms_norm_kernel",
           "causal_conv1d_update_kernel", "selective_state_update_kernel")
# Opcodes that touch global / shared / generic memory or end the thread.
FORBIDDEN = re.compile(r"^(LDG|STG|LDS|STS|LD|ST|ATOM|ATOMG|ATOMS|RED|LDGSTS|EXIT|RET)\b")


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for candidate in [Path(home) / "bin" / "cuobjdump"]:
        if candidate.exists():
            return str(candidate)
    try:
        import triton

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return None


def sass_functions(library: str, tool: str):
    """{mangled name: [opcode, ...]} of the library's sm_90 SASS."""
    text = subprocess.run([tool, "-sass", "-arch", "sm_90", library], check=True,
                          capture_output=True, text=True).stdout
    functions, current = {}, None
    for line in text.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = functions.setdefault(head.group(1), [])
            continue
        op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)", line)
        if op and current is not None:
            current.append(op.group(1))
    return functions


def rule_violations(functions):
    """(name, problem) for each decode-step kernel that breaks the rule; and how many checked."""
    problems, checked = [], 0
    for name, ops in functions.items():
        if not any(k in name for k in KERNELS):
            continue
        checked += 1
        if "ACQBULK" not in ops:
            problems.append((name, "no griddepcontrol.wait"))
            continue
        wait = ops.index("ACQBULK")
        before = [op for op in ops[:wait] if FORBIDDEN.match(op.split(".")[0])]
        if before:
            problems.append((name, f"before the wait: {before[:4]}"))
        if "PREEXIT" in ops and ops.index("PREEXIT") < wait:
            problems.append((name, "launch_dependents before the wait"))
    return problems, checked


def test_no_memory_access_before_the_grid_dependency_wait():
    if not tpssm.has_cuda_kernels():
        pytest.skip("the extension was built without the CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel)")
    library = importlib.import_module("tpssm._C").__file__
    functions = sass_functions(library, tool)
    if not functions:
        pytest.skip("the build holds no sm_90 code (TORCH_CUDA_ARCH_LIST without 9.0)")
    problems, checked = rule_violations(functions)
    # 192 gemv (48 each: plain, conv epilogue, norm prologue, both), 8 add / gated norm, and
    # the conv-update and state-update instantiations
    assert checked >= 60, f"only {checked} decode-step kernels found in the sm_90 SASS"
    assert not problems, problems
