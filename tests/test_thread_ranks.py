"""TP ranks as threads of one process (tests/thread_ranks.py), for correctness, not speed.

On the CPU: tp 2 / 4 thread ranks decode like tp 1, and the harness ends in an error, never a
hang, when a rank fails or stalls. On one GPU: a tp 2 / 4 decode step of all ranks - kernels,
every reduction of the model's all-reduce strategy (exact, fp16, and int8 / fp8 through the
composed path's quantize / dequantize kernels), the vocabulary-parallel head's greedy
exchange - captured into one CUDA graph, whose replays give eager decode's tokens and logits.
The fused NCCL op is not in it (NCCL puts no two ranks on one GPU); the engine's own graph path
is checked on the CPU by test_engine_graphs.py.
"""

import os
import sys
import threading
import time

import pytest
import torch

import tpssm
from tpssm.launch import RankError
from tpssm.ops import PAD_SLOT_ID
from tpssm.parallel import TPContext

sys.path.insert(0, os.path.dirname(__file__))

from test_engine_graphs import _cache_tensors, _model  # noqa: E402
from thread_ranks import run_thread_ranks  # noqa: E402

STEPS = 5


def _prompts():
    g = torch.Generator().manual_seed(17)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 3, 26)]


@torch.no_grad()
def _decode_ranks(rank, world, family, scheme, device, shared=None, sequence_parallel=False):
    """Prefill (sequence-parallel if asked), then STEPS greedy decode steps on this rank's
    shard; the cache goes back to its state after prefill. shared None: the steps run twice
    (the second pass must repeat the first). Else every rank captures one more step into
    shared["graph"] (one graph for all ranks, on shared["stream"]) with static ids / slots
    that the caller fills before replaying.
    """
    dev = torch.device(device)
    model = _model(family, TPContext(device=dev), allreduce=scheme, allreduce_min_bytes=0)
    model.set_sequence_parallel(sequence_parallel, min_tokens=1)
    prompts = _prompts()
    cache = model.allocate_cache(len(prompts), max_seq_len=64)
    slots = torch.arange(len(prompts), dtype=torch.int32, device=dev)
    ids = torch.tensor([t for p in prompts for t in p], device=dev)
    qsl = torch.cumsum(torch.tensor([0] + [len(p) for p in prompts]), 0).to(dev, torch.int32)
    logits = model(ids, qsl, slots, torch.zeros(len(prompts), dtype=torch.bool, device=dev),
                   cache, gather_logits=False)
    first = model.greedy_tokens(logits)
    after_prefill = [t.clone() for t in _cache_tensors(cache)]

    def eager_steps():
        steps, tokens = [], first
        for _ in range(STEPS):
            logits = model.decode(tokens, slots, cache, gather_logits=False)
            tokens = model.greedy_tokens(logits)
            steps.append((logits.clone(), tokens.clone()))
        for t, saved in zip(_cache_tensors(cache), after_prefill):
            t.copy_(saved)
        return steps

    out = dict(eager=eager_steps(), first=first, slots=slots, model=model, cache=cache,
               prefill_logits=logits)
    if shared is None:
        out["again"] = eager_steps()
        return out

    static_ids = first.clone()
    static_slots = torch.full_like(slots, PAD_SLOT_ID)  # padded until the replays: no state moves

    def step():
        logits = model.decode(static_ids, static_slots, cache, gather_logits=False)
        return logits, model.greedy_tokens(logits)

    stream, barrier = shared["stream"], shared["barrier"]
    try:
        # Every rank issues on one stream: a collective (issued by rank 0's thread) then follows
        # what each rank queued before it.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        barrier.wait()
        if rank == 0:
            with torch.cuda.graph(shared["graph"], stream=stream,
                                  capture_error_mode="thread_local"):
                barrier.wait()      # the capture has begun: every rank issues its step
                outputs = step()
                barrier.wait()      # every rank's step is queued: the capture may end
        else:
            barrier.wait()
            with torch.cuda.stream(stream):
                outputs = step()
            barrier.wait()
    except BaseException:
        barrier.abort()  # the other ranks stop waiting at once; this error is the cause
        raise
    out.update(static_ids=static_ids, static_slots=static_slots, outputs=outputs)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or not tpssm.has_cuda_kernels(),
        reason="needs a GPU and the CUDA kernels"))])
