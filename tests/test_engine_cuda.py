"""The engine on a GPU: decode steps replayed from captured CUDA graphs (padded batch sizes)
give the same tokens as eager decode and as the CPU model. Skips without CUDA."""

import pytest
import torch

import tpssm
from tpssm.engine import CachedModel, GenerationEngine, SamplingParams
from tpssm.models import SSMForCausalLM
from tpssm.presets import DEMO_CONFIG, RandomWeightSource
from tpssm.models.config import parse_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not tpssm.has_cuda_kernels(),
                                reason="needs a GPU and the CUDA kernels")


def _model(device, ctx=None):
    config = parse_config(DEMO_CONFIG)
    from tpssm.parallel import TPContext

    ctx = ctx if ctx is not None else TPContext(device=torch.device(device))
    model = SSMForCausalLM(config, ctx, torch.float32)
    with torch.no_grad():
        model.load_weights(RandomWeightSource(config, seed=3))
    return model


def _run(model, prompts, use_cuda_graphs, slots=4, sampling=None, engine=None):
    """Runs prompts to the end (on `engine` when given); sampling(i) -> request i's params."""
    engine = engine or GenerationEngine(CachedModel(model, model.allocate_cache(slots)),
                                        max_batch_size=slots, max_prefill_tokens=16,
                                        use_cuda_graphs=use_cuda_graphs)
    first = engine._next_id
    for i, p in enumerate(prompts):
        engine.add_request(p, sampling(i) if sampling else SamplingParams(max_new_tokens=12))
    done = [r for r in engine.run() if r.request_id >= first]
    return [r.output for r in done], engine


def test_graph_decode_equals_eager_and_cpu():
    g = torch.Generator().manual_seed(0)
    # 7 requests over 4 slots: the running batch shrinks and grows, exercising padded graphs.
    prompts = [torch.randint(1024, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (7,), generator=g)]
    gpu = _model("cuda")
    graphs, engine = _run(gpu, prompts, True)
    assert engine._graphs, "no decode step went through a CUDA graph"
    eager, _ = _run(gpu, prompts, False)
    cpu, _ = _run(_model("cpu"), prompts, False)
    assert graphs == eager
    # Different kernels (CPU vs CUDA): allow a rare argmax flip at a near-tie late in a request.
    same = sum(a == b for a, b in zip(graphs, cpu))
    assert same >= len(prompts) - 1, (graphs, cpu)


def test_graph_decode_with_gemv_and_programmatic_launch():
    """The decode graph with every projection through gemv and programmatic launch on gives
    eager gemv decode's tokens without it (the same kernels), and cuBLAS decode's up to a
    near-tie (other sums)."""
    from tpssm import ops

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1024, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (7,), generator=g)]
    gpu = _model("cuda")
    reference, _ = _run(gpu, prompts, False)
    gpu.set_projection_kernel("gemv")
    eager, _ = _run(gpu, prompts, False)
    previous = ops.set_programmatic_launch(True)
    try:
        graphs, engine = _run(gpu, prompts, True)
    finally:
        ops.set_programmatic_launch(previous)
    assert engine._graphs, "no decode step went through a CUDA graph"
    assert graphs == eager
    same = sum(a == b for a, b in zip(graphs, reference))
    assert same >= len(prompts) - 1, (graphs, reference)


# A small random Zamba2 with two shared blocks, adapters and rotary: decode attention reads the
# KV cache through device-side indices only, so its steps can be captured too.
_HYBRID = dict(architectures=["Zamba2ForCausalLM"], model_type="zamba2", vocab_size=1024,
               hidden_size=128, num_hidden_layers=6, num_attention_heads=4, n_mamba_heads=4,
               mamba_d_state=16, mamba_ngroups=1, intermediate_size=256, num_mem_blocks=2,
               use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
               layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hybrid_graph_decode_equals_eager_and_cpu(dtype):
    from tpssm.models import build_model
    from tpssm.models import parse_config as parse_any_config
    from tpssm.parallel import TPContext

    def hybrid(device):
        config = parse_any_config(_HYBRID)
        model = build_model(config, TPContext(device=torch.device(device)), dtype)
        with torch.no_grad():
            model.load_weights(RandomWeightSource(config, seed=5))
        return model

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1024, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 40, (7,), generator=g)]
    gpu = hybrid("cuda")
    graphs, engine = _run(gpu, prompts, True)
    assert engine._graphs, "no decode step went through a CUDA graph"
    eager, _ = _run(gpu, prompts, False)
    assert graphs == eager
    if dtype == torch.float32:
        cpu, _ = _run(hybrid("cpu"), prompts, False)
        same = sum(a == b for a, b in zip(graphs, cpu))
        assert same >= len(prompts) - 1, (graphs, cpu)


def test_greedy_graph_decode_step_reads_tokens_as_its_only_sync():
    """A decode step of greedy rows replays its graph (argmax included) and synchronises only to
    read the tokens: under torch's sync debug mode "error" any other synchronising call (reading
    logits, a pageable copy, .item()) raises. The event wait that reads the tokens is not one
    torch flags."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1024, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (5,), generator=g)]
    gpu = _model("cuda")
    first, engine = _run(gpu, prompts, True)  # captures the graphs of the batch sizes used
    strict_steps = []
    decode_step = engine._decode_step

    def strict_decode_step():
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        strict_steps.append(len(engine.running))

    engine._decode_step = strict_decode_step
    second, _ = _run(gpu, prompts, True, engine=engine)
    assert strict_steps, "no decode step ran"
    assert second == first


def test_graph_decode_with_sampling_rows_equals_eager():
    """Rows that sample read their logits from the graph's output; greedy rows beside them keep
    the in-graph argmax. Each sampling row has its own generator, so graph and eager agree."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1024, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (6,), generator=g)]

    def sampling(i):
        if i % 2:
            return SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, seed=100 + i)
        return SamplingParams(max_new_tokens=10)

    gpu = _model("cuda")
    graphs, engine = _run(gpu, prompts, True, sampling=sampling)
    assert engine._graphs
    eager, _ = _run(gpu, prompts, False, sampling=sampling)
    assert graphs == eager


def test_local_shard_graph_decode_equals_eager():
    """One tp 4 rank's shard in one process (TPContext.local_shard, as profile_step.py and the
    engine bench time it): its vocabulary-parallel head's greedy (max, token) exchange runs
    inside the captured decode graph, the sampling rows' logits gather after the replay; graph
    decode equals eager decode."""
    from tpssm.parallel import TPContext

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1024, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (6,), generator=g)]

    def sampling(i):
        if i % 3 == 2:
            return SamplingParams(max_new_tokens=10, temperature=0.8, top_k=50, seed=200 + i)
        return SamplingParams(max_new_tokens=10)

    shard = _model("cuda", TPContext.local_shard(4, torch.device("cuda")))
    assert shard.vocab_parallel and shard.lm_head.shape[0] == 1024 // 4
    graphs, engine = _run(shard, prompts, True, sampling=sampling)
    assert engine._graphs, "no decode step went through a CUDA graph"
    eager, _ = _run(shard, prompts, False, sampling=sampling)
    assert graphs == eager

