"""Benchmark of the SSM CUDA kernels on per-rank shards of real models, and of the fused norms.

For each kernel and shape: median time per call (CUDA events around CUDA-graph replays of one
call per input set, after warm-up; input sets are rotated so that the working set exceeds the L2
cache; mutated states are reset outside the timed region), the explicit byte inventory (every
input read once, every output written once, states read and written once), achieved GB/s, % of
the device copy bandwidth measured in the same run (a large device-to-device copy), and the
speed-up against the pure-PyTorch reference (tpssm.reference; timed eagerly on a reduced case
and scaled linearly where the full case is too slow - the table says so) and against a
torch-native baseline where one exists (F.conv1d for the conv, vectorised torch for the two
decode ops, the unfused torch chains the models ran before for the norms).

    python benchmarks/bench_ssm_ops.py [--quick] [--json PATH] [--ops conv,scan,...]

Without CUDA it prints that CUDA is required and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

# Per-rank shards: (name, form, d_inner, dstate, nheads, headdim, ngroups, conv width).
MODELS = {
    "mamba-2.8b": dict(form="mamba1", d_inner=5120, dstate=16, nheads=5120, headdim=1,
                       ngroups=1, width=4),
    "falcon-mamba-7b": dict(form="mamba1", d_inner=8192, dstate=16, nheads=8192, headdim=1,
                            ngroups=1, width=4),
    "mamba2-2.7b": dict(form="mamba2", d_inner=5120, dstate=128, nheads=80, headdim=64,
                        ngroups=1, width=4),
}
# The residual stream's width (replicated on every rank: the norms run at tp 1 shapes only) and
# Falcon-Mamba's x_proj row (dt_rank, then B and C of dstate each: one gated_rms_norm launch).
HIDDEN = {"mamba-2.8b": 2560, "falcon-mamba-7b": 4096, "mamba2-2.7b": 2560}
FALCON_XPROJ = dict(dt_rank=256, dstate=16)
NORM_ROWS = (1, 64, 256, 16384)
TPS = (1, 2, 4)
DECODE_BATCHES = (1, 8, 64, 256)
PREFILLS = ((1, 2048), (8, 2048), (1, 16384))
# A mixed packed batch: long and short prompts, a one-token and an empty sequence (~16K tokens).
VARLEN_SEQLENS = (7000, 17, 1, 0, 5000, 129, 2048, 1000, 1170)
QUICK = dict(tps=(1, 4), decode=(1, 64, 256), prefill=((8, 2048), (1, 16384)))

ACT = torch.bfloat16
STATE = torch.float32
DEVICE = "cuda"  # where the cases' tensors live; tests build small cases on the CPU
MAX_SETS = 1024


def shard(model: str, tp: int) -> Dict:
    m = dict(MODELS[model])
    m["nheads"] //= tp
    m["d_inner"] //= tp
    # Mamba-2's conv also covers B and C (ngroups * dstate each), replicated per rank for G=1.
    m["conv_dim"] = m["d_inner"] + (2 * m["ngroups"] * m["dstate"] if m["form"] == "mamba2" else 0)
    return m


@dataclass
class Case:
    op: str
    model: str
    tp: int
    shape: str
    bytes: float
    make_set: Callable[[], Dict]
    call: Callable[[Dict], None]
    ref: Optional[Callable[[], Callable[[], None]]] = None  # builds a callable on a reduced case
    ref_scale: float = 1.0   # full case / reduced case work
    ref_note: str = ""
    native: Optional[Callable[[Dict], None]] = None
    native_note: str = ""
    flops: float = 0.0       # tensor-core work (the SSD scan), reported as TFLOP/s
    consts: Dict = field(default_factory=dict)  # what call() takes beside a set (bench_peers.py)
    resets: Tuple[str, ...] = ()  # inputs the call overwrites: restored with the states
    results: Dict = field(default_factory=dict)


def _rand(*shape, dtype=ACT, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device=DEVICE) * scale + offset).to(dtype)


def _ssm_consts(m):
    h, n = m["nheads"], m["dstate"]
    if m["form"] == "mamba1":
        A = -torch.rand(h, n, device=DEVICE) * 4 - 0.5
    else:
        A = -torch.rand(h, device=DEVICE) * 4 - 0.5
    return A, torch.randn(h, device=DEVICE), torch.randn(h, device=DEVICE) * 0.5 - 1.0


def _state_shape(m, slots):
    if m["form"] == "mamba1":
        return (slots, m["d_inner"], m["dstate"])
    return (slots, m["nheads"], m["headdim"], m["dstate"])


def conv_case(model, tp, batch, seqlen, ops, ref_mod, chunk_len=0) -> Case:
    """chunk_len: force the tokens per block (walked in 64-token tiles, 32 for fp32) - extra rows
    beside the launcher's one tile per block, same process."""
    m = shard(model, tp)
    dim, width = m["conv_dim"], m["width"]
    e = 2
    nbytes = e * (2 * batch * seqlen * dim + 2 * batch * dim * (width - 1) + dim * (width + 1))

    def make_set():
        return dict(x=_rand(batch, seqlen, dim), weight=_rand(dim, width, scale=0.5),
                    bias=_rand(dim), conv_states=_rand(batch, dim, width - 1),
                    has_initial_state=torch.ones(batch, dtype=torch.bool, device=DEVICE),
                    out=torch.empty(batch, seqlen, dim, dtype=ACT, device=DEVICE))

    def call(s):
        ops.causal_conv1d(s["x"], s["weight"], s["bias"], conv_states=s["conv_states"],
                          has_initial_state=s["has_initial_state"], activation="silu",
                          out=s["out"], chunk_len=chunk_len)

    def native(s):
        x = s["x"].transpose(1, 2)
        y = F.conv1d(x, s["weight"][:, None, :], s["bias"], padding=width - 1, groups=dim)
        s["native_out"] = F.silu(y[..., :seqlen]).transpose(1, 2)

    def ref():
        s = make_set()
        return lambda: ref_mod.causal_conv1d_ref(
            s["x"], s["weight"], s["bias"], conv_states=s["conv_states"],
            has_initial_state=s["has_initial_state"], activation="silu", out=s["out"])

    shape = f"{batch}x{seqlen} dim {dim}" + (f" chunk {chunk_len}" if chunk_len else "")
    return Case("causal_conv1d", model, tp, shape, nbytes, make_set,
                call, ref=ref, native=native,
                native_note="F.conv1d on the transposed view, no initial state")