def test_thread_ranks_sequence_parallel_prefill_like_tp1(device):
    """Sequence-parallel prefill of 40 tokens at tp 3 (padding rows: the padded product) and
    tp 4 through the threaded process group - on a GPU, every rank's CUDA kernels and the
    reduce-scatter on one device: the greedy tokens of tp 1, prefill logits within fp32
    rounding of the all-reduce path, one reduce-scatter a layer."""
    base = run_thread_ranks(_decode_ranks, 1, "mamba2_g4", "exact", device)[0]
    for tp in (3, 4):
        plain = run_thread_ranks(_decode_ranks, tp, "mamba2_g4", "exact", device, timeout=240)
        split = run_thread_ranks(_decode_ranks, tp, "mamba2_g4", "exact", device, None, True,
                                 timeout=240)
        for p, r in zip(plain, split):
            assert r["model"].allreduce.calls["scatter"] == len(r["model"].layers)
            torch.testing.assert_close(r["prefill_logits"], p["prefill_logits"], rtol=1e-5,
                                       atol=1e-5)
            assert [t.tolist() for _, t in r["eager"]] == [t.tolist() for _, t in base["eager"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,scheme", [("mamba", "exact"), ("mamba", "int8"),
                                           ("mamba2_g4", "fp16"), ("zamba2_1blk", "fp8")])
def test_thread_ranks_decode_like_tp1(family, scheme):
    base = run_thread_ranks(_decode_ranks, 1, family, "exact", "cpu")[0]
    base_tokens = [tok.tolist() for _, tok in base["eager"]]
    for tp in (2, 4):
        ranks = run_thread_ranks(_decode_ranks, tp, family, scheme, "cpu", timeout=240)
        for r in ranks:
            tokens = [tok.tolist() for _, tok in r["eager"]]
            assert tokens == [tok.tolist() for _, tok in ranks[0]["eager"]]
            for (a, ta), (b, tb) in zip(r["eager"], r["again"]):
                assert torch.equal(a, b) and torch.equal(ta, tb)
            assert r["model"].vocab_parallel
            if scheme != "exact":
                assert r["model"].allreduce.calls["quantized"] > 0
        if scheme == "exact":  # the quantized schemes may flip a near-tie
            assert [tok.tolist() for _, tok in ranks[0]["eager"]] == base_tokens


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 broke")
    torch.distributed.all_reduce(torch.ones(2))  # the others wait here until woken
    return rank


def _stalls_on_rank_1(rank, world):
    if rank == 1:
        time.sleep(4)
    torch.distributed.all_reduce(torch.ones(2))
    return rank


def _fails_while_rank_0_waits_at_a_barrier(rank, world, barrier):
    try:
        if rank == 1:
            time.sleep(0.5)
            raise ValueError("rank 1 broke")
        barrier.wait()
    except BaseException:
        barrier.abort()
        raise


def test_the_first_failure_is_named_not_the_ranks_it_broke():
    with pytest.raises(RankError, match="rank 1 failed: ValueError"):
        run_thread_ranks(_fails_while_rank_0_waits_at_a_barrier, 2,
                         threading.Barrier(2, timeout=30), timeout=60)


def test_a_failing_rank_ends_the_run_with_its_error():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed: ValueError\\('rank 1 broke'\\)"):
        run_thread_ranks(_fails_on_rank_1, 3, timeout=60)
    assert time.monotonic() - start < 30


def test_a_stalled_rank_ends_the_run_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"ranks \[0, 1\] still running after 1 s"):
        run_thread_ranks(_stalls_on_rank_1, 2, timeout=1)
    assert time.monotonic() - start < 15
    # The next world starts clean.
    assert run_thread_ranks(lambda rank, world: rank, 2) == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available() or not tpssm.has_cuda_kernels(),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family,scheme", [("mamba", "exact"), ("mamba", "int8"),
                                           ("mamba2_g4", "fp16"), ("zamba2_1blk", "fp8")])
def test_thread_ranks_graph_decode_equals_eager_on_one_gpu(family, scheme, tp):
    shared = dict(graph=torch.cuda.CUDAGraph(), stream=torch.cuda.Stream(),
                  barrier=threading.Barrier(tp, timeout=120))
    ranks = run_thread_ranks(_decode_ranks, tp, family, scheme, "cuda", shared, timeout=400)
    for r in ranks:
        r["static_slots"].copy_(r["slots"])
        r["static_ids"].copy_(r["first"])
    worst = 0.0
    for step in range(STEPS):
        shared["graph"].replay()
        for rank, r in enumerate(ranks):
            logits, tokens = r["outputs"]
            want_logits, want_tokens = r["eager"][step]
            assert torch.equal(tokens, want_tokens), (step, rank)
            # The same kernels on the same data: equal but for a library picking another
            # algorithm on the capture stream (fp32 rounding).
            torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
            worst = max(worst, float((logits - want_logits).abs().max()))
            r["static_ids"].copy_(tokens)
    for r in ranks:
        if scheme != "exact":
            assert r["model"].allreduce.calls["quantized"] > 0
    print(f"THREAD_RANKS_GRAPH family={family} tp={tp} scheme={scheme} steps={STEPS} "
          f"max_logit_diff={worst:.2e}")
