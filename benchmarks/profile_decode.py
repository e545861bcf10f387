"""Kernels of one decode step: which kernels a layer launches and how long each takes.

Builds a preset with random weights (full depth by default) on one device, at tp 1 or as rank 0's
shard of tp N (TPContext.local_shard: the shard's compute, no communication), prefills a short
prompt per request, then profiles `--steps` eager decode steps with torch.profiler (the captured
CUDA graph replays the same kernels; the profiler attributes kernels inside a graph unreliably).
Prints the kernels of one step grouped by name (launches per step, microseconds per step) and
the totals: kernels per step and per layer, device time per step. JSON to --json.

    python benchmarks/profile_decode.py --preset mamba-2.8b --batch 1 --tp-shard 1 --json out.json

On a CPU it profiles the CPU ops instead (for a quick look, and for the test of this script).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import torch


def _build(preset: str, num_layers, tp_shard: int, dtype: torch.dtype, device: torch.device):
    from tpssm.models import build_model, load_config
    from tpssm.parallel import TPContext
    from tpssm.presets import RandomWeightSource, preset_config

    # A preset name, or a config.json (any registered family) for a model of one's own size.
    config = load_config(preset) if preset.endswith(".json") else preset_config(preset, num_layers)
    ctx = TPContext.local_shard(tp_shard, device) if tp_shard > 1 else TPContext(device=device)
    model = build_model(config, ctx, dtype)
    with torch.no_grad():
        model.load_weights(RandomWeightSource(config, seed=0, device=device))
    return config, model


def profile(preset: str, batch: int, tp_shard: int = 1, num_layers=None, steps: int = 5,
            prompt_len: int = 16, dtype: torch.dtype = torch.bfloat16, device=None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    config, model = _build(preset, num_layers, tp_shard, dtype, device)
    cache = model.allocate_cache(batch, max_seq_len=prompt_len + steps + 4)
    slots = torch.tensor(cache.allocate(batch), dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(config.vocab_size, (batch * prompt_len,), generator=g).to(device)
    qsl = torch.arange(0, batch * prompt_len + 1, prompt_len, dtype=torch.int32, device=device)
    tokens = torch.randint(config.vocab_size, (batch,), generator=g).to(device)
    with torch.no_grad():
        model(ids, qsl, slots, torch.zeros(batch, dtype=torch.bool, device=device), cache)
        model.decode(tokens, slots, cache)  # warm-up: kernels loaded, allocator blocks ready
        if cuda:
            torch.cuda.synchronize(device)
        activities = [torch.profiler.ProfilerActivity.CUDA if cuda
                      else torch.profiler.ProfilerActivity.CPU]
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                model.decode(tokens, slots, cache)
            if cuda:
                torch.cuda.synchronize(device)
        wall_ms = 1e3 * (time.perf_counter() - start) / steps
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
    rows = sorted(({"name": n, "launches_per_step": c / steps, "us_per_step": t / steps}
                   for n, (c, t) in kernels.items()), key=lambda r: -r["us_per_step"])
    per_step = sum(r["launches_per_step"] for r in rows)
    return {"preset": preset, "num_layers": config.num_hidden_layers, "tp_shard": tp_shard,
            "batch": batch, "dtype": str(dtype), "device": (torch.cuda.get_device_name(device)
                                                          if cuda else "cpu"),
            "kind": "cuda kernels" if cuda else "cpu ops",
            "kernels_per_step": per_step, "kernels_per_layer": per_step / config.num_hidden_layers,
            "device_us_per_step": sum(r["us_per_step"] for r in rows),
            "wall_ms_per_step_profiled": wall_ms, "kernels": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mamba-2.8b",
                   help="model preset, or a config.json path (default mamba-2.8b)")
    p.add_argument("--num-layers", type=int, default=None, help="layers (default: all)")
    p.add_argument("--batch", type=int, default=1, help="decode rows (default 1)")
    p.add_argument("--tp-shard", type=int, default=1,
                   help="profile rank 0's shard of this tp degree (default 1: the whole model)")
    p.add_argument("--steps", type=int, default=5, help="profiled decode steps (default 5)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="weights and activations (default bfloat16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    res = profile(args.preset, args.batch, args.tp_shard, args.num_layers, args.steps,
                  dtype=getattr(torch, args.dtype), device=args.device)
    print(f"{res['preset']} ({res['num_layers']} layers) tp shard {res['tp_shard']} batch "
          f"{res['batch']} on {res['device']}: {res['kernels_per_step']:.0f} {res['kind']} a "
          f"step, {res['kernels_per_layer']:.1f} a layer, {res['device_us_per_step']:.0f} us a "
          f"step")
    for r in res["kernels"][:25]:
        print(f"  {r['us_per_step']:10.1f} us  x{r['launches_per_step']:6.1f}  {r['name'][:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
