#!/usr/bin/env python3
"""Modelled tensor-parallel speedup of the engine, beside the paper's figures.

One GPU has no peers, so tp 2 / 4 is not measured end to end here. This report combines what was
measured with a documented link model:

  measured  tp 1 step times and rank 0's shard times at tp 2 / 4 (`tpssm bench --rank-shard`,
            collectives skipped) per phase, from the engine JSON; the quantize / reduce /
            dequantize kernel times of the int8 two-shot all-reduce, from bench_qallreduce JSON.
  assumed   per link preset: time of one collective = latency + wire bytes per rank / bus
            bandwidth; the engine's prefill chunking (max_prefill_tokens); the fp16 cast cost.
  modelled  tp N time of a phase = rank shard's measured time + the modelled time of every
            collective of the steps that phase spans (no overlap of communication with compute).

Every predicted number is labelled "modelled" in the table, the JSON and the plot. See
docs/tp-report.md for the model, its inputs and its limits.

    python benchmarks/tp_report.py \\
        --engine-json benchmarks/results/h100_*_engine_mamba-2.8b.json ... \\
        --qallreduce-json benchmarks/results/h100_*_bench_qallreduce.json \\
        --json out.json --plot out.png

Pure Python (matplotlib for the plot only): it does not import tpssm, so it runs without the
compiled extension. Model dimensions come from the presets' config dictionaries in
python/tpssm/models/mamba_family.py and zamba.py, read as source.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS_SOURCE = os.path.join(ROOT, "python", "tpssm", "models", "mamba_family.py")
HYBRID_PRESETS_SOURCE = os.path.join(ROOT, "python", "tpssm", "models", "zamba.py")

# arXiv 2602.21144 (docs/tp-design.md "What the paper claims"): batch-request throughput on A6000
# (PCIe) and A100 machines, Mamba-2.8B / Falcon-Mamba-7B / Zamba-7B.
PAPER = {
    "source": "arXiv 2602.21144, measured on NVIDIA A6000 (PCIe) and A100",
    "speedup": {2: (1.6, 2.1), 4: (2.6, 4.0)},
    "quantized_allreduce_gain": (0.10, 0.18),
    "quantized_allreduce": "fp32 payload cast to fp16 around a plain NCCL all-reduce",
}

SCHEMES = ("exact", "fp16", "int8", "fp8")
# The paper's fp16 variant halves an fp32 payload; our exact path already sends bf16, so the
# paper's gain is reproduced only against this hypothetical fp32 exact all-reduce.
REFERENCE_SCHEMES = ("exact_fp32",)
QUANT_GROUP_SIZES = (256, 128, 64, 32)  # tpssm.reference.qallreduce.SUPPORTED_GROUP_SIZES
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GREEDY_PAIR_BYTES = 16  # a row's (max, token) pair as 2 fp64 (CausalLM.greedy_tokens)


# ------------------------------------------------------------------------------------ links
@dataclass
class Link:
    """One collective costs latency_us + wire bytes per rank / bus_gbs (GB/s = 1e9 B/s)."""
    name: str
    bus_gbs: float
    latency_us: float
    source: str


LINKS: Dict[str, Link] = {
    "nvlink-h100": Link(
        "NVLink H100", 450.0, 8.0,
        "NVLink 4 (H100 SXM5, NVSwitch): 900 GB/s bidirectional = 450 GB/s per direction "
        "(NVIDIA H100 datasheet); nccl-tests all_reduce_perf busbw on 8x H100 SXM reaches "
        "~450-480 GB/s at large sizes, so 450 is the large-message ceiling (the figure "
        "docs/qallreduce.md and bench_qallreduce.py use); ~8 us is NCCL's small-message all-reduce "
        "time on NVLink (nccl-tests rows at 8 B)"),
    "nvlink-a100": Link(
        "NVLink A100", 230.0, 10.0,
        "NVLink 3 (A100 SXM4): 600 GB/s bidirectional = 300 GB/s per direction (NVIDIA A100 "
        "datasheet); nccl-tests all_reduce busbw on 8x A100 SXM4 ~200-250 GB/s "
        "(NVIDIA/nccl-tests issues 149, 178); 2x A100 NVLink at 8 B: 9.9 us (nccl-tests issue "
        "331)"),
    "pcie4-a6000": Link(
        "PCIe 4 A6000", 22.0, 20.0,
        "PCIe 4.0 x16: 32 GB/s per direction raw, ~22 GB/s achieved by NCCL through the host "
        "bridge (docs/qallreduce.md; the paper's A6000 machine has no NVLink); small-message "
        "latency over PCIe ~15-25 us, 20 us taken"),
}


def parse_link_override(text: str) -> Tuple[str, Dict[str, float]]:
    """'nvlink-h100:bw=400,lat=9' -> ('nvlink-h100', {'bus_gbs': 400.0, 'latency_us': 9.0})."""
    name, _, rest = text.partition(":")
    if name not in LINKS:
        raise ValueError(f"--link: unknown preset {name!r}, expected one of {sorted(LINKS)}")
    keys = {"bw": "bus_gbs", "lat": "latency_us"}
    out = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in keys:
            raise ValueError(f"--link {text!r}: keys are bw (GB/s) and lat (us), got {k!r}")
        out[keys[k]] = float(v)
    if not out:
        raise ValueError(f"--link {text!r}: give bw=GB/s and/or lat=us after the colon")
    return name, out


# -------------------------------------------------------------------------------- wire bytes
def wire_bytes(numel: int, n: int, scheme: str, group_size: int = 128,
               elem_bytes: int = 2) -> float:
    """Bytes each rank sends for one all-reduce of numel elements over n ranks.

    exact: ring all-reduce, 2(N-1)/N * M * elem_bytes. fp16: the same with 2-byte elements (a
    bf16 payload gains nothing). int8 / fp8 two-shot: (N-1) chunks in the all-to-all and (N-1)
    in the all-gather, 2(N-1)/N * M * (1 + 4/G) (codes plus one fp32 scale per group; the
    16-byte chunk padding is left out). exact_fp32: the exact ring on 4-byte elements.
    """
    if n == 1:
        return 0.0
    ring = 2.0 * (n - 1) / n * numel
    if scheme == "exact":
        return ring * elem_bytes
    if scheme == "fp16":
        return ring * 2
    if scheme == "exact_fp32":
        return ring * 4
    if scheme in ("int8", "fp8"):
        return ring * (1.0 + 4.0 / group_size)
    raise ValueError(f"unknown scheme {scheme!r}")


def quant_group_size(last_dim: int, requested: int = 128) -> int:
    """The group tpssm.parallel.TPContext.all_reduce picks (0: none fits, reduced exactly)."""
    return next((g for g in QUANT_GROUP_SIZES if g <= requested and last_dim % g == 0), 0)


# ---------------------------------------------------------------------------- model structure
def _source_values(path: str, names: Sequence[str], functions: Sequence[str] = ()) -> dict:
    """The top-level assignments `names` of a source file, evaluated in order with only `dict`,
    `list`, `range` and the top-level functions `functions` (annotations dropped) callable, so
    that the report needs neither torch nor the extension."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    ns: dict = {"__builtins__": {"dict": dict, "list": list, "range": range}}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            node.returns = None
            for a in node.args.args:
                a.annotation = None
            exec(compile(ast.Module([node], []), path, "exec"), ns)  # noqa: S102 (our source)
            continue
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in names:
            code = compile(ast.Expression(node.value), path, "eval")
            ns[target.id] = eval(code, ns)  # noqa: S307 (our own source)
    missing = [n for n in list(names) + list(functions) if n not in ns]
    if missing:
        raise ValueError(f"{path}: no top-level {', '.join(missing)}")
    return ns


