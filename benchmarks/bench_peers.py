"""tpssm's kernels timed beside the peer kernels that engines use today, in one process on one GPU.

The peers, staged in .peer/ by stage_peers.py (git-ignored; name ".peer" in the device call's
`carry`), are the kernels of mamba_ssm, vLLM and causal-conv1d, Triton and CUDA C++:
- the chunked SSD scan of Mamba-2 prefill, chunk 256: mamba_ssm's (mamba_chunk_scan_combined,
  given the pool's states as initial states, its final states copied back into the pool) and
  vLLM's varlen one (its chunk list built on the host as vLLM's engine does, initial states
  gathered from the slots as its Mamba2 layer does, final states written to the slots);
- the selective state update, Mamba-1 and Mamba-2 forms, rows addressed by state_batch_indices
  (Mamba-2's dt, A, D and dt bias broadcast over headdim with zero strides, as the models pass
  them), mamba_ssm's and vLLM's (its launch settings from its own tuned configurations where it
  has one for the GPU and shape);
- causal-conv1d's conv update (CUDA C++, built as below; transformers' Mamba decode and
  mamba_ssm call it), on tpssm's state layout - its callers' own;
- vLLM's conv update and conv prefill (the prefill with the program lists its engine builds on
  the host, so that the launch is graph-capturable), each on its engine's conv state layout
  (channels contiguous) and on tpssm's (slots, dim, width - 1): its strides are compile-time
  constants;
- the fused residual add + RMSNorm (rms_norm_fn, prenorm, fp32 residual) and Mamba-2's gated
  RMSNorm (rmsnorm_fn, the gate before the norm).
Inputs, shapes, byte counts and timing are bench_ssm_ops.py's: CUDA-graph replays over input sets
rotated past the L2 cache, states reset outside the timed region, the % of the copy bandwidth
measured in the same run for the same essential bytes. The peers' Triton autotuning runs again
for every case (their cache keys leave out rows and sequence lengths), before capture.
Programmatic dependent launch is off for both sides unless --programmatic-launch. Before
timing, each pair runs once on copies of the same inputs and their outputs and the states they
write are compared: `max_rel_diff` in the JSON and the table. A peer that fails (a Triton
version it does not support, say) gets a row with its error.
- vLLM's Mamba-1 prefill scan (CUDA C++: stage_peers.py builds its kernel code into a torch-free
  library called through ctypes), varlen, on the channels-major copies of the inputs its layer
  hands it, states read from and written to the slots; and mamba_ssm's, of which vLLM's is a
  fork (built the same way; transformers' Mamba fast path calls it), dense, on (batch, dim,
  seqlen) copies built before timing (mamba_ssm's Python makes the z / B / C ones on each call,
  untimed here) - it takes no initial state, and the final state goes to the pool by a copy
  after it, as in transformers.
- causal-conv1d's prefill conv (CUDA C++, built the same way), dense batches: its channel-last
  kernel (the one transformers' Mamba fast path reaches) on the same token-major x as tpssm's,
  its initial and final states in its layout (channels contiguous); and its channel-first
  kernel, as mamba_ssm's Mamba calls it, on the (batch, dim, seqlen) copy of x - it takes no
  initial state, and the last inputs go to the pool by a copy after it, as in that layer.

    python benchmarks/stage_peers.py              # once, where PyPI is reachable
    python benchmarks/bench_peers.py [--quick] [--ops scan,conv_update,...] [--json PATH]

Without CUDA, or without .peer/, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
import bench_ssm_ops as bench  # noqa: E402  (the cases and the timing)

PEER_DIR = HERE.parent / ".peer"
# The CUDA C++ peers, as stage_peers.py builds them (torch-free libraries called through ctypes).
SCAN_LIBRARY = "lib/libvllm_selective_scan.so"
CONV_LIBRARY = "lib/libcausal_conv1d.so"
DENSE_SCAN_LIBRARY = "lib/libmamba_ssm_selective_scan.so"
DENSE_SCAN_CHUNK = 2048  # tokens per chunk of mamba_ssm's Mamba-1 scan (its library says so too)
SSD_CHUNK = 256  # mamba_ssm's Mamba2 module default
OPS = ("scan", "conv", "conv_update", "state_update", "norm")


@dataclass
class Peer:
    """A peer's call on one input set (its output to s["peer_out"]; states it writes elsewhere
    than the set's own pool, under their key in s["peer_states"]). `adapt` turns a set of the
    case into the peer's layout, same values (None: the case's own)."""
    call: Callable[[Dict], None]
    adapt: Optional[Callable[[Dict], Dict]] = None
    note: str = ""
    resets: Tuple[str, ...] = ()  # inputs the call overwrites (restored between replays)
    # The peer takes no initial state: compared with tpssm's op on a set whose rows start from
    # zero states (both are still timed on the case's own sets).
    from_zero_states: bool = False

    def make_set(self, case: bench.Case) -> Dict:
        s = case.make_set()
        return self.adapt(s) if self.adapt else s


class _ScanArgs(ctypes.Structure):
    """The shim's PeerScanArgs (stage_peers.py's SCAN_SHIM), field for field."""
    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "u", "delta", "A", "B", "C", "D", "delta_bias", "z", "ssm_states", "query_start_loc",
        "cache_indices", "has_initial_state", "stream")]
        + [(name, ctypes.c_longlong) for name in (
            "batch", "dim", "tokens", "dstate", "groups", "null_block_id")]
        + [("delta_softplus", ctypes.c_int)])


class _DenseScanArgs(ctypes.Structure):
    """The shim's PeerDenseScanArgs (stage_peers.py's DENSE_SCAN_SHIM), field for field."""
    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "u", "delta", "A", "B", "C", "D", "delta_bias", "z", "out", "out_z", "x", "stream")]
        + [(name, ctypes.c_longlong) for name in ("batch", "dim", "seqlen", "dstate", "groups")]
        + [("delta_softplus", ctypes.c_int)])


class _ConvUpdateArgs(ctypes.Structure):
    """The shim's PeerConvUpdateArgs (stage_peers.py's CONV_SHIM), field for field."""
    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "x", "weight", "bias", "out", "conv_state", "conv_state_indices", "stream")]
        + [(name, ctypes.c_longlong) for name in (
            "batch", "dim", "seqlen", "width", "state_len", "slots", "x_batch_stride",
            "x_c_stride", "x_l_stride", "weight_c_stride", "weight_width_stride",
            "out_batch_stride", "out_c_stride", "out_l_stride", "state_batch_stride",
            "state_c_stride", "state_l_stride")]
        + [("silu", ctypes.c_int)])


class _ConvArgs(ctypes.Structure):
    """The shim's PeerConvArgs (stage_peers.py's CONV_SHIM), field for field."""
    _fields_ = ([(name, ctypes.c_void_p) for name in (
        "x", "weight", "bias", "out", "initial_states", "final_states", "stream")]
        + [(name, ctypes.c_longlong) for name in (
            "batch", "dim", "seqlen", "width", "x_batch_stride", "x_c_stride", "x_l_stride",
            "weight_c_stride", "weight_width_stride", "out_batch_stride", "out_c_stride",
            "out_l_stride", "states_batch_stride", "states_c_stride", "states_l_stride")]
        + [("silu", ctypes.c_int)])


def _load_library(path: Path, relative: str, entry: str, layout: str, args, last_field: str,
                  what: str, constants: Optional[Dict[int, int]] = None):
    """A peer's entry in a library stage_peers.py built, or None (with a line saying why). The
    library's view of its argument struct (size, offset of the last field: `layout`(0), (1))
    must be `args`', and `layout`(k) must be v for each k: v of `constants`."""
    library = path / relative
    if not library.exists():
        print(f"bench_peers: no {library} (stage_peers.py builds it where nvcc is): "
              f"no peer for {what}")
        return None
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as exc:  # built on another image: its C++ runtime may not be here
        print(f"bench_peers: {library} does not load here ({exc})")
        return None
    layout_of = getattr(lib, layout)
    layout_of.restype = ctypes.c_longlong
    found = (layout_of(0), layout_of(1))
    if found != (ctypes.sizeof(args), getattr(args, last_field).offset):
        print(f"bench_peers: {library}: its argument struct (size, last offset) {found} differs "
              f"from {args.__name__}: restage with stage_peers.py")
        return None
    for which, value in (constants or {}).items():
        if layout_of(which) != value:
            print(f"bench_peers: {library}: its {layout}({which}) is {layout_of(which)}, "
                  f"bench_peers assumes {value}")
            return None
    function = getattr(lib, entry)
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.POINTER(args)]
    return function


