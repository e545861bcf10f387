"""The engine benchmark behind `tpssm bench`: a sweep of (state cache mode, batch size, prompt
length) points per tp degree, its report (JSON and a table), the state cache speedups, and the
environment a result was measured in.

Each point reports the batch's throughput (generated tokens / s, the prefill included), the
median time to first token, the median per-token decode latency (time between a request's first
and last token over its remaining tokens) and the decode throughput it gives (batch tokens a
step). On CUDA a point with the state cache also reports its decode step's memory floor: the
weights the step reads (the embedding's rows only, a shared block at every visit) and the states
it reads and writes, over the copy bandwidth measured in the same rank process, and the floor as
a percentage of the measured step.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

from tpssm.runner import GenerateJob, ModelSpec, build_model, log, make_engine, run_job, spawn

__all__ = ["BenchJob", "bench_rank", "run_sweep", "cache_speedups", "format_table",
           "format_speedups", "git_commit", "environment", "device_label", "layers_label",
           "copy_bandwidth_gbs"]

# New tokens of each point's untimed warm-up (prefill, one decode step); the KV cache holds them.
WARMUP_TOKENS = 2


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


def copy_bandwidth_gbs(device) -> Optional[float]:
    """GB/s (1e9 bytes, read + written) of a 512 MiB device-to-device copy, the median of 20
    timed by CUDA events after two warm-ups; None off CUDA. The bandwidth the benchmarks'
    "% of copy" and floors divide by."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    n = 512 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * n / (statistics.median(times) * 1e-3) / 1e9


def decode_floor(model, cache, batch: int, copy_gbs: Optional[float]) -> dict:
    """A decode step's memory floor at `batch` requests on this rank: the weights it reads
    (model.decode_weight_bytes) plus the SSM and conv states it reads and writes back (a
    hybrid's keys are left out: they depend on the requests' lengths), over the copy
    bandwidth measured in the same process."""
    weights = model.decode_weight_bytes(batch)
    states = 2 * batch * (cache.bytes_per_slot() - cache.kv_bytes_per_slot())
    floor_ms = None if copy_gbs is None else (weights + states) / (copy_gbs * 1e9) * 1e3
    return {"decode_weight_bytes": weights, "decode_state_bytes": states,
            "decode_floor_ms": floor_ms}