def load_preset_configs(path: str = PRESETS_SOURCE,
                        hybrid_path: str = HYBRID_PRESETS_SOURCE) -> Dict[str, dict]:
    """Every preset's config dictionary: mamba_family.py's `_PRESETS` and zamba.py's Zamba /
    Zamba2 presets, evaluated from their source. A Zamba v1 config without layers_block_type
    gets the layer types the library derives (zamba.py's `_zamba_default_layers`)."""
    out = dict(_source_values(path, ["_PRESETS"])["_PRESETS"])
    ns = _source_values(hybrid_path, ["_ZAMBA2_DEFAULT_LAYERS", "_ZAMBA_PRESETS",
                                      "_ZAMBA2_COMMON", "_ZAMBA2_PRESETS"],
                        ["_every_sixth", "_zamba_default_layers"])
    for name, cfg in ns["_ZAMBA_PRESETS"].items():
        if not cfg.get("layers_block_type"):
            cfg = dict(cfg, layers_block_type=ns["_zamba_default_layers"](
                int(cfg["num_hidden_layers"]), int(cfg.get("attn_layer_period", 6)),
                int(cfg.get("attn_layer_offset", 4))))
        out[name] = cfg
    out.update(ns["_ZAMBA2_PRESETS"])
    return out


@dataclass
class ModelDims:
    name: str
    # "mamba1" (Mamba, Falcon-Mamba), "mamba2", or the hybrids "zamba" (multi-head Mamba-1
    # mixers) and "zamba2" (Mamba-2 mixers), whose "hybrid" layers also run a shared block
    family: str
    num_layers: int
    hidden: int          # D
    inner: int           # E
    dt_rank: int = 0     # R (Mamba-1, Zamba)
    d_state: int = 0     # N
    num_heads: int = 0   # H (Mamba-2, Zamba2)
    head_dim: int = 0    # P (Mamba-2, Zamba2)
    norm_groups: int = 1  # groups of the gated norm (Mamba-2, Zamba2)
    mixer_heads: int = 0  # Zamba: independent Mamba-1 heads of a mixer (n_mamba_heads)
    hybrid_layers: int = 0  # layers that run a shared attention + MLP block before the mixer
    first_layer_hybrid: bool = False

    @classmethod
    def from_config(cls, name: str, cfg: dict, num_layers: Optional[int] = None) -> "ModelDims":
        D = int(cfg["hidden_size"])
        layers = int(num_layers or cfg["num_hidden_layers"])
        if cfg["model_type"] in ("zamba", "zamba2"):
            # tpssm.models.zamba.parse_zamba_config's reading of the same keys (intermediate_size
            # is the shared block's MLP width there, not the mixer's).
            E = int(cfg.get("mamba_expand", 2) * D)
            N = int(cfg["mamba_d_state"])
            types = list(cfg["layers_block_type"])[:layers]
            hybrid = dict(hybrid_layers=types.count("hybrid"),
                          first_layer_hybrid=types[0] == "hybrid")
            heads = int(cfg["n_mamba_heads"])
            if cfg["model_type"] == "zamba":
                R = cfg.get("mamba_dt_rank", "auto")
                R = math.ceil(D / 16) if R in ("auto", None) else int(R)
                return cls(name, "zamba", layers, D, E, dt_rank=R, d_state=N, mixer_heads=heads,
                           **hybrid)
            # Zamba2's gated norm is per group (mamba_ngroups groups).
            return cls(name, "zamba2", layers, D, E, d_state=N, num_heads=heads,
                       head_dim=E // heads, norm_groups=int(cfg.get("mamba_ngroups", 1)),
                       **hybrid)
        E = int(cfg.get("intermediate_size") or cfg.get("expand", 2) * D)
        N = int(cfg["state_size"])
        if cfg["model_type"] in ("mamba", "falcon_mamba"):
            R = cfg.get("time_step_rank", "auto")
            R = math.ceil(D / 16) if R == "auto" else int(R)
            return cls(name, "mamba1", layers, D, E, dt_rank=R, d_state=N)
        if cfg["model_type"] == "mamba2":
            # transformers' convention (tpssm's default): the gated norm spans all of E.
            whole = cfg.get("tpssm_gated_norm", "whole") == "whole"
            return cls(name, "mamba2", layers, D, E, d_state=N, num_heads=int(cfg["num_heads"]),
                       head_dim=int(cfg["head_dim"]),
                       norm_groups=1 if whole else int(cfg.get("n_groups", 1)))
        raise ValueError(f"{name}: model_type {cfg['model_type']!r} is not modelled")

    def zamba_x_proj_spans_ranks(self, n: int) -> bool:
        """Whether a Zamba mixer head is split between ranks at tp n: its x_proj product is then
        summed over the group (tpssm.models.mixers.MultiHeadMamba1Mixer)."""
        hd = self.inner // self.mixer_heads
        return any(b % hd for _, b in _shard_bounds(self.inner, n)[:-1])

    def norm_spans_ranks(self, n: int) -> bool:
        """Whether a norm group straddles a rank boundary at tp n (tpssm.models.mixers)."""
        gs = self.inner // self.norm_groups
        return any((a * self.head_dim) % gs or (b * self.head_dim) % gs
                   for a, b in _shard_bounds(self.num_heads, n))


