"""The tpssm command line: `python -m tpssm {demo,generate,bench}` (also the `tpssm` script).

- demo: a small random Mamba at tp 1 and tp 2 (gloo processes on a CPU-only machine, NCCL with
  two GPUs): generates for a batch of prompts, prints tokens/s, checks the tp 2 tokens equal tp 1.
- generate: a local Hugging Face checkpoint at --tp N.
- bench: throughput, time to first token and decode latency over a sweep of prompt lengths and
  batch sizes, for a preset at its real dimensions (random weights) or a checkpoint.

`--tp N` spawns N local processes; under torchrun the same command runs on torchrun's ranks.
Every failure ends in one line on stderr naming the cause and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch

from tpssm.ops import SCAN_ALGORITHMS

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


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
    seed: int = 0
    local_shard_tp: int = 0  # > 0: one process builds rank 0's shard of a tp-way model (bench)

    def describe(self) -> str:
        return self.path or self.preset or "demo model"


def _rank_device(spec: ModelSpec) -> torch.device:
    import torch.distributed as dist

    want = spec.device
    if want == "auto":
        backend = dist.get_backend() if dist.is_initialized() else None
        want = "cuda" if backend == "nccl" or (backend is None and torch.cuda.is_available()) \
            else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but no GPU is available")
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
    with torch.no_grad():
        model.load_weights(ProgressSource(source, config.num_hidden_layers,
                                          f"loading {spec.describe()} (tp {ctx.tp})"))
    return model


# ----------------------------------------------------------------------------------- ranks
@dataclass
class GenerateJob:
    spec: ModelSpec
    prompts: List[List[int]]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    eos_token_id: Optional[int] = None
    max_batch_size: int = 8
    max_prefill_tokens: int = 2048
    max_prompt_tokens: int = 1 << 20
    num_slots: Optional[int] = None
    use_state_cache: bool = True
    warmup: bool = False
    # Tokens a request may hold in a hybrid model's KV cache (None: the longest prompt plus
    # max_new_tokens); ignored by pure SSMs.
    max_seq_len: Optional[int] = None


def _make_engine(model, job: GenerateJob):
    from tpssm.engine import CachedModel, GenerationEngine

    slots = job.num_slots if job.num_slots is not None else job.max_batch_size
    if slots < 1:
        raise CLIError(f"the state cache needs at least one slot, got num_slots={slots}")
    max_len = job.max_seq_len or max((len(p) for p in job.prompts), default=0) + job.max_new_tokens
    runner = CachedModel(model, model.allocate_cache(slots, max_seq_len=max_len))
    return GenerationEngine(runner, max_batch_size=min(job.max_batch_size, slots),
                            max_prefill_tokens=job.max_prefill_tokens,
                            max_prompt_tokens=job.max_prompt_tokens,
                            use_state_cache=job.use_state_cache, group=model.ctx.group)


def _run_job(engine, job: GenerateJob):
    from tpssm.engine import SamplingParams

    for i, p in enumerate(job.prompts):
        engine.add_request(p, SamplingParams(max_new_tokens=job.max_new_tokens,
                                             temperature=job.temperature, top_k=job.top_k,
                                             eos_token_id=job.eos_token_id, seed=job.seed + i))
    _sync(engine.model.device)
    start = time.perf_counter()
    done = engine.run()
    _sync(engine.model.device)
    return done, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_rank(job: GenerateJob) -> dict:
    """Runs on every rank; returns the generations and timings (identical on every rank)."""
    model = build_model(job.spec)
    engine = _make_engine(model, job)
    if job.warmup:
        _run_job(engine, GenerateJob(job.spec, [job.prompts[0][:8]], 2))
        engine.finished.clear()
    done, seconds = _run_job(engine, job)
    engine.close()
    return {"outputs": [r.output for r in done], "seconds": seconds,
            "ttft_s": [r.ttft_s for r in done],
            "new_tokens": sum(len(r.output) for r in done), "device": str(model.ctx.device),
            "param_bytes_per_rank": model.parameter_bytes(),
            "allreduce_calls": dict(model.allreduce.calls)}


@dataclass
class BenchJob:
    spec: ModelSpec
    prompt_lens: List[int]
    batch_sizes: List[int]
    gen_tokens: int
    max_prefill_tokens: int
    state_cache_modes: List[bool]
    repeats: int = 1
    seed: int = 0


def bench_rank(job: BenchJob) -> List[dict]:
    """One tp degree: every (state cache mode, batch size, prompt length) point of the sweep."""
    from tpssm.progress import Progress

    model = build_model(job.spec)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(job.seed)
    points = [(m, b, L) for m in job.state_cache_modes for b in job.batch_sizes
              for L in job.prompt_lens]
    rows = []
    progress = Progress(len(points), f"bench tp {model.ctx.tp}")
    # One engine per (state cache mode, batch size), reused across prompt lengths. Every point
    # first runs once untimed at its own shape: kernels a new shape selects (cuBLAS picks other
    # GEMM kernels per token count; CUDA loads a kernel's module at its first launch), the
    # allocator's blocks (the scan workspace grows with the prompt) and the decode CUDA graph of
    # the batch size are all ready before the timed repeats. With one warm-up at the longest
    # prompt only, the sweep's first point (batch 1, the shortest prompt) came out 7-17 ms
    # slower in TTFT on an H100 than the same point without the state cache, timed later.
    engines = {}
    for use_cache, batch, plen in points:
        gen = GenerateJob(job.spec, [], job.gen_tokens, max_batch_size=batch,
                          max_prefill_tokens=job.max_prefill_tokens, use_state_cache=use_cache,
                          max_seq_len=max(job.prompt_lens) + job.gen_tokens)
        engine = engines.get((use_cache, batch))
        if engine is None:
            engine = engines[(use_cache, batch)] = _make_engine(model, gen)
        gen.prompts = [torch.randint(vocab, (plen,), generator=g).tolist()] * batch
        gen.max_new_tokens = 2
        _run_job(engine, gen)
        engine.finished.clear()
        gen.max_new_tokens = job.gen_tokens
        times, ttfts, decode = [], [], []
        for _ in range(job.repeats):
            gen.prompts = [torch.randint(vocab, (plen,), generator=g).tolist()
                           for _ in range(batch)]
            done, seconds = _run_job(engine, gen)
            engine.finished.clear()
            times.append(seconds)
            ttfts.extend(r.ttft_s for r in done)
            decode.extend((r.finish_s - r.first_token_s) / max(1, len(r.output) - 1)
                          for r in done)
        seconds = statistics.median(times)
        rows.append({"tp": model.ctx.tp, "rank_shard_only": model.ctx.local_shard_only,
                     "state_cache": use_cache, "batch": batch,
                     "prompt_len": plen, "gen_tokens": job.gen_tokens,
                     "seconds": seconds,
                     "throughput_tok_s": batch * job.gen_tokens / seconds,
                     "ttft_ms": 1e3 * statistics.median(ttfts),
                     "decode_ms_per_token": 1e3 * statistics.median(decode),
                     "param_bytes_per_rank": model.parameter_bytes(),
                     "device": str(model.ctx.device)})
        progress.update()
    progress.close()
    for engine in engines.values():
        engine.close()
    return rows


# ----------------------------------------------------------------------------------- commands
def _parse_int_list(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise CLIError(f"{name} must be positive integers, got {text!r}")
    return values


def _spawn(fn, tp: int, arg, timeout_s: float):
    from tpssm.launch import RankError, run_ranks

    # The process-group backend follows the device the job asks for (auto: NCCL when every rank
    # can have a GPU of its own).
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(arg.spec.device)
    try:
        return run_ranks(fn, tp, (arg,), backend=backend, timeout_s=timeout_s)
    except RankError as exc:
        raise CLIError(_one_line(str(exc))) from None


def _one_line(message: str) -> str:
    """The informative line of a rank failure (its exception line, not the traceback)."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    if not lines:
        return message
    head = lines[0]
    for ln in reversed(lines):
        if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]:
            if ln.strip() not in head:
                return f"{head.split(':')[0]}: {ln.strip()}"
            break
    return head


