"""benchmarks/bench_peers.py calls each peer kernel the way tpssm's op is called: on small cases
built by bench_ssm_ops.py's own builders (tiny shards of each family, bf16 activations, fp32
states, the SSD scans across chunk and sequence boundaries, decode states at permuted slots of
a larger pool), the peers' Triton kernels run on the CPU in Triton's interpreter and agree with
tpssm's CPU ops, outputs and the states they write (the SSD scans and vLLM's convs on fp16
copies of the bf16 inputs: see in_fp16). The CUDA-only peers are checked as far as the CPU allows:
vLLM's Mamba-1 scan by its input layouts and argument struct, mamba_ssm's by an emulation of its
library's work through its argument struct, causal-conv1d's conv by its library's own argument
check and an emulation of its kernels' addressing. Peers called wrongly
(B and C swapped, the slots left out, the residual or the conv states not written, the conv's
initial states left out) and NaN on either side are caught by the same comparison.

Needs the peer kernels staged (python benchmarks/stage_peers.py: .peer/, git-ignored, never in the
repository), triton and einops; skips without them (CI has none of the three). Without a GPU this
is the check that the GPU run will time like for like."""

import importlib.util
import os
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
import contextlib, ctypes, dataclasses, os, sys, types
import numpy as np
os.environ["TRITON_INTERPRET"] = "1"
import torch
torch.cuda.device = lambda index: contextlib.nullcontext()
from triton.runtime.autotuner import Autotuner
Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None, **kw: [1.0, 1.0, 1.0])
sys.path.insert(0, "benchmarks")
import bench_peers
import bench_ssm_ops as bench
from bench_peers import Peer
from tpssm import ops, reference

from triton.runtime import interpreter

# vLLM's conv prefill hands the kernel its program lists by replacing arguments in the grid
# function's dict, which a compiled launch follows and the interpreter does not: here it does.
interpreter_init = interpreter.GridExecutor.__init__


def grid_executor_init(self, fn, arg_names, grid, *rest, **kw):
    if callable(grid):
        user_grid = grid

        def grid(args):
            meta = dict(args)
            dims = user_grid(meta)
            for name, value in meta.items():
                if value is not args[name] and isinstance(value, torch.Tensor):
                    args[name] = interpreter._implicit_cvt(value)
            return dims
    interpreter_init(self, fn, arg_names, grid, *rest, **kw)


interpreter.GridExecutor.__init__ = grid_executor_init
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


def spread_slots(case):
    """The case with its rows' states in a larger pool, at permuted slots (the builders' pools
    hold exactly the rows, slot b for row b): a peer that ignored the slots would differ."""
    key = "state" if case.op == "selective_state_update" else "conv_state"

    def make_set():
        s = case.make_set()
        rows = s[key].shape[0]
        pool = torch.randn((rows + 3,) + s[key].shape[1:]).to(s[key].dtype)
        slots = torch.randperm(rows + 3)[:rows]
        while (slots == torch.arange(rows)).any():  # no row at its own index: see no_slots
            slots = torch.randperm(rows + 3)[:rows]
        pool[slots] = s[key]
        return dict(s, **{key: pool, "idx": slots.to(torch.int32)})
    return dataclasses.replace(case, make_set=make_set)


cases = [bench.scan_case("mamba2-2.7b", 1, 2, 300, ops, reference),
         bench.scan_case("mamba2-2.7b", 2, 1, 70, ops, reference)]
cases += [spread_slots(bench.ssu_case(m, tp, 3, ops, reference)) for m in bench.MODELS
          for tp in (1, 2)]
cases += [spread_slots(bench.conv_update_case(m, tp, 3, ops, reference)) for m in bench.MODELS
          for tp in (1, 2)]
cases += [bench.add_rms_norm_case("mamba-2.8b", 5, ops),
          bench.gated_rms_norm_case("mamba2-2.7b", 5, ops)]


