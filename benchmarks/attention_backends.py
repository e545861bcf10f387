"""Which scaled_dot_product_attention backend serves each hybrid preset's attention shape, and
how fast: for every preset's (local heads at tp 1 / 2 / 4, head_dim) a prefill call (one
sequence, causal) and a decode call (a batch of single queries over max_len keys with a length
mask, as HybridForCausalLM's decode runs it), each under every backend torch offers, timed where
it runs. Zamba-7B's head_dim 464 is past the flash kernels' limit (256): this shows what it falls
to. Beside them, the models' own decode path on CUDA: tpssm.ops.decode_attention reading a slot
cache in place (rows holding half of max_len keys, as the SDPA rows' mask), at batch 1 and
--batch, in one block per (row, head) and with the automatic key splits - its bytes (the keys
and values it reads) against the copy bandwidth measured in the same run, timed by CUDA-graph
replays over caches that fill three L2s (the SDPA backends are timed per call, host time
included). JSON to --json; a table on stdout.

    python benchmarks/attention_backends.py --json out.json [--prompt-len 2048 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _time(fn, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _shapes():
    from tpssm.presets import PRESETS, preset_config

    for name in sorted(PRESETS):
        if not name.startswith("zamba"):
            continue
        a = preset_config(name).attention
        for tp in (1, 2, 4):
            if a.num_heads % tp == 0:
                yield name, tp, a.num_heads // tp, a.head_dim, a.scale


def _decode_op_rows(name, tp, heads, hd, scale, args, dev, dtype, copy_gbs):
    """tpssm.ops.decode_attention over a slot cache, one block per (row, head) and automatic
    splits, at batch 1 and args.batch: CUDA-graph replays (no host time in the figure) over
    enough caches to fill three L2s (each replay reads its keys from DRAM, as a decode step
    does after the layers between two visits)."""
    from bench_ssm_ops import MAX_SETS, l2_bytes, time_graph
    from tpssm import ops

    rows = []
    M = args.max_len
    for batch in sorted({1, args.batch}):
        cache_bytes = 2 * batch * heads * M * hd * torch.finfo(dtype).bits // 8
        num_sets = max(1, min(MAX_SETS, math.ceil(3 * l2_bytes() / cache_bytes)))
        sets = [dict(k=torch.randn(batch, heads, M, hd, device=dev, dtype=dtype),
                     v=torch.randn(batch, heads, M, hd, device=dev, dtype=dtype),
                     q=torch.randn(batch, heads, hd, device=dev, dtype=dtype),
                     out=torch.empty(batch, heads, hd, device=dev, dtype=dtype))
                for _ in range(num_sets)]
        slots = torch.arange(batch, device=dev)
        lengths = torch.full((batch,), M // 2, device=dev)
        read = 2 * batch * heads * (M // 2) * hd * torch.finfo(dtype).bits // 8
        for splits in (1, 0):
            used = splits or ops.decode_attention_splits(
                heads, M, torch.cuda.get_device_properties(dev).multi_processor_count)
            row = dict(preset=name, tp=tp, heads=heads, head_dim=hd, case="decode_op",
                       backend="tpssm " + ("auto splits" if splits == 0 else "one block"),
                       splits=used, batch=batch, keys=M // 2, device=str(dev),
                       dtype=str(dtype), cache_sets=num_sets)
            try:
                ms = time_graph(lambda st, splits=splits: ops.decode_attention(
                    st["q"], st["k"], st["v"], slots, lengths, scale, out=st["out"],
                    num_splits=splits), sets, args.repeats)
                s = ms * 1e-3
                row.update(ms=ms, bytes=read, gbs=read / s / 1e9,
                           pct_of_copy=100 * read / s / 1e9 / copy_gbs)
            except RuntimeError as e:
                row["error"] = str(e).splitlines()[0][:160]
            rows.append(row)
            ms = (f"{row['ms']:9.3f}  {row['pct_of_copy']:5.1f}% of copy" if "ms" in row
                  else "        -")
            print(f"{name:12s} tp {tp} heads {heads:3d} hd {hd:4d} decode_op {row['backend']:16s}"
                  f" batch {batch:3d} {ms}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--prompt-len", type=int, default=2048, help="prefill tokens (default 2048)")
    p.add_argument("--batch", type=int, default=8, help="decode rows (default 8)")
    p.add_argument("--max-len", type=int, default=4096, help="decode keys per row (default 4096)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per point (default 10)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    import tpssm

    decode_op = dev.type == "cuda" and tpssm.has_cuda_kernels()
    if decode_op:
        from bench_ssm_ops import copy_bandwidth
    copy_gbs = copy_bandwidth() if decode_op else None
    if decode_op:
        print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s", flush=True)
    for name, tp, heads, hd, scale in _shapes():
        L, B, M = args.prompt_len, args.batch, args.max_len
        q = torch.randn(1, heads, L, hd, device=dev, dtype=dtype)
        dq = torch.randn(B, heads, 1, hd, device=dev, dtype=dtype)
        dk = torch.randn(B, heads, M, hd, device=dev, dtype=dtype)
        mask = (torch.arange(M, device=dev)[None, :] < torch.full((B, 1), M // 2, device=dev))
        cases = {"prefill": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True,
                                                                    scale=scale),
                 "decode": lambda: F.scaled_dot_product_attention(
                     dq, dk, dk, attn_mask=mask[:, None, None, :], scale=scale)}
        for case, fn in cases.items():
            for backend, kind in BACKENDS.items():
                row = dict(preset=name, tp=tp, heads=heads, head_dim=hd, case=case,
                           backend=backend, device=str(dev), dtype=str(dtype))
                try:
                    with sdpa_kernel([kind]):
                        row["ms"] = 1e3 * _time(fn, dev, args.repeats)
                except RuntimeError as e:
                    row["error"] = str(e).splitlines()[0][:160]
                rows.append(row)
                ms = f"{row['ms']:9.3f}" if "ms" in row else "        -"
                print(f"{name:12s} tp {tp} heads {heads:3d} hd {hd:4d} {case:8s} {backend:9s} {ms}",
                      flush=True)
        if decode_op:
            rows += _decode_op_rows(name, tp, heads, hd, scale, args, dev, dtype, copy_gbs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                       "torch": torch.__version__, "args": vars(args),
                       "copy_bandwidth_gbs": copy_gbs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