def load_peers(path: Path = PEER_DIR, programmatic_launch: bool = False
               ) -> Optional[SimpleNamespace]:
    """The peer functions, or None when they are not staged. programmatic_launch: let vLLM's
    convs (prefill and update) launch with PDL on sm_90+ as they do in vLLM (else off, like
    tpssm's kernels unless bench_peers runs them with it too)."""
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
            causal_conv1d_fn as vllm_conv, causal_conv1d_update as vllm_conv_update)
        from vllm.model_executor.layers.mamba.ops.mamba_ssm import (
            selective_state_update as vllm_state_update)
        from vllm.model_executor.layers.mamba.ops.ssd_combined import (
            mamba_chunk_scan_combined_varlen as vllm_chunk_scan)
        from vllm.platforms import current_platform
        if not programmatic_launch:
            current_platform.is_arch_support_pdl = lambda: False
    except Exception as exc:  # noqa: BLE001 - the other peers still run
        print(f"bench_peers: vLLM's kernels do not import here ({type(exc).__name__}: {exc}); "
              "mamba_ssm's only")
        vllm_conv = vllm_conv_update = vllm_state_update = vllm_chunk_scan = None
    version = (path / "VERSION").read_text().strip() if (path / "VERSION").exists() else "?"
    return SimpleNamespace(vllm_mamba1_scan=_load_library(
                               path, SCAN_LIBRARY, "peer_vllm_selective_scan_bf16",
                               "peer_scan_args_layout", _ScanArgs, "delta_softplus",
                               "vLLM's Mamba-1 prefill scan"),
                           mamba_ssm_mamba1_scan=_load_library(
                               path, DENSE_SCAN_LIBRARY, "peer_mamba_ssm_selective_scan_bf16",
                               "peer_dense_scan_args_layout", _DenseScanArgs, "delta_softplus",
                               "mamba_ssm's Mamba-1 prefill scan", {2: DENSE_SCAN_CHUNK}),
                           causal_conv1d_fwd=_load_library(
                               path, CONV_LIBRARY, "peer_causal_conv1d_fwd_bf16",
                               "peer_conv_args_layout", _ConvArgs, "silu",
                               "causal-conv1d's conv prefill"),
                           causal_conv1d_update=_load_library(
                               path, CONV_LIBRARY, "peer_causal_conv1d_update_bf16",
                               "peer_conv_update_args_layout", _ConvUpdateArgs, "silu",
                               "causal-conv1d's conv update"),
                           chunk_scan=mamba_chunk_scan_combined,
                           state_update=selective_state_update, add_rms_norm=rms_norm_fn,
                           gated_rms_norm=rmsnorm_fn, vllm_state_update=vllm_state_update,
                           vllm_conv=vllm_conv, vllm_conv_update=vllm_conv_update,
                           vllm_chunk_scan=vllm_chunk_scan,
                           version=version)