def in_fp16(peer):
    """Triton's interpreter gets bf16 arithmetic wrong (the SSD kernels' outputs near 1e11,
    vLLM's conv update NaN), where the same values agree with tpssm in fp16: on the CPU those
    peers see fp16 copies of the bf16 inputs (exact: bf16's 8 significant bits fit in fp16's 11
    at these magnitudes), and what they write is copied back."""
    def call(s):
        narrow = {k: v.half() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16
                  else v for k, v in s.items()}
        peer.call(narrow)
        s["peer_out"] = narrow["peer_out"]
        for k, v in s.items():
            if narrow[k] is not v and isinstance(v, torch.Tensor):
                v.copy_(narrow[k])
    return dataclasses.replace(peer, call=call)


def interpretable(case, name, peer):
    """The Triton peers of the ops whose bf16 the interpreter gets wrong, on fp16 copies."""
    triton = not name.startswith("cconv1d")
    if triton and case.op in ("selective_scan", "causal_conv1d_update"):
        return in_fp16(peer)
    return peer


# causal-conv1d's convs are CUDA only. Here its library stands in for itself as far as it can
# without a GPU: its own argument checks (host code) refuse what the kernels would, and the
# convs are then done by emulate_conv / emulate_conv_update below, which read and write the
# tensors through the raw addresses and element strides bench_peers put in the argument
# structs, as the kernels address them.
# Without the library (stage_peers.py found no nvcc) only vLLM's conv is checked.
conv_path = bench_peers.PEER_DIR / bench_peers.CONV_LIBRARY
conv_lib = ctypes.CDLL(str(conv_path)) if conv_path.exists() else None
if conv_lib is not None:
    conv_lib.peer_conv_args_check.restype = ctypes.c_int
    conv_lib.peer_conv_args_check.argtypes = [ctypes.POINTER(bench_peers._ConvArgs)]
    conv_lib.peer_conv_update_args_check.restype = ctypes.c_int
    conv_lib.peer_conv_update_args_check.argtypes = [
        ctypes.POINTER(bench_peers._ConvUpdateArgs)]


def raw(ptr, shape, strides, dtype=torch.bfloat16):
    """bf16 (fp32, int32) elements at a raw address, as a tensor sharing that memory."""
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    word = {torch.bfloat16: ctypes.c_uint16, torch.float32: ctypes.c_float,
            torch.int32: ctypes.c_int32}[dtype]
    words = np.ctypeslib.as_array((word * extent).from_address(ptr))
    size = ctypes.sizeof(word)
    strided = np.lib.stride_tricks.as_strided(words, shape, [size * st for st in strides])
    t = torch.from_numpy(strided)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def emulate_conv(args_ref):
    a = args_ref._obj
    refused = conv_lib.peer_conv_args_check(args_ref)
    if refused:
        return refused
    B, D, L, W = a.batch, a.dim, a.seqlen, a.width
    states = (a.states_batch_stride, a.states_c_stride, a.states_l_stride)
    x = raw(a.x, (B, D, L), (a.x_batch_stride, a.x_c_stride, a.x_l_stride)).float()
    weight = raw(a.weight, (D, W), (a.weight_c_stride, a.weight_width_stride)).float()
    bias = raw(a.bias, (D,), (1,)).float() if a.bias else torch.zeros(D)
    start = (raw(a.initial_states, (B, D, W - 1), states).float() if a.initial_states
             else torch.zeros(B, D, W - 1))
    full = torch.cat([start, x], dim=-1)
    y = sum(full[..., k:k + L] * weight[:, k:k + 1] for k in range(W)) + bias[:, None]
    y = torch.nn.functional.silu(y) if a.silu else y
    raw(a.out, (B, D, L), (a.out_batch_stride, a.out_c_stride, a.out_l_stride)).copy_(y)
    if a.final_states:
        raw(a.final_states, (B, D, W - 1), states).copy_(full[..., L:])
    return 0


