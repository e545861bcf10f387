"""Model level: a tiny TP model with the quantized all-reduce against the exact one - top-1
agreement of next-token predictions over 960 positions, and the relative logit error (printed
as QAR_MODEL lines with -s and recorded as test properties). Two kinds of model: tiny random
checkpoints of two families (flat next-token distributions: the hard case for top-1), and a tiny
Mamba trained on a synthetic source (tests/assets/tiny_trained_mamba, made by
tools/train_tiny_lm.py), whose confident predictions are what a real checkpoint has."""

from pathlib import Path

import pytest
import torch

import hf_models as H
from dist_utils import run_distributed
from script_loader import load_script

NUM_POSITIONS = 960
LENGTHS = (80, 64, 96, 80, 120, 160, 200, 160)
ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "tests" / "assets" / "tiny_trained_mamba"


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(256, (n,), generator=g).tolist() for n in LENGTHS]


def _source_prompts():
    """Prompts drawn from the trained model's own source (in distribution, like text)."""
    source = load_script("tools/train_tiny_lm.py")
    g = torch.Generator().manual_seed(5)
    return [source.markov_tokens(1, n, g)[0].tolist() for n in LENGTHS]


def _rank_logits(rank, world, path, schemes, prompts=None):
    from tpssm.models import load_model
    from tpssm.parallel import TPContext

    prompts = prompts or _prompts()
    ids = torch.tensor([t for p in prompts for t in p])
    qsl = torch.cumsum(torch.tensor([0] + [len(p) for p in prompts], dtype=torch.int32), 0,
                       dtype=torch.int32)
    out = {}
    for scheme in schemes:
        model = load_model(path, TPContext(), allreduce=scheme)
        with torch.no_grad():
            out[scheme] = model(ids, qsl, return_all_logits=True)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qar_models")
    paths = {}
    for family in ("mamba", "mamba2_g1", "zamba2_2blk"):
        extra = {"num_heads": 16} if family.startswith("mamba2") else {}
        model = H.build_hf_model(family, seed=21, hidden_size=128, **extra)
        paths[family] = str(root / family)
        H.save_hf_model(model, paths[family])
    return paths


def _agreement(per_rank, schemes, label, record_property, note=""):
    """{scheme: (top-1 agreement with the exact logits, relative L2 error)} of rank 0, each
    recorded as the test property <label>_<scheme> and printed as a QAR_MODEL line."""
    exact = per_rank[0]["exact"]
    assert exact.shape[0] == NUM_POSITIONS
    report = {}
    for scheme in schemes:
        q = per_rank[0][scheme]
        agree = (q.argmax(-1) == exact.argmax(-1)).float().mean().item()
        rel = ((q - exact).norm() / exact.norm()).item()
        report[scheme] = (agree, rel)
        record_property(f"{label}_{scheme}", {"top1": agree, "rel_l2": rel})
    print(f"QAR_MODEL {label}{note} " + " ".join(
        f"{s}: top1 {a:.4f} rel {e:.2e}" for s, (a, e) in report.items()))
    return report


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["mamba", "mamba2_g1"])
@pytest.mark.parametrize("tp", [2, 4])
def test_quantized_allreduce_keeps_top1(checkpoints, family, tp, record_property):
    schemes = ("exact", "int8", "fp8", "fp16")
    per_rank = run_distributed(_rank_logits, tp, checkpoints[family], schemes, timeout=300)
    for scheme in schemes[1:]:
        for r in range(1, tp):  # every rank holds the same logits, quantized or not
            assert torch.equal(per_rank[r][scheme], per_rank[0][scheme])
    report = _agreement(per_rank, schemes[1:], f"{family}_tp{tp}", record_property)
    # The paper's fp16 cast keeps >= 98% top-1 (it reports 98.8% on Mamba-2.8B).
    assert report["fp16"][0] >= 0.98
    assert 0 < report["fp16"][1] < 1e-3  # > 0: the cast did happen
    # int8 two-shot: two quantization steps per all-reduce, ~1% relative error each (the
    # bounds of docs/qallreduce.md, asserted in test_qallreduce.py): a few percent at the logits.
    assert 0 < report["int8"][1] < 0.02
    # The >= 98% top-1 bar (what the paper's fp16 cast reaches on Mamba-2.8B) is asserted on the
    # trained model below, whose predictions are as confident as a real checkpoint's. These
    # random models measure 97.5-98% at 960 positions: their next-token distributions are
    # nearly flat (mean top-1 probability ~2%, median top-1/top-2 logit gap ~0.2 of the logit
    # std), so a 1.5% logit perturbation flips near-ties that a trained model does not have
    # (the trained one, mean top-1 probability ~0.76, keeps 99.8-99.9%). Here: the level the
    # numerics guarantee.
    assert report["int8"][0] >= 0.97
    # fp8 (e4m3, 3 mantissa bits): up to 2^-4 relative rounding per element and step, ~3.6% RMS,
    # two steps per all-reduce: ~5% at the logits (measured 5.3-6.5%), and the flat random
    # distributions lose more near-ties (measured 0.90-0.93 top-1).
    assert 0 < report["fp8"][1] < 0.08
    assert report["fp8"][0] >= 0.85


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [2, 4])
def test_int8_allreduce_keeps_top1_on_a_trained_model(tp, record_property):
    """int8 keeps >= 98% top-1 agreement with the exact all-reduce (the level the paper's fp16
    cast reaches on Mamba-2.8B) on the trained tiny Mamba, over 960 in-distribution positions."""
    prompts = _source_prompts()
    per_rank = run_distributed(_rank_logits, tp, str(TRAINED), ("exact", "int8", "fp8"),
                               prompts, timeout=300)
    confidence = per_rank[0]["exact"].softmax(-1).max(-1).values.mean().item()
    report = _agreement(per_rank, ("int8", "fp8"), f"trained_tp{tp}", record_property,
                        f" (mean top-1 probability {confidence:.2f})")
    assert 0 < report["int8"][1] < 0.02
    assert report["int8"][0] >= 0.98
    # fp8's ~5% logit error (see above) still keeps the trained model's confident predictions.
    assert 0 < report["fp8"][1] < 0.08
    assert report["fp8"][0] >= 0.98


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [2, 4])
def test_quantized_allreduce_in_a_hybrid(checkpoints, tp, record_property):
    """Zamba2 (two shared blocks: o_proj and down_proj reduce through the same strategy as the
    mixers): every rank holds the same logits, and the error is what this model's sensitivity
    predicts. The tiny random hybrid amplifies 1% noise on the mixer outputs alone into ~6.5% at
    the logits (a tiny Mamba: ~2%); with int8's ~1% per reduction on 4 reductions per hybrid
    layer it measures ~13% (fp16 ~0.5%)."""
    schemes = ("exact", "int8", "fp16")
    per_rank = run_distributed(_rank_logits, tp, checkpoints["zamba2_2blk"], schemes,
                               timeout=300)
    for scheme in schemes[1:]:
        for r in range(1, tp):
            assert torch.equal(per_rank[r][scheme], per_rank[0][scheme])
    report = _agreement(per_rank, schemes[1:], f"zamba2_tp{tp}", record_property)
    assert 0 < report["int8"][1] < 0.2
    assert 0 < report["fp16"][1] < 0.01
    assert report["fp16"][0] >= 0.98