def conv_update_case(model, tp, batch, ops, ref_mod) -> Case:
    m = shard(model, tp)
    dim, width = m["conv_dim"], m["width"]
    e = 2
    nbytes = e * (2 * batch * dim + 2 * batch * dim * (width - 1) + dim * (width + 1) + 0.0)

    def make_set():
        return dict(x=_rand(batch, dim), conv_state=_rand(batch, dim, width - 1),
                    weight=_rand(dim, width, scale=0.5), bias=_rand(dim),
                    idx=torch.arange(batch, dtype=torch.int32, device=DEVICE),
                    out=torch.empty(batch, dim, dtype=ACT, device=DEVICE))

    def call(s):
        ops.causal_conv1d_update(s["x"], s["conv_state"], s["weight"], s["bias"],
                                 activation="silu", cache_indices=s["idx"], out=s["out"])

    def native(s):
        idx = s["idx"].long()
        full = torch.cat([s["conv_state"][idx], s["x"][:, :, None]], dim=-1)
        s["out"].copy_(F.silu((full.float() * s["weight"].float()).sum(-1) + s["bias"].float()))
        s["conv_state"].index_copy_(0, idx, full[..., 1:])

    ref_batch = min(batch, 8)

    def ref():
        s = dict(x=_rand(ref_batch, dim), conv_state=_rand(ref_batch, dim, width - 1),
                 weight=_rand(dim, width, scale=0.5), bias=_rand(dim),
                 idx=torch.arange(ref_batch, dtype=torch.int32, device=DEVICE))
        return lambda: ref_mod.causal_conv1d_update_ref(
            s["x"], s["conv_state"], s["weight"], s["bias"], activation="silu",
            cache_indices=s["idx"])

    return Case("causal_conv1d_update", model, tp, f"batch {batch} dim {dim}", nbytes, make_set,
                call, ref=ref, ref_scale=batch / ref_batch,
                ref_note=f"ref at batch {ref_batch}, scaled" if ref_batch != batch else "",
                native=native, native_note="torch gather / sum / index_copy_")


