"""What the command line runs on its ranks: the model each rank builds (ModelSpec, build_model),
the generation job (GenerateJob, generate_rank), the scoring job (ScoreJob, score_rank), and
spawning the ranks with one-line errors.

Every function named `*_rank` runs inside a rank (a spawned process, or torchrun's); the rest
runs in the launching process.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

__all__ = ["CLIError", "UsageError", "DTYPES", "ModelSpec", "build_model", "GenerateJob",
           "make_engine", "run_job", "generate_rank", "ScoreJob", "score_rank", "spawn",
           "one_line", "is_primary", "log"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """A failure the user can act on, printed as one line; the command exits 1."""


class UsageError(CLIError):
    """The command was rejected before any work began (an option's value, or a file or
    directory an option names); the command exits 2, like argparse's own errors."""


def is_primary() -> bool:
    """False on torchrun's ranks other than 0: results and files come from rank 0 only."""
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """Progress and status to stderr (rank 0 only), keeping stdout for results."""
    if is_primary():
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- model spec
@dataclass
class ModelSpec:
    """What each rank builds: a checkpoint directory, a preset, or an inline config dict."""
    path: Optional[str] = None
    preset: Optional[str] = None
    config: Optional[dict] = None
    num_layers: Optional[int] = None
    dtype: str = "float32"
    device: str = "auto"
    allreduce: str = "exact"
    allreduce_min_bytes: int = 1 << 20
    scan_algorithm: str = "auto"
    projection_kernel: str = "torch"
    programmatic_launch: bool = False  # process-wide: tpssm.ops.set_programmatic_launch
    sequence_parallel_min_tokens: int = 0  # > 0: model.set_sequence_parallel(True, this)
    seed: int = 0
    local_shard_tp: int = 0  # > 0: one process builds rank 0's shard of a tp-way model (bench)

    def describe(self) -> str:
        return self.path or self.preset or "demo model"


# The launcher checks it before any rank starts; a rank (under torchrun) checks its own device.
NO_GPU = "--device cuda was asked for but no GPU is available"


def _rank_device(spec: ModelSpec) -> torch.device:
    import torch.distributed as dist

    want = spec.device
    if want == "auto":
        backend = dist.get_backend() if dist.is_initialized() else None
        want = "cuda" if backend == "nccl" or (backend is None and torch.cuda.is_available()) \
            else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(NO_GPU)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def build_model(spec: ModelSpec):
    """This rank's shard of the model (run inside a rank)."""
    import torch.distributed as dist

    from tpssm.models import build_model as build_unloaded, load_config, parse_config
    from tpssm.models.weights import SafetensorsSource
    from tpssm.parallel import TPContext
    from tpssm.presets import RandomWeightSource, preset_config
    from tpssm.progress import ProgressSource

    device = _rank_device(spec)
    if spec.local_shard_tp:
        ctx = TPContext.local_shard(spec.local_shard_tp, device)
    else:
        ctx = TPContext(None, device) if dist.is_initialized() else TPContext(device=device)
    dtype = DTYPES[spec.dtype]
    if spec.path is not None:
        config = load_config(spec.path)
        source = SafetensorsSource(spec.path)
    else:
        if spec.preset is not None:
            config = preset_config(spec.preset, spec.num_layers)
        else:
            config = parse_config(spec.config)
        source = RandomWeightSource(config, seed=spec.seed, device=device)
    model = build_unloaded(config, ctx, dtype, allreduce=spec.allreduce,
                           allreduce_min_bytes=spec.allreduce_min_bytes)
    model.set_scan_algorithm(spec.scan_algorithm)
    model.set_projection_kernel(spec.projection_kernel)
    if spec.sequence_parallel_min_tokens:
        model.set_sequence_parallel(True, spec.sequence_parallel_min_tokens)
    if spec.programmatic_launch:  # the rank process's setting (off unless asked for)
        from tpssm import ops

        ops.set_programmatic_launch(True)
    # Progress counts the elements this rank loads (its shard), so a long load - random weights
    # for a large vocabulary take minutes on a CPU - reports within tensors as well as layers.
    total = sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))
    with torch.no_grad(), ProgressSource(
            source, total, f"loading {spec.describe()}, {config.num_hidden_layers} layers "
                           f"(tp {ctx.tp})") as tracked:
        model.load_weights(tracked)
    return model


# ----------------------------------------------------------------------------------- generation
@dataclass
class GenerateJob:
    spec: ModelSpec
    prompts: List[List[int]]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: Union[None, int, Tuple[int, ...]] = None
    max_batch_size: int = 8
    max_prefill_tokens: int = 2048
    max_prompt_tokens: int = 1 << 20
    num_slots: Optional[int] = None
    use_state_cache: bool = True
    warmup: bool = False
    # Tokens a request may hold in a hybrid model's KV cache (None: the longest prompt plus
    # max_new_tokens); ignored by pure SSMs.
    max_seq_len: Optional[int] = None


