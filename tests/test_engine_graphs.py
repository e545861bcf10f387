"""The engine's graph decode path on the CPU: decode steps captured and replayed through
tests/graph_replay.py (a CPU stand-in with a CUDA graph's semantics: Python runs once, at
capture; tensors keep their addresses; host reads refused) give eager decode's tokens and leave
the state cache bit for bit as eager decode does - for every family, both projection kernels,
sampling rows, a vocabulary-parallel shard and gloo ranks with each all-reduce scheme. What
only a GPU shows (CUDA-only branches, the allocator under capture, NCCL in a graph) is in
test_engine_cuda.py."""

import os
import sys

import pytest
import torch

from tpssm.engine import CachedModel, GenerationEngine, SamplingParams
from tpssm.models import build_model
from tpssm.parallel import TPContext
from tpssm.presets import RandomWeightSource

sys.path.insert(0, os.path.dirname(__file__))

import hf_models as H  # noqa: E402
from dist_utils import run_distributed  # noqa: E402
from graph_replay import CaptureError, ReplayGraphCapture  # noqa: E402

FAMILIES = ("mamba", "falcon_mamba", "mamba2_g4", "zamba", "zamba2_1blk", "zamba2_2blk")


def _model(family, ctx=None, dtype=torch.float32, **kwargs):
    config = H.tpssm_config(family)
    model = build_model(config, ctx or TPContext(device=torch.device("cpu")), dtype, **kwargs)
    with torch.no_grad():
        model.load_weights(RandomWeightSource(config, seed=4))
    return model


def _prompts(seed, n=7, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (int(k),), generator=g).tolist()
            for k in torch.randint(1, 30, (n,), generator=g)]


def _run(model, prompts, graphs, sampling=None, slots=4, new_tokens=10, group=None,
         forks=True):
    """Every prompt to its end on a fresh cache; -> (outputs, engine, cache). forks=False:
    requests with one prompt prefill it each."""
    cached = CachedModel(model, model.allocate_cache(slots))
    engine = GenerationEngine(cached, max_batch_size=slots, max_prefill_tokens=16,
                              use_cuda_graphs=False, group=group)
    engine._forks = forks
    if graphs:
        engine._graph_capture = ReplayGraphCapture
        engine.use_cuda_graphs = True
    for i, p in enumerate(prompts):
        engine.add_request(p, sampling(i) if sampling
                           else SamplingParams(max_new_tokens=new_tokens))
    outputs = [r.output for r in engine.run()]
    return outputs, engine, cached.cache


def _cache_tensors(cache):
    """Every slot's states; the KV scratch row (written by padding rows) left out."""
    n = cache.num_slots
    return (list(cache.conv_states) + list(cache.ssm_states) + [k[:n] for k in cache.k_states]
            + [v[:n] for v in cache.v_states] + [cache.kv_lengths[:n]])


def _replays(engine):
    return sum(graph.capture.replays for graph in engine._graphs.values())


def _assert_same_states(graph_states, eager_states):
    for a, b in zip(graph_states, eager_states, strict=True):
        assert torch.equal(a, b)


def _assert_graph_equals_eager(model, prompts, **kwargs):
    graphs, engine, graph_cache = _run(model, prompts, True, **kwargs)
    eager, _, eager_cache = _run(model, prompts, False, **kwargs)
    assert len(engine._graphs) >= 2, "the batch should shrink through several padded sizes"
    assert _replays(engine) > len(prompts), "decode steps should replay their graphs"
    assert graphs == eager
    _assert_same_states(_cache_tensors(graph_cache), _cache_tensors(eager_cache))


_LINEAR = torch.nn.functional.linear


