"""tpssm's kernels timed beside the peer kernels that engines use today, in one process on one GPU.

The peers, staged in .peer/ by stage_peers.py (git-ignored; name ".peer" in the device call's
`carry`), are mamba_ssm's Triton kernels and vLLM's decode kernels:
- the chunked SSD scan of Mamba-2 prefill (mamba_chunk_scan_combined, chunk 256), given the pool's
  states as initial states and its final states copied back into the pool, as tpssm's op reads
  and writes them;
- the selective state update, Mamba-1 and Mamba-2 forms, rows addressed by state_batch_indices
  (Mamba-2's dt, A, D and dt bias broadcast over headdim with zero strides, as the models pass
  them), mamba_ssm's and vLLM's (its launch settings from its own tuned configurations where it
  has one for the GPU and shape);
- vLLM's conv update, on tpssm's conv state layout (slots, dim, width - 1);
- the fused residual add + RMSNorm (rms_norm_fn, prenorm, fp32 residual) and Mamba-2's gated
  RMSNorm (rmsnorm_fn, the gate before the norm).
Inputs, shapes, byte counts and timing are bench_ssm_ops.py's: CUDA-graph replays over input sets
rotated past the L2 cache, states reset outside the timed region, the % of the copy bandwidth
measured in the same run for the same essential bytes. The peer's Triton autotuning runs in the
warm-up, before capture. Before timing, each pair runs once on copies of the same inputs and
their outputs (and final states) are compared: `max_rel_diff` in the JSON and the table. A peer
that fails (a Triton version it does not support, say) gets a row with its error.
No peer here for the conv prefill (causal-conv1d is a separate CUDA extension; vLLM's Triton
one reads its launch metadata on the host, so no CUDA graph) or the Mamba-1 prefill scan
(mamba_ssm's is CUDA too).

    python benchmarks/stage_peers.py              # once, where PyPI is reachable
    python benchmarks/bench_peers.py [--quick] [--ops scan,conv_update,...] [--json PATH]

Without CUDA, or without .peer/, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
import bench_ssm_ops as bench  # noqa: E402  (the cases and the timing)

PEER_DIR = HERE.parent / ".peer"
SSD_CHUNK = 256  # mamba_ssm's Mamba2 module default


def load_peers(path: Path = PEER_DIR) -> Optional[SimpleNamespace]:
    """The peer functions, or None when they are not staged."""
    if not (path / "mamba_ssm").is_dir():
        return None
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    try:
        from vllm.model_executor.layers.mamba.ops.causal_conv1d import (
            causal_conv1d_update as vllm_conv_update)
        from vllm.model_executor.layers.mamba.ops.mamba_ssm import (
            selective_state_update as vllm_state_update)
    except Exception as exc:  # noqa: BLE001 - the other peers still run
        print(f"bench_peers: vLLM's kernels do not import here ({type(exc).__name__}: {exc}); "
              "mamba_ssm's only")
        vllm_conv_update = vllm_state_update = None
    version = (path / "VERSION").read_text().strip() if (path / "VERSION").exists() else "?"
    return SimpleNamespace(chunk_scan=mamba_chunk_scan_combined,
                           state_update=selective_state_update, add_rms_norm=rms_norm_fn,
                           gated_rms_norm=rmsnorm_fn, vllm_state_update=vllm_state_update,
                           vllm_conv_update=vllm_conv_update, version=version)


def peer_calls(case: bench.Case, peers: SimpleNamespace) -> Dict[str, Callable[[Dict], None]]:
    """The peers' calls on one of `case`'s input sets, by peer name (their outputs go to
    s["peer_out"], states to the set's pool); empty where no peer has such a kernel."""
    c = case.consts
    if case.op == "selective_scan" and c["m"]["form"] == "mamba2" and c["query_start_loc"] is None:
        h, p = c["m"]["nheads"], c["m"]["headdim"]

        def scan(s):
            b, length = s["u"].shape[:2]
            y, final = peers.chunk_scan(
                s["u"].view(b, length, h, p), s["delta"], c["A"], s["B"], s["C"], SSD_CHUNK,
                D=c["D"], z=s["z"].view(b, length, h, p), dt_bias=c["dbias"],
                initial_states=s["ssm_states"], dt_softplus=True, return_final_states=True)
            s["peer_out"] = y.view(b, length, h * p)
            s["ssm_states"].copy_(final)
        return {"mamba_ssm": scan}
    if case.op == "selective_state_update":
        m = c["m"]
        if m["form"] == "mamba1":
            A, D, dbias = c["A"], c["D"], c["dbias"]

            def dt_of(s):
                return s["dt"]
        else:
            h, p, n = m["nheads"], m["headdim"], m["dstate"]
            A = c["A"][:, None, None].expand(h, p, n)
            D, dbias = c["D"][:, None].expand(h, p), c["dbias"][:, None].expand(h, p)

            def dt_of(s):
                return s["dt"][:, :, None].expand(-1, h, p)

        def update(s):
            s["peer_out"] = peers.state_update(s["state"], s["x"], dt_of(s), A, s["B"], s["C"],
                                               D=D, z=s["z"], dt_bias=dbias, dt_softplus=True,
                                               state_batch_indices=s["idx"])

        def vllm_update(s):
            # null_block_id: vLLM skips rows whose slot equals it (its default, 0, is a slot
            # here); -1 is tpssm's pad slot, which no row of these cases uses.
            s["peer_out"] = torch.empty_like(s["x"])
            peers.vllm_state_update(s["state"], s["x"], dt_of(s), A, s["B"], s["C"], D, dbias,
                                    z=s["z"], dt_softplus=True, state_batch_indices=s["idx"],
                                    null_block_id=-1, out=s["peer_out"])
        calls = {"mamba_ssm": update}
        if peers.vllm_state_update is not None:
            calls["vllm"] = vllm_update
        return calls
    if case.op == "causal_conv1d_update" and peers.vllm_conv_update is not None:
        def conv_update(s):
            s["peer_out"] = torch.empty_like(s["x"])
            peers.vllm_conv_update(s["x"], s["conv_state"], s["weight"], s["bias"],
                                   activation="silu", conv_state_indices=s["idx"],
                                   null_block_id=-1, out=s["peer_out"])
        return {"vllm": conv_update}
    if case.op == "add_rms_norm":
        def add_norm(s):
            s["peer_out"], _ = peers.add_rms_norm(s["x"], s["weight"], None,
                                                  residual=s["residual"], eps=1e-5,
                                                  prenorm=True, residual_in_fp32=True)
        return {"mamba_ssm": add_norm}
    if case.op == "gated_rms_norm" and "gated" in case.shape:
        def gated(s):
            s["peer_out"] = peers.gated_rms_norm(s["x"], s["weight"], None, z=s["z"], eps=1e-6,
                                                 group_size=s["x"].shape[-1],
                                                 norm_before_gate=False)
        return {"mamba_ssm": gated}
    return {}


def compare(case: bench.Case, peer: Callable[[Dict], None]) -> float:
    """Both calls on copies of one input set: the largest difference of the outputs (and of the
    states written) relative to max(1, max |tpssm's|); inf where the peer's are not finite."""
    s = case.make_set()
    ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    case.call(ours)
    peer(theirs)
    pairs = [(ours["out"], theirs["peer_out"])]
    for key in ("ssm_states", "state", "conv_state"):
        if key in s:
            pairs.append((ours[key], theirs[key]))
    worst = 0.0
    for a, b in pairs:
        a, b = a.double(), b.double().reshape(a.shape)
        if not torch.isfinite(b).all():  # (NaN would pass max() unseen)
            return float("inf")
        worst = max(worst, ((a - b).abs().max() / max(1.0, a.abs().max().item())).item())
    return worst


OPS = ("scan", "conv_update", "state_update", "norm")


def build_cases(quick: bool, wanted, ops, ref_mod) -> List[bench.Case]:
    tps = bench.QUICK["tps"] if quick else bench.TPS
    decode = bench.QUICK["decode"] if quick else bench.DECODE_BATCHES
    prefill = bench.QUICK["prefill"] if quick else bench.PREFILLS
    cases = []
    if "scan" in wanted:
        for tp in tps:
            for batch, seqlen in prefill:
                cases.append(bench.scan_case("mamba2-2.7b", tp, batch, seqlen, ops, ref_mod))
    for model in bench.MODELS:
        for tp in tps:
            for batch in decode:
                if "conv_update" in wanted:
                    cases.append(bench.conv_update_case(model, tp, batch, ops, ref_mod))
                if "state_update" in wanted:
                    cases.append(bench.ssu_case(model, tp, batch, ops, ref_mod))
    if "norm" in wanted:
        for rows in bench.NORM_ROWS:
            for model in ("mamba-2.8b", "falcon-mamba-7b"):  # the two residual widths
                cases.append(bench.add_rms_norm_case(model, rows, ops))
            cases.append(bench.gated_rms_norm_case("mamba2-2.7b", rows, ops))
    return cases


def run_peers(case: bench.Case, calls: Dict[str, Callable[[Dict], None]], copy_gbs: float,
              reps: int) -> List[Dict]:
    """tpssm's call timed once, then each peer's: a row per peer."""
    ours = bench.run_case(case, copy_gbs, reps, with_ref=False)
    rows = []
    for name, peer in calls.items():
        row = dict(op=case.op, model=case.model, tp=case.tp, shape=case.shape, peer=name,
                   bytes=case.bytes, tpssm_us=ours["time_us"], tpssm_pct_copy=ours["pct_copy"])
        try:
            row["max_rel_diff"] = compare(case, peer)
            theirs = bench.run_case(dataclasses.replace(case, call=peer, native=None, ref=None),
                                    copy_gbs, reps, with_ref=False)
        except Exception as exc:  # noqa: BLE001 - a peer that fails here is reported, not fatal
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        row.update(peer_us=theirs["time_us"], peer_pct_copy=theirs["pct_copy"],
                   speedup_vs_peer=theirs["time_us"] / ours["time_us"])
        rows.append(row)
    return rows


def print_table(rows: List[Dict], copy_gbs: float, version: str) -> None:
    print(f"\ndevice copy bandwidth: {copy_gbs:.0f} GB/s (read + write); peers: {version} "
          f"(Triton)")
    head = (f"{'op':<23}{'model':<16}{'tp':>3} {'shape':<30}{'peer':<10}{'tpssm us':>9}"
            f"{'peer us':>9}{'x peer':>8}{'%copy':>7}{'peer %':>7}{'rel diff':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['op']:<23}{r['model']:<16}{r['tp']:>3} {r['shape']:<30}{r['peer']:<10}"
        if "error" in r:
            print(line + f"{r['tpssm_us']:>9.1f}  peer failed: {r['error'][:60]}")
            continue
        print(line + f"{r['tpssm_us']:>9.1f}{r['peer_us']:>9.1f}{r['speedup_vs_peer']:>8.2f}"
              f"{r['tpssm_pct_copy']:>7.1f}{r['peer_pct_copy']:>7.1f}{r['max_rel_diff']:>9.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tp 1 / 4, fewer shapes and repeats")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated subset of " + ",".join(OPS) + " (default all)")
    parser.add_argument("--reps", type=int, default=None, help="timed replays (default 5 / 15)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    wanted = [op.strip() for op in args.ops.split(",") if op.strip()]
    if not wanted or set(wanted) - set(OPS):
        parser.error(f"--ops takes a comma-separated subset of {','.join(OPS)}, got {args.ops!r}")
    if not torch.cuda.is_available():
        print("bench_peers: CUDA is required (no CUDA device found); nothing to benchmark")
        return 0
    peers = load_peers()
    if peers is None:
        print(f"bench_peers: no peer kernels in {PEER_DIR} (run benchmarks/stage_peers.py where "
              "PyPI is reachable, and carry .peer to the GPU machine); nothing to compare")
        return 0
    import tpssm
    from tpssm import ops
    from tpssm import reference as ref_mod
    from tpssm.bench import git_commit

    if not tpssm.has_cuda_kernels():
        print("bench_peers: this tpssm build has no CUDA kernels; nothing to benchmark")
        return 0
    torch.manual_seed(0)
    reps = args.reps or (5 if args.quick else 15)
    copy_gbs = bench.copy_bandwidth()
    rows = []
    for case in build_cases(args.quick, wanted, ops, ref_mod):
        calls = peer_calls(case, peers)
        if not calls:
            continue
        try:
            new_rows = run_peers(case, calls, copy_gbs, reps)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"skipped {case.op} {case.model} tp{case.tp} {case.shape}: out of memory")
            continue
        rows += new_rows
        for row in new_rows:
            outcome = (f"failed: {row['error']}" if "error" in row else
                       f"{row['peer_us']:9.1f} us  x{row['speedup_vs_peer']:.2f}  "
                       f"diff {row['max_rel_diff']:.1e}")
            print(f"{row['op']:<23}{row['model']:<16} tp{row['tp']} {row['shape']:<30}"
                  f"{row['tpssm_us']:9.1f} us  {row['peer']} {outcome}", flush=True)
    print_table(rows, copy_gbs, peers.version)
    if args.json:
        payload = dict(
            device=torch.cuda.get_device_name(0), torch=torch.__version__,
            cuda=torch.version.cuda, git_commit=git_commit() or "unknown", peer=peers.version,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            copy_bandwidth_gbs=copy_gbs, quick=args.quick, activation_dtype=str(bench.ACT),
            state_dtype=str(bench.STATE), rows=rows)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