def cmd_demo(args) -> int:
    from tpssm.presets import DEMO_CONFIG

    g = torch.Generator().manual_seed(args.seed)
    lens = [int(v) for v in torch.randint(4, 48, (args.num_prompts,), generator=g)]
    prompts = [torch.randint(DEMO_CONFIG["vocab_size"], (n,), generator=g).tolist() for n in lens]
    device = args.device
    if device == "auto":  # both runs on the same kind of device, so their tokens compare
        device = "cuda" if torch.cuda.device_count() >= args.tp else "cpu"
    spec = ModelSpec(config=DEMO_CONFIG, seed=args.seed, device=device)
    results = {}
    for tp in (1, args.tp):
        log(f"demo: {len(prompts)} prompts, {args.max_new_tokens} new tokens each, tp {tp}")
        job = GenerateJob(spec, prompts, args.max_new_tokens, max_batch_size=args.num_prompts,
                          warmup=True)
        results[tp] = _spawn(generate_rank, tp, job, args.timeout)[0]
    if not is_primary():
        return 0
    print(f"{'tp':>3} {'device':>8} {'requests':>8} {'new tokens':>10} {'seconds':>8} "
          f"{'tokens/s':>9}")
    for tp, r in results.items():
        print(f"{tp:>3} {r['device']:>8} {len(prompts):>8} {r['new_tokens']:>10} "
              f"{r['seconds']:>8.3f} {r['new_tokens'] / r['seconds']:>9.1f}")
    same = results[1]["outputs"] == results[args.tp]["outputs"]
    print(f"tp {args.tp} tokens equal tp 1 tokens: {'yes' if same else 'NO'}")
    if not same:
        for i, (a, b) in enumerate(zip(results[1]["outputs"], results[args.tp]["outputs"])):
            if a != b:
                print(f"  request {i}: tp 1 {a}\n  request {i}: tp {args.tp} {b}")
        return 1
    return 0


