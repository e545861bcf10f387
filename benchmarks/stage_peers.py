"""Stages the peer kernels that bench_peers.py times beside tpssm's into .peer/ at the repository
root. .peer/ is git-ignored and never committed: peer code is for timing on the lent GPU machine
only (name ".peer" in the device call's `carry`).

What is staged, from the projects' source distributions on PyPI (the sha256 PyPI lists checked;
the archives are read, nothing in them is built or run here), each with its license:
- mamba_ssm: its Triton kernels (the chunked SSD scan of Mamba-2 prefill, the selective state
  update, the fused residual-add RMSNorm and the gated RMSNorm). Its package __init__ files are
  replaced by empty ones, so the kernels import without its CUDA extension or causal_conv1d.
- vLLM: its Mamba-2 prefill scan (the varlen SSD kernels, states read from and written to cache
  slots) and its decode kernels (the selective state update, with its tuned launch
  configurations for NVIDIA GPUs, and the conv update). The few vLLM modules those files import
  (platform, logging, settings, constants) are replaced by small stand-ins written here, in
  .peer/vllm/ beside the staged files.
Needs the network (PyPI); run here, not on the GPU machine.  Usage: stage_peers.py"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / ".peer"
MAMBA_SSM = "2.3.2.post1"
VLLM = "0.34.0"
# The modules mamba_ssm's forward kernels import, inside its mamba_ssm/ folder.
MAMBA_SSM_MODULES = [f"ops/triton/{m}.py" for m in (
    "softplus", "ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan",
    "ssd_combined", "layernorm_gated", "layer_norm", "k_activations", "selective_state_update")
] + ["utils/determinism.py", "utils/torch.py"]
VLLM_OPS = "vllm/model_executor/layers/mamba/ops"
# Stand-ins for what vLLM's files import beside Triton, torch and numpy (the values are
# vLLM's own: PAD_SLOT_ID, NULL_BLOCK_ID; device names as its tuned configs' file names use).
VLLM_STANDINS = {
    "vllm/envs.py": "VLLM_TUNED_CONFIG_FOLDER = None\n",
    "vllm/_custom_ops.py": "",
    "vllm/logger.py": '''import logging


class _Logger(logging.LoggerAdapter):
    def _once(self, level, msg, *args, **kwargs):
        self.log(level, msg, *args)

    def info_once(self, msg, *args, **kwargs):
        self._once(logging.INFO, msg, *args)

    def warning_once(self, msg, *args, **kwargs):
        self._once(logging.WARNING, msg, *args)

    def debug_once(self, msg, *args, **kwargs):
        self._once(logging.DEBUG, msg, *args)


def init_logger(name):
    return _Logger(logging.getLogger(name), {})
''',
    "vllm/platforms/__init__.py": '''import torch


class _CudaPlatform:
    def is_xpu(self):
        return False

    def is_cpu(self):
        return False

    def get_device_name(self, device_id=0):
        return torch.cuda.get_device_name(device_id) if torch.cuda.is_available() else "cpu"

    def is_cuda(self):
        return torch.cuda.is_available()

    def is_device_capability(self, capability, device_id=0):
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability(device_id)
        if isinstance(capability, int):
            return major * 10 + minor == capability
        return (major, minor) == tuple(capability)

    def is_arch_support_pdl(self):
        try:
            return torch.cuda.get_device_capability(torch.cuda.current_device())[0] >= 9
        except Exception:
            return False


current_platform = _CudaPlatform()
''',
    "vllm/triton_utils.py": "import triton\nimport triton.language as tl\n\nHAS_TRITON = True\n",
    "vllm/utils/platform_utils.py": '''import re

from vllm.platforms import current_platform


def get_device_name_as_file_name(device_id=0):
    return re.sub(r"[\\s/]+", "_", current_platform.get_device_name(device_id))
''',
    "vllm/v1/attention/backends/utils.py": "PAD_SLOT_ID = -1\nNULL_BLOCK_ID = 0\n",
}


def _sdist(project: str, version: str) -> bytes:
    """The source archive, from PyPI's simple index (JSON form), checked against its sha256."""
    request = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"{project.replace('-', '_')}-{version}.tar.gz"
    found = [f for f in files if f["filename"] == name]
    if not found:
        sys.exit(f"stage_peers: PyPI lists no {name}")
    with urllib.request.urlopen(found[0]["url"], timeout=300) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != found[0]["hashes"]["sha256"]:
        sys.exit(f"stage_peers: {name}: sha256 differs from PyPI's")
    return data


def _copy(tar: tarfile.TarFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(tar.extractfile(member).read())


def stage_mamba_ssm(dest: Path) -> None:
    top = f"mamba_ssm-{MAMBA_SSM}"
    with tarfile.open(fileobj=io.BytesIO(_sdist("mamba-ssm", MAMBA_SSM)), mode="r:gz") as tar:
        for relative in MAMBA_SSM_MODULES:
            _copy(tar, f"{top}/mamba_ssm/{relative}", dest / "mamba_ssm" / relative)
        _copy(tar, f"{top}/LICENSE", dest / "LICENSE.mamba_ssm")
    for init in ("__init__.py", "ops/__init__.py", "ops/triton/__init__.py", "utils/__init__.py"):
        (dest / "mamba_ssm" / init).write_text("")  # the package's own would import its extension


def stage_vllm(dest: Path) -> None:
    top = f"vllm-{VLLM}"
    with tarfile.open(fileobj=io.BytesIO(_sdist("vllm", VLLM)), mode="r:gz") as tar:
        for name in ("mamba_ssm.py", "triton_helpers.py", "causal_conv1d.py", "ssd_combined.py",
                     "ssd_bmm.py", "ssd_chunk_scan.py", "ssd_chunk_state.py",
                     "ssd_state_passing.py"):
            _copy(tar, f"{top}/{VLLM_OPS}/{name}", dest / VLLM_OPS / name)
        configs = f"{top}/{VLLM_OPS}/configs/selective_state_update/"
        for member in tar.getnames():
            if member.startswith(configs) and "device_name=NVIDIA" in member:
                _copy(tar, member, dest / member[len(top) + 1:])
        _copy(tar, f"{top}/LICENSE", dest / "LICENSE.vllm")
    for relative, text in VLLM_STANDINS.items():
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        (dest / relative).write_text(text)
    for folder in [dest / "vllm"] + [p for p in (dest / "vllm").rglob("*") if p.is_dir()]:
        if folder.name != "configs" and folder.parent.name != "configs":
            (folder / "__init__.py").touch()


def main() -> int:
    # Staged beside .peer/ and swapped in whole: a download that fails leaves the old one.
    staging = DEST.with_name(".peer.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    stage_mamba_ssm(staging)
    stage_vllm(staging)
    (staging / "VERSION").write_text(f"mamba_ssm {MAMBA_SSM}, vllm {VLLM}\n")
    shutil.rmtree(DEST, ignore_errors=True)
    staging.rename(DEST)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"stage_peers: mamba_ssm {MAMBA_SSM} and vllm {VLLM} kernels in {DEST} "
          f"({size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