def _shard_bounds(size: int, n: int) -> List[Tuple[int, int]]:
    """[start, end) of each rank's part of `size` units over n ranks, the first size % n ranks
    one unit larger (tpssm.parallel.shard_range)."""
    base, extra = divmod(size, n)
    bounds, start = [], 0
    for r in range(n):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather")


@dataclass
class Collective:
    """One collective of a step over `rows` x `width` elements of `elem_bytes` bytes: an
    all-reduce or, under sequence parallelism, a reduce-scatter or an all-gather (exact)."""
    name: str
    rows: int
    width: int
    elem_bytes: int
    quantizable: bool  # False: always reduced exactly (fp32 norm sums, token broadcast)
    kind: str = "all_reduce"

    @property
    def numel(self) -> int:
        return self.rows * self.width


def layer_collectives(dims: ModelDims, tokens: int, n: int, elem_bytes: int = 2,
                      hybrid: bool = False) -> List[Collective]:
    """The row-parallel reductions of one layer for a step of `tokens` tokens at tp n; `hybrid`:
    a hybrid layer of Zamba / Zamba2, whose shared block reduces its attention o_proj and MLP
    down_proj products (T x D each) before the mixer runs."""
    if n == 1:
        return []
    out = []
    if hybrid:
        out += [Collective("block_o_proj", tokens, dims.hidden, elem_bytes, True),
                Collective("block_down_proj", tokens, dims.hidden, elem_bytes, True)]
    if dims.family == "mamba1":
        out.append(Collective("x_proj", tokens, dims.dt_rank + 2 * dims.d_state, elem_bytes,
                              True))
    if dims.family == "zamba" and dims.zamba_x_proj_spans_ranks(n):
        out.append(Collective("x_proj", tokens,
                              dims.mixer_heads * (dims.dt_rank + 2 * dims.d_state), elem_bytes,
                              True))
    out.append(Collective("out_proj", tokens, dims.hidden, elem_bytes, True))
    if dims.family in ("mamba2", "zamba2") and dims.norm_spans_ranks(n):
        out.append(Collective("gated_norm_sumsq", tokens, dims.norm_groups, 4, False))
    return out