def _load_tokenizer(path: str):
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CLIError("the checkpoint ships tokenizer.json but the `tokenizers` package is not "
                       "installed: pip install tokenizers, or pass --input-ids") from None
    return Tokenizer.from_file(file)


def cmd_generate(args) -> int:
    from tpssm.models import load_config

    if not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model!r} is not a directory")
    config = load_config(args.model)  # fails early, in this process, on a bad config
    tokenizer = _load_tokenizer(args.model)
    if args.input_ids is not None:
        ids = _parse_int_list(args.input_ids.replace(" ", ""), "--input-ids") \
            if args.input_ids.strip() not in ("",) else []
        if not ids:
            raise CLIError("--input-ids needs at least one token id")
    else:
        if tokenizer is None:
            raise CLIError(f"{args.model} ships no tokenizer.json: pass --input-ids instead of "
                           f"--prompt")
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise CLIError("--prompt encodes to no tokens")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise CLIError(f"token ids must be in [0, {config.vocab_size}), got {bad[:5]}")
    if len(ids) > args.max_prompt_tokens:
        raise CLIError(f"the prompt has {len(ids)} tokens, more than --max-prompt-tokens "
                       f"{args.max_prompt_tokens}")
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    spec = ModelSpec(path=args.model, dtype=args.dtype, device=args.device,
                     allreduce=args.allreduce, allreduce_min_bytes=args.allreduce_min_bytes,
                     scan_algorithm=args.scan_algorithm)
    job = GenerateJob(spec, [ids], args.max_new_tokens,
                      temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k,
                      seed=args.seed, eos_token_id=None if args.ignore_eos else eos,
                      max_prompt_tokens=args.max_prompt_tokens, num_slots=args.num_slots)
    result = _spawn(generate_rank, args.tp, job, args.timeout)[0]
    out = result["outputs"][0]
    record = {"model": args.model, "tp": args.tp, "input_ids": ids, "output_ids": out,
              "seconds": result["seconds"], "allreduce": args.allreduce,
              "allreduce_calls": result["allreduce_calls"]}
    if tokenizer is not None:
        record["text"] = tokenizer.decode(out)
    if not is_primary():
        return 0
    if args.json:
        print(json.dumps(record))
    else:
        print(" ".join(str(t) for t in out))
        if "text" in record:
            print(record["text"])
    return 0


