"""Stages the peer kernels that bench_peers.py times beside tpssm's into .peer/ at the repository
root. .peer/ is git-ignored and never committed: peer code is for timing on the lent GPU machine
only (name ".peer" in the device call's `carry`).

What is staged: mamba_ssm's Triton kernels (the chunked SSD scan of Mamba-2 prefill, the selective
state update, the fused residual-add RMSNorm and the gated RMSNorm) from its source distribution
on PyPI, the sha256 PyPI lists checked, with its license. The package's own __init__ files are
replaced by empty ones, so importing the kernels needs neither its CUDA extension nor
causal_conv1d (nothing of the package runs here: the archive is read, not built).
Needs the network (PyPI); run here, not on the GPU machine.  Usage: stage_peers.py [VERSION]"""

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
VERSION = "2.3.2.post1"
# The modules the forward kernels import, inside the package's mamba_ssm/ folder.
MODULES = [f"ops/triton/{m}.py" for m in (
    "softplus", "ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan",
    "ssd_combined", "layernorm_gated", "layer_norm", "k_activations", "selective_state_update")
] + ["utils/determinism.py", "utils/torch.py"]
EMPTY_INITS = ["__init__.py", "ops/__init__.py", "ops/triton/__init__.py", "utils/__init__.py"]


def _sdist(version: str) -> bytes:
    """The source archive, from PyPI's simple index (JSON form), checked against its sha256."""
    request = urllib.request.Request("https://pypi.org/simple/mamba-ssm/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"mamba_ssm-{version}.tar.gz"
    found = [f for f in files if f["filename"] == name]
    if not found:
        sys.exit(f"stage_peers: PyPI lists no {name}")
    with urllib.request.urlopen(found[0]["url"], timeout=120) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != found[0]["hashes"]["sha256"]:
        sys.exit(f"stage_peers: {name}: sha256 differs from PyPI's")
    return data


def main(argv=None) -> int:
    version = (argv if argv is not None else sys.argv[1:] or [VERSION])[0]
    data = _sdist(version)
    package = DEST / "mamba_ssm"
    shutil.rmtree(DEST, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        top = f"mamba_ssm-{version}"
        for relative in MODULES:
            target = package / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(f"{top}/mamba_ssm/{relative}").read())
        (DEST / "LICENSE.mamba_ssm").write_bytes(tar.extractfile(f"{top}/LICENSE").read())
    for relative in EMPTY_INITS:
        (package / relative).write_text("")
    (DEST / "VERSION").write_text(f"mamba_ssm {version}\n")
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"stage_peers: mamba_ssm {version} Triton kernels in {DEST} ({size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