def _ssd_flops(tokens, m) -> float:
    """Useful tensor-core FLOPs of the SSD form for 64-token chunks: per token and head 2NP for
    the inter-chunk output, 2NP for the chunk state, and the causal halves of C B^T (QN) and of
    its product with x (QP)."""
    n, p, q = m["dstate"], m["headdim"], 64
    return tokens * m["nheads"] * (4 * n * p + q * (n + p))


def scan_case(model, tp, batch, seqlen, ops, ref_mod, split_len=0, algorithm="auto",
              seqlens=None, lanes=0) -> Case:
    """split_len: force the split plan with pieces of this length; algorithm: force one of the
    op's algorithms ('recurrent', 'recurrent_direct', 'ssd'); lanes: force the staged walk's
    lanes per channel (Mamba1) - extra rows that compare the launcher's choices in the same
    process. seqlens: a packed varlen batch instead of batch x seqlen."""
    m = shard(model, tp)
    h, p, n, g = m["nheads"], m["headdim"], m["dstate"], m["ngroups"]
    dim = h * p
    if seqlens is not None:
        batch, tokens = len(seqlens), sum(seqlens)
        qsl = torch.tensor([0] + list(itertools.accumulate(seqlens)), dtype=torch.int32,
                           device=DEVICE)
        lead = (tokens,)
    else:
        tokens, qsl, lead = batch * seqlen, None, (batch, seqlen)
    e, s_e = 2, 4
    nbytes = (e * (3 * tokens * dim + tokens * h + 2 * tokens * g * n)
              + 2 * s_e * batch * dim * n)
    A, D, dbias = _ssm_consts(m)

    def make(lead_shape, rows):
        return dict(u=_rand(*lead_shape, dim), delta=_rand(*lead_shape, h, scale=0.5),
                    B=_rand(*lead_shape, g, n), C=_rand(*lead_shape, g, n),
                    z=_rand(*lead_shape, dim),
                    ssm_states=torch.randn(_state_shape(m, rows), device=DEVICE, dtype=STATE),
                    has_initial_state=torch.ones(rows, dtype=torch.bool, device=DEVICE),
                    out=torch.empty(*lead_shape, dim, dtype=ACT, device=DEVICE))

    def call(s):
        ops.selective_scan(s["u"], s["delta"], A, s["B"], s["C"], D, s["z"], dbias,
                           delta_softplus=True, ssm_states=s["ssm_states"],
                           has_initial_state=s["has_initial_state"], query_start_loc=qsl,
                           out=s["out"], algorithm=algorithm, split_len=split_len,
                           lanes_per_channel=lanes)

    ref_len = 128

    def ref():
        s = make((1, ref_len), 1)
        return lambda: ref_mod.selective_scan_ref(
            s["u"], s["delta"], A, s["B"], s["C"], D, s["z"], dbias, delta_softplus=True,
            ssm_states=s["ssm_states"], has_initial_state=s["has_initial_state"], out=s["out"])

    shape = (f"varlen {len(seqlens)} seqs {tokens} tok" if seqlens is not None
             else f"{batch}x{seqlen}") + f" {h}x{p}x{n}"
    if split_len:
        shape += f" split {split_len}"
    if algorithm != "auto":
        shape += f" {algorithm}"
    if lanes:
        shape += f" lanes {lanes}"
    ssd = m["form"] == "mamba2" and algorithm in ("auto", "ssd")
    return Case("selective_scan", model, tp, shape, nbytes,
                lambda: make(lead, batch), call, ref=ref, ref_scale=tokens / ref_len,
                ref_note=f"ref at 1x{ref_len}, scaled by tokens",
                flops=_ssd_flops(tokens, m) if ssd else 0.0,
                consts=dict(m=m, A=A, D=D, dbias=dbias, query_start_loc=qsl))


