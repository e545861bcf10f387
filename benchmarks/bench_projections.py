"""Benchmark of the decode-sized projections (GEMV-like GEMMs, M = 1..8 tokens) of each preset's
per-rank shards against their bytes.

At decode a projection reads its whole weight for a handful of tokens, so it is bound by the
weight bytes: its floor is bytes / copy bandwidth. For every projection of a layer (in_proj,
x_proj, dt_proj, out_proj; Mamba-2: in_proj, out_proj) and the head, at tp 1 / 2 / 4 and M
tokens, this times torch's F.linear (cuBLAS) and tpssm.ops.gemv side by side on the rank's weight
shape, the same weights for both (with --gemv-sweep, gemv at every explicit launch option too;
with --in-proj-conv, in_proj followed by its decode conv three ways: cuBLAS + causal_conv1d_update,
gemv + causal_conv1d_update, and the fused gemv_conv_update; and the layer's norm before it two
ways: add_rms_norm + gemv_conv_update, and gemv_conv_update with its norm prologue, the one
launch the models run): median time per
call (CUDA events around CUDA-graph replays, weights rotated over enough copies to miss the L2
cache), the bytes (weight + activations in and out), GB/s and % of the copy bandwidth measured in
the same run. The issue's bar is 80% of the copy bandwidth.

    python benchmarks/bench_projections.py [--presets mamba-2.8b,...] [--tokens 1,2,4,8]
        [--kernels torch,gemv] [--gemv-sweep] [--in-proj-conv] [--json P]

Without CUDA it prints that CUDA is required and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

PRESETS = ("mamba-2.8b", "falcon-mamba-7b", "mamba2-2.7b")
ACT = torch.bfloat16


def projections(config, tp: int) -> List[Tuple[str, int, int]]:
    """(name, out_features, in_features) of one layer's projections on rank 0 of tp, and the head
    (split by vocabulary rows). Rank 0 holds the largest share of an uneven split."""
    from tpssm.models.mixers import mamba2_local_groups
    from tpssm.parallel import shard_range

    D, N, V = config.hidden_size, config.state_size, config.vocab_size

    def local(n):
        a, b = shard_range(n, tp, 0, "projection")
        return b - a

    if config.family == "mamba2":
        H, P, G = config.num_heads, config.head_dim, config.n_groups
        h0, h1 = shard_range(H, tp, 0, "num_heads")
        heads = h1 - h0
        groups = len(mamba2_local_groups(H, G, h0, h1)[0])
        El = heads * P
        rows = 2 * El + 2 * groups * N + heads
        layer = [("in_proj", rows, D), ("out_proj", D, El)]
    else:
        E, R = config.intermediate_size, config.time_step_rank
        El = local(E)
        layer = [("in_proj", 2 * El, D), ("x_proj", R + 2 * N, El), ("dt_proj", El, R),
                 ("out_proj", D, El)]
    return layer + [("lm_head", local(V), D)]


def in_proj_conv(config, tp: int) -> Tuple[int, int, int]:
    """(first column, channels, width) of the decode conv over rank 0's in_proj output: Mamba's
    x columns, Mamba-2's x | B | C after z."""
    from tpssm.models.mixers import mamba2_local_groups
    from tpssm.parallel import shard_range

    if config.family == "mamba2":
        H, P, G = config.num_heads, config.head_dim, config.n_groups
        h0, h1 = shard_range(H, tp, 0, "num_heads")
        groups = len(mamba2_local_groups(H, G, h0, h1)[0])
        El = (h1 - h0) * P
        return El, El + 2 * groups * config.state_size, config.conv_kernel
    e0, e1 = shard_range(config.intermediate_size, tp, 0, "intermediate_size")
    return 0, e1 - e0, config.conv_kernel


# gemv's explicit launch options, timed by --gemv-sweep: (warps_per_row, rows_per_warp).
GEMV_OPTIONS = [(w, r) for w in (1, 2, 4, 8) for r in (1, 2, 4)]


