"""Kernels of one model step, decode or prefill: which kernels run, how long each takes, and how
each phase's time shrinks from tp 1 to the tp N rank shards.

Builds a preset with random weights (full depth by default) on one device, at tp 1 or as rank 0's
shard of tp N (TPContext.local_shard: the shard's compute, no communication), and profiles with
torch.profiler either `--steps` eager decode steps after a short prefill (`--phase decode`; the
captured CUDA graph replays the same kernels, and the profiler attributes kernels inside a graph
unreliably) or `--steps` prefill steps of `--batch` fresh prompts of `--prompt-len` tokens
(`--phase prefill`). Kernels are grouped by name (launches and microseconds per step) and by
phase (projections, conv, scan, norms, attention, communication, embedding / head gathers, other
elementwise work and copies). Each step is also timed unprofiled (CUDA events, median).
kernels_per_layer leaves out the kernels a step runs once whatever its depth
(kernels_outside_layers: the embedding, final norm, head and greedy exchange), counted from the
same step at one and two layers like the first (a Mamba layer in every hybrid preset, so a
hybrid's once-a-step KV bookkeeping is counted into its layers).

`--tp-shards 1,2,4` profiles each shard in turn and prints the per-phase table of tp 1 against
the shards: time per step and tp 1 / shard (ideal: the tp degree for sharded work, 1 for
replicated work). That table says what does not shrink with the shard. `--sequence-parallel`
runs the shards' prefill steps sequence-parallel (CausalLM.set_sequence_parallel): the residual
adds and norms (and a hybrid's `linear`) on the shard's ceil(T / tp) tokens, the row-parallel
outputs reduce-scattered (in a local shard: its rows taken) and the normalised rows
all-gathered (a copy of them here).

    python benchmarks/profile_step.py --preset mamba-2.8b --phase decode --batch 1 --json out.json
    python benchmarks/profile_step.py --phase prefill --batch 8 --prompt-len 2048 --tp-shards 1,2,4

On a CPU it profiles the CPU ops instead (for a quick look, and for the test of this script).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

# (phase, substrings of kernel / op names), first match wins; names are lower-cased.
PHASES = (
    ("communication", ("nccl", "qar_", "all_reduce", "allreduce")),
    ("conv", ("conv1d",)),
    ("scan", ("selective_scan", "ssd_scan", "state_update")),
    ("norms", ("rms_norm", "layer_norm")),
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    ("projections", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "aten::linear",
                     "aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "splitk")),
    # The greedy token: aten::max over the vocabulary (MaxOps kernels on CUDA).
    ("embedding / head gathers", ("embedding", "index_select", "gather", "argmax", "aten::max",
                                  "maxops")),
)
OTHER = "other (elementwise, copies)"


def phase_of(name: str) -> str:
    low = name.lower()
    for phase, keys in PHASES:
        if any(k in low for k in keys):
            return phase
    return OTHER


def _config(preset: str, num_layers, like_the_first: bool = False):
    """A preset name, or a config.json (any registered family) for a model of one's own size;
    cut to num_layers layers, every one of the first layer's type with like_the_first."""
    from tpssm.models import parse_config
    from tpssm.models.registry import presets, read_config_json, with_num_layers
    from tpssm.presets import preset_config

    if not preset.endswith(".json") and preset not in presets():
        preset_config(preset)  # the unknown preset's error
    raw = read_config_json(preset) if preset.endswith(".json") else dict(presets()[preset])
    if num_layers is not None:
        raw = with_num_layers(raw, num_layers)
        if like_the_first and "layers_block_type" in raw:  # a hybrid's
            raw["layers_block_type"] = raw["layers_block_type"][:1] * num_layers
    return parse_config(raw)


def _build(preset: str, num_layers, tp_shard: int, dtype: torch.dtype, device: torch.device,
           vocab_parallel: bool = True, projection_kernel: str = "torch",
           sequence_parallel: bool = False, like_the_first: bool = False):
    from tpssm.models import build_model
    from tpssm.parallel import TPContext
    from tpssm.presets import RandomWeightSource

    config = _config(preset, num_layers, like_the_first)
    ctx = TPContext.local_shard(tp_shard, device) if tp_shard > 1 else TPContext(device=device)
    model = build_model(config, ctx, dtype, vocab_parallel=vocab_parallel)
    model.set_projection_kernel(projection_kernel)
    if sequence_parallel:
        model.set_sequence_parallel(True, min_tokens=1)
    with torch.no_grad():
        model.load_weights(RandomWeightSource(config, seed=0, device=device))
    return config, model