def _rank_buffer_reuse(rank, world, path):
    """A model's reductions all go through its one strategy and its persistent buffers: the
    allocating all_reduce of tpssm.qallreduce is never called, and after the engine sized the
    buffers their addresses stay fixed over prefill and decode steps."""
    from tpssm import qallreduce
    from tpssm.engine import CachedModel, GenerationEngine, SamplingParams
    from tpssm.models import load_model
    from tpssm.parallel import TPContext

    def forbidden(*args, **kwargs):
        raise AssertionError("the per-call allocating all_reduce was used")

    qallreduce.all_reduce = forbidden
    model = load_model(path, TPContext(), allreduce="int8", allreduce_min_bytes=0)
    engine = GenerationEngine(CachedModel(model, model.allocate_cache(4)), max_batch_size=4,
                              max_prefill_tokens=32)
    buffers = model.allreduce._quantized
    ptrs = [t.data_ptr() for t in (buffers.send, buffers.recv, buffers.mine, buffers.gathered)]
    for p in _prompts()[:6]:
        engine.add_request(p[:40], SamplingParams(max_new_tokens=4))
    outputs = [r.output for r in engine.run()]
    after = model.allreduce._quantized
    return dict(same_object=after is buffers,
                same_ptrs=ptrs == [t.data_ptr() for t in (after.send, after.recv, after.mine,
                                                          after.gathered)],
                quantized_calls=model.allreduce.calls["quantized"], outputs=outputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 3])
def test_model_reductions_reuse_the_strategy_buffers(checkpoints, tp):
    res = run_distributed(_rank_buffer_reuse, tp, checkpoints["mamba"], timeout=240)
    for r in res:
        assert r["same_object"] and r["same_ptrs"], r
        assert r["quantized_calls"] > 0
        assert r["outputs"] == res[0]["outputs"]


def _rank_dies_in_allreduce(rank, world, path):
    import os

    from tpssm.models import load_model
    from tpssm.parallel import TPContext

    model = load_model(path, TPContext(), allreduce="int8", allreduce_min_bytes=0)
    if rank == world - 1:
        os._exit(3)  # dies while the others enter the quantized all-reduce
    ids = torch.tensor(_prompts()[0])
    model(ids, torch.tensor([0, len(ids)], dtype=torch.int32))
    return "finished"


@pytest.mark.timeout(300)
def test_a_rank_dying_during_a_quantized_allreduce_is_an_error_not_a_hang(checkpoints):
    import time

    from tpssm.launch import RankError

    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 died with exit code 3"):
        run_distributed(_rank_dies_in_allreduce, 2, checkpoints["mamba"], timeout=120)
    assert time.monotonic() - start < 120
