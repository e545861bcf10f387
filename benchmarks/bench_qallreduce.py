"""Quantized all-reduce: bytes on the wire per scheme and the kernels' own time per message size.

What is measured and what is modelled:
- wire bytes (per rank, per all-reduce): exact for int8 / fp8 (the sizes of the buffers this
  implementation sends, checked against the formula), modelled for exact / fp16 (a ring
  all-reduce sends 2(N-1)/N * M * elem_bytes).
- kernel time (MEASURED on the device named in the output): one rank's quantize-pack of the
  whole message, its reduce-requantize of N received chunks and the dequantize of the gathered
  result - the compute a rank adds to the exchange. On a GPU: CUDA events around a CUDA graph
  of 20 back-to-back calls, per call (the kernels' own time, without the host's dispatch gap);
  wall clock on the CPU (CPU kernel figures are for completeness).
- link time saved (MODELLED): (bf16 ring bytes - int8 bytes) / link bandwidth, for PCIe 4 at
  22 GB/s and H100 NVLink at 450 GB/s per direction; overhead_fraction = kernel time / time saved
  (below 1: the quantized path wins on that link, ignoring latency and overlap).

    PYTHONPATH=python python benchmarks/bench_qallreduce.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ssm_ops import time_graph  # noqa: E402  (the same CUDA-graph timer)

import tpssm  # noqa: E402
import tpssm.qallreduce as Q  # noqa: E402
from tpssm.bench import git_commit  # noqa: E402
from tpssm.reference.qallreduce import qar_layout  # noqa: E402

LINKS_GBPS = {"pcie4": 22.0, "nvlink_h100": 450.0}
SCHEMES = ("exact", "fp16", "int8", "fp8")


def measured_wire_bytes(x: torch.Tensor, n: int, group_size: int, codec: str) -> int:
    """Bytes this rank sends in the two-shot exchange, from the buffers the ops actually fill:
    the send buffer minus its own chunk (all-to-all) plus its chunk to N-1 peers (all-gather)."""
    send = Q.quantize_pack(x, n, group_size, codec)
    cb = send.numel() // n
    mine = Q.reduce_requant(send, x.numel(), n, group_size, codec)
    return (send.numel() - cb) + mine.numel() * (n - 1)


CALLS_PER_GRAPH = 20


def time_fn(fn, device: str, iters: int, warmup: int = 3) -> float:
    """Median time of fn() in microseconds. On CUDA: CALLS_PER_GRAPH calls captured in one CUDA
    graph, replayed between two events, per call - timing single eager calls counts the host's
    dispatch gap before each launch (~15 us from Python on an H200, whatever the message size),
    which hides the kernels' own time."""
    if device == "cuda":
        return 1e3 * time_graph(lambda _: fn(), [None] * CALLS_PER_GRAPH, iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def bench_kernels(tokens, hidden, n, group_size, codec, dtype, device, iters):
    numel = tokens * hidden
    lay = qar_layout(numel, n, group_size)
    cb = lay["chunk_bytes"]
    # Rotating inputs keep a GPU run from measuring L2-resident data for mid-sized messages.
    num_inputs = 3 if device == "cuda" else 1
    xs = [torch.randn(tokens, hidden, device=device).to(dtype) for _ in range(num_inputs)]
    send = torch.empty(n * cb, dtype=torch.uint8, device=device)
    mine = torch.empty(cb, dtype=torch.uint8, device=device)
    out = torch.empty_like(xs[0])
    cid = Q._codec_id(codec)
    ops = torch.ops.tpssm
    ops.qar_quantize_pack(xs[0], n, group_size, cid, send)
    ops.qar_reduce_requant(send, numel, n, group_size, cid, mine)
    gathered = torch.cat([mine] * n)
    state = {"i": 0}

    def quantize():
        state["i"] = (state["i"] + 1) % num_inputs
        ops.qar_quantize_pack(xs[state["i"]], n, group_size, cid, send)

    t_q = time_fn(quantize, device, iters)
    t_r = time_fn(lambda: ops.qar_reduce_requant(send, numel, n, group_size, cid, mine), device,
                  iters)
    t_d = time_fn(lambda: ops.qar_dequant(gathered, n, group_size, cid, None, out), device, iters)
    return {"quantize_us": t_q, "reduce_us": t_r, "dequant_us": t_d,
            "total_us": t_q + t_r + t_d}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="1,16,128,512,2048")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--world-sizes", default="2,4,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = args.device
    if device == "cuda" and not (torch.cuda.is_available() and tpssm.has_cuda_kernels()):
        raise SystemExit("--device cuda needs a GPU and the CUDA build of tpssm")
    G = args.group_size
    elem = torch.empty(0, dtype=dtype).element_size()
    device_name = (torch.cuda.get_device_name() if device == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)")
    rows = []
    print(f"# kernel times MEASURED on {device_name}; link times MODELLED "
          f"({', '.join(f'{k} {v} GB/s' for k, v in LINKS_GBPS.items())})")
    print(f"# {'tokens':>6} {'N':>2} {'exact MiB':>10} {'fp16 MiB':>9} {'int8 MiB':>9} "
          f"{'ratio':>6} {'kern us':>9} {'saved us pcie':>13} {'frac pcie':>9} "
          f"{'saved us nvl':>12} {'frac nvl':>8}")
    for n in map(int, args.world_sizes.split(",")):
        for tokens in map(int, args.tokens.split(",")):
            numel = tokens * args.hidden
            wire = {s: Q.wire_bytes(numel, n, s, G, elem) for s in SCHEMES}
            x = torch.randn(tokens, args.hidden).to(dtype)
            for codec in ("int8", "fp8"):
                sent = measured_wire_bytes(x, n, G, codec)
                assert sent == wire[codec], (codec, sent, wire[codec])
            kern = bench_kernels(tokens, args.hidden, n, G, "int8", dtype, device, args.iters)
            saved = wire["exact"] - wire["int8"]
            link = {}
            for name, gbps in LINKS_GBPS.items():
                saved_us = saved / (gbps * 1e3)
                link[name] = {"exact_us": wire["exact"] / (gbps * 1e3),
                              "int8_us": wire["int8"] / (gbps * 1e3),
                              "saved_us": saved_us,
                              "overhead_fraction": kern["total_us"] / saved_us}
            rows.append({"tokens": tokens, "hidden": args.hidden, "world_size": n,
                         "group_size": G, "dtype": args.dtype, "numel": numel,
                         "wire_bytes": wire, "wire_bytes_checked_against_buffers": True,
                         "kernel_us_measured": kern, "link_modelled": link})
            print(f"  {tokens:>6} {n:>2} {wire['exact'] / 2**20:>10.3f} "
                  f"{wire['fp16'] / 2**20:>9.3f} {wire['int8'] / 2**20:>9.3f} "
                  f"{wire['int8'] / max(wire['exact'], 1):>6.3f} {kern['total_us']:>9.1f} "
                  f"{link['pcie4']['saved_us']:>13.1f} {link['pcie4']['overhead_fraction']:>9.3f} "
                  f"{link['nvlink_h100']['saved_us']:>12.1f} "
                  f"{link['nvlink_h100']['overhead_fraction']:>8.3f}")
    result = {"device": device, "device_name": device_name,
              "kernel_times": "measured", "link_times": "modelled",
              "kernel_timing": "cuda graph of 20 calls, per call" if device == "cuda"
              else "wall clock per call",
              "links_gbps": LINKS_GBPS, "torch": torch.__version__, "cuda": torch.version.cuda,
              "git_commit": git_commit() or "unknown",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