def ssu_case(model, tp, batch, ops, ref_mod) -> Case:
    m = shard(model, tp)
    h, p, n, g = m["nheads"], m["headdim"], m["dstate"], m["ngroups"]
    dim = h * p
    e, s_e = 2, 4
    nbytes = 2 * s_e * batch * dim * n + e * (3 * batch * dim + batch * h + 2 * batch * g * n)
    A, D, dbias = _ssm_consts(m)
    x_shape = (batch, dim) if m["form"] == "mamba1" else (batch, h, p)

    def make(b):
        return dict(state=torch.randn(_state_shape(m, b), device=DEVICE, dtype=STATE),
                    x=_rand(*((b,) + x_shape[1:])), dt=_rand(b, h, scale=0.5),
                    B=_rand(b, g, n), C=_rand(b, g, n), z=_rand(*((b,) + x_shape[1:])),
                    idx=torch.arange(b, dtype=torch.int32, device=DEVICE),
                    out=torch.empty(*((b,) + x_shape[1:]), dtype=ACT, device=DEVICE))

    def call(s):
        ops.selective_state_update(s["state"], s["x"], s["dt"], A, s["B"], s["C"], D, s["z"],
                                   dbias, dt_softplus=True, state_batch_indices=s["idx"],
                                   out=s["out"])

    A_hn = A if m["form"] == "mamba1" else A[:, None].expand(h, n)

    def native(s):
        idx = s["idx"].long()
        st = s["state"][idx].view(batch, h, p, n)
        dt = F.softplus(s["dt"].float() + dbias)  # (b, h)
        dA = torch.exp(dt[:, :, None] * A_hn)  # (b, h, n)
        reps = h // g
        Bh = s["B"].float().repeat_interleave(reps, dim=1)
        Ch = s["C"].float().repeat_interleave(reps, dim=1)
        x = s["x"].float().reshape(batch, h, p)
        st = st * dA[:, :, None, :] + (dt[:, :, None, None] * Bh[:, :, None, :]) * x[..., None]
        y = torch.einsum("bhpn,bhn->bhp", st, Ch) + x * D.view(1, h, 1)
        y = y * F.silu(s["z"].float().reshape(batch, h, p))
        s["out"].copy_(y.reshape(s["out"].shape))
        s["state"].index_copy_(0, idx, st.view(s["state"][idx].shape))

    ref_batch = min(batch, 8)

    def ref():
        s = make(ref_batch)
        return lambda: ref_mod.selective_state_update_ref(
            s["state"], s["x"], s["dt"], A, s["B"], s["C"], D, s["z"], dbias, dt_softplus=True,
            state_batch_indices=s["idx"], out=s["out"])

    return Case("selective_state_update", model, tp, f"batch {batch} {h}x{p}x{n}", nbytes,
                lambda: make(batch), call, ref=ref, ref_scale=batch / ref_batch,
                ref_note=f"ref at batch {ref_batch}, scaled" if ref_batch != batch else "",
                native=native, native_note="vectorised torch gather / exp / einsum",
                consts=dict(m=m, A=A, D=D, dbias=dbias))


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return int(getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20)


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written): the engine
    benchmark's own measurement, so that every "% of copy" divides by the same figure."""
    from tpssm.bench import copy_bandwidth_gbs

    return copy_bandwidth_gbs(DEVICE)