def bench_rank(job: BenchJob) -> List[dict]:
    """One tp degree: every (state cache mode, batch size, prompt length) point of the sweep."""
    from tpssm.progress import Progress

    model = build_model(job.spec)
    copy_gbs = copy_bandwidth_gbs(model.ctx.device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(job.seed)
    points = [(m, b, L) for m in job.state_cache_modes for b in job.batch_sizes
              for L in job.prompt_lens]
    rows = []
    progress = Progress(len(points), f"bench tp {model.ctx.tp}", unit=" points")
    # One engine per (state cache mode, batch size), reused across prompt lengths. Every point
    # first runs once untimed at its own shape: kernels a new shape selects (cuBLAS picks other
    # GEMM kernels per token count; CUDA loads a kernel's module at its first launch), the
    # allocator's blocks (the scan workspace grows with the prompt) and the decode CUDA graph of
    # the batch size are all ready before the timed repeats. A single warm-up at the longest
    # prompt leaves the shorter shapes cold: on an H100 that adds 7-17 ms to the first point's
    # TTFT, as much as the effect a cache on / off comparison measures there.
    engines = {}
    try:  # closed on errors too: NCCL's teardown waits for the graphs that captured it
        for use_cache, batch, plen in points:
            gen = GenerateJob(job.spec, [], job.gen_tokens, max_batch_size=batch,
                              max_prefill_tokens=job.max_prefill_tokens, use_state_cache=use_cache,
                              max_seq_len=max(job.prompt_lens)
                              + max(job.gen_tokens, WARMUP_TOKENS) - 1)
            engine = engines.get((use_cache, batch))
            if engine is None:
                engine = engines[(use_cache, batch)] = make_engine(model, gen)
            # Distinct prompts: requests with one prompt would share its prefill (the engine
            # forks them), leaving the batch's prefill shapes cold.
            gen.prompts = [torch.randint(vocab, (plen,), generator=g).tolist()
                           for _ in range(batch)]
            gen.max_new_tokens = WARMUP_TOKENS
            run_job(engine, gen)
            engine.finished.clear()
            gen.max_new_tokens = job.gen_tokens
            times, ttfts, decode = [], [], []
            for _ in range(job.repeats):
                gen.prompts = [torch.randint(vocab, (plen,), generator=g).tolist()
                               for _ in range(batch)]
                done, seconds = run_job(engine, gen)
                engine.finished.clear()
                times.append(seconds)
                ttfts.extend(r.ttft_s for r in done)
                decode.extend((r.finish_s - r.first_token_s) / max(1, len(r.output) - 1)
                              for r in done)
            seconds = statistics.median(times)
            decode_ms = 1e3 * statistics.median(decode)
            # Without the state cache every step recomputes whole sequences: no decode floor. With
            # one new token a request runs no decode step: no decode figures.
            decodes = job.gen_tokens > 1 and decode_ms > 0
            floor = (decode_floor(model, engine.model.cache, batch, copy_gbs) if use_cache
                     else dict.fromkeys(("decode_weight_bytes", "decode_state_bytes",
                                         "decode_floor_ms")))
            rows.append({"tp": model.ctx.tp, "rank_shard_only": model.ctx.local_shard_only,
                         "state_cache": use_cache, "batch": batch,
                         "prompt_len": plen, "gen_tokens": job.gen_tokens,
                         "num_layers": model.config.num_hidden_layers, "dtype": job.spec.dtype,
                         "seconds": seconds,
                         # End to end: the prompts' prefill included.
                         "throughput_tok_s": batch * job.gen_tokens / seconds,
                         "ttft_ms": 1e3 * statistics.median(ttfts),
                         "decode_ms_per_token": decode_ms,
                         # Decode alone: a step's `batch` tokens over its median time.
                         "decode_tok_s": batch * 1e3 / decode_ms if decodes else None,
                         **floor,
                         "decode_pct_of_floor": (100 * floor["decode_floor_ms"] / decode_ms
                                                 if decodes and floor["decode_floor_ms"] is not None
                                                 else None),
                         "copy_bandwidth_gbs": copy_gbs,
                         "param_bytes_per_rank": model.parameter_bytes(),
                         "device": str(model.ctx.device)})
            progress.update()
        progress.close()
    finally:
        for engine in engines.values():
            engine.close()
    return rows


def run_sweep(job: BenchJob, tps: List[int], rank_shards: List[int], report: dict,
              json_path: Optional[str], timeout_s: float, compare_state_cache: bool) -> dict:
    """Runs the sweep at every tp degree (then every rank-shard degree), filling report["rows"].
    The JSON file is rewritten after every degree, so a sweep stopped part way keeps what it
    measured (report["complete"] says whether it finished)."""
    spec = job.spec
    runs: List[Tuple[str, int, BenchJob]] = [(f"at tp {tp}", tp, job) for tp in tps]
    for tp in rank_shards:
        runs.append((f"rank 0's shard of tp {tp} alone (no communication)", 1,
                     replace(job, spec=replace(spec, local_shard_tp=tp))))
    rows: List[dict] = report["rows"]
    for i, (what, nprocs, run_job_) in enumerate(runs):
        log(f"bench: {spec.describe()} {what} (run {i + 1} of {len(runs)})")
        rows.extend(spawn(bench_rank, nprocs, run_job_, timeout_s)[0])
        if report["num_layers"] is None:  # a checkpoint: its depth as built
            report["num_layers"] = rows[0]["num_layers"]
        report["complete"] = i == len(runs) - 1
        if compare_state_cache:
            report["state_cache_speedups"] = cache_speedups(rows)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)
    if json_path:
        log(f"bench: wrote {json_path}")
    return report


