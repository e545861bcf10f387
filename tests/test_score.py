"""tpssm.score.token_logprobs: every token's log-probability against transformers' log-softmax
over its full logits, across chunkings (one token a chunk to the whole sequence), at tp 2 / 3
(gloo ranks, vocabulary-parallel and whole heads) against tp 1, and its argument errors."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import hf_models as H  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

from tpssm.models import load_model  # noqa: E402
from tpssm.score import token_logprobs  # noqa: E402

BACKEND = H.pick_backend()
# Measured on the CPU: at most 6.2e-6 from transformers (zamba2, one token a chunk), for
# log-probabilities of magnitude up to 8.4.
TOL = 3e-5
TOKENS = torch.randint(251, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def _checkpoint(family, path, **overrides):
    hf = H.build_hf_model(family, seed=3, **overrides)
    H.save_hf_model(hf, path)
    full = H.hf_full_logits(hf, TOKENS).log_softmax(-1)
    return full[:-1].gather(-1, torch.tensor(TOKENS[1:])[:, None]).squeeze(-1)


@pytest.mark.parametrize("family", ["mamba", "mamba2_g4", "zamba", "zamba2_1blk"])
def test_token_logprobs_match_transformers_at_any_chunking(family, tmp_path):
    expect = _checkpoint(family, str(tmp_path / "ckpt"))
    model = load_model(str(tmp_path / "ckpt"), backend=BACKEND)
    for chunk in (1, 7, len(TOKENS)):
        got = token_logprobs(model, TOKENS, chunk_tokens=chunk)
        assert got.dtype == torch.float32 and got.shape == (len(TOKENS) - 1,)
        assert float((got - expect).abs().max()) < TOL, chunk
    # A cache of the caller's: one slot taken and given back.
    cache = model.allocate_cache(2, max_seq_len=64)
    got = token_logprobs(model, TOKENS, chunk_tokens=16, cache=cache)
    assert float((got - expect).abs().max()) < TOL and cache.num_free == 2


@pytest.mark.parametrize("family", ["mamba", "zamba2_1blk"])
def test_bfloat16_scores_track_float32(family, tmp_path):
    """Measured here against transformers in float32: bfloat16 is off by at most 0.089 nats,
    0.026 on average (zamba2, the worst); the bounds are about twice that."""
    expect = _checkpoint(family, str(tmp_path / "ckpt"))
    model = load_model(str(tmp_path / "ckpt"), backend=BACKEND, dtype=torch.bfloat16)
    err = (token_logprobs(model, TOKENS, chunk_tokens=7) - expect).abs()
    assert float(err.max()) < 0.2 and float(err.mean()) < 0.05


def _rank_scores(rank, world, path, vocab_parallel, sequence_parallel):
    model = load_model(path, backend=BACKEND, vocab_parallel=vocab_parallel)
    if sequence_parallel:
        model.set_sequence_parallel(True, 4)
    return token_logprobs(model, TOKENS, chunk_tokens=9).tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family, tp, vocab_parallel, sequence_parallel", [
    ("mamba", 2, True, False), ("mamba", 2, False, True), ("mamba2_g4", 3, True, False),
    ("zamba", 2, True, True), ("zamba2_1blk", 2, True, False)])
def test_token_logprobs_under_tp_equal_tp1_on_every_rank(family, tp, vocab_parallel,
                                                          sequence_parallel, tmp_path):
    """Vocabularies tp does not divide (251 at tp 2, 256 at tp 3): each rank's columns of the
    log-softmax sum; a whole head: rank 0's result, broadcast. Sequence parallelism splits the
    chunks of 9 tokens over the ranks (steps of at least 4)."""
    vocab = 251 if tp == 2 else 256
    path = str(tmp_path / "ckpt")
    expect = _checkpoint(family, path, vocab_size=vocab)
    results = run_distributed(_rank_scores, tp, path, vocab_parallel, sequence_parallel,
                              timeout=240)
    assert all(r == results[0] for r in results)
    assert float((torch.tensor(results[0]) - expect).abs().max()) < TOL


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    _checkpoint("mamba", str(tmp_path / "ckpt"))
    model = load_model(str(tmp_path / "ckpt"), backend=BACKEND)
    cache = model.allocate_cache(1)
    for tokens, kwargs, match in [
            ([3], {}, "scoring needs at least 2 tokens"),
            ([3, 256], {}, r"tokens: token ids must be in \[0, 256\), got \[256\]"),
            ([3, -1], {}, r"token ids must be in \[0, 256\), got \[-1\]"),
            ([3, 4], dict(chunk_tokens=0), "chunk_tokens must be >= 1, got 0")]:
        with pytest.raises(ValueError, match=match):
            token_logprobs(model, tokens, cache=cache, **kwargs)
    assert cache.num_free == 1


def test_a_hybrid_cache_too_short_is_refused_before_any_work(tmp_path):
    _checkpoint("zamba2_1blk", str(tmp_path / "ckpt"))
    model = load_model(str(tmp_path / "ckpt"), backend=BACKEND)
    cache = model.allocate_cache(1, max_seq_len=38)
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="cache: its max_seq_len 38 holds fewer than the 39 "
                                         "tokens a hybrid model's keys must keep to score 40"):
        token_logprobs(model, TOKENS, chunk_tokens=8, cache=cache)
    assert calls == [] and cache.num_free == 1
    assert len(token_logprobs(model, TOKENS[:39], chunk_tokens=8, cache=cache)) == 38


def _rank_overflow(rank, world, path):
    model = load_model(path, backend=BACKEND, dtype=torch.float16)
    return token_logprobs(model, TOKENS, chunk_tokens=9)


@pytest.mark.timeout(300)
def test_logits_that_are_not_finite_end_every_rank_alike(tmp_path):
    """tp 2: the ranks see the same non-finite row (from the all-gathered sums) and the run
    ends with the error naming the position."""
    from tpssm.launch import RankError

    H.save_overflowing_checkpoint(str(tmp_path / "ckpt"))
    with pytest.raises(RankError, match="position 1: the model's logits are not finite"):
        run_distributed(_rank_overflow, 2, str(tmp_path / "ckpt"), timeout=120)


def test_logits_that_are_not_finite_name_the_position(tmp_path):
    """float16 overflow: a RuntimeError naming the first position, not NaN log-probabilities;
    the slot is given back."""
    H.save_overflowing_checkpoint(str(tmp_path / "ckpt"))
    model = load_model(str(tmp_path / "ckpt"), backend=BACKEND, dtype=torch.float16)
    cache = model.allocate_cache(1)
    with pytest.raises(RuntimeError, match=r"tokens: position 1: the model's logits are not "
                                           r"finite \(NaN or inf\)"):
        token_logprobs(model, TOKENS, cache=cache)
    assert cache.num_free == 1