def _time_eager(fn, iters=10, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def time_graph(fn_per_set, sets, reps, reset=None) -> float:
    """Median ms per call: one CUDA graph calls fn on every input set in turn."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for s in sets[:2]:
            fn_per_set(s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            fn_per_set(s)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if reset is not None:
            reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(sets))
    times.sort()
    del graph
    return times[len(times) // 2]


def run_case(case: Case, copy_gbs: float, reps: int, with_ref: bool) -> Dict:
    probe = case.make_set()
    set_bytes = sum(t.numel() * t.element_size() for t in probe.values()
                    if isinstance(t, torch.Tensor))
    num_sets = max(1, min(MAX_SETS, math.ceil(3 * l2_bytes() / max(set_bytes, 1))))
    sets = [probe] + [case.make_set() for _ in range(num_sets - 1)]
    # Pristine copies of the states the op mutates; every replay starts from them. Sets are reset
    # in replay order, so the sets the reset left warm in L2 are replayed last, after the earlier
    # sets have evicted them.
    keys = [k for k in ("conv_states", "conv_state", "ssm_states", "state") + case.resets
            if k in probe]
    pristine = [{k: s[k].clone() for k in keys} for s in sets]

    def reset_all():
        for s, saved in zip(sets, pristine):
            for k in keys:
                s[k].copy_(saved[k])

    ms = time_graph(case.call, sets, reps, reset_all if keys else None)
    res = dict(op=case.op, model=case.model, tp=case.tp, shape=case.shape, time_us=ms * 1e3,
               bytes=case.bytes, gbs=case.bytes / (ms * 1e-3) / 1e9, input_sets=num_sets)
    res["pct_copy"] = 100.0 * res["gbs"] / copy_gbs
    # Sets too small for MAX_SETS of them to fill three L2s (batch-1 decode shapes, one-row
    # norms) are replayed from the L2: their "% of copy" is not a DRAM figure.
    res["l2_resident"] = num_sets * set_bytes < 2 * l2_bytes()
    if case.flops:
        res["flops"] = case.flops
        res["tflops"] = case.flops / (ms * 1e-3) / 1e12
    if case.native is not None:
        try:
            native_ms = time_graph(case.native, sets[: min(num_sets, 64)], reps)
        except Exception:  # noqa: BLE001 - a baseline that cannot be captured runs eagerly
            native_ms = _time_eager(lambda: case.native(sets[0]), iters=reps)
        res["native_us"] = native_ms * 1e3
        res["speedup_vs_native"] = native_ms / ms
        res["native_note"] = case.native_note
    if with_ref and case.ref is not None:
        fn = case.ref()
        ref_ms = _time_eager(fn, iters=3, warmup=1) * case.ref_scale
        res["ref_us"] = ref_ms * 1e3
        res["speedup_vs_ref"] = ref_ms / ms
        res["ref_note"] = case.ref_note
    del sets, pristine, probe
    torch.cuda.empty_cache()
    return res


def add_rms_norm_case(model, rows, ops) -> Case:
    d = HIDDEN[model]
    nbytes = rows * d * (2 + 4 + 4 + 2) + 2 * d  # x, residual in / out (fp32), out; weight

    def make_set():
        return dict(x=_rand(rows, d), residual=_rand(rows, d, dtype=torch.float32),
                    weight=_rand(d, scale=0.1, offset=1.0),
                    out=torch.empty(rows, d, dtype=ACT, device=DEVICE))

    def call(s):
        ops.add_rms_norm(s["x"], s["weight"], 1e-5, residual=s["residual"], out=s["out"])

    def native(s):
        r = s["residual"] + s["x"]
        s["native_out"] = s["weight"] * F.rms_norm(r.to(ACT), (d,), eps=1e-5)

    return Case("add_rms_norm", model, 1, f"{rows} x {d}, fp32 residual", nbytes, make_set, call,
                native=native, native_note="torch add, cast, rms_norm, weight multiply")


def gated_rms_norm_case(model, rows, ops) -> Case:
    """Mamba-2's gated norm over the local d_inner (one group at tp 1), or Falcon-Mamba's dt / B /
    C norms of x_proj's row (three groups, no gate or weight)."""
    falcon = MODELS[model]["form"] == "mamba1"
    if falcon:
        R, N = FALCON_XPROJ["dt_rank"], FALCON_XPROJ["dstate"]
        e, gs, first = R + 2 * N, N, R
    else:
        e = gs = MODELS[model]["d_inner"]
        first = 0
    nbytes = rows * e * 2 * (2 if falcon else 3) + (0 if falcon else 2 * e)

    def make_set():
        return dict(x=_rand(rows, e), z=None if falcon else _rand(rows, e),
                    weight=None if falcon else _rand(e, scale=0.1, offset=1.0),
                    out=torch.empty(rows, e, dtype=ACT, device=DEVICE))

    def call(s):
        ops.gated_rms_norm(s["x"], s["weight"], 1e-6, z=s["z"], group_size=gs,
                           first_group_size=first, out=s["out"])

    def native(s):
        x = s["x"]
        if falcon:  # the three F.rms_norm calls the model made
            s["native_out"] = [F.rms_norm(x[:, a:b], (b - a,), eps=1e-6)
                               for a, b in ((0, R), (R, R + N), (R + N, e))]
            return
        g = x.float() * F.silu(s["z"].float())
        y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-6)).to(ACT)
        s["native_out"] = s["weight"] * y

    shape = (f"{rows} x ({R} | {N} | {N})" if falcon else f"{rows} x {e}, gated")
    return Case("gated_rms_norm", model, 1, shape, nbytes, make_set, call, native=native,
                native_note="the unfused torch chains of the mixers")