def clear_autotune_caches() -> None:
    """Forget the peers' autotuned choices: their keys leave out rows and sequence lengths, so
    a choice made on one case's shape would be reused on the next one's."""
    from triton.runtime.autotuner import Autotuner

    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith(("mamba_ssm.", "vllm.")):
            for obj in vars(module).values():
                if isinstance(obj, Autotuner):
                    obj.cache.clear()
            # vLLM's launch_autotuned keeps the choices once more, by the same keys.
            getattr(module, "_autotuned_configs", {}).clear()


def _channels_contiguous(states: torch.Tensor) -> torch.Tensor:
    """(rows, dim, width - 1) conv states with channels contiguous, as vLLM's engine keeps them
    and causal-conv1d's channel-last kernel reads and writes them: (rows, width - 1, dim)
    storage, seen as (rows, dim, width - 1)."""
    return states.transpose(1, 2).contiguous().transpose(1, 2)


def _vllm_conv_layout(s: Dict) -> Dict:
    return dict(s, conv_state=_channels_contiguous(s["conv_state"]))


def _ssd_chunks(seqlens: List[int], chunk: int) -> Dict[str, List[int]]:
    """vLLM's SSD chunk list for a packed batch: chunks end at every sequence end and every
    multiple of `chunk` tokens of the packed batch; per chunk its sequence, per sequence its last
    chunk."""
    bounds, seq_of_chunk, last = [0], [], []
    start = 0
    for b, n in enumerate(seqlens):
        pos, end = start, start + n
        while pos < end:
            pos = min(end, (pos // chunk + 1) * chunk)
            bounds.append(pos)
            seq_of_chunk.append(b)
        last.append(len(seq_of_chunk) - 1)
        start = end
    return dict(cu_chunk_seqlens=bounds, seq_idx=seq_of_chunk, last_chunk_indices=last)


def _vllm_ssd_inputs(s: Dict) -> Dict:
    """The launch metadata vLLM's engine builds on the host for a prefill batch (kept with the
    set, as vLLM keeps it with the step) and the output buffer it passes in."""
    b, length = s["u"].shape[:2]
    meta = _ssd_chunks([length] * b, SSD_CHUNK)
    on = dict(dtype=torch.int32, device=s["u"].device)
    return dict(s, cu_seqlens=torch.arange(0, b * length + 1, length, **on),
                slots=torch.arange(b, **on), peer_out=torch.empty_like(s["u"]),
                **{k: torch.tensor(v, **on) for k, v in meta.items()})


def _vllm_mamba1_inputs(s: Dict) -> Dict:
    """The case's inputs in the layouts vLLM's Mamba layer hands its scan (varlen: channels x
    tokens, tokens contiguous; B and C groups x dstate x tokens), with its batch description.
    Only what the peer reads: the token-major originals are left out, so that the sets rotated
    past the L2 cache hold the peer's bytes alone."""
    b, length, dim = s["u"].shape
    tokens = b * length
    groups, dstate = s["B"].shape[-2:]

    def channels_major(t):
        return t.reshape(tokens, -1).t().contiguous()

    def states_major(t):
        return t.reshape(tokens, groups, dstate).permute(1, 2, 0).contiguous()

    on = dict(dtype=torch.int32, device=s["u"].device)
    return dict(peer_u=channels_major(s["u"]), peer_delta=channels_major(s["delta"]),
                peer_z=channels_major(s["z"]), peer_B=states_major(s["B"]),
                peer_C=states_major(s["C"]), ssm_states=s["ssm_states"],
                has_initial_state=s["has_initial_state"],
                cu_seqlens=torch.arange(0, tokens + 1, length, **on),
                slots=torch.arange(b, **on), shape=(b, length, dim, groups, dstate))


def _mamba_ssm_mamba1_inputs(s: Dict) -> Dict:
    """The case's inputs as transformers' Mamba hands mamba_ssm's scan (dense: (batch, dim,
    seqlen); B and C (batch, groups, dstate, seqlen)), its outputs and running-state buffers,
    and the pool its final states are copied into. Only what the peer reads and writes."""
    b, length, dim = s["u"].shape
    dstate = s["B"].shape[-1]

    def channels_major(t):
        return t.transpose(1, 2).contiguous()

    chunks = -(-length // DENSE_SCAN_CHUNK)
    on = dict(dtype=s["u"].dtype, device=s["u"].device)
    return dict(peer_u=channels_major(s["u"]), peer_delta=channels_major(s["delta"]),
                peer_z=channels_major(s["z"]), peer_B=s["B"].permute(0, 2, 3, 1).contiguous(),
                peer_C=s["C"].permute(0, 2, 3, 1).contiguous(),
                peer_y=torch.empty(b, dim, length, **on),
                peer_gated=torch.empty(b, dim, length, **on),
                peer_running=torch.empty(b, dim, chunks, 2 * dstate, dtype=torch.float32,
                                         device=s["u"].device),
                ssm_states=s["ssm_states"])


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _check_causal_conv1d_tensors(x: torch.Tensor, **tensors) -> None:
    """What causal-conv1d's shims cannot see: every tensor bf16 (they read nothing else) on x's
    device, device 0 (their library's own CUDA runtime launches there), a contiguous bias."""
    for name, t in dict(x=x, **tensors).items():
        if t is not None and (t.dtype != torch.bfloat16 or t.device != x.device):
            raise ValueError(f"causal-conv1d peer: {name} must be bf16 on x's device")
    if x.is_cuda and x.device.index not in (None, 0):
        raise ValueError("causal-conv1d peer: its library launches on device 0 only")
    bias = tensors.get("bias")
    if bias is not None and bias.stride(0) != 1:
        raise ValueError("causal-conv1d peer: bias must be contiguous")


def causal_conv1d_args(x, weight, bias, out, initial_states=None, final_states=None
                       ) -> _ConvArgs:
    """causal-conv1d's forward conv as its binding describes it: x and out (batch, dim, seqlen)
    views, weight (dim, width), states (batch, dim, width - 1) views, strides in elements; SiLU
    on."""
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    given = dict(out=out, weight=weight, bias=bias, initial_states=initial_states,
                 final_states=final_states)
    _check_causal_conv1d_tensors(x, **given)
    # The shapes its binding checks.
    expected = dict(out=(batch, dim, seqlen), weight=(dim, width), bias=(dim,),
                    initial_states=(batch, dim, width - 1),
                    final_states=(batch, dim, width - 1))
    for name, t in given.items():
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(f"causal-conv1d peer: {name} is {tuple(t.shape)}, expected "
                             f"{expected[name]}")
    states = initial_states if initial_states is not None else final_states
    if initial_states is not None and final_states is not None:
        if initial_states.stride() != final_states.stride():
            raise ValueError("causal-conv1d takes one stride description for initial and "
                             f"final states: {initial_states.stride()} != "
                             f"{final_states.stride()}")
        # Its first 64-token chunk reads the initial states while its last writes the final
        # ones, nothing ordering the two.
        storages = {t.untyped_storage().data_ptr() for t in (initial_states, final_states)}
        if len(storages) == 1:
            raise ValueError("causal-conv1d peer: initial and final states must not share memory")

    def ptr(t):
        return None if t is None else t.data_ptr()

    return _ConvArgs(
        x=ptr(x), weight=ptr(weight), bias=ptr(bias), out=ptr(out),
        initial_states=ptr(initial_states), final_states=ptr(final_states), stream=_stream(x),
        batch=batch, dim=dim, seqlen=seqlen, width=width,
        x_batch_stride=x.stride(0), x_c_stride=x.stride(1), x_l_stride=x.stride(2),
        weight_c_stride=weight.stride(0), weight_width_stride=weight.stride(1),
        out_batch_stride=out.stride(0), out_c_stride=out.stride(1), out_l_stride=out.stride(2),
        **({} if states is None else dict(
            states_batch_stride=states.stride(0), states_c_stride=states.stride(1),
            states_l_stride=states.stride(2))),
        silu=1)


def _conv_channel_last_inputs(s: Dict) -> Dict:
    """The peer's initial states in its layout, and the buffer for the final states it writes
    (in its layout too, under the pool's key so that they are compared with tpssm's)."""
    return dict(x=s["x"], weight=s["weight"], bias=s["bias"],
                peer_initial=_channels_contiguous(s["conv_states"]),
                conv_states=_channels_contiguous(s["conv_states"]),
                peer_out=torch.empty_like(s["x"]))


def _conv_channel_first_inputs(s: Dict) -> Dict:
    """x as (batch, dim, seqlen), contiguous, as a Mamba layer's in_proj hands it to the conv;
    the token-major original left out (the sets rotated past the L2 hold the peer's bytes)."""
    x_cf = s["x"].transpose(1, 2).contiguous()
    return dict(peer_x=x_cf, weight=s["weight"], bias=s["bias"], conv_states=s["conv_states"],
                peer_out_cf=torch.empty_like(x_cf))


VLLM_CONV_TOKENS = 8  # tokens per program of vLLM's conv prefill (its BLOCK_M, fixed)


def _vllm_conv_inputs(s: Dict, states_layout=None) -> Dict:
    """The batch description vLLM's engine builds on the host for its conv prefill and passes
    as `metadata` (kept with the set, as vLLM keeps it with the step): per program of
    VLLM_CONV_TOKENS tokens its sequence and its chunk in the sequence. With it the launch
    reads nothing back from the GPU, so it can be captured in a CUDA graph."""
    b, length = s["x"].shape[:2]
    per_row = -(-length // VLLM_CONV_TOKENS)
    on = dict(dtype=torch.int32, device=s["x"].device)
    seq_of_program = torch.arange(b, dtype=torch.int32).repeat_interleave(per_row)
    chunk_of_program = torch.arange(per_row, dtype=torch.int32).repeat(b)
    # The lists on the host, their copies on the device (the kernel reads those).
    on_device = dict(batch_ptr=seq_of_program.to(on["device"]),
                     token_chunk_offset_ptr=chunk_of_program.to(on["device"]))
    programs = dict(tot=b * per_row, mlist=seq_of_program, mlist_len=b * per_row,
                    offsetlist=chunk_of_program, **on_device)
    metadata = SimpleNamespace(nums_dict={VLLM_CONV_TOKENS: programs}, **on_device)
    states = s["conv_states"] if states_layout is None else states_layout(s["conv_states"])
    return dict(x=s["x"], weight=s["weight"], bias=s["bias"], conv_states=states,
                has_initial_state=s["has_initial_state"],
                query_start_loc=torch.arange(0, b * length + 1, length, **on),
                slots=torch.arange(b, **on), metadata=metadata)


def _vllm_conv_peers(fn) -> Dict[str, Peer]:
    def conv(s):
        b, length, dim = s["x"].shape
        out = fn(s["x"].view(b * length, dim).t(), s["weight"], s["bias"], s["conv_states"],
                 s["query_start_loc"], cache_indices=s["slots"],
                 has_initial_state=s["has_initial_state"], activation="silu",
                 null_block_id=-1, metadata=s["metadata"])
        s["peer_out"] = out.t().view(b, length, dim)
    # Its state strides are compile-time constants: timed on its engine's layout, and on ours.
    return {"vllm": Peer(conv, lambda s: _vllm_conv_inputs(s, _channels_contiguous),
                         "its own state layout; output allocated in the call"),
            "vllm@ours": Peer(conv, _vllm_conv_inputs,
                              "on tpssm's (slots, dim, width - 1) layout; output allocated in "
                              "the call")}


def causal_conv1d_update_args(x, conv_state, weight, bias, out, slots) -> _ConvUpdateArgs:
    """causal-conv1d's conv update as its binding describes it: x and out (batch, dim, seqlen)
    views, the state pool (slots, dim, state_len) of any strides, int32 slots; SiLU on."""
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    _check_causal_conv1d_tensors(x, conv_state=conv_state, weight=weight, bias=bias, out=out)
    if (tuple(out.shape) != tuple(x.shape) or tuple(weight.shape) != (dim, width)
            or conv_state.shape[1] != dim or (bias is not None and tuple(bias.shape) != (dim,))):
        raise ValueError("causal-conv1d peer: out must be shaped as x, weight (dim, width), "
                         "conv_state (slots, dim, state_len), bias (dim,)")
    if slots is not None and (slots.dtype != torch.int32 or tuple(slots.shape) != (batch,)
                              or slots.stride(0) != 1 or slots.device != x.device):
        raise ValueError("causal-conv1d peer: slots must be contiguous int32 (batch,) on x's "
                         "device")
    return _ConvUpdateArgs(
        x=x.data_ptr(), weight=weight.data_ptr(),
        bias=None if bias is None else bias.data_ptr(), out=out.data_ptr(),
        conv_state=conv_state.data_ptr(),
        conv_state_indices=None if slots is None else slots.data_ptr(), stream=_stream(x),
        batch=batch, dim=dim, seqlen=seqlen, width=width, state_len=conv_state.shape[2],
        slots=conv_state.shape[0], x_batch_stride=x.stride(0), x_c_stride=x.stride(1),
        x_l_stride=x.stride(2), weight_c_stride=weight.stride(0),
        weight_width_stride=weight.stride(1), out_batch_stride=out.stride(0),
        out_c_stride=out.stride(1), out_l_stride=out.stride(2),
        state_batch_stride=conv_state.stride(0), state_c_stride=conv_state.stride(1),
        state_l_stride=conv_state.stride(2), silu=1)


def _causal_conv1d_update_peer(fn) -> Peer:
    def update(s):
        error = fn(ctypes.byref(causal_conv1d_update_args(
            s["x"][:, :, None], s["conv_state"], s["weight"], s["bias"],
            s["peer_out"][:, :, None], s["idx"])))
        if error:
            raise RuntimeError(f"causal-conv1d's conv update: CUDA error {error}")
    # (slots, dim, width - 1) contiguous is the layout its callers keep (with width columns
    # there): a thread per channel walks its state row.
    return Peer(update, lambda s: dict(s, peer_out=torch.empty_like(s["x"])),
                "on tpssm's (slots, dim, width - 1) layout, its callers' own")


def _conv_peers(fn) -> Dict[str, Peer]:
    def check(error):
        if error:
            raise RuntimeError(f"causal-conv1d's forward conv: CUDA error {error}")

    def channel_last(s):
        check(fn(ctypes.byref(causal_conv1d_args(
            s["x"].transpose(1, 2), s["weight"], s["bias"], s["peer_out"].transpose(1, 2),
            s["peer_initial"], s["conv_states"]))))

    def channel_first(s):
        check(fn(ctypes.byref(causal_conv1d_args(s["peer_x"], s["weight"], s["bias"],
                                                 s["peer_out_cf"]))))
        # As mamba_ssm's Mamba layer keeps its conv state after a prefill: a separate copy (of
        # width inputs there, of the width - 1 that tpssm's pool holds here).
        width = s["weight"].shape[1]
        s["conv_states"].copy_(s["peer_x"][:, :, s["peer_x"].shape[2] - (width - 1):])
        s["peer_out"] = s["peer_out_cf"].transpose(1, 2)

    return {"cconv1d": Peer(channel_last, _conv_channel_last_inputs,
                            "its channel-last kernel: initial and final states in its own "
                            "layout (channels contiguous)"),
            "cconv1d-cf": Peer(channel_first, _conv_channel_first_inputs,
                               "its channel-first kernel on the (batch, dim, seqlen) copy of x: "
                               "no initial state read (compared from zero states), the final "
                               "state a separate copy as in mamba_ssm's Mamba layer",
                               from_zero_states=True)}


def _vllm_mamba1_peer(c: Dict, fn) -> Peer:
    def mamba1_scan(s):
        b, length, dim, groups, dstate = s["shape"]
        args = _ScanArgs(
            u=s["peer_u"].data_ptr(), delta=s["peer_delta"].data_ptr(),
            A=c["A"].data_ptr(), B=s["peer_B"].data_ptr(), C=s["peer_C"].data_ptr(),
            D=c["D"].data_ptr(), delta_bias=c["dbias"].data_ptr(), z=s["peer_z"].data_ptr(),
            ssm_states=s["ssm_states"].data_ptr(), query_start_loc=s["cu_seqlens"].data_ptr(),
            cache_indices=s["slots"].data_ptr(),
            has_initial_state=s["has_initial_state"].data_ptr(),
            stream=_stream(s["peer_u"]), batch=b, dim=dim, tokens=b * length, dstate=dstate,
            groups=groups, null_block_id=-1, delta_softplus=1)
        error = fn(ctypes.byref(args))
        if error:
            raise RuntimeError(f"vLLM's Mamba-1 scan: CUDA error {error}")
        s["peer_out"] = s["peer_z"].t()  # its gated output, written over z
    # null_block_id -1: vLLM's layer passes 0 with slot 0 reserved; here 0 is a slot.
    return Peer(mamba1_scan, _vllm_mamba1_inputs,
                "its output written over delta and z (restored between replays); inputs in its "
                "channels-major layout, built before timing", resets=("peer_delta", "peer_z"))


def _mamba_ssm_mamba1_peer(c: Dict, fn) -> Peer:
    def mamba1_scan(s):
        b, dim, length = s["peer_u"].shape
        groups, dstate = s["peer_B"].shape[1:3]
        args = _DenseScanArgs(
            u=s["peer_u"].data_ptr(), delta=s["peer_delta"].data_ptr(), A=c["A"].data_ptr(),
            B=s["peer_B"].data_ptr(), C=s["peer_C"].data_ptr(), D=c["D"].data_ptr(),
            delta_bias=c["dbias"].data_ptr(), z=s["peer_z"].data_ptr(),
            out=s["peer_y"].data_ptr(), out_z=s["peer_gated"].data_ptr(),
            x=s["peer_running"].data_ptr(), stream=_stream(s["peer_u"]), batch=b, dim=dim,
            seqlen=length, dstate=dstate, groups=groups, delta_softplus=1)
        error = fn(ctypes.byref(args))
        if error:
            raise RuntimeError(f"mamba_ssm's Mamba-1 scan: CUDA error {error}")
        # As transformers' Mamba keeps the final state: the last chunk's state, copied.
        s["ssm_states"].copy_(s["peer_running"][:, :, -1, 1::2])
        s["peer_out"] = s["peer_gated"].transpose(1, 2)
    return Peer(mamba1_scan, _mamba_ssm_mamba1_inputs,
                "dense (batch, dim, seqlen) copies of the inputs, built before timing (its Python "
                "copies z / B / C per call: untimed); no initial state read (compared from zero "
                "states); the final state a separate copy, as in transformers' Mamba",
                from_zero_states=True)


def peer_calls(case: bench.Case, peers: SimpleNamespace) -> Dict[str, Peer]:
    """The peers of `case`, by name; empty where no peer has such a kernel."""
    c = case.consts
    if (case.op == "selective_scan" and c["m"]["form"] == "mamba1" and c["query_start_loc"] is None
            and "lanes" not in case.shape and "split" not in case.shape):
        calls = {}
        if peers.vllm_mamba1_scan is not None:
            calls["vllm"] = _vllm_mamba1_peer(c, peers.vllm_mamba1_scan)
        if peers.mamba_ssm_mamba1_scan is not None:
            calls["mamba_ssm"] = _mamba_ssm_mamba1_peer(c, peers.mamba_ssm_mamba1_scan)
        return calls
    if case.op == "causal_conv1d" and "chunk" not in case.shape:
        calls = {}
        if peers.causal_conv1d_fwd is not None:
            calls.update(_conv_peers(peers.causal_conv1d_fwd))
        if peers.vllm_conv is not None:
            calls.update(_vllm_conv_peers(peers.vllm_conv))
        return calls
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
        def vllm_scan(s):
            b, length = s["u"].shape[:2]
            tokens = b * length
            # As vLLM's Mamba2 layer: the rows' initial states gathered from their slots, the
            # final states written to the slots by the kernel.
            peers.vllm_chunk_scan(
                s["u"].view(tokens, h, p), s["delta"].view(tokens, h), c["A"],
                s["B"].view(tokens, *s["B"].shape[2:]), s["C"].view(tokens, *s["C"].shape[2:]),
                SSD_CHUNK, s["cu_seqlens"], s["cu_chunk_seqlens"], s["last_chunk_indices"],
                s["seq_idx"], s["peer_out"].view(tokens, h, p), D=c["D"],
                z=s["z"].view(tokens, h, p), dt_bias=c["dbias"],
                initial_states=s["ssm_states"][s["slots"]], dt_softplus=True,
                state_dtype=s["ssm_states"].dtype, final_states_out=s["ssm_states"],
                final_state_indices=s["slots"])
        # Per row, in MB: the pool's state read and written once more than tpssm's op does.
        pool_mb = 2 * 4 * c["m"]["d_inner"] * c["m"]["dstate"] / 1e6
        calls = {"mamba_ssm": Peer(scan, note=f"its final states copied into the pool: "
                                              f"+{pool_mb:.2f} MB a row of the peer's traffic")}
        if peers.vllm_chunk_scan is not None:
            calls["vllm"] = Peer(vllm_scan, _vllm_ssd_inputs,
                                 f"initial states gathered from the slots, as its layer does: "
                                 f"+{pool_mb:.2f} MB a row")
        return calls
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
        calls = {"mamba_ssm": Peer(update)}
        if peers.vllm_state_update is not None:
            calls["vllm"] = Peer(vllm_update)
        return calls
    if case.op == "causal_conv1d_update":
        calls = {}
        if peers.vllm_conv_update is not None:
            def conv_update(s):
                s["peer_out"] = torch.empty_like(s["x"])
                peers.vllm_conv_update(s["x"], s["conv_state"], s["weight"], s["bias"],
                                       activation="silu", conv_state_indices=s["idx"],
                                       null_block_id=-1, out=s["peer_out"])
            # Its strides are compile-time constants: timed on its engine's layout, and on ours.
            calls["vllm"] = Peer(conv_update, _vllm_conv_layout, "its own state layout")
            calls["vllm@ours"] = Peer(conv_update,
                                      note="on tpssm's (slots, dim, width - 1) layout")
        if peers.causal_conv1d_update is not None:
            calls["cconv1d"] = _causal_conv1d_update_peer(peers.causal_conv1d_update)
        return calls
    if case.op == "add_rms_norm":
        def add_norm(s):
            s["peer_out"], residual = peers.add_rms_norm(s["x"], s["weight"], None,
                                                         residual=s["residual"], eps=1e-5,
                                                         prenorm=True, residual_in_fp32=True)
            # Kept per set, so that each set's new residual has its own buffer as tpssm's.
            s["peer_states"] = {"residual": residual}
        return {"mamba_ssm": Peer(add_norm, note="residual written to a new buffer")}
    if case.op == "gated_rms_norm" and "gated" in case.shape:
        def gated(s):
            s["peer_out"] = peers.gated_rms_norm(s["x"], s["weight"], None, z=s["z"], eps=1e-6,
                                                 group_size=s["x"].shape[-1],
                                                 norm_before_gate=False)
        return {"mamba_ssm": Peer(gated)}
    return {}


def compare(case: bench.Case, peer: Peer) -> float:
    """Both calls on copies of one input set: the largest difference of the outputs and of the
    states they write, relative to max(1, max |tpssm's|); inf where either side's values are
    not finite (NaN would pass max() unseen)."""
    s = case.make_set()
    if peer.from_zero_states:
        s["has_initial_state"].zero_()
    ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    theirs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    if peer.adapt:
        theirs = peer.adapt(theirs)
    case.call(ours)
    peer.call(theirs)
    pairs = [(ours["out"], theirs["peer_out"])]
    for key in ("ssm_states", "state", "conv_state", "conv_states"):
        if key in s:
            pairs.append((ours[key], theirs[key]))
    pairs += [(ours[key], value) for key, value in theirs.get("peer_states", {}).items()]
    worst = 0.0
    for a, b in pairs:
        a, b = a.double(), b.double().reshape(a.shape)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return math.inf
        worst = max(worst, ((a - b).abs().max() / max(1.0, a.abs().max().item())).item())
    return worst


def build_cases(quick: bool, wanted, ops, ref_mod) -> List[bench.Case]:
    tps = bench.QUICK["tps"] if quick else bench.TPS
    decode = bench.QUICK["decode"] if quick else bench.DECODE_BATCHES
    prefill = bench.QUICK["prefill"] if quick else bench.PREFILLS
    cases = []  # in order of importance: a stage cut short keeps the first rows
    if "scan" in wanted:
        for model in ("mamba-2.8b", "mamba2-2.7b"):
            for tp in tps:
                for batch, seqlen in prefill:
                    cases.append(bench.scan_case(model, tp, batch, seqlen, ops, ref_mod))
    if "conv" in wanted:
        for model in bench.MODELS:
            for tp in tps:
                for batch, seqlen in prefill:
                    cases.append(bench.conv_case(model, tp, batch, seqlen, ops, ref_mod))
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


def run_peers(case: bench.Case, calls: Dict[str, Peer], copy_gbs: float,
              reps: int) -> List[Dict]:
    """tpssm's call timed once, then each peer's (autotuned on this case's shape first): a row
    per peer; a peer that fails gets its error in its row."""
    ours = bench.run_case(case, copy_gbs, reps, with_ref=False)
    rows = []
    for name, peer in calls.items():
        row = dict(op=case.op, model=case.model, tp=case.tp, shape=case.shape, peer=name,
                   bytes=case.bytes, tpssm_us=ours["time_us"], tpssm_pct_copy=ours["pct_copy"])
        if peer.note:
            row["peer_note"] = peer.note
        try:
            clear_autotune_caches()
            diff = compare(case, peer)
            timed = dataclasses.replace(case, call=peer.call, native=None, ref=None,
                                        make_set=lambda peer=peer: peer.make_set(case),
                                        resets=case.resets + peer.resets)
            theirs = bench.run_case(timed, copy_gbs, reps, with_ref=False)
        except Exception as exc:  # noqa: BLE001 - a peer that fails here is reported, not fatal
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        # JSON has no inf: a comparison that met NaN / inf says so instead.
        row.update(max_rel_diff=diff if math.isfinite(diff) else None,
                   outputs_finite=math.isfinite(diff), peer_us=theirs["time_us"],
                   peer_pct_copy=theirs["pct_copy"],
                   speedup_vs_peer=theirs["time_us"] / ours["time_us"])
        rows.append(row)
    return rows


def _outcome(r: Dict) -> str:
    if "error" in r:
        return f"peer failed: {r['error'][:70]}"
    diff = f"{r['max_rel_diff']:.1e}" if r["outputs_finite"] else "NOT FINITE"
    return (f"{r['peer_us']:>9.1f}{r['speedup_vs_peer']:>8.2f}{r['tpssm_pct_copy']:>7.1f}"
            f"{r['peer_pct_copy']:>7.1f}{diff:>11}")


def summary(rows: List[Dict]) -> List[str]:
    """A line per op, model form (Mamba-1 / Mamba-2) and peer: the geometric mean of `x peer`
    (> 1: tpssm faster) over the rows timed with finite outputs, its range, and how many rows
    failed or were not finite."""
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in rows:
        form = bench.MODELS.get(r.get("model"), {}).get("form", "")
        groups.setdefault((r["op"], form, r["peer"]), []).append(r)
    lines = []
    for (op, form, peer), group in groups.items():
        timed = [r["speedup_vs_peer"] for r in group
                 if "error" not in r and r["outputs_finite"]]
        failed = sum("error" in r for r in group)
        not_finite = len(group) - len(timed) - failed
        line = f"{op:<23}{form:<7}{peer:<11}"
        if timed:
            mean = math.exp(sum(math.log(x) for x in timed) / len(timed))
            line += (f"x peer {mean:5.2f} (geomean of {len(timed)}, "
                     f"{min(timed):.2f} - {max(timed):.2f})")
        else:
            line += "no row timed"
        if failed or not_finite:
            line += f"; {failed} failed, {not_finite} not finite"
        lines.append(line)
    return lines


def print_table(rows: List[Dict], copy_gbs: float, version: str) -> None:
    print(f"\ndevice copy bandwidth: {copy_gbs:.0f} GB/s (read + write); peers: {version}")
    # The summary first: the GPU scripts print the table's head only.
    for line in summary(rows):
        print("summary: " + line)
    head = (f"{'op':<23}{'model':<16}{'tp':>3} {'shape':<30}{'peer':<11}{'tpssm us':>9}"
            f"{'peer us':>9}{'x peer':>8}{'%copy':>7}{'peer %':>7}{'rel diff':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<23}{r['model']:<16}{r['tp']:>3} {r['shape']:<30}{r['peer']:<11}"
              f"{r['tpssm_us']:>9.1f}" + _outcome(r))
    notes = sorted({f"{r['peer']} {r['op']}: {r['peer_note']}" for r in rows if "peer_note" in r})
    for note in notes:
        print("note: " + note)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tp 1 / 4, fewer shapes and repeats")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="comma-separated subset of " + ",".join(OPS) + " (default all)")
    parser.add_argument("--reps", type=int, default=None, help="timed replays (default 5 / 15)")
    parser.add_argument("--programmatic-launch", action="store_true",
                        help="tpssm's kernels and vLLM's convs with programmatic dependent launch "
                             "(sm_90+; default off for both)")
    parser.add_argument("--json", type=Path,
                        help="write the rows as JSON here (rewritten after every case)")
    args = parser.parse_args(argv)
    wanted = [op.strip() for op in args.ops.split(",") if op.strip()]
    if not wanted or set(wanted) - set(OPS):
        parser.error(f"--ops takes a comma-separated subset of {','.join(OPS)}, got {args.ops!r}")
    if not torch.cuda.is_available():
        print("bench_peers: CUDA is required (no CUDA device found); nothing to benchmark")
        return 0
    peers = load_peers(programmatic_launch=args.programmatic_launch)
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
    ops.set_programmatic_launch(args.programmatic_launch)
    torch.manual_seed(0)
    reps = args.reps or (5 if args.quick else 15)
    copy_gbs = bench.copy_bandwidth()
    payload = dict(
        device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
        git_commit=git_commit() or "unknown", peer=peers.version,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        copy_bandwidth_gbs=copy_gbs, quick=args.quick,
        programmatic_launch=args.programmatic_launch, activation_dtype=str(bench.ACT),
        state_dtype=str(bench.STATE), rows=[])
    rows = payload["rows"]
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
            print(f"{row['op']:<23}{row['model']:<16} tp{row['tp']} {row['shape']:<30}"
                  f"{row['peer']:<11}{row['tpssm_us']:9.1f} us  " + _outcome(row), flush=True)
        if args.json:  # a run cut short keeps what it measured
            args.json.write_text(json.dumps(payload, indent=1))
    print_table(rows, copy_gbs, peers.version)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