def _linear_row_by_row(x, weight, bias=None):
    """F.linear one row at a time. Some CPUs' GEMMs round a row differently by the number of
    rows (on AVX2, M = 1, 2 and larger take different kernels), which graph decode's padded
    batch would then show; one row at a time, a row's bits do not depend on its batch."""
    if x.dim() < 2 or x.shape[:-1].numel() <= 1:
        return _LINEAR(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.cat([_LINEAR(rows[i:i + 1], weight, bias) for i in range(rows.shape[0])])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _batch_independent_rows():
    """What makes a row's bits independent of its batch on the CPU, so that graph decode (a
    padded batch) and eager decode compare bit for bit: one thread (with several, torch's CPU
    RMSNorm splits its sums by the batch's size: the hybrids' shared-block norms) and F.linear
    row by row. Returns the previous thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.nn.functional.linear = _linear_row_by_row
    return previous


@pytest.fixture(autouse=True)
def batch_independent_rows():
    previous = _batch_independent_rows()
    yield
    torch.nn.functional.linear = _LINEAR
    torch.set_num_threads(previous)


@pytest.mark.parametrize("projection", ["torch", "gemv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_decode_equals_eager(family, projection):
    model = _model(family)
    model.set_projection_kernel(projection)
    _assert_graph_equals_eager(model, _prompts(1))


def test_hybrid_graph_decode_in_bfloat16():
    _assert_graph_equals_eager(_model("zamba2_1blk", dtype=torch.bfloat16), _prompts(2))


def _sampling(i):
    if i % 2:
        return SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, seed=100 + i)
    return SamplingParams(max_new_tokens=10)


def test_graph_decode_with_sampling_rows_equals_eager():
    _assert_graph_equals_eager(_model("mamba2_g4"), _prompts(3), sampling=_sampling)


def test_local_shard_graph_decode_equals_eager():
    """One tp 4 rank's shard in one process: the vocabulary-parallel head's greedy exchange is
    inside the captured step, sampling rows gather after the replay."""
    shard = _model("mamba", TPContext.local_shard(4, torch.device("cpu")))
    assert shard.vocab_parallel
    _assert_graph_equals_eager(shard, _prompts(4), sampling=_sampling)


def _rank_graph_vs_eager(rank, world, family, scheme, vocab_parallel):
    _batch_independent_rows()  # a rank process of its own: set for its life
    model = _model(family, TPContext(), allreduce=scheme, allreduce_min_bytes=0,
                   vocab_parallel=vocab_parallel)
    graphs, engine, graph_cache = _run(model, _prompts(5), True)
    eager, _, eager_cache = _run(model, _prompts(5), False)
    return dict(graphs=graphs, eager=eager, sizes=len(engine._graphs),
                replays=_replays(engine), calls=dict(model.allreduce.calls),
                collectives={f.__name__ for g in engine._graphs.values()
                             for f, *_ in g.capture.ops if f.namespace == "c10d"},
                states=(_cache_tensors(graph_cache), _cache_tensors(eager_cache)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family,scheme,vocab_parallel", [
    ("mamba", "exact", True), ("mamba", "int8", False), ("zamba2_2blk", "fp8", True),
    ("mamba2_g4", "fp16", False)])
def test_tp_ranks_graph_decode_equals_eager(family, scheme, vocab_parallel):
    """gloo ranks at tp 2: the model's all-reduce strategy (its persistent buffers for the
    quantized schemes) and the step's token exchange - the vocabulary-parallel head's greedy
    pairs, or rank 0's tokens broadcast - replayed inside every decode step's graph, as NCCL's
    are captured on GPUs."""
    results = run_distributed(_rank_graph_vs_eager, 2, family, scheme, vocab_parallel,
                              timeout=240)
    for r in results:
        assert r["sizes"] >= 2 and r["replays"] > 5
        assert r["graphs"] == r["eager"]
        _assert_same_states(*r["states"])
        assert r["graphs"] == results[0]["graphs"]
        # The token exchange is among the captured collectives.
        exchange = "_allgather_base_.default" if vocab_parallel else "broadcast_.default"
        assert exchange in r["collectives"], r["collectives"]
        if scheme in ("int8", "fp8"):  # the composed quantized path's exchange
            assert "alltoall_base_.default" in r["collectives"], r["collectives"]
        if scheme != "exact":
            assert sum(n for path, n in r["calls"].items() if path != "exact") > 0, r["calls"]


@pytest.mark.parametrize("family", FAMILIES + ("mamba-shard",))
def test_requests_with_one_prompt_share_its_prefill(family):
    """Three requests with one 29-token prompt (two 16-token prefill steps) behind another (the
    leader is not its steps' first row), one sampling, decoded through graphs: the prompt is
    prefilled once and copied (SSMStateCache.copy, a hybrid's keys and values too), and every
    request's tokens equal those of an engine that prefills each, eagerly. mamba-shard: one tp
    4 rank's shard, whose vocabulary-parallel head picks the followers' rows."""
    model = (_model("mamba", TPContext.local_shard(4, torch.device("cpu")))
             if family == "mamba-shard" else _model(family))
    prompt = list(range(100, 129))
    prompts = [[5, 6, 7], prompt, prompt, prompt, [9]]

    def sampling(i):
        return SamplingParams(max_new_tokens=8, temperature=0.8 if i == 3 else 0.0, seed=i)

    fed = []  # prompt tokens a forward took (decoding requests' ride-along tokens left out)

    def count(_, args, kwargs):
        lengths = args[1].diff().tolist()
        fed.append(sum(n for n, decode in zip(lengths, kwargs["decode_rows"].tolist())
                       if not decode))

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    shared = _run(model, prompts, True, sampling=sampling)[0]
    shared_tokens, fed[:] = sum(fed), []
    each = _run(model, prompts, False, sampling=sampling, forks=False)[0]
    hook.remove()
    assert shared == each and shared[3] != shared[1]
    assert sum(fed) == 3 * len(prompt) + 4 and shared_tokens == len(prompt) + 4


def _rank_nan_in_one_ranks_columns(rank, world, graphs):
    """Rank 1's logit columns are NaN for the row decoding in slot 0 (tensor ops, so a graph
    replays them): -> (output, ended in error) of each request, and the clean run's outputs."""
    _batch_independent_rows()
    model = _model("mamba", TPContext())
    clean = _run(model, _prompts(6), graphs)[0]
    plain = model.decode

    def poisoned(input_ids, cache_indices, cache, gather_logits=True):
        logits = plain(input_ids, cache_indices, cache, gather_logits=gather_logits)
        if rank == 1:
            logits = torch.where((cache_indices == 0)[:, None], float("nan"), logits)
        return logits

    model.decode = poisoned
    engine = _run(model, _prompts(6), graphs)[1]
    done = sorted(engine.finished, key=lambda r: r.request_id)
    return [(r.output, r.error is not None) for r in done], clean


@pytest.mark.timeout(300)
def test_a_nan_in_one_ranks_logit_columns_ends_that_request_on_every_rank():
    """Vocabulary-parallel greedy decode at tp 2, captured and eager: the requests decoding in
    slot 0 get -1 from the (max, token) exchange on both ranks - NaN in rank 1's columns only -
    and end with an error at their first decode step (tokens from mixed prefill steps before it
    kept); the others keep the clean run's tokens."""
    for graphs in (True, False):
        results = run_distributed(_rank_nan_in_one_ranks_columns, 2, graphs, timeout=240)
        assert results[0] == results[1]
        ended, clean = results[0]
        assert any(failed for _, failed in ended)
        for (out, failed), want in zip(ended, clean):
            if failed:
                assert len(out) < len(want) and out == want[:len(out)]
            else:
                assert out == want


def _replica_rank(rank, world):
    """Rank r serves replica r: a tp 1 model on a one-rank group of its own."""
    import torch.distributed as dist
    groups = [dist.new_group([r]) for r in range(world)]
    model = _model("mamba", TPContext(groups[rank]))
    outputs = _run(model, _prompts(20 + rank, n=3), False, sampling=_replica_sampling)[0]
    try:
        _run(model, _prompts(0, n=1), False, group=dist.group.WORLD)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return outputs, refused


def _replica_sampling(i):
    return SamplingParams(max_new_tokens=8, temperature=1.0, seed=i)


def test_data_parallel_replicas_keep_their_own_tokens():
    """Two model replicas in one gloo world (a tp 1 group each), the engine built without a
    group: each replica's sampled tokens are its own (they used to be replica 0's, broadcast
    over the world group), equal to the same requests served in a lone process."""
    results = run_distributed(_replica_rank, 2, timeout=120)
    for rank, (outputs, refused) in enumerate(results):
        alone = _run(_model("mamba"), _prompts(20 + rank, n=3), False,
                     sampling=_replica_sampling)[0]
        assert outputs == alone, rank
        assert refused and "group" in refused, refused
    assert results[0][0] != results[1][0]


# ---- the stand-in itself: what it freezes, restores and refuses --------------------------------
def test_replay_recomputes_from_the_inputs_it_captured():
    x = torch.arange(4.0)
    capture = ReplayGraphCapture()
    y = capture.capture(lambda: (x * 2).sum(0, keepdim=True))
    assert torch.isnan(y).all(), "a capture leaves its results unwritten"
    x.copy_(torch.ones(4))
    capture.replay()
    assert torch.equal(y, torch.tensor([8.0]))


def test_python_values_are_frozen_at_capture():
    x = torch.zeros(2)
    scale = [3.0]
    capture = ReplayGraphCapture()
    y = capture.capture(lambda: x + scale[0])
    scale[0] = 5.0
    capture.replay()
    assert torch.equal(y, torch.full((2,), 3.0))


def test_capture_restores_what_it_wrote_and_replay_writes_it():
    state = torch.zeros(3)
    capture = ReplayGraphCapture()
    capture.capture(lambda: state.add_(1))
    assert torch.equal(state, torch.full((3,), 2.0)), "the two warm-up calls run eagerly"
    capture.replay()
    assert torch.equal(state, torch.full((3,), 3.0))


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: t.tolist(),
                                  lambda t: t.cpu(), lambda t: t.nonzero(),
                                  lambda t: bool(t[0] > 0), lambda t: t[t > 0],
                                  lambda t: t.index_put_((t > 0,), t[:1])])