def build_cases(args, ops, ref_mod) -> List[Case]:
    tps = QUICK["tps"] if args.quick else TPS
    decode = QUICK["decode"] if args.quick else DECODE_BATCHES
    prefill = QUICK["prefill"] if args.quick else PREFILLS
    wanted = set(args.ops.split(","))
    cases = []
    norm_widths = set()  # add_rms_norm once per residual width
    for model in (args.models.split(",") if args.models else MODELS):
        for tp in tps:
            for batch, seqlen in prefill:
                if "conv" in wanted:
                    cases.append(conv_case(model, tp, batch, seqlen, ops, ref_mod))
                    # Forced tokens per block: data to tune the conv launcher.
                    for chunk_len in args.conv_chunk_lens:
                        cases.append(conv_case(model, tp, batch, seqlen, ops, ref_mod,
                                               chunk_len=chunk_len))
                if "scan" in wanted:
                    cases.append(scan_case(model, tp, batch, seqlen, ops, ref_mod))
                    if MODELS[model]["form"] == "mamba2":
                        # The recurrence beside the SSD kernel, same shapes, same process.
                        cases.append(scan_case(model, tp, batch, seqlen, ops, ref_mod,
                                               algorithm="recurrent"))
                    # Forced split lengths: data to tune the scan plan.
                    for split_len in args.scan_split_lens:
                        cases.append(scan_case(model, tp, batch, seqlen, ops, ref_mod,
                                               split_len=split_len))
                    # Forced lanes per channel (Mamba1's staged walk): one pass with 2 / 4 / 8
                    # lanes against the automatic plan at the shard shapes and batch 1.
                    if MODELS[model]["form"] == "mamba1":
                        for lanes in args.scan_lanes:
                            cases.append(scan_case(model, tp, batch, seqlen, ops, ref_mod,
                                                   lanes=lanes))
                    if args.scan_direct and MODELS[model]["form"] == "mamba1":
                        cases.append(scan_case(model, tp, batch, seqlen, ops, ref_mod,
                                               algorithm="recurrent_direct"))
            if "scan" in wanted and MODELS[model]["form"] == "mamba2":
                for algorithm in ("auto", "recurrent"):
                    cases.append(scan_case(model, tp, 0, 0, ops, ref_mod, algorithm=algorithm,
                                           seqlens=VARLEN_SEQLENS))
            for batch in decode:
                if "conv_update" in wanted:
                    cases.append(conv_update_case(model, tp, batch, ops, ref_mod))
                if "state_update" in wanted:
                    cases.append(ssu_case(model, tp, batch, ops, ref_mod))
        if "norm" in wanted:
            for rows in NORM_ROWS:
                if HIDDEN[model] not in norm_widths:
                    cases.append(add_rms_norm_case(model, rows, ops))
                if model != "mamba-2.8b":  # Mamba-1 proper has no gated or weightless norm
                    cases.append(gated_rms_norm_case(model, rows, ops))
            norm_widths.add(HIDDEN[model])
    return cases


