"""Builds the tpssm package and its compiled extension tpssm._C.

The CPU kernels are always built. The CUDA kernels are built too when torch is a CUDA build and a
CUDA toolkit is found (CUDA_HOME), unless TPSSM_SKIP_CUDA_BUILD=1. TORCH_CUDA_ARCH_LIST picks the
GPU architectures (default below) and MAX_JOBS the number of parallel compile jobs (ninja).
Nothing is downloaded: install with `pip install --no-build-isolation -e .` against the torch that
is already installed.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "python"))

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a message, not logic
    raise SystemExit(
        "tpssm builds against an installed torch: `pip install torch` first, then "
        "`pip install --no-build-isolation -e .`"
    ) from exc

DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0"  # A100, A6000, H100

CPU_SOURCES = [
    "csrc/torch_bindings.cpp",
    "csrc/ssm_ops.cpp",
    "csrc/cpu/causal_conv1d_cpu.cpp",
    "csrc/cpu/selective_scan_cpu.cpp",
    "csrc/qallreduce_ops.cpp",
    "csrc/cpu/qallreduce_cpu.cpp",
    "csrc/norm_ops.cpp",
    "csrc/cpu/norm_cpu.cpp",
    "csrc/attention_ops.cpp",
    "csrc/cpu/attention_cpu.cpp",
    "csrc/linear_ops.cpp",
    "csrc/cpu/linear_cpu.cpp",
]

CUDA_SOURCES = [
    "csrc/cuda/ssm_cuda_ops.cpp",
    "csrc/kernels/causal_conv1d.cu",
    "csrc/kernels/selective_scan.cu",
    "csrc/kernels/ssd_scan.cu",
    "csrc/kernels/selective_state_update.cu",
    "csrc/kernels/qallreduce_kernels.cu",
    "csrc/cuda/qallreduce_cuda_ops.cpp",
    "csrc/kernels/rms_norm.cu",
    "csrc/cuda/norm_cuda_ops.cpp",
    "csrc/kernels/attention.cu",
    "csrc/cuda/attention_cuda_ops.cpp",
    "csrc/kernels/gemv.cu",
    "csrc/cuda/linear_cuda_ops.cpp",
]


def cuda_build_wanted() -> bool:
    if os.environ.get("TPSSM_SKIP_CUDA_BUILD", "0") == "1":
        return False
    wanted = _cuda_toolchain_present()
    if not wanted and os.environ.get("TPSSM_REQUIRE_CUDA_BUILD", "0") == "1":
        raise SystemExit("tpssm: TPSSM_REQUIRE_CUDA_BUILD=1 but the CUDA kernels cannot be built")
    return wanted


def _cuda_toolchain_present() -> bool:
    if torch.version.cuda is None:
        print("tpssm: torch is a CPU-only build, building the CPU kernels only")
        return False
    if CUDA_HOME is None:
        print("tpssm: no CUDA toolkit found (set CUDA_HOME), building the CPU kernels only")
        return False
    return True


def nccl_paths():
    """Include and library folders of the nvidia-nccl wheel that torch itself loads."""
    try:
        import nvidia.nccl
    except ImportError as exc:
        major = torch.version.cuda.split(".")[0]
        raise SystemExit(
            f"tpssm: the CUDA build links NCCL from the nvidia-nccl-cu{major} wheel: "
            f"`pip install nvidia-nccl-cu{major}` (or set TPSSM_SKIP_CUDA_BUILD=1)"
        ) from exc
    base = Path(list(nvidia.nccl.__path__)[0])
    return base / "include", base / "lib"


def make_extension():
    # No -std flag: torch picks the C++ standard its headers need (C++20 since 2.13).
    # -ffp-contract=off: the quantized all-reduce must match its reference bit for bit, so no
    # multiply-add may be contracted into an FMA (targets with FMA contract by default).
    # -fopenmp: at::parallel_for is a header template that runs its range serially unless the
    # including file is compiled with OpenMP (torch's CPU backend); the CPU kernels rely on it.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    # The C++ runtime must be the process's shared libstdc++.so.6, the one torch uses. Where a
    # toolchain offers only the static libstdc++.a to the linker (seen on a GPU image), the
    # extension gets a private copy whose locale is never set up: every number streamed into an
    # error message (TORCH_CHECK) then crashes or vanishes. Naming the shared library ahead of
    # the driver's own -lstdc++ resolves every symbol there first.
    link_flags = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    link_flags.append("-fopenmp")
    with_cuda = cuda_build_wanted()
    if not with_cuda:
        return CppExtension(
            name="tpssm._C",
            sources=CPU_SOURCES,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nccl_include, nccl_lib = nccl_paths()
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-DTPSSM_WITH_CUDA",
    ]
    return CUDAExtension(
        name="tpssm._C",
        sources=CPU_SOURCES + CUDA_SOURCES,
        include_dirs=[str(ROOT / "csrc"), str(nccl_include)],
        library_dirs=[str(nccl_lib)],
        # The exact soname torch loads; the wheel ships no unversioned libnccl.so.
        extra_link_args=link_flags + ["-l:libnccl.so.2", "-Wl,-rpath,$ORIGIN/../nvidia/nccl/lib"],
        extra_compile_args={"cxx": cxx_flags + ["-DTPSSM_WITH_CUDA"], "nvcc": nvcc_flags},
    )


setup(
    name="tpssm",
    version="0.1.0",
    description="Tensor-parallel inference kernels and layers for selective state-space models",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch", "safetensors"],
    entry_points={"console_scripts": ["tpssm=tpssm.__main__:main"]},
)