def test_host_reads_during_capture_are_refused(read):
    x = torch.ones(3)
    with pytest.raises(CaptureError, match="on the host"):
        ReplayGraphCapture().capture(lambda: read(x))
    assert x.tolist() == [1.0, 1.0, 1.0]  # the patched methods are restored


def test_ops_returning_several_tensors_replay_all_of_them():
    a, b = torch.ones(2), torch.full((2,), 3.0)
    capture = ReplayGraphCapture()
    outs = capture.capture(lambda: torch._foreach_mul([a, b], 2.0))
    a.fill_(5.0)
    b.fill_(7.0)
    capture.replay()
    assert torch.equal(outs[0], torch.full((2,), 10.0))
    assert torch.equal(outs[1], torch.full((2,), 14.0))


def test_a_return_aliasing_an_input_is_not_taken_for_new_memory():
    """_unsafe_view returns its input's storage without saying so in its schema: that storage
    existed before the capture and keeps its contents."""
    state = torch.arange(4.0)
    capture = ReplayGraphCapture()
    capture.capture(lambda: torch.ops.aten._unsafe_view(state, (2, 2)) + 0)
    assert torch.equal(state, torch.arange(4.0))


def test_a_failed_capture_leaves_memory_as_it_found_it():
    state = torch.zeros(3)

    def step():
        state.add_(1)
        if state.sum() > 6:  # a host read during capture, after the write
            pass
    capture = ReplayGraphCapture()
    with pytest.raises(CaptureError):
        capture.capture(step)
    assert torch.equal(state, torch.full((3,), 2.0))  # the warm-ups' writes only


def test_tensors_from_host_data_during_capture_are_refused():
    x = torch.ones(3)
    with pytest.raises(CaptureError, match="built from host data"):
        ReplayGraphCapture().capture(lambda: x + torch.tensor([1.0, 2.0, 3.0]))