def sequence_parallel_layer_collectives(dims: ModelDims, tokens: int, n: int, elem_bytes: int = 2,
                                        hybrid: bool = False,
                                        first: bool = False) -> List[Collective]:
    """One layer's collectives in a sequence-parallel prefill step (docs/tp-design.md; exact
    only): the reductions that feed the residual stream become reduce-scatters of the step's
    rows padded to a multiple of n, and all-gathers of the normalised rows feed the mixer (not
    on the first layer when it is a mamba layer: it normalises the replicated embedding itself)
    and, on a hybrid layer, the block's qkv (2D wide) and gate_up. The mixers' other
    reductions (x_proj, norm sums) stay all-reduces over the T gathered rows."""
    if n == 1:
        return []
    D, e = dims.hidden, elem_bytes
    padded = -(-tokens // n) * n
    out = []
    if hybrid:
        out += [Collective("block_input_gather", padded, 2 * D, e, False, "all_gather"),
                Collective("block_o_proj", padded, D, e, False, "reduce_scatter"),
                Collective("block_ff_gather", padded, D, e, False, "all_gather"),
                Collective("block_down_proj", padded, D, e, False, "reduce_scatter")]
    if hybrid or not first:
        out.append(Collective("mixer_input_gather", padded, D, e, False, "all_gather"))
    for c in layer_collectives(dims, tokens, n, e):
        out.append(Collective("out_proj", padded, D, e, False, "reduce_scatter")
                   if c.name == "out_proj" else c)
    return out


# ------------------------------------------------------------------ measured kernel times
@dataclass
class KernelTimes:
    """Measured quantize + reduce + dequantize time (us) of the int8 two-shot against message
    elements, per world size; piecewise linear between measured sizes, the smallest size's time
    below them (a launch floor), the last segment's per-element slope above them."""
    source: str
    points: Dict[int, List[Tuple[int, float]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: str, dtype: str = "bfloat16", group_size: int = 128) -> "KernelTimes":
        with open(path) as f:
            d = json.load(f)
        kt = cls(os.path.basename(path))
        for r in d["rows"]:
            if r.get("dtype") != dtype or r.get("group_size") != group_size:
                continue
            k = r["kernel_us_measured"]
            kt.points.setdefault(int(r["world_size"]), []).append(
                (int(r["numel"]), float(k["total_us"])))
        if not kt.points:
            raise ValueError(f"{path}: no rows with dtype {dtype} and group_size {group_size}")
        for pts in kt.points.values():
            pts.sort()
        kt.meta = {k: d.get(k) for k in ("device_name", "kernel_timing", "git_commit", "date",
                                         "torch")}
        return kt

    def world_size_for(self, n: int) -> int:
        return n if n in self.points else min(self.points, key=lambda m: (abs(m - n), m))

    def total_us(self, numel: int, n: int) -> float:
        pts = self.points[self.world_size_for(n)]
        xs = [p[0] for p in pts]
        if numel <= xs[0] or len(pts) == 1:
            if numel <= xs[0]:
                return pts[0][1]
            return pts[0][1] * numel / xs[0]
        i = bisect.bisect_left(xs, numel)
        if i >= len(pts):
            i = len(pts) - 1
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (numel - x0) / (x1 - x0)

    def slope_us_per_melem(self, n: int) -> float:
        pts = self.points[self.world_size_for(n)]
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return (y1 - y0) / (x1 - x0) * 1e6


# --------------------------------------------------------------------------- collective time
@dataclass
class CommSettings:
    min_bytes: int = 1 << 20        # payloads below it are reduced exactly (the bench default)
    group_size: int = 128
    copy_tbs: float = 3.0           # device copy rate for the fp16 casts (TB/s, read + write)
    # One latency-bound token exchange per engine step: the all-gather of every row's greedy
    # (max, token) pair from each rank (the bench runs decode greedily).
    broadcast_per_step: bool = True


def collective_us(c: Collective, scheme: str, n: int, link: Link, kernels: KernelTimes,
                  cs: CommSettings) -> float:
    """Modelled time of one collective under `scheme` (with tpssm's fall-backs to exact)."""
    if n == 1:
        return 0.0
    if c.kind not in COLLECTIVE_KINDS:
        raise ValueError(f"unknown collective kind {c.kind!r}")
    if c.kind != "all_reduce":
        # A ring reduce-scatter or all-gather sends (N-1)/N of the message from each rank.
        return link.latency_us + (n - 1) / n * c.numel * c.elem_bytes / (link.bus_gbs * 1e3)
    payload = c.numel * c.elem_bytes
    eff = scheme
    G = cs.group_size
    if not c.quantizable:
        eff = "exact"
    elif scheme in ("int8", "fp8"):
        G = quant_group_size(c.width, cs.group_size)
        if G == 0:
            eff = "exact"
    if eff != "exact_fp32" and payload < cs.min_bytes:
        eff = "exact"
    bw = link.bus_gbs * 1e3  # bytes per us
    if eff == "exact":
        return link.latency_us + wire_bytes(c.numel, n, "exact", elem_bytes=c.elem_bytes) / bw
    if eff == "exact_fp32":
        return link.latency_us + wire_bytes(c.numel, n, "exact_fp32") / bw
    if eff == "fp16":
        # Two elementwise casts (in -> fp16 before, fp16 -> out after), each reading and writing
        # the message once at the device copy rate.
        cast_us = 2 * c.numel * (c.elem_bytes + 2) / (cs.copy_tbs * 1e6)
        return link.latency_us + wire_bytes(c.numel, n, "fp16") / bw + cast_us
    # int8 / fp8 two-shot: two NCCL operations (all-to-all, all-gather), each with its latency,
    # plus the measured kernels (fp8 assumed to cost what int8 does: the same kernels).
    return (2 * link.latency_us + wire_bytes(c.numel, n, eff, G) / bw
            + kernels.total_us(c.numel, n))


def step_comm_us(dims: ModelDims, tokens: int, rows: int, scheme: str, n: int, link: Link,
                 kernels: KernelTimes, cs: CommSettings, elem_bytes: int = 2,
                 sequence_parallel: bool = False) -> float:
    """All collectives of one engine step at tp n: every layer's reductions and, once per
    step, the token exchange (latency-bound; a ring all-gather of 16 bytes per row from each
    rank: (n - 1) x 16 bytes per row on each rank's wire). `sequence_parallel`: the step runs
    with the stream split by tokens (exact scheme): the layers' sequence-parallel collectives,
    and the exact all-reduce of the `rows` last-token rows that gives every rank the rows the
    head needs."""
    if n == 1:
        return 0.0
    mamba_layers = dims.num_layers - dims.hybrid_layers
    if sequence_parallel:
        if scheme != "exact":
            raise ValueError(f"sequence parallelism runs the exact scheme only, not {scheme!r}")

        def layer_us(hybrid: bool, first: bool = False) -> float:
            return sum(collective_us(c, scheme, n, link, kernels, cs)
                       for c in sequence_parallel_layer_collectives(dims, tokens, n, elem_bytes,
                                                                    hybrid, first))

        first_hybrid = dims.first_layer_hybrid
        total = (layer_us(first_hybrid, first=True)
                 + (mamba_layers - (0 if first_hybrid else 1)) * layer_us(False)
                 + (dims.hybrid_layers - (1 if first_hybrid else 0)) * layer_us(True))
        total += collective_us(Collective("last_token_rows", rows, dims.hidden, elem_bytes,
                                          False), scheme, n, link, kernels, cs)
    else:
        def layer_us(hybrid: bool) -> float:
            return sum(collective_us(c, scheme, n, link, kernels, cs)
                       for c in layer_collectives(dims, tokens, n, elem_bytes, hybrid))

        total = mamba_layers * layer_us(False)
        if dims.hybrid_layers:
            total += dims.hybrid_layers * layer_us(True)
    if cs.broadcast_per_step:
        total += link.latency_us + (n - 1) * GREEDY_PAIR_BYTES * rows / (link.bus_gbs * 1e3)
    return total


# ----------------------------------------------------------------------- engine schedule
@dataclass
class Schedule:
    """Steps of the bench run: tokens and rows of each step, and whether it is a prefill-style
    step (some prompt chunk in it) rather than a decode batch; per request the (1-based) step
    that emits its first token and the step that finishes it."""
    step_tokens: List[int]
    step_rows: List[int]
    first_step: List[int]
    finish_step: List[int]
    step_prefill: List[bool] = field(default_factory=list)


def engine_schedule(batch: int, prompt_len: int, gen_tokens: int,
                    max_prefill_tokens: int) -> Schedule:
    """Replays tpssm.engine.GenerationEngine for the bench: `batch` requests of `prompt_len`
    tokens added at once, batch slots, state cache on. A prefill step fills its token budget in
    request order; finished prompts ride along as one token each; then decode steps."""
    prefilled = [0] * batch
    out = [0] * batch
    first = [0] * batch
    finish = [0] * batch
    running = list(range(batch))
    tokens, rows, prefill = [], [], []
    step = 0
    while running:
        step += 1
        prefill.append(any(prefilled[r] < prompt_len for r in running))
        if prefill[-1]:
            budget, t, nrows, emit = max_prefill_tokens, 0, 0, []
            for r in running:
                if prefilled[r] < prompt_len:
                    if budget <= 0:
                        continue
                    k = min(prompt_len - prefilled[r], budget)
                    prefilled[r] += k
                    budget -= k
                    t += k
                    if prefilled[r] == prompt_len:
                        emit.append(r)
                else:
                    t += 1
                    emit.append(r)
                nrows += 1
        else:
            t = nrows = len(running)
            emit = list(running)
        tokens.append(t)
        rows.append(nrows)
        for r in emit:
            out[r] += 1
            if out[r] == 1:
                first[r] = step
        still = []
        for r in running:
            if out[r] >= gen_tokens:
                finish[r] = step
            else:
                still.append(r)
        running = still
    return Schedule(tokens, rows, first, finish, prefill)


@dataclass
class PhaseComm:
    """Modelled communication added to each measured quantity (ms)."""
    ttft_ms: float
    decode_ms_per_token: float
    seconds: float
    per_step_us: List[float]


def phase_comm(sched: Schedule, step_us: Sequence[float], gen_tokens: int) -> PhaseComm:
    """Medians over requests, as the bench takes them: a request's TTFT spans steps 1..first,
    its decode the steps after first up to finish, over gen_tokens - 1 tokens."""
    cum = [0.0]
    for u in step_us:
        cum.append(cum[-1] + u)
    ttft = [cum[f] for f in sched.first_step]
    dec = [(cum[e] - cum[f]) / max(1, gen_tokens - 1)
           for f, e in zip(sched.first_step, sched.finish_step)]
    return PhaseComm(statistics.median(ttft) / 1e3, statistics.median(dec) / 1e3,
                     cum[-1] / 1e6, list(step_us))


# ---------------------------------------------------------------------------- measured inputs
Setting = Tuple[int, int]  # (batch, prompt_len)


@dataclass
class EngineRun:
    path: str
    model: str
    dims: ModelDims
    elem_bytes: int
    gen_tokens: int
    min_bytes: int
    tp1: Dict[Setting, dict]
    shards: Dict[int, Dict[Setting, dict]]
    environment: dict
    # > 0: the run had sequence parallelism on for prefill steps of at least this many tokens
    # (`tpssm bench --sequence-parallel`); its shard times are those of that mode.
    sequence_parallel_min_tokens: int = 0


def load_engine_json(path: str, configs: Dict[str, dict]) -> EngineRun:
    with open(path) as f:
        d = json.load(f)
    model = d["model"]
    name = next((p for p in configs if model == p or model.startswith(p + "-")), None)
    if name is None:
        raise ValueError(f"{path}: model {model!r} is not one of the presets {sorted(configs)}")
    dims = ModelDims.from_config(name, configs[name], d.get("num_layers"))
    tp1: Dict[Setting, dict] = {}
    shards: Dict[int, Dict[Setting, dict]] = {}
    for r in d["rows"]:
        if not r["state_cache"]:
            continue
        key = (int(r["batch"]), int(r["prompt_len"]))
        if r.get("rank_shard_only"):
            shards.setdefault(int(r["tp"]), {})[key] = r
        elif r["tp"] == 1:
            tp1[key] = r
    return EngineRun(os.path.basename(path), name, dims, DTYPE_BYTES[d.get("dtype", "bfloat16")],
                     int(d["gen_tokens"]), int(d.get("allreduce_min_bytes") or 0), tp1, shards,
                     d.get("environment", {}), int(d.get("sequence_parallel_min_tokens") or 0))


METRICS = ("ttft_ms", "decode_ms_per_token", "seconds")


def shard_compute(run: EngineRun, n: int, key: Setting,
                  borrow: Optional[EngineRun]) -> Tuple[Optional[dict], str]:
    """Rank 0's compute at tp n for one setting: measured, or tp 1 x a reference preset's
    measured shard / tp 1 ratio (assumed), or None."""
    row = run.shards.get(n, {}).get(key)
    if row is not None:
        return {m: row[m] for m in METRICS}, f"measured ({run.path})"
    if borrow is None or key not in run.tp1:
        return None, "not measured"
    ref_shard = borrow.shards.get(n, {}).get(key)
    ref_tp1 = borrow.tp1.get(key)
    if ref_shard is None or ref_tp1 is None:
        return None, "not measured"
    out = {m: run.tp1[key][m] * ref_shard[m] / ref_tp1[m] for m in METRICS}
    note = ""
    if borrow.gen_tokens != run.gen_tokens:
        # The run-time ratio mixes prefill and decode in the donor's proportions.
        note = (f"; the donor generated {borrow.gen_tokens} tokens per request, this run "
                f"{run.gen_tokens}")
    return out, (f"assumed: {run.path} tp 1 x {borrow.model}'s measured shard / tp 1 ratio "
                 f"({borrow.path}){note}")


# ---------------------------------------------------------------------------------- report
def model_setting(run: EngineRun, key: Setting, n: int, compute: dict, link: Link,
                  kernels: KernelTimes, cs: CommSettings, max_prefill_tokens: int) -> dict:
    """Every scheme's modelled tp-n quantities for one (preset, setting, link). A
    sequence-parallel run models the exact scheme only (the library refuses the others with
    it), its prefill-style steps of at least its threshold with the sequence-parallel
    collectives (decode batches never run sequence-parallel, whatever their size)."""
    batch, plen = key
    gen = run.gen_tokens
    base = run.tp1[key]
    sched = engine_schedule(batch, plen, gen, max_prefill_tokens)
    sp = run.sequence_parallel_min_tokens
    out = {}
    for scheme in ("exact",) if sp else SCHEMES + REFERENCE_SCHEMES:
        step_us = [step_comm_us(run.dims, t, rows, scheme, n, link, kernels, cs, run.elem_bytes,
                                sequence_parallel=bool(sp) and prefill and t >= sp)
                   for t, rows, prefill in zip(sched.step_tokens, sched.step_rows,
                                               sched.step_prefill)]
        pc = phase_comm(sched, step_us, gen)
        ttft = compute["ttft_ms"] + pc.ttft_ms
        dec = compute["decode_ms_per_token"] + pc.decode_ms_per_token
        secs = compute["seconds"] + pc.seconds
        thr = batch * gen / secs
        out[scheme] = {
            "ttft_ms": ttft, "decode_ms_per_token": dec, "seconds": secs,
            "throughput_tok_s": thr,
            "comm_ms": {"ttft": pc.ttft_ms, "decode_per_token": pc.decode_ms_per_token,
                        "run": pc.seconds * 1e3},
            "speedup": {"prefill_ttft": base["ttft_ms"] / ttft,
                        "decode_per_token": base["decode_ms_per_token"] / dec,
                        "throughput": thr / base["throughput_tok_s"]},
        }
    gains = {}
    for scheme, ref in (("int8", "exact"), ("fp8", "exact"), ("fp16", "exact"),
                        ("fp16", "exact_fp32")):
        if scheme not in out:
            continue
        a, b = out[scheme], out[ref]
        gains[f"{scheme}_vs_{ref}"] = {
            "prefill_ttft": b["ttft_ms"] / a["ttft_ms"] - 1,
            "decode_per_token": b["decode_ms_per_token"] / a["decode_ms_per_token"] - 1,
            "throughput": a["throughput_tok_s"] / b["throughput_tok_s"] - 1}
    return {"schemes": out, "gains": gains,
            "steps": {"count": len(sched.step_tokens), "tokens": sched.step_tokens}}


def build_report(runs: Sequence[EngineRun], kernels: KernelTimes, links: Dict[str, Link],
                 tps: Sequence[int], cs: CommSettings, max_prefill_tokens: int,
                 borrow: Optional[EngineRun] = None, qallreduce_path: str = "") -> dict:
    results = []
    for run in runs:
        for key in sorted(run.tp1):
            base = run.tp1[key]
            for n in tps:
                compute, source = shard_compute(run, n, key, borrow if borrow is not run else None)
                if compute is None:
                    continue
                shard_bound = {"prefill_ttft": base["ttft_ms"] / compute["ttft_ms"],
                               "decode_per_token": base["decode_ms_per_token"]
                               / compute["decode_ms_per_token"],
                               "throughput": base["seconds"] / compute["seconds"]}
                for lname, link in links.items():
                    m = model_setting(run, key, n, compute, link, kernels, cs,
                                      max_prefill_tokens)
                    results.append({
                        "preset": run.model, "family": run.dims.family,
                        "sequence_parallel_min_tokens": run.sequence_parallel_min_tokens,
                        "batch": key[0], "prompt_len": key[1], "gen_tokens": run.gen_tokens,
                        "state_cache": True, "tp": n, "link": lname,
                        "tp1_measured": {k: base[k] for k in METRICS + ("throughput_tok_s",)},
                        "shard_compute": {"source": source, **compute},
                        "no_comm_bound": {"label": "measured" if source.startswith("measured")
                                          else "assumed", **shard_bound},
                        "modelled": m,
                    })
    return {
        "title": "Modelled tensor-parallel speedup (not a multi-GPU measurement)",
        "label": "modelled",
        "model": MODEL_SUMMARY,
        "paper": {"source": PAPER["source"],
                  "speedup_tp2": PAPER["speedup"][2], "speedup_tp4": PAPER["speedup"][4],
                  "quantized_allreduce_gain": PAPER["quantized_allreduce_gain"],
                  "quantized_allreduce": PAPER["quantized_allreduce"]},
        "inputs": {
            "measured": {
                "engine": [{"file": r.path, "model": r.model, "gen_tokens": r.gen_tokens,
                            "sequence_parallel_min_tokens": r.sequence_parallel_min_tokens,
                            "environment": r.environment,
                            "tp1_settings": [list(k) for k in sorted(r.tp1)],
                            "rank_shard_tp": sorted(r.shards)} for r in runs],
                "qallreduce_kernels": {
                    "file": kernels.source or os.path.basename(qallreduce_path),
                    **kernels.meta,
                    "what": "quantize + reduce/requantize + dequantize, int8, bf16, G 128",
                    "total_us_by_world_size": {str(k): v for k, v in kernels.points.items()},
                    "slope_us_per_million_elements": {
                        str(k): kernels.slope_us_per_melem(k) for k in kernels.points
                        if len(kernels.points[k]) > 1}},
            },
            "assumed": {
                "links": {k: {"name": v.name, "bus_gbs": v.bus_gbs, "latency_us": v.latency_us,
                              "source": v.source} for k, v in links.items()},
                "max_prefill_tokens": {"value": max_prefill_tokens, "source":
                                       "tpssm bench's default (--max-prefill-tokens) at the "
                                       "commits that ran; not recorded in the engine JSON"},
                "allreduce_min_bytes": {"value": cs.min_bytes, "source":
                                        "payloads below it are reduced exactly, as tpssm does; "
                                        "the engine JSON's allreduce_min_bytes"},
                "quant_group_size": cs.group_size,
                "fp16_cast_copy_tbs": {"value": cs.copy_tbs, "source":
                                       "two casts, each reading and writing the message at "
                                       "the device copy rate (~3.0 TB/s measured on this "
                                       "workplace's H100, benchmarks/NOTES.md); not measured "
                                       "as kernels"},
                "fp8_kernels": "fp8 kernel times taken equal to the measured int8 ones",
                "other_group_sizes": "kernel time depends on elements only (measured at G 128; "
                                     "x_proj reductions use G 64 / 32)",
                "kernel_time_outside_measured_sizes": "below the smallest measured message: "
                                                      "its time; above the largest: linear in "
                                                      "elements with the last segment's slope",
                "two_shot_latency": "int8 / fp8 pay two link latencies (all-to-all and "
                                    "all-gather), exact / fp16 one",
                "overlap": "none: communication time adds to the measured compute time",
                "token_broadcast": "one broadcast of the sampled tokens per engine step",
                "shard_ratio_borrowed_from": borrow.model if borrow is not None else None,
            },
        },
        "results": results,
    }


MODEL_SUMMARY = [
    "time of one collective = latency + wire bytes per rank / bus bandwidth (+ measured int8 "
    "kernels, or fp16 casts)",
    "wire bytes per rank: exact ring 2(N-1)/N*M*2, fp16 the same, int8/fp8 two-shot "
    "2(N-1)/N*M*(1+4/G)",
    "collectives per step: Mamba-1 x_proj T x (R+2N) and out_proj T x D per layer; Mamba-2 "
    "out_proj T x D (+ fp32 T x groups norm sum when a norm group spans ranks); Zamba / Zamba2 "
    "layers as their mixers (Zamba's x_proj T x heads(R+2N) only where a head spans ranks), "
    "and each hybrid layer's shared block o_proj and down_proj T x D; one all-gather of the "
    "rows' greedy (max, token) pairs (16 B a row from each rank)",
    "a run measured with --sequence-parallel (exact only): its prefill steps of at least "
    "sequence_parallel_min_tokens tokens reduce-scatter out_proj (and a hybrid block's o_proj, "
    "down_proj) and all-gather the normalised rows, (N-1)/N of the padded message each, plus "
    "one all-reduce of the last-token rows",
    "steps replay the engine's schedule of the bench run (chunked prefill, continuous "
    "batching); T = tokens of the step",
    "tp N time = rank 0's measured shard time + modelled communication, no overlap; speedup "
    "= measured tp 1 / modelled tp N",
]


# ------------------------------------------------------------------------------------ output
def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _label(r: dict) -> str:
    """A result's preset, marked +SP for a sequence-parallel run."""
    return r["preset"] + (" +SP" if r.get("sequence_parallel_min_tokens") else "")


def _gain(r: dict, key: str) -> str:
    g = r["modelled"]["gains"].get(key)
    return _pct(g["throughput"]) if g is not None else "n/a"


def format_table(report: dict) -> str:
    lines = [report["title"], "Every speedup and gain below is MODELLED (see --json inputs).",
             ""]
    hdr = (f"{'preset':<20} {'batch x prompt':>14} {'tp':>2} {'link':<13} {'compute':<8} "
           f"{'no-comm x':>9} {'TTFT x':>7} {'decode x':>8} {'thrpt x':>7} "
           f"{'int8 gain':>9} {'fp16 gain':>9} {'fp16 vs fp32':>12}")
    lines += [hdr, "-" * len(hdr)]
    for r in report["results"]:
        sch = r["modelled"]["schemes"]["exact"]["speedup"]
        comp = "measured" if r["shard_compute"]["source"].startswith("measured") else "assumed"
        lines.append(
            f"{_label(r):<20} {r['batch']:>5} x {r['prompt_len']:<6} {r['tp']:>2} "
            f"{LINKS_NAMES.get(r['link'], r['link']):<13} {comp:<8} "
            f"{r['no_comm_bound']['throughput']:>9.2f} {sch['prefill_ttft']:>7.2f} "
            f"{sch['decode_per_token']:>8.2f} {sch['throughput']:>7.2f} "
            f"{_gain(r, 'int8_vs_exact'):>9} {_gain(r, 'fp16_vs_exact'):>9} "
            f"{_gain(r, 'fp16_vs_exact_fp32'):>12}")
    p = report["paper"]
    lines += ["",
              "Columns: speedups of the exact (bf16) all-reduce against measured tp 1 "
              "(TTFT, decode ms/token, end-to-end throughput of the bench run); no-comm x: "
              "the rank shard's throughput ratio (measured, or assumed where compute says so); "
              "gains: throughput of int8 / fp16 against exact bf16, and of fp16 against a "
              "hypothetical fp32 exact payload (the paper's setting). +SP: a run with "
              "sequence-parallel prefill (exact scheme only, so no gains).",
              f"Paper ({p['source']}): tp 2 {p['speedup_tp2'][0]}-{p['speedup_tp2'][1]}x, "
              f"tp 4 {p['speedup_tp4'][0]}-{p['speedup_tp4'][1]}x, quantized all-reduce "
              f"+{100 * p['quantized_allreduce_gain'][0]:.0f}-"
              f"{100 * p['quantized_allreduce_gain'][1]:.0f}% ({p['quantized_allreduce']})."]
    return "\n".join(lines)


LINKS_NAMES = {k: v.name for k, v in LINKS.items()}


def plot_report(report: dict, path: str, settings: Optional[Sequence[Setting]] = None) -> dict:
    """Throughput speedup against tp: a row per setting, a panel per preset, a colour per link
    preset (exact solid, int8 dashed), the rank shard's no-communication ratio dotted, the
    paper's ranges shaded. Default settings: every batch size at the longest prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    rows = report["results"]
    if not settings:
        longest = max(r["prompt_len"] for r in rows)
        settings = sorted({(r["batch"], longest) for r in rows}, reverse=True)
    settings = list(settings)
    presets = list(dict.fromkeys(_label(r) for r in rows))
    fig, axes = plt.subplots(len(settings), len(presets),
                             figsize=(4.6 * len(presets) + 2.6, 3.9 * len(settings) + 0.5),
                             squeeze=False, sharey=True)
    links = list(dict.fromkeys(r["link"] for r in rows))
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(links)}
    tps = sorted({r["tp"] for r in rows})
    for row_axes, setting in zip(axes, settings):
        for ax, preset in zip(row_axes, presets):
            sel = [r for r in rows if _label(r) == preset
                   and (r["batch"], r["prompt_len"]) == tuple(setting)]
            for n, key in ((2, "speedup_tp2"), (4, "speedup_tp4")):
                lo, hi = report["paper"][key]
                label = "paper's range (its measurements, A6000 / A100)" if n == 2 else None
                ax.fill_between([n - 0.35, n + 0.35], lo, hi, color="0.6", alpha=0.25, lw=0,
                                label=label)
            ax.plot([1] + tps, [1] + tps, color="0.3", lw=0.8, ls="-.", label="ideal (x tp)")
            assumed = False
            for link in links:
                pts = sorted(((r["tp"], r) for r in sel if r["link"] == link),
                             key=lambda tr: tr[0])
                if not pts:
                    continue
                assumed |= any(not r["shard_compute"]["source"].startswith("measured")
                               for _, r in pts)
                xs = [1] + [t for t, _ in pts]
                for scheme, ls in (("exact", "-"), ("int8", "--")):
                    if any(scheme not in r["modelled"]["schemes"] for _, r in pts):
                        continue  # a sequence-parallel run: exact only
                    ys = [1.0] + [r["modelled"]["schemes"][scheme]["speedup"]["throughput"]
                                  for _, r in pts]
                    ax.plot(xs, ys, color=colours[link], ls=ls, marker="o", ms=4,
                            label=f"{LINKS_NAMES.get(link, link)}, {scheme} (modelled)")
            bound = sorted({(r["tp"], r["no_comm_bound"]["throughput"]) for r in sel})
            if bound:
                ax.plot([1] + [t for t, _ in bound], [1.0] + [b for _, b in bound],
                        color="k", ls=":", marker="s", ms=3,
                        label="rank shard alone, no communication")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator([1] + tps))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlim(0.85, max(tps) * 1.15)
            ax.set_ylim(0, max(tps) + 0.5)
            ax.set_xlabel("tensor-parallel degree (GPUs)")
            ax.set_title(f"{preset}, batch {setting[0]}, prompt {setting[1]}"
                         + ("\n(shard compute assumed)" if assumed else ""), fontsize="medium")
            ax.grid(True, alpha=0.3)
        row_axes[0].set_ylabel("throughput speedup vs measured tp 1")
    # One legend of every panel's entries (a sequence-parallel panel has no int8 lines).
    entries: dict = {}
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(text, handle)
    axes[0][-1].legend(list(entries.values()), list(entries), loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), fontsize="small")
    devices = sorted({e.get("environment", {}).get("device_name", "?")
                      for e in report["inputs"]["measured"]["engine"]})
    fig.suptitle(f"MODELLED tensor-parallel speedup: shard compute measured on "
                 f"{', '.join(devices)} + link model, no overlap (state cache on)",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    labels = list(entries)
    title = fig._suptitle.get_text()
    plt.close(fig)
    return {"settings": settings, "title": title, "legend": labels}


# --------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine-json", nargs="+", required=True,
                   help="engine bench JSON(s) (tpssm bench --rank-shard ...)")
    p.add_argument("--qallreduce-json", required=True,
                   help="bench_qallreduce.py JSON with CUDA-graph kernel times")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write the PNG here (matplotlib)")
    p.add_argument("--plot-settings", default="",
                   help="BATCHxPROMPT rows of the plot, comma-separated (default: every batch "
                        "size at the longest prompt)")
    p.add_argument("--tp", default="2,4", help="tp degrees to model")
    p.add_argument("--links", default=",".join(LINKS), help="link presets to model")
    p.add_argument("--link", action="append", default=[], metavar="NAME:bw=GBS,lat=US",
                   help="override a link preset, e.g. nvlink-h100:bw=400,lat=9 (repeatable)")
    p.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="the engine's prefill token budget in the bench runs")
    p.add_argument("--allreduce-min-bytes", type=int, default=None,
                   help="exact below this payload (default: the engine JSON's value)")
    p.add_argument("--copy-tbs", type=float, default=3.0,
                   help="device copy rate for the fp16 casts, TB/s")
    p.add_argument("--shard-ratio-from", default="",
                   help="preset whose measured shard / tp 1 ratios stand in (assumed) for "
                        "presets without rank-shard rows")
    return p


def _rounded(x, digits: int = 6):
    """Floats to `digits` significant digits: the model is not that precise and the file stays
    readable."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    links = {}
    for name in filter(None, args.links.split(",")):
        if name not in LINKS:
            raise SystemExit(f"--links: unknown preset {name!r}, expected some of {sorted(LINKS)}")
        links[name] = Link(**vars(LINKS[name]))
    for text in args.link:
        try:
            name, over = parse_link_override(text)
        except ValueError as e:
            raise SystemExit(str(e))
        base = links.get(name, Link(**vars(LINKS[name])))
        links[name] = Link(base.name, over.get("bus_gbs", base.bus_gbs),
                           over.get("latency_us", base.latency_us),
                           base.source + f" [overridden on the command line: {text}]")
    configs = load_preset_configs()
    runs = [load_engine_json(p, configs) for p in args.engine_json]
    kernels = KernelTimes.from_json(args.qallreduce_json)
    min_bytes = args.allreduce_min_bytes
    if min_bytes is None:
        min_bytes = max((r.min_bytes for r in runs), default=1 << 20)
    cs = CommSettings(min_bytes=min_bytes, copy_tbs=args.copy_tbs)
    borrow = None
    if args.shard_ratio_from:
        borrow = next((r for r in runs if r.model == args.shard_ratio_from), None)
        if borrow is None or not borrow.shards:
            raise SystemExit(f"--shard-ratio-from {args.shard_ratio_from}: no engine JSON of "
                             f"that preset with rank-shard rows was given")
    tps = [int(t) for t in args.tp.split(",") if t]
    report = build_report(runs, kernels, links, tps, cs, args.max_prefill_tokens, borrow,
                          args.qallreduce_json)
    report["generated"] = {
        "command": "python benchmarks/tp_report.py " + " ".join(
            os.path.relpath(a, ROOT) if os.path.isfile(a) else a
            for a in (sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": _git_commit()}
    missing = [f"{r.model} tp {n}" for r in runs for n in tps
               if n not in r.shards and borrow is None]
    if missing:
        report["not_modelled"] = [m + ": no rank-shard rows" for m in missing]
    print(format_table(report))
    if missing:
        print("Not modelled (no measured shard times; see --shard-ratio-from): "
              + ", ".join(missing))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_rounded(report), f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        settings = [tuple(int(v) for v in item.split("x"))
                    for item in args.plot_settings.split(",") if item]
        plot_report(report, args.plot, settings)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