def print_table(results: List[Dict], copy_gbs: float) -> None:
    print(f"\ndevice copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    head = (f"{'op':<23}{'model':<16}{'tp':>3} {'shape':<36}{'us':>10}{'MB':>9}{'GB/s':>8}"
            f"{'%copy':>7}{'x ref':>9}{'x native':>10}{'TFLOP/s':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        ref = f"{r['speedup_vs_ref']:.1f}" if "speedup_vs_ref" in r else "-"
        nat = f"{r['speedup_vs_native']:.2f}" if "speedup_vs_native" in r else "-"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        pct = f"{r['pct_copy']:.1f}" + ("*" if r.get("l2_resident") else "")
        print(f"{r['op']:<23}{r['model']:<16}{r['tp']:>3} {r['shape']:<36}{r['time_us']:>10.1f}"
              f"{r['bytes'] / 1e6:>9.1f}{r['gbs']:>8.0f}{pct:>7}{ref:>9}{nat:>10}"
              f"{tf:>9}")
    if any(r.get("l2_resident") for r in results):
        print("* inputs within two L2s: an L2 figure, not DRAM bandwidth")
    notes = sorted({r.get("ref_note", "") for r in results} - {""})
    if notes:
        print("reference timings: " + "; ".join(notes))
    # Forced scan algorithms against the launcher's choice, same shapes, same process.
    times = {(r["model"], r["tp"], r["shape"]): r["time_us"] for r in results
             if r["op"] == "selective_scan"}
    for suffix, what in ((" recurrent_direct", "the launcher's plan over the direct walk"),
                         (" recurrent", "the SSD kernel over the recurrence")):
        ratios = []
        for (model, tp, shape), forced_us in times.items():
            plain = shape.removesuffix(suffix)
            if plain != shape and (model, tp, plain) in times:
                ratios.append(f"{model} tp{tp} {plain}: x{forced_us / times[model, tp, plain]:.2f}")
        if ratios:
            print(f"scan speedup of {what}: " + "; ".join(ratios))

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of shapes, fewer repeats")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--ops", default="conv,scan,conv_update,state_update,norm")
    parser.add_argument("--models", default="",
                        help="comma-separated subset of " + ",".join(MODELS) + " (default all)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-ref", action="store_true", help="skip the slow reference timings")
    parser.add_argument("--scan-direct", action="store_true",
                        help="add Mamba1 scan rows with the direct token walk forced "
                             "(algorithm='recurrent_direct') beside the launcher's own plan")
    parser.add_argument("--scan-split-lens", default="",
                        help="comma-separated split lengths to force on the prefill scan cases "
                             "(extra rows beside the launcher's own plan), e.g. 256,1024,4096")
    parser.add_argument("--scan-lanes", default="",
                        help="comma-separated lanes per channel (1, 2, 4, 8) to force on the "
                             "Mamba1 prefill scan cases (extra rows beside the launcher's own "
                             "plan)")
    parser.add_argument("--conv-chunk-lens", default="",
                        help="comma-separated chunk_len values (tokens per block) to force on "
                             "the prefill conv cases (extra rows beside the launcher's one tile "
                             "per block), e.g. 128,256,1024")
    args = parser.parse_args(argv)
    args.scan_split_lens = [int(v) for v in args.scan_split_lens.split(",") if v.strip()]
    args.conv_chunk_lens = [int(v) for v in args.conv_chunk_lens.split(",") if v.strip()]
    args.scan_lanes = [int(v) for v in args.scan_lanes.split(",") if v.strip()]

    if not torch.cuda.is_available():
        print("bench_ssm_ops: CUDA is required (no CUDA device found); nothing to benchmark")
        return 0
    import tpssm
    from tpssm import ops
    from tpssm import reference as ref_mod
    from tpssm.bench import git_commit

    if not tpssm.has_cuda_kernels():
        print("bench_ssm_ops: this tpssm build has no CUDA kernels; nothing to benchmark")
        return 0
    torch.manual_seed(0)
    reps = args.reps or (5 if args.quick else 15)
    copy_gbs = copy_bandwidth()
    results = []
    # Reference timings once per (op, model, tp) in quick mode: they dominate the run time.
    seen_ref = set()
    for case in build_cases(args, ops, ref_mod):
        key = (case.op, case.model, case.tp)
        with_ref = not args.no_ref and (not args.quick or key not in seen_ref)
        seen_ref.add(key)
        try:
            res = run_case(case, copy_gbs, reps, with_ref)
        except torch.cuda.OutOfMemoryError:
            res = dict(op=case.op, model=case.model, tp=case.tp, shape=case.shape,
                       error="out of memory")
            torch.cuda.empty_cache()
            print(f"skipped {case.op} {case.model} tp{case.tp} {case.shape}: out of memory")
            continue
        results.append(res)
        print(f"{res['op']:<23}{res['model']:<16} tp{res['tp']} {res['shape']:<36}"
              f"{res['time_us']:9.1f} us {res['gbs']:7.0f} GB/s {res['pct_copy']:5.1f}%",
              flush=True)
    print_table(results, copy_gbs)
    if args.json:
        payload = dict(
            device=torch.cuda.get_device_name(0), torch=torch.__version__,
            cuda=torch.version.cuda, git_commit=git_commit() or "unknown",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            copy_bandwidth_gbs=copy_gbs, quick=args.quick, activation_dtype=str(ACT),
            state_dtype=str(STATE), results=results)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