def make_engine(model, job: GenerateJob):
    from tpssm.engine import CachedModel, GenerationEngine

    # By default a slot for each request that can run at once: no more than the job's prompts
    # (a job without prompts yet - bench fills them in per point - gets max_batch_size).
    slots = job.num_slots if job.num_slots is not None else job.max_batch_size
    if job.num_slots is None and job.prompts:
        slots = min(slots, len(job.prompts))
    if slots < 1:
        raise CLIError(f"the state cache needs at least one slot, got num_slots={slots}")
    # The KV cache (hybrids) holds what the engine admits: prompt + max_new_tokens - 1 keys (the
    # last new token is never fed back).
    max_len = job.max_seq_len or max(
        1, max((len(p) for p in job.prompts), default=0) + job.max_new_tokens - 1)
    runner = CachedModel(model, model.allocate_cache(slots, max_seq_len=max_len))
    return GenerationEngine(runner, max_batch_size=min(job.max_batch_size, slots),
                            max_prefill_tokens=job.max_prefill_tokens,
                            max_prompt_tokens=job.max_prompt_tokens,
                            use_state_cache=job.use_state_cache)


def run_job(engine, job: GenerateJob):
    """Runs job's prompts to completion on engine: (finished requests, seconds). RuntimeError
    naming the prompt when a request ended in an error (logits that are not finite)."""
    from tpssm.engine import SamplingParams

    requests = [engine.add_request(p, SamplingParams(
        max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_k=job.top_k,
        top_p=job.top_p, eos_token_id=job.eos_token_id, seed=job.seed + i))
        for i, p in enumerate(job.prompts)]
    _sync(engine.model.device)
    start = time.perf_counter()
    done = engine.run()
    _sync(engine.model.device)
    seconds = time.perf_counter() - start
    for i, r in enumerate(requests):
        if r.error is not None:  # every rank has the same tokens: every rank raises this
            raise RuntimeError(f"prompt {i}: {r.error}")
    return done, seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_rank(job: GenerateJob) -> dict:
    """Runs on every rank; returns the generations and timings (identical on every rank)."""
    model = build_model(job.spec)
    engine = make_engine(model, job)
    try:  # closed on errors too: NCCL's teardown waits for the graphs that captured it
        if job.warmup:
            run_job(engine, GenerateJob(job.spec, [job.prompts[0][:8]], 2))
            engine.finished.clear()
        done, seconds = run_job(engine, job)
    finally:
        engine.close()
    return {"outputs": [r.output for r in done], "seconds": seconds,
            "ttft_s": [r.ttft_s for r in done],
            "new_tokens": sum(len(r.output) for r in done), "device": str(model.ctx.device),
            "param_bytes_per_rank": model.parameter_bytes(),
            "allreduce_calls": dict(model.allreduce.calls)}


# ----------------------------------------------------------------------------------- scoring
@dataclass
class ScoreJob:
    spec: ModelSpec
    tokens: List[int]
    chunk_tokens: int = 2048


def score_rank(job: ScoreJob) -> dict:
    """Runs on every rank: each token's log-probability (tpssm.score.token_logprobs), the same
    on every rank, and the time it took."""
    from tpssm.score import token_logprobs

    model = build_model(job.spec)
    _sync(model.ctx.device)
    start = time.perf_counter()
    logprobs = token_logprobs(model, job.tokens, chunk_tokens=job.chunk_tokens, progress=True)
    _sync(model.ctx.device)
    return {"token_logprobs": logprobs.tolist(), "seconds": time.perf_counter() - start,
            "allreduce_calls": dict(model.allreduce.calls)}


# ----------------------------------------------------------------------------------- ranks
def spawn(fn, tp: int, arg, timeout_s: float):
    """fn(arg) on tp ranks (local processes, or torchrun's); a rank failure becomes a CLIError
    whose message is the failure's one informative line."""
    from tpssm.launch import RankError, run_ranks, under_torchrun

    # The process-group backend follows the device the job asks for (auto: NCCL when every rank
    # can have a GPU of its own).
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(arg.spec.device)
    if backend == "nccl":
        # Checked here, before NCCL's own failure inside a rank names no option.
        found, need = torch.cuda.device_count(), 1 if under_torchrun() else tp
        if found == 0:
            raise CLIError(NO_GPU)
        if found < need:
            raise CLIError(f"--device cuda with --tp {tp} needs {tp} GPUs (one a rank), found "
                           f"{found}")
    try:
        return run_ranks(fn, tp, (arg,), backend=backend, timeout_s=timeout_s)
    except RankError as exc:
        raise CLIError(one_line(str(exc))) from None


def _strip_exception_name(line: str) -> str:
    """'ValueError: tp 3 does not divide ...' -> 'tp 3 does not divide ...': the class name
    tells a user nothing the message does not."""
    head, sep, rest = line.partition(": ")
    if sep and head.isidentifier() and (head.endswith("Error") or head.endswith("Exception")):
        return rest
    return line


def one_line(message: str) -> str:
    """The informative line of a (rank) failure: its first line, or, when that line only says
    which rank failed, the rank plus the exception's message from the end of the traceback."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return message
    head = lines[0]
    for ln in reversed(lines[1:]):
        name = ln.split(":")[0]
        if name.isidentifier() and (name.endswith("Error") or name.endswith("Exception")):
            if ln not in head:
                return f"{head.split(':')[0]}: {_strip_exception_name(ln)}"
            break
    prefix, sep, rest = head.partition(": ")
    return f"{prefix}: {_strip_exception_name(rest)}" if sep else _strip_exception_name(head)