def emulate_conv_update(args_ref):
    a = args_ref._obj
    refused = conv_lib.peer_conv_update_args_check(args_ref)
    if refused:
        return refused
    B, D, L, W, S = a.batch, a.dim, a.seqlen, a.width, a.state_len
    x = raw(a.x, (B, D, L), (a.x_batch_stride, a.x_c_stride, a.x_l_stride)).float()
    weight = raw(a.weight, (D, W), (a.weight_c_stride, a.weight_width_stride)).float()
    bias = raw(a.bias, (D,), (1,)).float() if a.bias else torch.zeros(D)
    pool = raw(a.conv_state, (a.slots, D, S),
               (a.state_batch_stride, a.state_c_stride, a.state_l_stride))
    out = raw(a.out, (B, D, L), (a.out_batch_stride, a.out_c_stride, a.out_l_stride))
    slots = (raw(a.conv_state_indices, (B,), (1,), torch.int32).tolist()
             if a.conv_state_indices else list(range(B)))
    for b, slot in enumerate(slots):
        if slot < 0:  # a padded row
            out[b] = 0
            continue
        full = torch.cat([pool[slot].float(), x[b]], dim=-1)  # (D, S + L)
        y = torch.stack([(full[:, S - (W - 1) + i:S + 1 + i] * weight).sum(-1) + bias
                         for i in range(L)], dim=-1)
        out[b] = torch.nn.functional.silu(y) if a.silu else y
        pool[slot] = full[:, L:]
    return 0


# The Mamba-1 scans are CUDA only. mamba_ssm's: its library's work emulated through the raw
# addresses in its argument struct, in the contiguous layouts its shim gives the kernel (its
# running states per chunk of the length the library reports: the last chunk's odd entries are
# the final state, which the emulation writes after running tpssm's reference; the rest NaN),
# so that the inputs' layouts, the final-state copy and the comparison from zero states are
# checked, across a chunk boundary too.
dense_path = bench_peers.PEER_DIR / bench_peers.DENSE_SCAN_LIBRARY
if dense_path.exists():
    dense_lib = ctypes.CDLL(str(dense_path))
    dense_lib.peer_dense_scan_args_layout.restype = ctypes.c_longlong
    DENSE_CHUNK = dense_lib.peer_dense_scan_args_layout(2)
else:
    DENSE_CHUNK = bench_peers.DENSE_SCAN_CHUNK


