"""The vocabulary-parallel LM head: each rank's rows, its logit columns, the greedy token from
the ranks' (max, token) pairs, the whole logits by all-gather, and the engine decoding through
them - against the same checkpoint at tp 1 (gloo ranks on the CPU).

Vocabularies that tp does not divide (251 at tp 2, 256 at tp 3) take the padded gather path;
256 at tp 4 the plain one. Tied heads are views of the embedding, untied ones load their rows.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import hf_models as H  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

BACKEND = H.pick_backend()
PROMPTS = [[3, 17, 250, 9, 41], [200, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
CASES = [  # (tp, vocab, tied, family)
    (2, 251, True, "mamba"),
    (3, 256, False, "mamba2_g4"),
    (4, 256, True, "mamba"),
]


def _tie_logits(vocab: int, tp: int) -> torch.Tensor:
    """Rows whose argmax probes the cross-rank pick: maxima in the last rank, ties across the
    first rank boundary (the lower token id must win), ties inside one rank, a flat row,
    everything -inf but one token, negative logits only."""
    from tpssm.parallel import shard_range

    first_end = shard_range(vocab, tp, 0)[1]
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(6, vocab, generator=g)
    rows[0, vocab - 2] = 9.0
    rows[1, first_end - 1] = rows[1, first_end] = 9.0
    rows[2, 1] = rows[2, 3] = 9.0
    rows[3] = 0.5
    rows[4] = float("-inf")
    rows[4, first_end + 1] = -3.0
    rows[5] = -rows[5].abs() - 1.0
    return rows


def _non_finite_logits(vocab: int, tp: int) -> torch.Tensor:
    """Rows no token can be picked from (greedy -1), each in another rank's columns: NaN in the
    last rank's, +inf in the first rank's, all -inf; and a clean row last."""
    from tpssm.parallel import shard_range

    rows = torch.randn(4, vocab, generator=torch.Generator().manual_seed(6))
    rows[0, shard_range(vocab, tp, tp - 1)[0]] = float("nan")
    rows[1, 2] = float("inf")
    rows[2] = float("-inf")
    return rows


def _engine_outputs(model, sampled: bool):
    from tpssm.engine import CachedModel, GenerationEngine, SamplingParams

    wrapped = CachedModel(model, model.allocate_cache(4))
    gathers = []
    plain_gather = wrapped.gather_logits

    def counting_gather(shard):
        gathers.append(tuple(shard.shape))
        return plain_gather(shard)

    wrapped.gather_logits = counting_gather
    engine = GenerationEngine(wrapped, max_batch_size=3, max_prefill_tokens=6)
    for i, p in enumerate(PROMPTS):
        temperature = 0.8 if sampled and i == 1 else 0.0
        engine.add_request(p, SamplingParams(max_new_tokens=6, temperature=temperature,
                                             top_k=20, seed=11 + i))
    return [r.output for r in engine.run()], gathers


def _rank_checks(rank, world, path, vocab, ties, reference):
    from tpssm.generate import generate
    from tpssm.models import load_model
    from tpssm.parallel import TPContext, shard_range

    ctx = TPContext()
    model = load_model(path, ctx, backend=BACKEND)
    start, end = shard_range(vocab, world, rank)
    out = {"range": model.vocab_range, "expect_range": (start, end),
           "head_rows": model.lm_head.shape[0],
           "head_is_embedding_view": model.lm_head.data_ptr()
           == model.embeddings[start].data_ptr()}
    ids = torch.tensor([t for p in PROMPTS for t in p])
    qsl = torch.cumsum(torch.tensor([0] + [len(p) for p in PROMPTS], dtype=torch.int32), 0,
                       dtype=torch.int32)
    with torch.no_grad():
        full = model(ids, qsl, return_all_logits=True)
        shard = model(ids, qsl, return_all_logits=True, gather_logits=False)
        out["full_err"] = H.max_rel_err(full, reference["full"])
        out["shard_is_columns"] = bool(torch.equal(shard, full[:, start:end]))
        out["gather_is_full"] = bool(torch.equal(model.gather_logits(shard), full))
        out["greedy_of_model"] = model.greedy_tokens(shard).tolist()
        out["ties_greedy"] = model.greedy_tokens(ties[:, start:end]).tolist()
        out["ties_gathered"] = bool(torch.equal(model.gather_logits(ties[:, start:end]), ties))
        bad = _non_finite_logits(vocab, world)
        out["non_finite_greedy"] = model.greedy_tokens(bad[:, start:end]).tolist()
        out["generate"] = generate(model, PROMPTS, 5)
        out["engine_greedy"], out["gathers_greedy"] = _engine_outputs(model, sampled=False)
        out["engine_sampled"], out["gathers_sampled"] = _engine_outputs(model, sampled=True)
        replicated = load_model(path, ctx, backend=BACKEND, vocab_parallel=False)
        out["replicated_rows"] = replicated.lm_head.shape[0]
        # A whole head on every rank: greedy tokens are rank 0's, whatever the others computed.
        own = torch.zeros(2, vocab)
        own[:, rank] = 1.0
        out["replicated_greedy"] = replicated.greedy_tokens(own).tolist()
        out["replicated_non_finite"] = replicated.greedy_tokens(bad).tolist()
        out["replicated_err"] = H.max_rel_err(replicated(ids, qsl, return_all_logits=True),
                                              reference["full"])
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,vocab,tied,family", CASES)
def test_vocab_parallel_head_equals_tp1(tp, vocab, tied, family, tmp_path):
    from tpssm.models import load_model

    hf = H.build_hf_model(family, seed=3, vocab_size=vocab, tie_word_embeddings=tied)
    path = str(tmp_path / "ckpt")
    H.save_hf_model(hf, path)
    ties = _tie_logits(vocab, tp)

    single = load_model(path, backend=BACKEND)
    assert not single.vocab_parallel and single.lm_head.shape[0] == vocab
    ids = torch.tensor([t for p in PROMPTS for t in p])
    qsl = torch.cumsum(torch.tensor([0] + [len(p) for p in PROMPTS], dtype=torch.int32), 0,
                       dtype=torch.int32)
    with torch.no_grad():
        full = single(ids, qsl, return_all_logits=True)
        engine_greedy, gathers_tp1 = _engine_outputs(single, sampled=False)
        engine_sampled, _ = _engine_outputs(single, sampled=True)
        from tpssm.generate import generate
        gen = generate(single, PROMPTS, 5)
    reference = {"full": full}

    results = run_distributed(_rank_checks, tp, path, vocab, ties, reference, timeout=540)
    for rank, r in enumerate(results):
        assert r["range"] == r["expect_range"], rank
        assert r["head_rows"] == r["expect_range"][1] - r["expect_range"][0], rank
        assert r["head_is_embedding_view"] == tied, rank
        assert r["full_err"] <= 1e-5, (rank, r["full_err"])
        assert r["shard_is_columns"] and r["gather_is_full"], rank
        # The pick from (max, token) pairs is the whole-vocabulary argmax: ties to the lowest id.
        assert r["ties_greedy"] == ties.argmax(-1).tolist(), rank
        assert r["ties_gathered"], rank
        # A NaN or +inf in any rank's columns, or no finite logit at all: -1 on every rank.
        clean = int(_non_finite_logits(vocab, tp)[3].argmax())
        assert r["non_finite_greedy"] == [-1, -1, -1, clean], rank
        assert r["replicated_non_finite"] == [-1, -1, -1, clean], rank
        assert r["greedy_of_model"] == results[0]["greedy_of_model"], rank
        assert r["generate"] == gen, rank
        assert r["engine_greedy"] == engine_greedy, rank
        assert r["engine_sampled"] == engine_sampled, rank
        # Greedy steps exchange only the pairs; a step with a sampling row gathers that row's
        # logits alone (one of the batch's rows samples).
        assert r["gathers_greedy"] == [], rank
        assert r["gathers_sampled"] and all(rows == 1 and width == r["head_rows"]
                                            for rows, width in r["gathers_sampled"]), rank
        assert r["replicated_rows"] == vocab and r["replicated_err"] <= 1e-5, rank
        assert r["replicated_greedy"] == [0, 0], rank
    assert gathers_tp1 == []
    # The full logits' argmax, seen from tp 1.
    assert results[0]["greedy_of_model"] == full.argmax(-1).tolist()


def test_local_shard_head_is_rank_zeros_rows():
    """A benchmark's single-process shard (TPContext.local_shard) holds rank 0's vocabulary
    rows and returns whole-vocabulary shapes (copies stand in for the other ranks)."""
    from tpssm.models import build_model, parse_config
    from tpssm.parallel import TPContext, shard_range
    from tpssm.presets import RandomWeightSource

    config = parse_config(dict(model_type="mamba", vocab_size=250, hidden_size=32,
                               num_hidden_layers=1, state_size=4, expand=2, conv_kernel=4,
                               tie_word_embeddings=True))
    model = build_model(config, TPContext.local_shard(4), torch.float32)
    with torch.no_grad():  # every tensor, buffers too (A is one: uninitialised, it gave NaN)
        model.load_weights(RandomWeightSource(config, seed=2))
    start, end = shard_range(250, 4, 0)
    assert model.vocab_range == (start, end) and model.lm_head.shape == (end - start, 32)
    cache = model.allocate_cache(2)
    slots = torch.tensor(cache.allocate(2), dtype=torch.int32)
    with torch.no_grad():
        shard = model.decode(torch.tensor([1, 2]), slots, cache, gather_logits=False)
        assert shard.shape == (2, end - start) and bool(shard.isfinite().all())
        assert model.greedy_tokens(shard).tolist() == shard.argmax(-1).tolist()
        assert model.gather_logits(shard).shape == (2, 250)
        # Moved (here to another dtype), the tied head stays a view of the moved embedding.
        model.to(torch.float64)
        assert model.lm_head.dtype == torch.float64
        assert model.lm_head.data_ptr() == model.embeddings[start].data_ptr()