def git_commit() -> str:
    """The commit of the source tree, "" when unknown (the benchmarks record it too).
    TPSSM_GIT_COMMIT names it where the checkout's .git is not the tree's own (a copied working
    tree, as on a lent GPU machine)."""
    if os.environ.get("TPSSM_GIT_COMMIT"):
        return os.environ["TPSSM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _environment() -> dict:
    commit = git_commit()
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "git_commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def cmd_bench(args) -> int:
    if (args.preset is None) == (args.model is None):
        raise CLIError("bench needs exactly one of --preset NAME or --model DIR")
    if args.model is not None and not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model!r} is not a directory")
    if args.preset is not None:
        from tpssm.presets import preset_config

        preset_config(args.preset, args.num_layers)  # an unknown name fails here, not per rank
    tps = _parse_int_list(args.tp, "--tp")
    if args.rank_shard:
        from tpssm.launch import under_torchrun

        if under_torchrun():
            raise CLIError("--rank-shard times one process on its own: run it without torchrun")
    spec = ModelSpec(path=args.model, preset=args.preset, num_layers=args.num_layers,
                     dtype=args.dtype, device=args.device, allreduce=args.allreduce,
                     allreduce_min_bytes=args.allreduce_min_bytes,
                     scan_algorithm=args.scan_algorithm)
    modes = [True, False] if args.compare_state_cache else [not args.no_state_cache]
    job = BenchJob(spec, _parse_int_list(args.prompt_lens, "--prompt-lens"),
                   _parse_int_list(args.batch_sizes, "--batch-sizes"), args.gen_tokens,
                   args.max_prefill_tokens, modes, args.repeats)
    report = {"model": spec.describe(), "num_layers": args.num_layers, "dtype": args.dtype,
              "allreduce": args.allreduce, "allreduce_min_bytes": args.allreduce_min_bytes,
              "scan_algorithm": args.scan_algorithm,
              "gen_tokens": args.gen_tokens, "complete": False,
              "environment": _environment(), "rows": []}
    rows: List[dict] = report["rows"]
    runs = [(f" at tp {tp}", tp, job) for tp in tps]
    for tp in _parse_int_list(args.rank_shard, "--rank-shard") if args.rank_shard else []:
        runs.append((f", rank 0's shard of tp {tp} alone (no communication)", 1,
                     replace(job, spec=replace(spec, local_shard_tp=tp))))
    for i, (what, nprocs, run_job) in enumerate(runs):
        log(f"bench: {spec.describe()}{what}")
        rows.extend(_spawn(bench_rank, nprocs, run_job, args.timeout)[0])
        report["complete"] = i == len(runs) - 1
        if args.compare_state_cache:
            report["state_cache_ratios"] = _cache_ratios(rows)
        if args.json and is_primary():
            # Rewritten after every tp degree: a sweep killed part way keeps what it measured.
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    if args.json and is_primary():
        log(f"bench: wrote {args.json}")
    if not is_primary():
        return 0
    print(f"{'tp':>7} {'cache':>5} {'batch':>5} {'prompt':>6} {'tok/s':>9} {'TTFT ms':>9} "
          f"{'ms/token':>9}")
    for r in rows:
        tp = f"{r['tp']}" + (" shard" if r["rank_shard_only"] else "")
        print(f"{tp:>7} {'on' if r['state_cache'] else 'off':>5} {r['batch']:>5} "
              f"{r['prompt_len']:>6} {r['throughput_tok_s']:>9.1f} {r['ttft_ms']:>9.1f} "
              f"{r['decode_ms_per_token']:>9.2f}")
    if args.compare_state_cache:
        for r in report["state_cache_ratios"]:
            tp = f"{r['tp']}" + (" (rank shard)" if r["rank_shard_only"] else "")
            print(f"state cache on/off tp {tp} batch {r['batch']} prompt {r['prompt_len']}: "
                  f"throughput x{r['throughput_ratio']:.2f}, TTFT x{r['ttft_ratio']:.2f}")
    if args.plot:
        _plot(rows, args.plot, f"{spec.describe()} ({args.dtype}, {args.gen_tokens} new tokens)")
    return 0


def _cache_ratios(rows: List[dict]) -> List[dict]:
    key = lambda r: (r["tp"], r["rank_shard_only"], r["batch"], r["prompt_len"])  # noqa: E731
    off = {key(r): r for r in rows if not r["state_cache"]}
    out = []
    for r in rows:
        if r["state_cache"] and key(r) in off:
            o = off[key(r)]
            out.append({"tp": r["tp"], "rank_shard_only": r["rank_shard_only"],
                        "batch": r["batch"], "prompt_len": r["prompt_len"],
                        "throughput_ratio": r["throughput_tok_s"] / o["throughput_tok_s"],
                        "ttft_ratio": o["ttft_ms"] / r["ttft_ms"]})
    return out


