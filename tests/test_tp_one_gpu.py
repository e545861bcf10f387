"""TP ranks sharing one GPU, for correctness (not speed): tp 2 and tp 4 gloo processes all on
cuda:0 run the full GPU model - CUDA kernels, sharded weights, every reduction of the model's
all-reduce strategy (exact and fp16 through gloo's CUDA all_reduce; int8 / fp8 through the
composed two-shot path, whose all-to-all and all-gather gloo serves through the host) - and
are compared with tp 1 on the same GPU. NCCL refuses two ranks on one device, so the fused NCCL
op is not covered; gloo does not capture, so a tp > 1 step in a CUDA graph is checked by
test_thread_ranks.py (ranks as threads of one process). Skips without CUDA."""

import os
import sys

import pytest
import torch

import tpssm

sys.path.insert(0, os.path.dirname(__file__))

import hf_models as H  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not tpssm.has_cuda_kernels(),
                                reason="needs a GPU and the CUDA kernels")

FAMILIES = ("mamba", "mamba2_g4", "zamba2_1blk")
# "exact+sp": the exact scheme with sequence-parallel prefill (reduce-scatters and all-gathers
# through gloo's host path; 70 prompt tokens leave padding rows at tp 4).
SCHEMES = ("exact", "exact+sp", "fp16", "int8", "fp8")
STEPS = 6


def _prompts():
    g = torch.Generator().manual_seed(9)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (23, 7, 40)]


def _rank_run(rank, world, path, schemes):
    from tpssm.generate import generate
    from tpssm.models import load_model
    from tpssm.parallel import TPContext

    ctx = TPContext(device=torch.device("cuda", 0))  # every rank on the same GPU
    prompts = _prompts()
    ids = torch.tensor([t for p in prompts for t in p], device="cuda")
    qsl = torch.cumsum(torch.tensor([0] + [len(p) for p in prompts]), 0).to(
        device="cuda", dtype=torch.int32)
    out = {}
    for name in schemes:
        scheme = name.removesuffix("+sp")
        model = load_model(path, ctx, allreduce=scheme, allreduce_min_bytes=0)
        model.set_sequence_parallel(name.endswith("+sp"), min_tokens=1)
        with torch.no_grad():
            logits = model(ids, qsl, return_all_logits=True).cpu()
        out[name] = dict(logits=logits, tokens=generate(model, prompts, STEPS),
                           calls=dict(model.allreduce.calls))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_gpu")
    paths = {}
    for family in FAMILIES:
        model = H.build_hf_model(family, seed=31)
        paths[family] = str(root / family)
        H.save_hf_model(model, paths[family])
    return paths


@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_tp_ranks_on_one_gpu_equal_tp1(checkpoints, family, tp):
    base = run_distributed(_rank_run, 1, checkpoints[family], ("exact",), timeout=600)[0]
    ranks = run_distributed(_rank_run, tp, checkpoints[family], SCHEMES, timeout=600)
    ref = base["exact"]["logits"]
    for scheme in SCHEMES:
        for r in ranks[1:]:  # every rank holds the same result
            assert torch.equal(r[scheme]["logits"], ranks[0][scheme]["logits"]), scheme
            assert r[scheme]["tokens"] == ranks[0][scheme]["tokens"], scheme
        got = ranks[0][scheme]
        rel = (H.max_rel_err(got["logits"], ref) if scheme.startswith("exact")
               else float((got["logits"] - ref).norm() / ref.norm()))
        print(f"ONE_GPU family={family} tp={tp} scheme={scheme} rel={rel:.2e} "
              f"calls={got['calls']}")
        if scheme.startswith("exact"):
            assert rel <= 1e-4
            assert got["tokens"] == base["exact"]["tokens"]
            assert (got["calls"]["scatter"] > 0) == scheme.endswith("+sp"), got["calls"]
        else:
            assert got["calls"]["quantized"] > 0, scheme
            # Relative L2 error vs exact, bounded at ~2x what the same checkpoints measure on
            # the CPU (gloo, tp 2 / 4): Mamba / Mamba-2 fp16 4-7e-4, int8 1.3-1.5%, fp8 5-7%;
            # the tiny random hybrid amplifies reduction noise ~5x: 3e-3, 7-7.5%, 26-28%.
            bound = ({"fp16": 8e-3, "int8": 0.15, "fp8": 0.5} if family.startswith("zamba")
                     else {"fp16": 2e-3, "int8": 0.03, "fp8": 0.12})[scheme]
            assert rel <= bound, (scheme, rel)
