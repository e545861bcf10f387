"""What the build must contain. CI sets TPSSM_REQUIRE_CUDA_BUILD=1: there the extension must hold
the CUDA kernels and link the nvidia-nccl wheel's libnccl.so.2 (compiled and linked, even though
no GPU runs them)."""

import os
import subprocess

import pytest
import torch

import tpssm

REQUIRED = os.environ.get("TPSSM_REQUIRE_CUDA_BUILD", "0") == "1"


def test_cpu_kernels_registered():
    for op in ("causal_conv1d", "causal_conv1d_update", "selective_scan",
               "selective_state_update", "qar_quantize_pack", "qar_reduce_requant",
               "qar_dequant", "decode_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tpssm::{op}", "CPU"), op


@pytest.mark.skipif(not REQUIRED, reason="only where the CUDA build is required (CI)")
def test_cuda_kernels_built_and_nccl_linked():
    assert tpssm.has_cuda_kernels()
    for op in ("causal_conv1d", "selective_scan", "selective_state_update",
               "qar_nccl_all_reduce", "qar_loopback", "decode_attention"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tpssm::{op}", "CUDA"), op
    needed = subprocess.run(["objdump", "-p", tpssm._C.__file__], capture_output=True,
                            text=True, check=True).stdout
    assert "libnccl.so.2" in needed


def test_cxx_runtime_is_the_shared_libstdcxx():
    """The extension uses the process's shared libstdc++.so.6 (the one torch uses), not a private
    static copy: that copy's locale is never set up, and numbers streamed into error messages
    crash or vanish (setup.py names the shared library explicitly)."""
    so = tpssm._C.__file__
    needed = subprocess.run(["objdump", "-p", so], capture_output=True, text=True,
                            check=True).stdout
    assert "NEEDED               libstdc++.so.6" in needed
    symbols = subprocess.run(["nm", "--defined-only", "-C", so], capture_output=True, text=True,
                             check=True).stdout
    private = [line for line in symbols.splitlines() if "std::locale::" in line
               or "std::codecvt<" in line]
    assert not private, f"libstdc++ linked statically into {so}: {private[:3]}"


def test_error_message_formats_numbers():
    """The number in a validation message survives (a broken C++ runtime drops or crashes it)."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(dim, width\) with dim = 4, "
                                           r"got \[5, 3\]"):
        tpssm.ops.causal_conv1d(x, torch.randn(5, 3))