def _plot(rows: List[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("bench: matplotlib is not installed, no plot written")
        return
    # One panel per batch size; a colour per tp degree (rank shards dashed), the state cache
    # off in open markers and dotted lines. Throughput on a log axis: the cache-off baseline is
    # often 10x below.
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches) + 2.2, 4),
                             squeeze=False)
    degrees = sorted({(r["tp"], r["rank_shard_only"]) for r in rows})
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(degrees)}
    for ax, batch in zip(axes[0], batches):
        series: Dict[tuple, List[tuple]] = {}
        for r in rows:
            if r["batch"] == batch:
                series.setdefault((r["tp"], r["rank_shard_only"], r["state_cache"]),
                                  []).append((r["prompt_len"], r["throughput_tok_s"]))
        # Per tp degree, the state cache on before off.
        for (tp, shard, cache), pts in sorted(series.items(),
                                              key=lambda kv: (kv[0][:2], not kv[0][2])):
            pts.sort()
            colour = colours[(tp, shard)]
            ax.plot([p for p, _ in pts], [t for _, t in pts], color=colour,
                    marker="o", markerfacecolor=colour if cache else "none",
                    linestyle=("--" if shard else "-") if cache else ":",
                    label=f"tp {tp}" + (" rank shard" if shard else "")
                    + ("" if cache else ", no state cache"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("throughput (generated tokens/s)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"bench: wrote {path}")


# ----------------------------------------------------------------------------------- parser
def _allreduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allreduce", choices=["exact", "int8", "fp8", "fp16"], default="exact",
                   help="TP aggregation: exact, or quantized (int8 / fp8 two-shot, the paper's "
                        "fp16 cast)")
    p.add_argument("--allreduce-min-bytes", type=int, default=1 << 20,
                   help="messages below this use the exact all-reduce (decode messages are "
                        "latency-bound; quantization pays on prefill's large ones)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and activations (SSM state stays float32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU per rank when there are enough, else the CPU")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before a run (all ranks) is declared dead")
    p.add_argument("--scan-algorithm", choices=SCAN_ALGORITHMS, default="auto",
                   help="prefill selective scan: auto (the chunked SSD kernel for Mamba-2 where "
                        "it covers the shape, else the recurrence), or force one (default auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpssm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="tp 2 vs tp 1 on a small random Mamba (the main job)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate from a local Hugging Face checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tp", type=int, default=1)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text, encoded with the checkpoint's tokenizer.json")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default when "
                   "--temperature is 0)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-prompt-tokens", type=int, default=32768)
    p.add_argument("--num-slots", type=int, default=None, help="state cache slots (default 1)")
    _allreduce_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="throughput / TTFT / decode latency sweep")
    p.add_argument("--preset", help="mamba-2.8b, falcon-mamba-7b or mamba2-2.7b (random weights)")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--tp", default="1", help="tp degree(s), comma-separated, e.g. 1,2,4")
    p.add_argument("--num-layers", type=int, default=None,
                   help="override the preset's layer count (a CPU has no time for 64)")
    p.add_argument("--prompt-lens", default="128,512,2048")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--max-prefill-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=1)
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-state-cache", action="store_true",
                       help="baseline: recompute the whole prefix for every new token")
    cache.add_argument("--compare-state-cache", action="store_true",
                       help="run with and without the state cache and print the ratios")
    p.add_argument("--rank-shard", default="",
                   help="tp degree(s): also time rank 0's shard of a tp-way model alone on one "
                        "device, collectives skipped (per-rank compute at tp shard sizes)")
    _allreduce_args(p)
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--plot", help="write a PNG of throughput vs prompt length (matplotlib)")
    _common(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("tp", "max_new_tokens", "num_prompts", "gen_tokens", "repeats"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            print(f"tpssm: error: --{name.replace('_', '-')} must be >= 1, got {value}",
                  file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"tpssm: error: {exc}", file=sys.stderr)
    except (ValueError, KeyError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"tpssm: error: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("tpssm: interrupted", file=sys.stderr)
        return 130
    return 1