def _median_ms(fn, steps: int, cuda: bool) -> float:
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def profile(preset: str, batch: int, tp_shard: int = 1, num_layers=None, steps: int = 5,
            prompt_len: int = 16, dtype: torch.dtype = torch.bfloat16, device=None,
            phase: str = "decode", vocab_parallel: bool = True,
            projection_kernel: str = "torch", sequence_parallel: bool = False,
            count_per_layer: bool = True, like_the_first: bool = False) -> dict:
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    config, model = _build(preset, num_layers, tp_shard, dtype, device, vocab_parallel,
                           projection_kernel, sequence_parallel, like_the_first)
    # Decode appends a token a step: warm-up, the timed steps and the profiled steps.
    cache = model.allocate_cache(batch, max_seq_len=prompt_len + 2 * steps + 4)
    slots = torch.tensor(cache.allocate(batch), dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(config.vocab_size, (batch * prompt_len,), generator=g).to(device)
    qsl = torch.arange(0, batch * prompt_len + 1, prompt_len, dtype=torch.int32, device=device)
    fresh = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = torch.randint(config.vocab_size, (batch,), generator=g).to(device)

    def prefill():
        # Fresh prompts every time: the same work per step whatever the slots hold. A hybrid's
        # KV lengths restart too (the prefill of a fresh sequence resets its slot).
        model(ids, qsl, slots, fresh, cache)

    def decode():
        # The engine's decode step: this rank's logit columns and the greedy tokens.
        model.greedy_tokens(model.decode(tokens, slots, cache, gather_logits=False))

    step = prefill if phase == "prefill" else decode
    with torch.no_grad():
        prefill()
        step()  # warm-up: kernels loaded, allocator blocks ready, plans built
        if cuda:
            torch.cuda.synchronize(device)
        step_ms = _median_ms(step, steps, cuda)
        activities = [torch.profiler.ProfilerActivity.CUDA if cuda
                      else torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize(device)
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (ev.device_type != torch.autograd.DeviceType.CPU
                         or not ev.name.startswith(("aten::", "tpssm::"))
                         or ev.cpu_parent is not None):
            continue  # on the CPU: the top-level ops, standing in for kernels
        k = kernels[ev.name]
        k[0] += 1
        k[1] += (ev.device_time_total if cuda else ev.cpu_time_total)
    rows = sorted(({"name": n, "phase": phase_of(n), "launches_per_step": c / steps,
                    "us_per_step": t / steps}
                   for n, (c, t) in kernels.items()), key=lambda r: -r["us_per_step"])
    phases: Dict[str, Dict[str, float]] = {}
    for r in rows:
        p = phases.setdefault(r["phase"], {"us_per_step": 0.0, "launches_per_step": 0.0})
        p["us_per_step"] += r["us_per_step"]
        p["launches_per_step"] += r["launches_per_step"]
    per_step = sum(r["launches_per_step"] for r in rows)
    layers = config.num_hidden_layers
    outside = None
    if count_per_layer:
        # The kernels a step runs once whatever its depth (embedding, final norm, head, greedy
        # exchange), so that kernels_per_layer counts the layers' own: the same step at one and
        # two layers like the first gives k(1) = out + a, k(2) = out + 2a.
        depth = [profile(preset, batch, tp_shard, n, 1, prompt_len, dtype, device, phase,
                         vocab_parallel, projection_kernel, sequence_parallel,
                         count_per_layer=False, like_the_first=True)["kernels_per_step"]
                 for n in (1, 2)]
        outside = 2 * depth[0] - depth[1]
    return {"preset": preset, "phase": phase, "num_layers": layers,
            "tp_shard": tp_shard, "batch": batch,
            "lm_head": "vocab-parallel" if model.vocab_parallel else "whole",
            "lm_head_rows": model.lm_head.shape[0], "projection_kernel": projection_kernel,
            # Whether the profiled step ran sequence-parallel (prefill of a tp > 1 shard).
            "sequence_parallel": (model.sequence_parallel and tp_shard > 1
                                  and phase == "prefill"),
            "prompt_len": prompt_len if phase == "prefill" else None, "dtype": str(dtype),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "kind": "cuda kernels" if cuda else "cpu ops",
            "kernels_per_step": per_step, "kernels_outside_layers": outside,
            "kernels_per_layer": (per_step - (outside or 0)) / layers,
            "device_us_per_step": sum(r["us_per_step"] for r in rows),
            "step_ms_median_unprofiled": step_ms, "phases": phases, "kernels": rows}


def shard_table(results: List[dict]) -> List[dict]:
    """Per phase: us per step of each shard and tp 1 / shard (results[0] must be tp 1)."""
    base = results[0]
    names = sorted({p for r in results for p in r["phases"]},
                   key=lambda p: -base["phases"].get(p, {"us_per_step": 0.0})["us_per_step"])
    table = []
    for name in names + ["total"]:
        row = {"phase": name}
        for r in results:
            us = (r["device_us_per_step"] if name == "total"
                  else r["phases"].get(name, {"us_per_step": 0.0})["us_per_step"])
            row[f"tp{r['tp_shard']}_us"] = us
            b = row[f"tp{base['tp_shard']}_us"]
            if r is not base:
                row[f"speedup_tp{r['tp_shard']}"] = b / us if us > 0 else None
        table.append(row)
    return table


def _print_one(res: dict) -> None:
    what = (f"prefill of {res['batch']} x {res['prompt_len']}" if res["phase"] == "prefill"
            else f"decode batch {res['batch']}")
    print(f"{res['preset']} ({res['num_layers']} layers) tp shard {res['tp_shard']} {what} on "
          f"{res['device']}: {res['kernels_per_step']:.0f} {res['kind']} a step, "
          f"{res['kernels_per_layer']:.1f} a layer and {res['kernels_outside_layers']:.0f} "
          f"outside the layers, {res['device_us_per_step']:.0f} us a step "
          f"(profiled), {res['step_ms_median_unprofiled']:.3f} ms a step unprofiled")
    for r in res["kernels"][:25]:
        print(f"  {r['us_per_step']:10.1f} us  x{r['launches_per_step']:6.1f}  "
              f"{r['phase'][:12]:<12}  {r['name'][:80]}")


def _print_shards(table: List[dict], shards: List[int]) -> None:
    head = f"{'phase':<30}" + "".join(f"{f'tp{t} us':>12}" for t in shards) + "".join(
        f"{f'x tp{t}':>9}" for t in shards[1:])
    print("\nper-phase device time per step, tp 1 against the rank shards (ideal x = tp for "
          "sharded work, x1 for replicated work):")
    print(head)
    for row in table:
        line = f"{row['phase']:<30}" + "".join(f"{row[f'tp{t}_us']:12.1f}" for t in shards)
        for t in shards[1:]:
            s = row.get(f"speedup_tp{t}")
            line += f"{s:9.2f}" if s else f"{'-':>9}"
        print(line)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mamba-2.8b",
                   help="model preset, or a config.json path (default mamba-2.8b)")
    p.add_argument("--phase", default="decode", choices=("decode", "prefill"),
                   help="which step to profile (default decode)")
    p.add_argument("--num-layers", type=int, default=None, help="layers (default: all)")
    p.add_argument("--batch", type=int, default=1, help="requests in the step (default 1)")
    p.add_argument("--prompt-len", type=int, default=16,
                   help="tokens per request of the prefill (default 16)")
    p.add_argument("--tp-shard", type=int, default=1,
                   help="profile rank 0's shard of this tp degree (default 1: the whole model)")
    p.add_argument("--tp-shards", default="",
                   help="comma-separated tp degrees starting with 1 (e.g. 1,2,4): profile each "
                        "shard and print the per-phase comparison (overrides --tp-shard)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    p.add_argument("--replicated-head", action="store_true",
                   help="a shard holds the whole LM head (default: its vocabulary rows, as the "
                        "models do under TP)")
    p.add_argument("--projection-kernel", default="torch", choices=("torch", "gemv"),
                   help="decode-sized projections through F.linear (cuBLAS) or tpssm.ops.gemv "
                        "(default torch)")
    p.add_argument("--programmatic-launch", action="store_true",
                   help="the decode-step kernels with programmatic dependent launch (sm_90+)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="prefill steps of the tp shards sequence-parallel")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="weights and activations (default bfloat16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    for name in ("batch", "prompt_len", "steps", "tp_shard"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        shards = [int(v) for v in args.tp_shards.split(",") if v.strip()] or [args.tp_shard]
    except ValueError:
        p.error(f"--tp-shards must be comma-separated integers, got {args.tp_shards!r}")
    if args.tp_shards and (shards[0] != 1 or any(t < 1 for t in shards)):
        p.error(f"--tp-shards must start with 1 and hold degrees >= 1, got {args.tp_shards!r}")
    from tpssm import ops

    ops.set_programmatic_launch(args.programmatic_launch)
    results = []
    for tp in shards:
        res = profile(args.preset, args.batch, tp, args.num_layers, args.steps,
                      prompt_len=args.prompt_len, dtype=getattr(torch, args.dtype),
                      device=args.device, phase=args.phase,
                      vocab_parallel=not args.replicated_head,
                      projection_kernel=args.projection_kernel,
                      sequence_parallel=args.sequence_parallel)
        res["programmatic_launch"] = args.programmatic_launch
        _print_one(res)
        results.append(res)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out: dict = results[0]
    if len(results) > 1:
        table = shard_table(results)
        _print_shards(table, shards)
        out = {"phase": args.phase, "preset": args.preset, "shards": results,
               "per_phase": table}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