def run(preset: str, tp: int, name: str, n_out: int, n_in: int, m: int, copy_gbs: float,
        reps: int, kernels: List[str], sweep: bool, conv=None, device: str = "cuda") -> List[Dict]:
    """One row per kernel ('torch': F.linear's cuBLAS GEMM; 'gemv': tpssm.ops.gemv with its
    automatic plan; with sweep, 'gemv w<W> r<R>' for every explicit launch option) on the same
    weights. gemv's result is checked against torch's on the first set (max_abs_diff).
    conv: (first column, channels, width) of in_proj's decode conv, to time the product with
    the conv as well: 'torch + conv_update' and 'gemv + conv_update' (the separate ops, for the
    kernels asked for) and 'gemv_conv_update' (fused, with gemv). Their bytes add a nominal
    conv count (state read and written, weights, one output) to the product's; their
    speedup_vs_torch is against 'torch + conv_update'; the fused row's conv columns and state
    are checked once against the separate ops (conv_max_abs_diff_vs_separate). With gemv, the
    layer's norm too (an fp32 residual stream): 'add_rms_norm + gemv_conv_update' and
    'gemv_conv_update + norm prologue' (speedup_vs_separate_norm; outputs, state and stream
    checked once against each other: norm_max_abs_diff_vs_separate, 0 expected).
    device: where the tensors live (the tests run the rows' logic on the CPU with the timing
    stubbed)."""
    from bench_ssm_ops import MAX_SETS, l2_bytes, time_graph
    from tpssm import ops

    weight_bytes = n_out * n_in * 2
    # Three L2s of weight copies, so that each replay reads its weight from DRAM, as a decode
    # step does (a layer's weight comes back after every other layer's): a cap of 64 copies
    # kept the tp 4 shard's x_proj and dt_proj (0.4-0.5 MB) in a 50 MB L2.
    copies = max(1, min(MAX_SETS, math.ceil(3 * l2_bytes() / weight_bytes)))
    sets = [dict(w=torch.randn(n_out, n_in, device=device).to(ACT),
                 x=torch.randn(m, n_in, device=device).to(ACT),
                 out=torch.empty(m, n_out, device=device, dtype=ACT)) for _ in range(copies)]
    variants = []
    if "torch" in kernels:
        # F.linear's GEMM into a fixed buffer
        variants.append(("torch", lambda s: torch.matmul(s["x"], s["w"].t(), out=s["out"])))
    if "gemv" in kernels:
        variants.append(("gemv", lambda s: ops.gemv(s["x"], s["w"], out=s["out"])))
        if sweep:
            for w, r in GEMV_OPTIONS:
                variants.append((f"gemv w{w} r{r}",
                                 lambda s, w=w, r=r: ops.gemv(s["x"], s["w"], out=s["out"],
                                                              warps_per_row=w, rows_per_warp=r)))
    conv_variants, conv_bytes, norm_bytes = [], 0, 2 * m * n_in * (1 + 4) + 2 * n_in
    if conv is not None:
        start, dim, width = conv
        for s in sets:
            s.update(conv_state=torch.randn(m, dim, width - 1, device=device).to(ACT),
                     conv_w=torch.randn(dim, width, device=device).to(ACT),
                     conv_out=torch.empty(m, dim, device=device, dtype=ACT))
        # nominal: the state read and written, the conv weights, the conv output written
        conv_bytes = 2 * (2 * m * dim * (width - 1) + dim * width + m * dim)

        def then_conv(s):
            ops.causal_conv1d_update(s["out"][:, start:start + dim], s["conv_state"], s["conv_w"],
                                     activation="silu", out=s["conv_out"])

        def fused(s, state=None, x=None, **norm):
            return ops.gemv_conv_update(s["x"] if x is None else x, s["w"], None,
                                        s["conv_state"] if state is None else state, s["conv_w"],
                                        conv_start=start, activation="silu", out=s["out"], **norm)

        if "torch" in kernels:
            conv_variants.append(("torch + conv_update", lambda s: (
                torch.matmul(s["x"], s["w"].t(), out=s["out"]), then_conv(s))))
        if "gemv" in kernels:
            conv_variants += [
                ("gemv + conv_update", lambda s: (ops.gemv(s["x"], s["w"], out=s["out"]),
                                                  then_conv(s))),
                ("gemv_conv_update", fused)]
            # Once, outside the graphs: the fused op against gemv + conv update from one state.
            s0 = sets[0]
            state = s0["conv_state"].clone()
            cols = fused(s0, state)[:, start:start + dim].float().clone()  # out is reused
            ops.gemv(s0["x"], s0["w"], out=s0["out"])
            then_conv(s0)
            conv_check = max((cols - s0["conv_out"].float()).abs().max().item(),
                             (state.float() - s0["conv_state"].float()).abs().max().item())
            # The layer's norm before it: the previous layer's output `prev` and the fp32
            # residual stream, as add_rms_norm then gemv_conv_update, and as its norm prologue.
            for s in sets:
                s.update(prev=torch.randn(m, n_in, device=device).to(ACT),
                         stream=torch.randn(m, n_in, device=device),
                         stream_out=torch.empty(m, n_in, device=device),
                         norm_w=torch.rand(n_in, device=device).to(ACT),
                         normed=torch.empty(m, n_in, device=device, dtype=ACT))

            def prologue(s):
                return dict(norm_weight=s["norm_w"], residual=s["stream"],
                            residual_out=s["stream_out"])

            def norm_then_fused(s, state=None):
                ops.add_rms_norm(s["prev"], s["norm_w"], 1e-5, residual=s["stream"],
                                 out=s["normed"])
                return fused(s, state, x=s["normed"])

            conv_variants += [
                ("add_rms_norm + gemv_conv_update", norm_then_fused),
                ("gemv_conv_update + norm prologue",
                 lambda s: fused(s, x=s["prev"], **prologue(s)))]
            # Once: both ways from one stream and state (the separate norm updates the stream in
            # place, so it runs on a copy).
            state, stream = s0["conv_state"].clone(), s0["stream"].clone()
            whole = fused(s0, state, x=s0["prev"], **prologue(s0)).float().clone()
            sep_state, sep_stream = s0["conv_state"].clone(), s0["stream"].clone()
            ops.add_rms_norm(s0["prev"], s0["norm_w"], 1e-5, residual=sep_stream,
                             out=s0["normed"])
            sep = fused(s0, sep_state, x=s0["normed"]).float()
            norm_check = max((whole - sep).abs().max().item(),
                             (state.float() - sep_state.float()).abs().max().item(),
                             (s0["stream_out"] - sep_stream).abs().max().item())
            assert torch.equal(stream, s0["stream"]), "the prologue only reads the residual"
    want = torch.matmul(sets[0]["x"].float(), sets[0]["w"].float().t())
    rows = []
    for label, fn in variants + conv_variants:
        ms = time_graph(fn, sets, reps)  # its replays leave this variant's result in each set
        normed = "norm" in label
        diff = (sets[0]["out"].float() - want)
        if label.startswith("gemv_conv_update"):  # its conv columns hold the conv output
            diff = torch.cat([diff[:, :start], diff[:, start + dim:]], 1)
        # (the norm rows multiply another input: checked against each other once instead)
        diff = None if normed else diff.abs().max().item() if diff.numel() else 0.0
        # nominal norm bytes: the previous output read, the fp32 stream read and written
        nbytes = (weight_bytes + 2 * m * (n_in + n_out) + (conv_bytes if "conv" in label else 0)
                  + (norm_bytes if normed else 0))
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(preset=preset, tp=tp, projection=name, kernel=label,
                         out_features=n_out, in_features=n_in, tokens=m, time_us=ms * 1e3,
                         bytes=nbytes, gbs=gbs, pct_copy=100.0 * gbs / copy_gbs,
                         weight_copies=copies, max_abs_diff_vs_fp32=diff))
        if label == "gemv_conv_update":
            rows[-1]["conv_max_abs_diff_vs_separate"] = conv_check
        if label == "gemv_conv_update + norm prologue":
            rows[-1]["norm_max_abs_diff_vs_separate"] = norm_check
    # The baseline timed in the same process, on the same weights: cuBLAS alone, or cuBLAS and
    # the separate conv for the conv rows; the norm rows against the separate norm.
    base = {b: next((r for r in rows if r["kernel"] == b), None)
            for b in ("torch", "torch + conv_update", "add_rms_norm + gemv_conv_update")}
    for r in rows:
        ref = base["torch + conv_update" if "conv" in r["kernel"] else "torch"]
        if "norm" in r["kernel"]:
            ref = None  # no cuBLAS row does the norm
        r["speedup_vs_torch"] = ref["time_us"] / r["time_us"] if ref else None
        if r["kernel"] == "gemv_conv_update + norm prologue":
            sep = base["add_rms_norm + gemv_conv_update"]
            r["speedup_vs_separate_norm"] = sep["time_us"] / r["time_us"]
    del sets
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS),
                   help=f"comma-separated presets (default {','.join(PRESETS)})")
    p.add_argument("--tps", default="1,2,4", help="tp degrees (default 1,2,4)")
    p.add_argument("--tokens", default="1,2,4,8", help="tokens per call (default 1,2,4,8)")
    p.add_argument("--reps", type=int, default=15, help="timed replays (default 15)")
    p.add_argument("--kernels", default="torch,gemv",
                   help="comma-separated: torch (F.linear / cuBLAS), gemv (tpssm.ops.gemv) "
                        "(default both)")
    p.add_argument("--gemv-sweep", action="store_true",
                   help="also time gemv at every explicit launch option (warps_per_row x "
                        "rows_per_warp)")
    p.add_argument("--in-proj-conv", action="store_true",
                   help="also time in_proj with its decode conv: cuBLAS or gemv followed by "
                        "causal_conv1d_update, and the fused gemv_conv_update; and with the "
                        "layer's norm: add_rms_norm before it, or its norm prologue "
                        "(tokens <= 8)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        tps = [int(v) for v in args.tps.split(",")]
        tokens = [int(v) for v in args.tokens.split(",")]
    except ValueError:
        p.error("--tps and --tokens take comma-separated integers")
    if min(tps + tokens) < 1 or args.reps < 1:
        p.error("--tps, --tokens and --reps take values >= 1")
    kernels = [k for k in args.kernels.split(",") if k]
    if not kernels or any(k not in ("torch", "gemv") for k in kernels):
        p.error(f"--kernels takes torch and / or gemv, got {args.kernels!r}")
    if max(tokens) > 8 and ("gemv" in kernels or args.in_proj_conv):
        p.error("gemv takes at most 8 tokens: lower --tokens or use --kernels torch")
    if not torch.cuda.is_available():
        print("bench_projections: CUDA is required (no CUDA device found); nothing to benchmark")
        return 0
    from bench_ssm_ops import copy_bandwidth
    from tpssm.bench import git_commit
    from tpssm.presets import preset_config

    copy_gbs = copy_bandwidth()
    results = []
    for preset in args.presets.split(","):
        config = preset_config(preset, None)
        for tp in tps:
            seen = set()
            for name, n_out, n_in in projections(config, tp):
                for m in tokens:
                    key = (n_out, n_in, m)
                    if key in seen:
                        continue
                    seen.add(key)
                    conv = (in_proj_conv(config, tp)
                            if args.in_proj_conv and name == "in_proj" else None)
                    rows = run(preset, tp, name, n_out, n_in, m, copy_gbs, args.reps,
                               kernels, args.gemv_sweep, conv)
                    results.extend(rows)
                    best = min((r for r in rows if "conv" not in r["kernel"]),
                               key=lambda r: r["time_us"])
                    line = "  ".join(f"{r['kernel']} {r['time_us']:.1f} us {r['pct_copy']:.0f}%"
                                     for r in rows if not r["kernel"].startswith("gemv w"))
                    if args.gemv_sweep:
                        line += f"  best: {best['kernel']} {best['time_us']:.1f} us"
                    print(f"{preset:<16} tp{tp} {name:<9} {n_out:>6} x {n_in:<6} M {m}: {line}",
                          flush=True)
    print(f"\ndevice copy bandwidth: {copy_gbs:.0f} GB/s; per kernel, the timings below 80% "
          "of it:")
    for k in sorted({r["kernel"] for r in results if not r["kernel"].startswith("gemv w")}):
        mine = [r for r in results if r["kernel"] == k]
        below = [r for r in mine if r["pct_copy"] < 80.0]
        print(f"  {k}: {len(below)} of {len(mine)}")
    if args.json:
        payload = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                       git_commit=git_commit() or "unknown",
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                           timespec="seconds"),
                       copy_bandwidth_gbs=copy_gbs, dtype=str(ACT), results=results)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
