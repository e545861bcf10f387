"""benchmarks/bench_peers.py calls each peer kernel the way tpssm's op is called: on small cases
built by bench_ssm_ops.py's own builders (tiny shards of each family, bf16 activations, fp32
states, the SSD scan across a chunk boundary, slots by index), the peer's Triton kernels run on
the CPU in Triton's interpreter and agree with tpssm's CPU ops, outputs and states (the SSD
scan and vLLM's conv update on fp32 copies of the bf16 inputs: see in_fp32). A peer called
wrongly (B and C swapped), or one writing NaN, is caught by the same comparison.

Needs the peer kernels staged (python benchmarks/stage_peers.py: .peer/, git-ignored, never in the
repository), triton and einops; skips without them (CI has none of the three). Without a GPU this
is the check that the GPU run will time like for like."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [name for name in ("triton", "einops") if importlib.util.find_spec(name) is None]
if not (ROOT / ".peer" / "mamba_ssm").is_dir():
    MISSING.append(".peer/ (python benchmarks/stage_peers.py)")
pytestmark = pytest.mark.skipif(bool(MISSING), reason="needs " + ", ".join(MISSING))

# Runs in its own process: the interpreter is chosen when triton is first imported, and the two
# stand-ins below (the peer enters the tensors' CUDA device; the autotuner times configurations
# on a GPU) must not leak into other tests.
CHECK = r'''
import contextlib, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
torch.cuda.device = lambda index: contextlib.nullcontext()
from triton.runtime.autotuner import Autotuner
Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None, **kw: [1.0, 1.0, 1.0])
sys.path.insert(0, "benchmarks")
import bench_peers
import bench_ssm_ops as bench
from tpssm import ops, reference

bench.DEVICE = "cpu"
bench.MODELS = {
    "mamba-2.8b": dict(form="mamba1", d_inner=48, dstate=16, nheads=48, headdim=1, ngroups=1,
                       width=4),
    "falcon-mamba-7b": dict(form="mamba1", d_inner=40, dstate=8, nheads=40, headdim=1,
                            ngroups=1, width=4),
    "mamba2-2.7b": dict(form="mamba2", d_inner=64, dstate=16, nheads=4, headdim=16, ngroups=1,
                        width=4),
}
bench.HIDDEN = {"mamba-2.8b": 40, "falcon-mamba-7b": 72, "mamba2-2.7b": 40}
peers = bench_peers.load_peers()
torch.manual_seed(0)
cases = [bench.scan_case("mamba2-2.7b", 1, 2, 300, ops, reference),
         bench.scan_case("mamba2-2.7b", 2, 1, 70, ops, reference)]
cases += [bench.ssu_case(m, tp, 3, ops, reference) for m in bench.MODELS for tp in (1, 2)]
cases += [bench.conv_update_case(m, tp, 3, ops, reference) for m in bench.MODELS
          for tp in (1, 2)]
cases += [bench.add_rms_norm_case("mamba-2.8b", 5, ops),
          bench.gated_rms_norm_case("mamba2-2.7b", 5, ops)]


def in_fp32(peer):
    """Triton's interpreter gets some 16-bit arithmetic wrong (the SSD kernels' products: outputs
    near 1e11; vLLM's conv update: NaN), where the same values in fp32 agree with tpssm: on the
    CPU those peers see fp32 copies of the bf16 inputs, and what they write is copied back."""
    def call(s):
        wide = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v
                for k, v in s.items()}
        peer(wide)
        s["peer_out"] = wide["peer_out"]
        for k, v in s.items():
            if wide[k] is not v and isinstance(v, torch.Tensor):
                v.copy_(wide[k])
    return call


for case in cases:
    for name, peer in bench_peers.peer_calls(case, peers).items():
        if case.op in ("selective_scan", "causal_conv1d_update"):
            peer = in_fp32(peer)
        print("diff", name, case.op, case.model, case.tp, case.shape,
              bench_peers.compare(case, peer))
# No peer: the conv, the Mamba-1 prefill scan, Falcon-Mamba's weightless norms.
none = [bench.conv_case("mamba-2.8b", 1, 1, 8, ops, reference),
        bench.scan_case("mamba-2.8b", 1, 1, 8, ops, reference),
        bench.gated_rms_norm_case("falcon-mamba-7b", 2, ops)]
print("no peer", [bench_peers.peer_calls(c, peers) for c in none])
# A peer called wrongly: B and C swapped.
case = cases[0]
right = in_fp32(bench_peers.peer_calls(case, peers)["mamba_ssm"])
def swapped(s):
    wrong = dict(s, B=s["C"], C=s["B"])
    right(wrong)
    s["peer_out"] = wrong["peer_out"]
print("swapped", bench_peers.compare(case, swapped))
print("nan", bench_peers.compare(cases[2], lambda s: s.update(
    peer_out=torch.full_like(s["out"], float("nan")))))


# The rows, with the timing stubbed (CUDA graphs need a GPU): a peer that raises gets a row with
# its error, and the others still run.
def broken(s):
    raise RuntimeError("unsupported here")


bench.run_case = lambda case, copy_gbs, reps, with_ref: (case.call(case.make_set()) and None
                                                         or dict(time_us=2.0, pct_copy=40.0))
case = cases[2]
rows = bench_peers.run_peers(case, {"broken": broken, **bench_peers.peer_calls(case, peers)},
                             4000.0, 1)
print("rows", [(r["peer"], r.get("error"), r.get("speedup_vs_peer")) for r in rows])
'''

# bf16 outputs: a few roundings of the output's magnitude apart (the two sum in other orders).
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def lines():
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "python")})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.splitlines()


def test_peers_agree_with_tpssm(lines):
    diffs = [line for line in lines if line.startswith("diff ")]
    # 2 scans, 6 state updates (mamba_ssm's and vLLM's each), 6 conv updates (vLLM's), 2 norms.
    assert len(diffs) == 22, lines
    assert sum(" vllm selective_state_update " in line for line in diffs) == 6, lines
    assert sum(" vllm causal_conv1d_update " in line for line in diffs) == 6, lines
    for line in diffs:
        assert float(line.split()[-1]) < TOLERANCE, line


def test_no_peer_where_it_has_no_kernel(lines):
    assert "no peer [{}, {}, {}]" in lines, lines


def test_a_wrong_call_is_caught(lines):
    swapped = [float(line.split()[-1]) for line in lines if line.startswith("swapped ")]
    assert swapped and swapped[0] > 10 * TOLERANCE, lines
    assert "nan inf" in lines, lines  # NaN outputs are not a match


def test_a_failing_peer_gives_an_error_row(lines):
    rows = [line for line in lines if line.startswith("rows ")]
    assert rows == ["rows [('broken', 'RuntimeError: unsupported here', None), "
                    "('mamba_ssm', None, 1.0), ('vllm', None, 1.0)]"], lines