def cache_speedups(rows: List[dict]) -> List[dict]:
    """Per point, how many times faster the state cache makes it: each ratio is the cost
    without the cache over the cost with it (throughput: tok/s on over off), so > 1 always
    means the cache helps and < 1 that it costs."""
    key = lambda r: (r["tp"], r["rank_shard_only"], r["batch"], r["prompt_len"])  # noqa: E731
    off = {key(r): r for r in rows if not r["state_cache"]}
    out = []
    for r in rows:
        if r["state_cache"] and key(r) in off:
            o = off[key(r)]
            out.append({"tp": r["tp"], "rank_shard_only": r["rank_shard_only"],
                        "batch": r["batch"], "prompt_len": r["prompt_len"],
                        "throughput": r["throughput_tok_s"] / o["throughput_tok_s"],
                        "ttft": o["ttft_ms"] / r["ttft_ms"],
                        "decode": o["decode_ms_per_token"] / r["decode_ms_per_token"]})
    return out


def _tp_label(r: dict) -> str:
    return f"{r['tp']}" + (" shard" if r["rank_shard_only"] else "")


def layers_label(report: dict) -> str:
    """'2 of 64 layers' for a shortened preset, '64 layers' otherwise."""
    layers = report["num_layers"]
    full = report.get("full_num_layers")
    if full is not None and full != layers:
        return f"{layers} of {full} layers"
    return f"{layers} layers"


def device_label(report: dict) -> str:
    env = report["environment"]
    devices = {r["device"].split(":")[0] for r in report["rows"]} or {"?"}
    if devices == {"cuda"}:
        return env["device_name"]
    return f"CPU ({env['cpu_count']} cores)" if devices == {"cpu"} else "/".join(sorted(devices))


def describe_run(report: dict) -> str:
    """The one line that says what a table or plot measured."""
    return (f"{report['model']}, {layers_label(report)}, {report['dtype']}, "
            f"{device_label(report)}, {report['gen_tokens']} new tokens per request")


def format_table(report: dict) -> str:
    """tok/s counts the prefill in; decode tok/s is a decode step's tokens over its time; floor
    % is the decode step's memory floor over its time (CUDA only)."""
    lines = [describe_run(report),
             f"{'tp':>7} {'device':>7} {'cache':>5} {'batch':>5} {'prompt':>6} {'tok/s':>9} "
             f"{'TTFT ms':>9} {'ms/token':>9} {'dec tok/s':>9} {'floor %':>7}"]
    for r in report["rows"]:
        decode = r.get("decode_tok_s")
        pct = r.get("decode_pct_of_floor")
        lines.append(f"{_tp_label(r):>7} {r['device']:>7} {'on' if r['state_cache'] else 'off':>5} "
                     f"{r['batch']:>5} {r['prompt_len']:>6} {r['throughput_tok_s']:>9.1f} "
                     f"{r['ttft_ms']:>9.1f} {r['decode_ms_per_token']:>9.2f} "
                     f"{'-' if decode is None else f'{decode:.1f}':>9} "
                     f"{'-' if pct is None else f'{pct:.0f}':>7}")
    return "\n".join(lines)


def format_speedups(report: dict) -> str:
    lines = ["state cache speedup (cost without the cache / cost with it; > 1: faster with it):"]
    for r in report.get("state_cache_speedups", []):
        lines.append(f"  tp {_tp_label(r)}, batch {r['batch']}, prompt {r['prompt_len']}: "
                     f"throughput x{r['throughput']:.2f}, TTFT x{r['ttft']:.2f}, "
                     f"decode x{r['decode']:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- environment
def git_commit() -> str:
    """The commit of the source tree, "" when unknown (the benchmarks record it too).
    TPSSM_GIT_COMMIT names it where the checkout's .git is not the tree's own (a
    working tree copied to another machine without its .git)."""
    if os.environ.get("TPSSM_GIT_COMMIT"):
        return os.environ["TPSSM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "git_commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