def emulate_dense_scan(args_ref):
    a = args_ref._obj
    b, d, length, n, g = a.batch, a.dim, a.seqlen, a.dstate, a.groups

    def rows(ptr):  # (batch, dim, seqlen) as (batch, seqlen, dim)
        return raw(ptr, (b, d, length), (d * length, length, 1)).transpose(1, 2)

    def states_major(ptr):  # (batch, groups, dstate, seqlen) as (batch, seqlen, groups, dstate)
        return raw(ptr, (b, g, n, length), (g * n * length, n * length, length, 1)).permute(
            0, 3, 1, 2)

    f32 = torch.float32
    final = torch.zeros(b, d, n)
    y = reference.selective_scan_ref(
        rows(a.u), rows(a.delta), raw(a.A, (d, n), (n, 1), f32), states_major(a.B),
        states_major(a.C), raw(a.D, (d,), (1,), f32), rows(a.z),
        raw(a.delta_bias, (d,), (1,), f32), delta_softplus=bool(a.delta_softplus),
        ssm_states=final, has_initial_state=torch.zeros(b, dtype=torch.bool))
    rows(a.out_z).copy_(y)
    chunks = -(-length // DENSE_CHUNK)
    running = raw(a.x, (b, d, chunks, 2 * n), (d * chunks * 2 * n, chunks * 2 * n, 2 * n, 1),
                  f32)
    running.fill_(float("nan"))
    running[:, :, -1, 1::2] = final
    return 0


# On the CPU the CUDA-only peers run emulated (causal-conv1d's only where its library's checks
# are at hand), vLLM's Mamba-1 scan not at all.
emulate_if_built = {} if conv_lib is None else dict(causal_conv1d_fwd=emulate_conv,
                                                     causal_conv1d_update=emulate_conv_update)
cpu_peers = types.SimpleNamespace(**{
    **vars(peers), "causal_conv1d_fwd": None, "causal_conv1d_update": None,
    "vllm_mamba1_scan": None, "mamba_ssm_mamba1_scan": emulate_dense_scan, **emulate_if_built})


for case in cases:
    for name, peer in bench_peers.peer_calls(case, cpu_peers).items():
        print("diff", name, case.op, case.model, case.tp, case.shape,
              bench_peers.compare(case, interpretable(case, name, peer)))
# No peer: the conv prefill at a forced chunk length (a tuning row), Falcon-Mamba's weightless
# norms.
none = [bench.conv_case("mamba-2.8b", 1, 1, 8, ops, reference, chunk_len=4),
        bench.gated_rms_norm_case("falcon-mamba-7b", 2, ops)]
print("no peer", [bench_peers.peer_calls(c, peers) for c in none])

for model in bench.MODELS:
    for tp in (1, 2):
        case = bench.conv_case(model, tp, 2, 70, ops, reference)
        for name, peer in bench_peers.peer_calls(case, cpu_peers).items():
            peer = in_fp16(peer) if name.startswith("vllm") else peer  # vLLM's is Triton
            try:
                diff = bench_peers.compare(case, peer)
            except RuntimeError as exc:
                diff = f"refused {exc}"
            print("conv diff", name, case.model, case.tp, case.shape, diff)
print("conv peers", peers.causal_conv1d_fwd is not None,
      sorted(bench_peers.peer_calls(case, peers)))
# Conv peers called wrongly: the channel-last kernel without its initial states; the
# channel-first one compared on the case's own set (its rows start from states it cannot
# take); its final states not copied to the pool.
case = bench.conv_case("mamba-2.8b", 1, 2, 70, ops, reference)
right = bench_peers.peer_calls(case, cpu_peers)


def no_initial(s):
    emulate_conv(ctypes.byref(bench_peers.causal_conv1d_args(
        s["x"].transpose(1, 2), s["weight"], s["bias"], s["peer_out"].transpose(1, 2), None,
        s["conv_states"])))


def states_unwritten(s):
    emulate_conv(ctypes.byref(bench_peers.causal_conv1d_args(
        s["peer_x"], s["weight"], s["bias"], s["peer_out_cf"])))
    s["peer_out"] = s["peer_out_cf"].transpose(1, 2)


if conv_lib is not None:
    wrong_conv = dict(
        conv_no_initial=dataclasses.replace(right["cconv1d"], call=no_initial),
        conv_from_states=dataclasses.replace(right["cconv1d-cf"], from_zero_states=False),
        conv_states_unwritten=dataclasses.replace(right["cconv1d-cf"], call=states_unwritten))
    for name, peer in wrong_conv.items():
        print("wrong", name, bench_peers.compare(case, peer))


# The library's check refuses what the kernels cannot do: channels not a multiple of 8 or
# states with the channel-first kernel, width 5, rows not 16-byte aligned for the channel-first
# kernel's 16-byte moves, a 32-bit offset overflow.
def bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


def channel_last(b, d, length):  # (batch, dim, seqlen) view of token-major storage
    return bf16(b, length, d).transpose(1, 2)


x, xl = bf16(2, 64, 16), channel_last(2, 64, 16)
s_in, s_out = (bench_peers._channels_contiguous(bf16(2, 64, 3)) for _ in range(2))
w4, w5 = bf16(64, 4), bf16(64, 5)
shifted = bf16(2 * 64 * 16 + 1)[1:].view(2, 64, 16)  # 2 bytes past a 16-byte boundary
if conv_lib is not None:
    checks = dict(
        first=bench_peers.causal_conv1d_args(x, w4, None, x.clone()),
        last_states=bench_peers.causal_conv1d_args(xl, w4, None, channel_last(2, 64, 16),
                                                   s_in, s_out),
        first_states=bench_peers.causal_conv1d_args(x, w4, None, x.clone(), s_in, s_out),
        width5=bench_peers.causal_conv1d_args(x, w5, None, x.clone()),
        dim60=bench_peers.causal_conv1d_args(xl[:, :60], w4[:60], None,
                                             channel_last(2, 64, 16)[:, :60]),
        first_unaligned=bench_peers.causal_conv1d_args(shifted, w4, None, x.clone()))
    huge = bench_peers.causal_conv1d_args(x, w4, None, x.clone())
    huge.x_batch_stride = 1 << 32
    checks["offset_2_32"] = huge
    print("conv checks",
          {k: conv_lib.peer_conv_args_check(ctypes.byref(v)) for k, v in checks.items()})
    # The update's: width 5, a state shorter than width - 1, no slots for a pool smaller than
    # the batch.
    xu, slots2 = bf16(2, 64, 1), torch.tensor([1, 0], dtype=torch.int32)
    update_checks = dict(
        fine=bench_peers.causal_conv1d_update_args(xu, bf16(3, 64, 3), w4, None, xu.clone(),
                                                   slots2),
        width5=bench_peers.causal_conv1d_update_args(xu, bf16(3, 64, 4), w5, None, xu.clone(),
                                                     slots2),
        short_state=bench_peers.causal_conv1d_update_args(xu, bf16(3, 64, 2), w4, None,
                                                          xu.clone(), slots2),
        pool_1_no_slots=bench_peers.causal_conv1d_update_args(xu, bf16(1, 64, 3), w4, None,
                                                              xu.clone(), None))
    # ... and what its grid and 32-bit offsets cannot take (host-only: the fields set by hand).
    for name, fields in dict(dim_grid=dict(dim=65535 * 64 + 1),
                             offset_2_32=dict(state_batch_stride=1 << 31),
                             negative_stride=dict(x_c_stride=-1),
                             seqlen_2_31=dict(seqlen=(1 << 31) + 5, x_l_stride=0,
                                              out_l_stride=0)).items():
        args = bench_peers.causal_conv1d_update_args(xu, bf16(3, 64, 3), w4, None, xu.clone(),
                                                     slots2)
        for field, value in fields.items():
            setattr(args, field, value)
        update_checks[name] = args
    print("conv update checks", {k: conv_lib.peer_conv_update_args_check(ctypes.byref(v))
                                 for k, v in update_checks.items()})
    # Called wrongly: the slots left out (rows at their own index of the pool).
    update_case = cases[8]
    update_peer = bench_peers.peer_calls(update_case, cpu_peers)["cconv1d"]

    def update_no_slots(s):
        emulate_conv_update(ctypes.byref(bench_peers.causal_conv1d_update_args(
            s["x"][:, :, None], s["conv_state"], s["weight"], s["bias"],
            s["peer_out"][:, :, None], None)))
    print("wrong conv_update_no_slots", bench_peers.compare(
        update_case, dataclasses.replace(update_peer, call=update_no_slots)))
# What bench_peers itself refuses before the library sees it (the shim reads bf16 only, and
# its kernels read the initial states and write the final ones unordered).
refusals = dict(
    shared_states=lambda: bench_peers.causal_conv1d_args(xl, w4, None, xl.clone(), s_in, s_in),
    fp16_x=lambda: bench_peers.causal_conv1d_args(x.half(), w4, None, x.clone()),
    weight_shape=lambda: bench_peers.causal_conv1d_args(x, w4[:32], None, x.clone()),
    states_shape=lambda: bench_peers.causal_conv1d_args(xl, w4, None, xl.clone(), s_in[:1]))
for name, attempt in refusals.items():
    try:
        attempt()
        print("conv refusal", name, "none")
    except ValueError as exc:
        print("conv refusal", name, str(exc).split(":")[1].split()[0])
# The Mamba-1 scans: mamba_ssm's emulated (above), on Mamba and Falcon-Mamba shards and a row
# across a running-state chunk boundary.
dense_cases = [bench.scan_case(model, tp, 2, 70, ops, reference)
               for model in ("mamba-2.8b", "falcon-mamba-7b") for tp in (1, 2)]
dense_cases.append(bench.scan_case("mamba-2.8b", 2, 1, DENSE_CHUNK + 70, ops, reference))
for case in dense_cases:
    peer = bench_peers.peer_calls(case, cpu_peers)["mamba_ssm"]
    print("mamba1 diff mamba_ssm", case.model, case.tp, case.shape.split()[0],
          bench_peers.compare(case, peer))
case = dense_cases[0]  # 70 tokens: the initial states' effect has not decayed
peer = bench_peers.peer_calls(case, cpu_peers)["mamba_ssm"]
print("wrong mamba1_from_states",
      bench_peers.compare(case, dataclasses.replace(peer, from_zero_states=False)))


def final_state_not_copied(s):
    saved = s["ssm_states"].clone()
    peer.call(s)
    s["ssm_states"].copy_(saved)


print("wrong mamba1_states_unwritten",
      bench_peers.compare(case, dataclasses.replace(peer, call=final_state_not_copied)))
# vLLM's: its inputs in its layouts (element by element). For both, the library's view of its
# arguments (load_peers checks the struct's size and last offset against the library's).
m1 = bench.scan_case("mamba-2.8b", 1, 2, 5, ops, reference)
print("mamba1 peers", sorted(bench_peers.peer_calls(m1, peers)), peers.vllm_mamba1_scan is not None,
      peers.mamba_ssm_mamba1_scan is not None)
s = m1.make_set()
v = bench_peers._vllm_mamba1_inputs(s)
same = [torch.equal(v[f"peer_{k}"][c, b * 5 + t], s[k][b, t, c]) for k in ("u", "delta", "z")
        for b, t, c in ((0, 0, 0), (1, 4, 47), (1, 2, 13))]
same += [torch.equal(v[f"peer_{k}"][0, n, b * 5 + t], s[k][b, t, 0, n]) for k in ("B", "C")
         for b, t, n in ((0, 0, 0), (1, 4, 15), (1, 2, 7))]
print("mamba1 layout", len(same), all(same), all(t.is_contiguous() for k, t in v.items()
                                                 if k.startswith("peer_")),
      v["cu_seqlens"].tolist(), v["shape"], "u" in v)

# Peers called wrongly: B and C swapped in the scan; the slots left out of the state update;
# the residual left unwritten by the norm; NaN from either side.
ssu, norm = cases[2], cases[-2]
scan = interpretable(cases[0], "mamba_ssm",
                     bench_peers.peer_calls(cases[0], peers)["mamba_ssm"])


def swapped(s):
    wrong = dict(s, B=s["C"], C=s["B"])
    scan.call(wrong)
    s["peer_out"] = wrong["peer_out"]


def no_slots(s):
    s["peer_out"] = peers.state_update(s["state"], s["x"], s["dt"], ssu.consts["A"], s["B"],
                                       s["C"], D=ssu.consts["D"], z=s["z"],
                                       dt_bias=ssu.consts["dbias"], dt_softplus=True)


def no_residual(s):
    s["peer_out"], _ = peers.add_rms_norm(s["x"], s["weight"], None, residual=s["residual"],
                                          eps=1e-5, prenorm=True, residual_in_fp32=True)
    s["peer_states"] = {"residual": s["residual"]}


print("wrong swapped", bench_peers.compare(cases[0], Peer(swapped)))
print("wrong no_slots", bench_peers.compare(ssu, Peer(no_slots)))
print("wrong no_residual", bench_peers.compare(norm, Peer(no_residual)))
nan_peer = Peer(lambda s: s.update(peer_out=torch.full_like(s["out"], float("nan"))))
print("nan peer", bench_peers.compare(ssu, nan_peer))
nan_ours = dataclasses.replace(ssu, call=lambda s: s["out"].fill_(float("nan")))
print("nan ours", bench_peers.compare(nan_ours, bench_peers.peer_calls(ssu, peers)["vllm"]))


# The rows, with the timing stubbed (CUDA graphs need a GPU): a peer that raises gets a row with
# its error, and the others still run.
def broken(s):
    raise RuntimeError("unsupported here")


def run_once(case, copy_gbs, reps, with_ref):
    case.call(case.make_set())
    return dict(time_us=2.0, pct_copy=40.0)


bench.run_case = run_once
rows = bench_peers.run_peers(ssu, {"broken": Peer(broken), **bench_peers.peer_calls(ssu, peers)},
                             4000.0, 1)
print("rows", [(r["peer"], r.get("error"), r.get("speedup_vs_peer")) for r in rows])
synthetic = [dict(op="scan", model="mamba-2.8b", peer="p", speedup_vs_peer=2.0,
                  outputs_finite=True),
             dict(op="scan", model="falcon-mamba-7b", peer="p", speedup_vs_peer=0.5,
                  outputs_finite=True),
             dict(op="scan", model="mamba-2.8b", peer="p", speedup_vs_peer=9.0,
                  outputs_finite=False),
             dict(op="scan", model="mamba2-2.7b", peer="p", speedup_vs_peer=3.0,
                  outputs_finite=True),
             dict(op="scan", model="mamba2-2.7b", peer="q", error="RuntimeError: no")]
for line in bench_peers.summary(synthetic):
    print("summary|" + " ".join(line.split()))
conv = cases[8]
rows = bench_peers.run_peers(conv, {name: interpretable(conv, name, peer) for name, peer
                                    in bench_peers.peer_calls(conv, cpu_peers).items()}, 4000.0,
                             1)
print("conv rows", [(r["peer"], r["outputs_finite"], r["max_rel_diff"] < 1e-2) for r in rows])
'''

# bf16 outputs: a few roundings of the output's magnitude apart (the two sum in other orders).
TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def lines():
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.splitlines()


def test_peers_agree_with_tpssm(lines):
    diffs = [line for line in lines if line.startswith("diff ")]
    # 2 scans and 6 state updates, mamba_ssm's and vLLM's; 6 conv updates, vLLM's on its layout
    # and on ours, and causal-conv1d's (emulated, where its library was built); 2 norms.
    built = (ROOT / ".peer" / "lib" / "libcausal_conv1d.so").exists()
    assert len(diffs) == (36 if built else 30), lines
    for peer_op, count in ((" vllm selective_scan ", 2), (" vllm selective_state_update ", 6),
                           (" vllm causal_conv1d_update ", 6),
                           (" vllm@ours causal_conv1d_update ", 6),
                           (" cconv1d causal_conv1d_update ", 6 if built else 0)):
        assert sum(peer_op in line for line in diffs) == count, (peer_op, lines)
    for line in diffs:
        assert float(line.split()[-1]) < TOLERANCE, line


def test_no_peer_where_it_has_no_kernel(lines):
    assert "no peer [{}, {}]" in lines, lines


def test_the_mamba1_scan_peers(lines):
    """The CUDA-only peers: listed when stage_peers.py built their libraries (whose argument
    layouts load_peers checks against bench_peers'); vLLM's inputs in its layouts (checked
    element by element); mamba_ssm's, with its library's work emulated through the struct's raw
    addresses, agree with tpssm's op, outputs and final states, from zero states."""
    vllm = (ROOT / ".peer" / "lib" / "libvllm_selective_scan.so").exists()
    dense = (ROOT / ".peer" / "lib" / "libmamba_ssm_selective_scan.so").exists()
    names = sorted((["vllm"] if vllm else []) + (["mamba_ssm"] if dense else []))
    assert f"mamba1 peers {names} {vllm} {dense}" in lines, lines
    assert "mamba1 layout 15 True True [0, 5, 10] (2, 5, 48, 1, 16) False" in lines, lines
    diffs = [line for line in lines if line.startswith("mamba1 diff ")]
    # Mamba and Falcon-Mamba, tp 1 / 2, and a row of two running-state chunks
    assert len(diffs) == 5 and " 1x2118 " in diffs[-1], lines
    for line in diffs:
        assert float(line.split()[-1]) < TOLERANCE, line


def test_the_conv_peers(lines):
    """vLLM's Triton conv prefill (interpreted) and causal-conv1d's CUDA one (its library's own
    argument check, the conv emulated through the struct's raw addresses and strides: see
    emulate_conv) agree with tpssm's op, outputs and written states, on each family's tp 1 / 2
    shards; causal-conv1d's check refuses what its kernels cannot do."""
    built = (ROOT / ".peer" / "lib" / "libcausal_conv1d.so").exists()
    names = (['cconv1d', 'cconv1d-cf'] if built else []) + ['vllm', 'vllm@ours']
    assert f"conv peers {built} {names}" in lines, lines
    diffs = [line for line in lines if line.startswith("conv diff ")]
    # causal-conv1d's two kernels and vLLM's on two layouts, for 3 families x tp 1 / 2
    assert len(diffs) == (24 if built else 12), lines
    assert sum(" vllm@ours " in line for line in diffs) == 6, lines
    for line in diffs:
        if " dim 20 " in line and " cconv1d " in line:  # Falcon-Mamba's tp 2 toy shard
            assert "refused" in line and "CUDA error 1" in line, line  # cudaErrorInvalidValue
        else:
            assert float(line.split()[-1]) < TOLERANCE, line
    if built:
        assert ("conv checks {'first': 0, 'last_states': 0, 'first_states': 1, 'width5': 1, "
                "'dim60': 1, 'first_unaligned': 1, 'offset_2_32': 1}") in lines, lines
        assert ("conv update checks {'fine': 0, 'width5': 1, 'short_state': 1, "
                "'pool_1_no_slots': 1, 'dim_grid': 1, 'offset_2_32': 1, 'negative_stride': 1, "
                "'seqlen_2_31': 1}") in lines, lines
    refusals = [line for line in lines if line.startswith("conv refusal ")]
    assert refusals == ["conv refusal shared_states initial", "conv refusal fp16_x x",
                        "conv refusal weight_shape weight",
                        "conv refusal states_shape initial_states"
                        ], lines


def test_a_wrong_call_is_caught(lines):
    wrong = {line.split()[1]: float(line.split()[2]) for line in lines
             if line.startswith("wrong ")}
    conv = {"conv_no_initial", "conv_from_states", "conv_states_unwritten",
            "conv_update_no_slots"}
    built = (ROOT / ".peer" / "lib" / "libcausal_conv1d.so").exists()
    assert set(wrong) == ({"swapped", "no_slots", "no_residual", "mamba1_from_states",
                           "mamba1_states_unwritten"} | (conv if built else set())), lines
    for name, diff in wrong.items():
        assert diff > 10 * TOLERANCE, (name, diff)
    assert "nan peer inf" in lines and "nan ours inf" in lines, lines  # NaN is no match


def test_a_failing_peer_gives_an_error_row(lines):
    rows = [line for line in lines if line.startswith("rows ")]
    assert rows == ["rows [('broken', 'RuntimeError: unsupported here', None), "
                    "('mamba_ssm', None, 1.0), ('vllm', None, 1.0)]"], lines
    # The summary: a NOT FINITE row's speedup is left out of the mean, and said.
    assert [line for line in lines if line.startswith("summary|")] == [
        "summary|scan mamba1 p x peer 1.00 (geomean of 2, 0.50 - 2.00); 0 failed, 1 not finite",
        "summary|scan mamba2 p x peer 3.00 (geomean of 1, 3.00 - 3.00)",
        "summary|scan mamba2 q no row timed; 1 failed, 0 not finite"], lines
    # A peer with its own state layout is timed on it (its make_set adapts the case's).
    built = (ROOT / ".peer" / "lib" / "libcausal_conv1d.so").exists()
    assert ("conv rows [('vllm', True, True), ('vllm@ours', True, True)"
            + (", ('cconv1d', True, True)]" if built else "]")) in lines, lines
