"""Quantized two-shot all-reduce for the tensor-parallel aggregation (docs/qallreduce.md).

Schemes
- "exact": torch.distributed.all_reduce in the input dtype.
- "int8":  per-group (G = 32/64/128/256 contiguous elements, default 128) int8 codes with fp32
           scales; two quantization steps whatever the number of ranks.
- "fp8":   the same with e4m3 codes (saturating, round to nearest even).
- "fp16":  the paper's baseline: cast to fp16, exact all-reduce, cast back.

Two-shot algorithm for int8 / fp8 on N ranks (M elements, buffers uint8):
  1. qar_quantize_pack: x -> send, one chunk per owner rank.
  2. all-to-all: recv[r] = send_r[me].
  3. qar_reduce_requant: dequantize the N chunks, sum in rank order in fp32, requantize -> mine.
  4. all-gather mine -> gathered.
  5. qar_dequant: gathered -> y (optionally + residual, added in fp32 before the one rounding).
Every rank ends with bitwise-identical y. The chunk layout is documented in
python/tpssm/reference/qallreduce.py and csrc/kernels/qallreduce_params.h.

Two transports:
- composed (any backend, gloo on CPU included): the three kernels plus
  torch.distributed.all_to_all_single and all_gather_single.
- fused (CUDA + NCCL): one op, torch.ops.tpssm.qar_nccl_all_reduce, enqueues all five steps on
  the current stream with the extension's own NCCL communicator; no host sync, capturable in a
  CUDA graph. Used through QuantizedAllReduce(backend="fused" or "auto").

Public API
- all_reduce(x, group=None, scheme="int8", group_size=128, residual=None, min_bytes=0)
  -> Tensor
- QuantizedAllReduce(group, max_tokens, hidden, dtype, device, scheme, group_size, min_bytes,
  backend): persistent buffers, exact all-reduce below min_bytes.
- quantize_pack / reduce_requant / dequant / loopback: typed wrappers of the ops.
- chunk_bytes(numel, world_size, group_size), wire_bytes(numel, world_size, scheme, ...).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

import tpssm  # noqa: F401  (loads the extension that registers torch.ops.tpssm)
from tpssm.capture import capturing
from tpssm.parallel import all_gather_single, check_allreduce_backend, exchange
from tpssm.reference.qallreduce import (CODECS, SUPPORTED_GROUP_SIZES, pick_group_size,
                                        qar_layout, qar_wire_bytes)

__all__ = [
    "SCHEMES",
    "all_reduce",
    "QuantizedAllReduce",
    "quantize_pack",
    "reduce_requant",
    "dequant",
    "loopback",
    "chunk_bytes",
    "wire_bytes",
    "init_nccl_comm",
    "pick_group_size",
]

SCHEMES = ("exact", "int8", "fp8", "fp16")

_ops = torch.ops.tpssm


def _codec_id(codec) -> int:
    if isinstance(codec, int):
        return codec
    if codec not in CODECS:
        raise ValueError(f"codec must be 'int8' or 'fp8', got {codec!r}")
    return CODECS[codec][0]


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def chunk_bytes(numel: int, world_size: int, group_size: int = 128) -> int:
    """Bytes of one chunk: [sg*G codes | pad 16 | sg fp32 scales | pad 16], sg = ceil(M/G/N)."""
    return qar_layout(numel, world_size, group_size)["chunk_bytes"]


def wire_bytes(numel: int, world_size: int, scheme: str, group_size: int = 128,
               elem_bytes: int = 2) -> int:
    """Bytes each rank sends per all-reduce (modelled ring for exact/fp16, exact for int8/fp8)."""
    _check_scheme(scheme)
    return qar_wire_bytes(numel, world_size, scheme, group_size, elem_bytes)


# ---------------------------------------------------------------- typed wrappers of the ops


def quantize_pack(x: torch.Tensor, world_size: int, group_size: int = 128, codec="int8",
                  send: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., D) contiguous fp32/fp16/bf16, G | D -> send uint8 (>= N * chunk_bytes,).

    Chunk k of send holds the groups owned by rank k. Returns send.
    """
    if send is None:
        send = torch.empty(world_size * chunk_bytes(x.numel(), world_size, group_size),
                           dtype=torch.uint8, device=x.device)
    _ops.qar_quantize_pack(x, world_size, group_size, _codec_id(codec), send)
    return send


def reduce_requant(recv: torch.Tensor, numel: int, world_size: int, group_size: int = 128,
                   codec="int8", mine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """recv uint8 (>= N * chunk_bytes,), chunk r from rank r -> mine uint8 (>= chunk_bytes,).

    numel is M, the element count of the message (it fixes the layout). Returns mine.
    """
    if mine is None:
        mine = torch.empty(chunk_bytes(numel, world_size, group_size), dtype=torch.uint8,
                           device=recv.device)
    _ops.qar_reduce_requant(recv, numel, world_size, group_size, _codec_id(codec), mine)
    return mine


def dequant(gathered: torch.Tensor, out: torch.Tensor, world_size: int, group_size: int = 128,
            codec="int8", residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gathered uint8 (>= N * chunk_bytes,) -> out (..., D) (its shape and dtype fix M).

    out = cast(float(q) * s [+ float(residual)]); residual has out's shape and dtype. Returns out.
    """
    _ops.qar_dequant(gathered, world_size, group_size, _codec_id(codec), residual, out)
    return out


def loopback(xs: torch.Tensor, group_size: int = 128, codec="int8",
             residual: Optional[torch.Tensor] = None):
    """N simulated ranks in one process: xs (N, ..., D) holds rank r's partial sum at xs[r].

    Returns (out (N, ..., D), buffers) where buffers maps send/recv/gathered to uint8
    (N, N * chunk_bytes) and mine to (N, chunk_bytes), row r being rank r's buffer. residual has
    the per-rank shape xs.shape[1:].
    """
    n = xs.shape[0]
    cb = chunk_bytes(xs[0].numel(), n, group_size)
    dev = xs.device
    bufs = {
        "send": torch.empty(n, n * cb, dtype=torch.uint8, device=dev),
        "recv": torch.empty(n, n * cb, dtype=torch.uint8, device=dev),
        "mine": torch.empty(n, cb, dtype=torch.uint8, device=dev),
        "gathered": torch.empty(n, n * cb, dtype=torch.uint8, device=dev),
    }
    out = torch.empty_like(xs)
    _ops.qar_loopback(xs, group_size, _codec_id(codec), residual, bufs["send"], bufs["recv"],
                      bufs["mine"], bufs["gathered"], out)
    return out, bufs


@torch.library.register_fake("tpssm::qar_quantize_pack")
def _qar_quantize_pack_fake(x, world_size, group_size, codec, send):
    return None


@torch.library.register_fake("tpssm::qar_reduce_requant")
def _qar_reduce_requant_fake(recv, numel, world_size, group_size, codec, mine):
    return None


@torch.library.register_fake("tpssm::qar_dequant")
def _qar_dequant_fake(gathered, world_size, group_size, codec, residual, out):
    return None


@torch.library.register_fake("tpssm::qar_loopback")
def _qar_loopback_fake(xs, group_size, codec, residual, send, recv, mine, gathered, out):
    return None


@torch.library.register_fake("tpssm::qar_nccl_all_reduce")
def _qar_nccl_all_reduce_fake(handle, x, group_size, codec, residual, send, recv, mine,
                              gathered, out):
    return None


# ---------------------------------------------------------------- composed path


def _add_residual(y: torch.Tensor, residual: Optional[torch.Tensor], dtype) -> torch.Tensor:
    if residual is None:
        return y.to(dtype)
    if residual.shape != y.shape:
        raise ValueError(f"residual must have the shape of x {tuple(y.shape)}, "
                         f"got {tuple(residual.shape)}")
    return (y.to(torch.float32) + residual.to(torch.float32)).to(dtype)


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    if x.data_ptr() % 16 != 0:
        x = x.clone()
    return x


def _plain_all_reduce(x, group, scheme, residual):
    if scheme == "fp16":
        y = x.to(torch.float16, copy=True)
    else:
        y = x.clone()
    dist.all_reduce(y, group=group)
    return _add_residual(y, residual, x.dtype)


def _two_shot(x, group, n, codec, group_size, residual, send, recv, mine, gathered, out):
    numel = x.numel()
    cb = chunk_bytes(numel, n, group_size)
    send, recv, gathered, mine = send[: n * cb], recv[: n * cb], gathered[: n * cb], mine[:cb]
    _ops.qar_quantize_pack(x, n, group_size, codec, send)
    exchange(dist.all_to_all_single, recv, send, group)
    _ops.qar_reduce_requant(recv, numel, n, group_size, codec, mine)
    exchange(all_gather_single, gathered, mine, group)
    _ops.qar_dequant(gathered, n, group_size, codec, residual, out)
    return out


def all_reduce(x: torch.Tensor, group=None, scheme: str = "int8", group_size: int = 128,
               residual: Optional[torch.Tensor] = None, min_bytes: int = 0) -> torch.Tensor:
    """Sum of x over the ranks of `group` (x: (..., D), fp32/fp16/bf16; G must divide D).

    Returns a new tensor of x's shape and dtype, the same bytes on every rank; with `residual`
    (x's shape and dtype) returns cast(float(sum) + float(residual)). One rank: x itself (plus
    the residual). Messages of fewer than `min_bytes` bytes use the exact all-reduce whatever
    the scheme (small decode messages are latency-bound). Composed transport (works on gloo and
    NCCL); allocates its buffers per call - use QuantizedAllReduce on the decode hot path.
    """
    _check_scheme(scheme)
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    n = dist.get_world_size(group)
    if n == 1 or x.numel() == 0:
        return _add_residual(x.clone(), residual, x.dtype)
    if x.numel() * x.element_size() < min_bytes:
        return _plain_all_reduce(x, group, "exact", residual)
    if scheme in ("exact", "fp16"):
        return _plain_all_reduce(x, group, scheme, residual)
    x = _aligned(x)
    if residual is not None:
        residual = _aligned(residual)
    cb = chunk_bytes(x.numel(), n, group_size)
    dev = x.device
    send = torch.empty(n * cb, dtype=torch.uint8, device=dev)
    recv = torch.empty_like(send)
    gathered = torch.empty_like(send)
    mine = torch.empty(cb, dtype=torch.uint8, device=dev)
    out = torch.empty_like(x)
    return _two_shot(x, group, n, _codec_id(scheme), group_size, residual, send, recv, mine,
                     gathered, out)


# ---------------------------------------------------------------- fused NCCL path

# Per member list: a process-wide counter would give different keys on ranks that created
# communicators for other groups first (e.g. one TP group per data-parallel replica), and they
# would then wait for a key nobody sets.
_comm_counters: dict = {}


def init_nccl_comm(group=None, device=None) -> int:
    """Creates the extension's own NCCL communicator over `group` and returns its handle.

    Collective: every rank of the group calls it, in the same order relative to other calls.
    Rank 0 of the group draws the unique id and shares its 128 bytes through the default
    torch.distributed store; each rank then joins with ncclCommInitRank on `device` (default: the
    current CUDA device).
    """
    if not tpssm.has_cuda_kernels():
        raise RuntimeError("init_nccl_comm needs the CUDA build of tpssm")
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(n))
    members = "-".join(map(str, ranks))
    index = _comm_counters.get(members, 0)
    _comm_counters[members] = index + 1
    key = f"tpssm/qar_nccl_id/{members}/{index}"
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        uid = _ops.qar_nccl_unique_id()
        store.set(key, bytes(uid.tolist()))
    else:
        uid = torch.tensor(list(store.get(key)), dtype=torch.uint8)
    # ncclCommInitRank blocks without a timeout until every rank has joined: first make sure they
    # all got this far, so that a missing rank raises the store's timeout error instead of hanging.
    store.set(f"{key}/joined/{rank}", b"1")
    store.wait([f"{key}/joined/{r}" for r in range(n)])
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    with torch.cuda.device(device):
        return int(_ops.qar_nccl_init(uid, rank, n))


class QuantizedAllReduce:
    """Reusable all-reduce with persistent buffers (fixed addresses: CUDA-graph safe).

    Buffers are sized once for max_tokens x hidden elements. Messages smaller than `min_bytes`
    (bytes of x) use the exact all-reduce, since decode-sized messages are latency-bound.
    backend: "composed" (torch.distributed collectives on the buffers), "fused" (one op on the
    extension's own NCCL communicator, CUDA only) or "auto" (fused on CUDA with the CUDA build
    and an NCCL group, composed otherwise).

    hidden=None serves any last dim (a model's reductions of several widths share one set of
    buffers): each int8 / fp8 call quantizes in groups of pick_group_size(width, group_size)
    elements and reduces exactly when no supported size divides the width (fp16 casts at any
    width); dtype=None accepts any dtype;
    max_elements sizes the buffers. reserve(numel) grows them (never during CUDA-graph capture;
    the buffers a captured graph uses are kept alive for its replays).
    """

    def __init__(self, group=None, max_tokens: int = 1, hidden: Optional[int] = 128,
                 dtype: Optional[torch.dtype] = torch.bfloat16, device=None,
                 scheme: str = "int8", group_size: int = 128, min_bytes: int = 0,
                 backend: str = "auto", max_elements: Optional[int] = None):
        _check_scheme(scheme)
        check_allreduce_backend(backend)
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got "
                             f"{group_size}")
        if hidden is not None and hidden % group_size != 0:
            raise ValueError(f"group_size ({group_size}) must divide hidden ({hidden})")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.max_tokens, self.hidden, self.dtype = max_tokens, hidden, dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.scheme, self.group_size, self.min_bytes = scheme, group_size, min_bytes
        self.codec = _codec_id(scheme) if scheme in CODECS else None
        self.handle = None
        n = self.world_size
        if backend == "auto":
            backend = "composed"
            if (self.device.type == "cuda" and tpssm.has_cuda_kernels()
                    and dist.get_backend(group) == "nccl" and self.codec is not None and n > 1):
                backend = "fused"
        if backend == "fused" and (self.device.type != "cuda" or not tpssm.has_cuda_kernels()):
            raise ValueError("backend='fused' needs a CUDA device and the CUDA build of tpssm")
        self.backend = backend
        self.capacity = 0
        # Buffers a CUDA graph may have captured: kept alive when reserve() replaces them, since
        # a replay still reads and writes them.
        self._captured = False
        self._retired = []
        self.reserve(max_elements if max_elements is not None
                     else max_tokens * (hidden or group_size))
        if backend == "fused" and self.codec is not None and n > 1:
            self.handle = init_nccl_comm(group, self.device)

    def _bytes_for(self, numel: int) -> int:
        # Chunk bytes for any group size a call may pick: small sizes carry more scales, large
        # ones round stripes up further.
        sizes = ([self.group_size] if self.hidden is not None
                 else [g for g in SUPPORTED_GROUP_SIZES if g <= self.group_size])
        return max(chunk_bytes(-(-numel // g) * g, self.world_size, g) for g in sizes)

    def reserve(self, numel: int) -> None:
        """Grows the buffers to hold messages of numel elements (no-op when they do)."""
        need = self._bytes_for(max(1, int(numel)))
        if need <= self.capacity:
            return
        if capturing(self.device):
            raise RuntimeError(f"QuantizedAllReduce: a {numel}-element message does not fit the "
                               f"buffers during graph capture; reserve() before capturing")
        n = self.world_size
        mk = lambda size: torch.zeros(size, dtype=torch.uint8, device=self.device)  # noqa: E731
        if self._captured:
            self._retired.append((self.send, self.recv, self.mine, self.gathered))
            self._captured = False
        self.capacity = need
        self.send, self.recv = mk(n * need), mk(n * need)
        self.mine, self.gathered = mk(need), mk(n * need)

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (tokens, hidden) (any leading shape) -> the sum over ranks (+ residual)."""
        n = self.world_size
        group_size = self.group_size
        if self.hidden is not None:
            if x.shape[-1] != self.hidden:
                raise ValueError(f"x must have hidden dim {self.hidden}, got shape "
                                 f"{tuple(x.shape)}")
            if x.numel() > self.max_tokens * self.hidden:
                raise ValueError(f"x has {x.numel() // self.hidden} tokens, more than max_tokens "
                                 f"({self.max_tokens}) the buffers were sized for")
        else:
            group_size = pick_group_size(x.shape[-1], self.group_size)
        if self.dtype is not None and x.dtype != self.dtype:
            raise ValueError(f"x must have dtype {self.dtype}, got {x.dtype}")
        if residual is not None and residual.dtype != x.dtype:
            raise ValueError(f"residual must have the dtype of x ({x.dtype}), got "
                             f"{residual.dtype}")
        if n == 1 or x.numel() == 0:
            y = _add_residual(x.clone(), residual, x.dtype)
        elif (x.numel() * x.element_size() < self.min_bytes
              or (self.codec is not None and not group_size)):
            y = _plain_all_reduce(x, self.group, "exact", residual)
        elif self.codec is None:
            y = _plain_all_reduce(x, self.group, self.scheme, residual)
        else:
            y = None
        if y is not None:
            if out is None:
                return y
            return out.copy_(y)
        self.reserve(x.numel())
        self._captured = self._captured or capturing(self.device)
        x = _aligned(x)
        if residual is not None:
            residual = _aligned(residual)
        if out is None:
            out = torch.empty_like(x)
        if self.backend == "fused":
            _ops.qar_nccl_all_reduce(self.handle, x, group_size, self.codec, residual,
                                     self.send, self.recv, self.mine, self.gathered, out)
            return out
        return _two_shot(x, self.group, n, self.codec, group_size, residual, self.send,
                         self.recv, self.mine, self.gathered, out)

    def close(self) -> None:
        """Destroys the NCCL communicator of the fused backend (collective on the group).

        Destroy (or reset) every CUDA graph that captured this all-reduce first: NCCL >= 2.26
        makes ncclCommDestroy wait until no graph holds work of the communicator, so closing
        while such a graph is alive blocks forever.
        """
        self._retired.clear()   # the graphs that used them are gone (see above)
        if self.handle is not None:
            _ops.qar_nccl_destroy(self.handle)
            self.handle = None
