"""Tensor parallelism over torch.distributed: a TP context, the two parallel linears and the
segment-aware shard helpers that packed SSM projections need.

Uneven splits are supported: a dimension of size n over tp ranks gives the first n % tp ranks one
extra unit (channel, head), as in the paper's prototype. Splits that would leave a rank with
nothing raise up front (`shard_range` names the dimension and the tp degree).

Row-parallel reductions go through one `AllReduce` strategy per model: "exact" is a plain
`dist.all_reduce`; "int8", "fp8" and "fp16" run `tpssm.qallreduce.QuantizedAllReduce` on
persistent buffers shared by every reduction of the model (the fused NCCL op on CUDA with an
NCCL group, the composed collectives otherwise), except for payloads under `min_bytes`, which
always take the exact path (latency-bound decode messages gain nothing from quantization). int8 /
fp8 quantize in groups of `group_size` elements of the last dim: the largest supported size <=
the requested one that divides the last dim is used, and a last dim no supported size divides
(e.g. a tiny x_proj output) is reduced exactly.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from tpssm.reference.qallreduce import SUPPORTED_GROUP_SIZES, pick_group_size

__all__ = [
    "ALLREDUCE_SCHEMES",
    "PROJECTION_KERNELS",
    "linear",
    "gemv_applies",
    "AllReduce",
    "TPContext",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "shard_range",
    "shard_segments",
    "ranges_size",
]

ALLREDUCE_SCHEMES = ("exact", "int8", "fp8", "fp16")

# How the parallel linears and the LM head multiply: "torch" (F.linear, cuBLAS on CUDA) or "gemv"
# (tpssm.ops.gemv for decode-sized inputs of at most 8 token rows, F.linear for larger ones).
PROJECTION_KERNELS = ("torch", "gemv")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           kernel: str = "torch") -> torch.Tensor:
    """x @ weight.T (+ bias) through `kernel` (PROJECTION_KERNELS). gemv runs where the build
    has it: on the CPU, and on CUDA when the CUDA kernels are built; F.linear elsewhere."""
    if gemv_applies(x, kernel):
        from tpssm import ops

        return ops.gemv(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def gemv_applies(x: torch.Tensor, kernel: str) -> bool:
    """Whether linear(x, ..., kernel) multiplies through tpssm.ops.gemv: the 'gemv' kernel, a 2-D
    input of at most GEMV_MAX_ROWS rows, and a device the build has the op for."""
    if kernel != "gemv" or x.dim() != 2 or not _gemv_available(x.device):
        return False
    from tpssm import ops

    return x.shape[0] <= ops.GEMV_MAX_ROWS


def _gemv_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type != "cuda":
        return False
    global _GEMV_ON_CUDA
    if _GEMV_ON_CUDA is None:
        import tpssm

        _GEMV_ON_CUDA = bool(tpssm.has_cuda_kernels())
    return _GEMV_ON_CUDA


_GEMV_ON_CUDA: Optional[bool] = None


# torch 2.14 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); older
# releases lack the new ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                         or dist.reduce_scatter_tensor)


def exchange(collective, dst: torch.Tensor, src: torch.Tensor, group) -> None:
    """collective(dst, src, group=group). gloo has no all-to-all, all-gather or reduce-scatter
    for CUDA tensors: there (TP ranks sharing one GPU, a correctness setting) the bytes go
    through the host."""
    if src.is_cuda and dist.get_backend(group) == "gloo":
        host = torch.empty(dst.shape, dtype=dst.dtype)
        collective(host, src.cpu(), group=group)
        dst.copy_(host)
    else:
        collective(dst, src, group=group)

Ranges = List[Tuple[int, int]]


def shard_range(size: int, tp: int, rank: int, name: str = "dimension") -> Tuple[int, int]:
    """[start, end) of rank's part of a dimension of `size` units split over tp ranks; the first
    size % tp ranks take one extra unit."""
    if tp < 1 or not 0 <= rank < tp:
        raise ValueError(f"rank must be in [0, tp), got rank {rank} with tp {tp}")
    if size < tp:
        raise ValueError(
            f"cannot split {name} of size {size} over tp={tp} ranks: every rank needs at least "
            f"one unit")
    base, extra = divmod(size, tp)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_segments(segments: Sequence[Tuple[int, int]], tp: int, rank: int,
                   names: Optional[Sequence[str]] = None) -> Ranges:
    """Rank's rows of a packed tensor whose rows are consecutive segments.

    segments: (size, unit) per segment, in storage order; a segment is split in units of `unit`
    rows (unit = head dim for a per-head segment, 1 for per-channel) and unit = 0 marks a
    replicated segment (every rank takes all of it). Returns global [start, end) row ranges, in
    order: the rank's part of segment 0, then of segment 1, ... - a checkpoint packed at tp=1
    cannot be cut as one contiguous block.
    """
    ranges: Ranges = []
    offset = 0
    for i, (size, unit) in enumerate(segments):
        name = names[i] if names is not None else f"segment {i}"
        if unit == 0:
            ranges.append((offset, offset + size))
        else:
            if size % unit:
                raise ValueError(f"{name} of size {size} is not a multiple of its unit {unit}")
            a, b = shard_range(size // unit, tp, rank, name)
            ranges.append((offset + a * unit, offset + b * unit))
        offset += size
    return ranges


def ranges_size(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


class TPContext:
    """The tensor-parallel group a model runs on.

    TPContext()                      tp = 1, no torch.distributed needed.
    TPContext(group)                 an existing process group (None with an initialised default
                                     group means the world group).
    TPContext.from_env()             initialises torch.distributed from torchrun's environment
                                     (gloo on CPU, NCCL on CUDA) and uses the world group.
    TPContext.local_shard(tp)        rank 0's shard of a tp-way model with no group at all: the
                                     collectives return their local operand (all_gather_cat its
                                     copies), so a benchmark times one rank's compute at tp
                                     shard sizes on one device. Outputs are not the model's.
    `device` is where this rank's weights and activations live.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None, *, local_shard_of: int = 0):
        self.local_shard_only = local_shard_of > 0
        if self.local_shard_only:
            if group is not None:
                raise ValueError("local_shard_of: a local shard has no process group")
            self.group, self.rank, self.world_size = None, 0, local_shard_of
        elif dist.is_available() and dist.is_initialized():
            self.group = group if group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
        else:
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not "
                                 "initialised")
            self.group = None
            self.rank = 0
            self.world_size = 1
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @classmethod
    def from_env(cls, backend: Optional[str] = None) -> "TPContext":
        """From torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT."""
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
        return cls(None, device)

    @classmethod
    def local_shard(cls, tp: int, device: Optional[torch.device] = None) -> "TPContext":
        if tp < 1:
            raise ValueError(f"local_shard: tp must be >= 1, got {tp}")
        return cls(device=device, local_shard_of=tp)

    @property
    def communicates(self) -> bool:
        return self.world_size > 1 and not self.local_shard_only

    @property
    def tp(self) -> int:
        return self.world_size

    def shard_range(self, size: int, name: str = "dimension") -> Tuple[int, int]:
        return shard_range(size, self.world_size, self.rank, name)

    def all_reduce(self, x: torch.Tensor, scheme: str = "exact", min_bytes: int = 0,
                   group_size: int = 128) -> torch.Tensor:
        """Sum of x over the group. "exact" reduces x in place and returns it; the quantized
        schemes return a new tensor. x must be contiguous."""
        if not self.communicates:
            return x
        if scheme not in ALLREDUCE_SCHEMES:
            raise ValueError(f"allreduce must be one of {ALLREDUCE_SCHEMES}, got {scheme!r}")
        if scheme in ("int8", "fp8"):
            group_size = pick_group_size(x.shape[-1], group_size)
            if not group_size:
                scheme = "exact"
        if scheme == "exact" or x.numel() * x.element_size() < min_bytes:
            dist.all_reduce(x, group=self.group)
            return x
        from tpssm import qallreduce  # the quantized collectives are an optional module

        return qallreduce.all_reduce(x, self.group, scheme=scheme, group_size=group_size or 128)

    def all_gather_cat(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's x along dim (ranks may hold different sizes)."""
        if self.world_size == 1:
            return x
        if self.local_shard_only:  # the gathered shape and the concatenation's cost
            return torch.cat([x] * self.world_size, dim=dim)
        dim = dim % x.dim()
        sizes = torch.tensor([x.shape[dim]], dtype=torch.int64, device=x.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes, group=self.group)
        sizes = [int(s) for s in all_sizes]
        # Collectives want equal shapes everywhere: pad to the largest part, trim afterwards.
        width = max(sizes)
        pad_shape = list(x.shape)
        pad_shape[dim] = width - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)

    def all_gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """(tp, *x.shape): every rank's x stacked in rank order; x has the same shape on every
        rank. One collective, no host synchronisation (CUDA-graph capturable with NCCL)."""
        if self.world_size == 1:
            return x.unsqueeze(0)
        if self.local_shard_only:  # the gathered shape and the cost of writing it
            return x.unsqueeze(0).expand(self.world_size, *x.shape).contiguous()
        out = x.new_empty((self.world_size * x.shape[0],) + tuple(x.shape[1:]))
        exchange(all_gather_single, out, x.contiguous(), self.group)
        return out.view(self.world_size, *x.shape)

    def all_gather_rows(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """(total, ...): every rank's x (the same shape on every rank) concatenated along dim 0
        in rank order, cut to its first `total` rows - a stream split by tokens made whole
        again (sequence parallelism; the cut drops the padding rows)."""
        return self.all_gather_stack(x).flatten(0, 1)[:total]

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.communicates:
            dist.broadcast(x, src=dist.get_global_rank(self.group, src), group=self.group)
        return x

    def barrier(self) -> None:
        if self.communicates:
            dist.barrier(group=self.group)


def check_allreduce_backend(backend: str) -> str:
    """The all-reduce transports: "auto", "composed" or "fused" (see AllReduce)."""
    if backend not in ("auto", "composed", "fused"):
        raise ValueError(f"allreduce backend must be 'auto', 'composed' or 'fused', got "
                         f"{backend!r}")
    return backend


def _check_scheme(allreduce: str) -> str:
    if allreduce not in ALLREDUCE_SCHEMES:
        raise ValueError(f"allreduce must be one of {ALLREDUCE_SCHEMES}, got {allreduce!r}")
    return allreduce


class AllReduce:
    """A model's one all-reduce strategy, shared by all its row-parallel reductions.

    scheme: "exact" | "int8" | "fp8" | "fp16"; payloads under min_bytes are reduced exactly;
    group_size: the int8 / fp8 quantization group (see the module docstring); backend: "auto"
    (the fused NCCL op on CUDA with an NCCL group, else composed), "composed" or "fused".
    The quantized schemes keep persistent buffers (fixed addresses: CUDA-graph safe), created
    at the first reduction or by reserve(num_elements) - call it with the largest step's
    T x width before capturing graphs; a larger message outside capture grows them (the buffers
    a captured graph uses stay alive for its replays).
    """

    def __init__(self, ctx: "TPContext", scheme: str = "exact", min_bytes: int = 0,
                 group_size: int = 128, backend: str = "auto"):
        self.ctx = ctx
        self.scheme = _check_scheme(scheme)
        self.min_bytes = int(min_bytes)
        self.group_size = int(group_size)
        self.backend = check_allreduce_backend(backend)
        self._quantized = None   # tpssm.qallreduce.QuantizedAllReduce, built on first use
        # Reductions issued per path (a CUDA graph counts its captured ones once, at capture).
        self.calls = {"exact": 0, "quantized": 0, "scatter": 0}
        if self.scheme != "exact" and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"allreduce_group_size must be one of {SUPPORTED_GROUP_SIZES}, got "
                             f"{group_size}")

    @classmethod
    def of(cls, ctx: "TPContext", allreduce: Union[str, "AllReduce"] = "exact",
           min_bytes: int = 0, group_size: int = 128) -> "AllReduce":
        """`allreduce` itself when it is a strategy, else a new one for the scheme it names."""
        if isinstance(allreduce, AllReduce):
            return allreduce
        return cls(ctx, allreduce, min_bytes, group_size)

    def reserve(self, num_elements: int, device=None) -> None:
        """Sizes the persistent buffers for messages of up to num_elements elements."""
        if self.scheme in ("int8", "fp8") and self.ctx.communicates:
            self._buffers(device or self.ctx.device).reserve(num_elements)

    def _buffers(self, device):
        if self._quantized is None:
            from tpssm.qallreduce import QuantizedAllReduce  # needs the compiled extension

            self._quantized = QuantizedAllReduce(
                self.ctx.group, hidden=None, dtype=None, device=device, scheme=self.scheme,
                group_size=self.group_size, min_bytes=self.min_bytes, backend=self.backend,
                max_elements=1)
        return self._quantized

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        """The sum of x over the group, plus `residual` when given. With a residual of x's
        dtype the quantized schemes add it in fp32 before their one rounding (fused into the
        dequantize); otherwise it is added after the reduction. "exact" reduces x in place."""
        ctx = self.ctx
        if ctx.communicates:
            if (self.scheme == "exact" or x.numel() * x.element_size() < self.min_bytes
                    or (self.scheme != "fp16"
                        and not pick_group_size(x.shape[-1], self.group_size))):
                self.calls["exact"] += 1
                dist.all_reduce(x, group=ctx.group)
            else:
                self.calls["quantized"] += 1
                fuse = residual is not None and residual.dtype == x.dtype
                x = self._buffers(x.device)(x.contiguous(), residual if fuse else None)
                if fuse:
                    return x
        return x if residual is None else residual + x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the sum of x over the group: x (tp * rows, ...) -> (rows, ...),
        rank r getting rows [r * rows, (r + 1) * rows). The first half of an all-reduce (an
        all-gather of the results completes it): sequence parallelism's reduction (see
        CausalLM.set_sequence_parallel). Exact scheme only. Without communication (tp 1,
        or a local shard) it is the rank's rows of x itself."""
        ctx, tp = self.ctx, self.ctx.tp
        if self.scheme != "exact":
            raise ValueError(f"reduce_scatter needs the exact scheme; this strategy's is "
                             f"{self.scheme!r}")
        if x.dim() < 1 or x.shape[0] % tp:
            raise ValueError(f"reduce_scatter: x's first dimension must be a multiple of tp "
                             f"({tp}), got shape {tuple(x.shape)}")
        rows = x.shape[0] // tp
        if not ctx.communicates:
            return x.narrow(0, ctx.rank * rows, rows)
        self.calls["scatter"] += 1
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        exchange(reduce_scatter_single, out, x.contiguous(), ctx.group)
        return out

    def close(self) -> None:
        """Destroys the fused backend's NCCL communicator (collective; see
        QuantizedAllReduce.close)."""
        if self._quantized is not None:
            self._quantized.close()
            self._quantized = None


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows]^T (+ b[rows]): the rank holds the output rows `rows` (global
    [start, end) ranges, possibly several for a packed weight, possibly repeated for replicated
    groups). No communication: the output stays sharded.

    x: (..., in_features) -> (..., local_out_features) with local_out_features = ranges_size(rows).
    projection_kernel: see PROJECTION_KERNELS (the model's set_projection_kernel sets it).
    """

    def __init__(self, in_features: int, rows: Ranges, bias: bool, ctx: TPContext,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features = in_features
        self.rows = list(rows)
        self.ctx = ctx
        out_local = ranges_size(self.rows)
        device = device if device is not None else ctx.device
        self.weight = nn.Parameter(torch.empty(out_local, in_features, dtype=dtype,
                                               device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_local, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.projection_kernel = "torch"

    @property
    def out_features_local(self) -> int:
        return self.weight.shape[0]

    def load(self, source, weight_name: str, bias_name: Optional[str] = None) -> None:
        """Reads only the rank's rows from `source` (a tpssm.models.weights source)."""
        with torch.no_grad():
            self.weight.copy_(source.get_rows(weight_name, self.rows))
            if self.bias is not None:
                self.bias.copy_(source.get_rows(bias_name, self.rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.projection_kernel)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W[:, cols]^T) + b: the rank holds the input columns `cols`.

    x: (..., local_in_features) -> (..., out_features); forward(x, residual) returns
    residual + y with the add done by the reduction where it can (see AllReduce).
    reduce_results=False returns the partial sum instead (the caller reduces); the bias and the
    residual are then added on rank 0 only, so the later reduction counts them once.
    forward(x, scatter=True) returns only this rank's rows of y, reduce-scattered (sequence
    parallelism): x's T rows are padded to a multiple of tp inside the product's output
    (T_pad / tp rows a rank; padding rows are zero before the bias). allreduce: the model's
    AllReduce strategy, or a scheme name ("exact" | "int8" | "fp8" | "fp16") for a strategy of
    this layer's own with allreduce_min_bytes / allreduce_group_size. projection_kernel: as in
    ColumnParallelLinear.
    """

    def __init__(self, cols: Ranges, out_features: int, bias: bool, ctx: TPContext,
                 dtype: torch.dtype = torch.float32, device=None, reduce_results: bool = True,
                 allreduce: Union[str, AllReduce] = "exact", allreduce_min_bytes: int = 0,
                 allreduce_group_size: int = 128):
        super().__init__()
        self.cols = list(cols)
        self.out_features = out_features
        self.ctx = ctx
        self.reduce_results = reduce_results
        self.allreduce = AllReduce.of(ctx, allreduce, allreduce_min_bytes, allreduce_group_size)
        device = device if device is not None else ctx.device
        self.weight = nn.Parameter(torch.empty(out_features, ranges_size(self.cols), dtype=dtype,
                                               device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.projection_kernel = "torch"

    def load(self, source, weight_name: str, bias_name: Optional[str] = None) -> None:
        with torch.no_grad():
            self.weight.copy_(source.get_cols(weight_name, self.cols))
            if self.bias is not None:
                self.bias.copy_(source.get(bias_name))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                scatter: bool = False) -> torch.Tensor:
        if scatter:
            if residual is not None or not self.reduce_results or x.dim() != 2:
                raise ValueError("RowParallelLinear: scatter=True takes a 2-D x, no residual, "
                                 "and a layer that reduces its results")
            y = self.allreduce.reduce_scatter(self._product_padded(x))
            return y if self.bias is None else y + self.bias
        y = linear(x, self.weight, kernel=self.projection_kernel)
        if not self.reduce_results:
            if self.ctx.rank == 0:
                if self.bias is not None:
                    y = y + self.bias
                if residual is not None:
                    y = residual + y
            return y
        if self.bias is None:
            return self.allreduce(y, residual)
        y = self.allreduce(y) + self.bias
        return y if residual is None else residual + y

    def _product_padded(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T with its rows padded by zero rows to a multiple of tp: the product writes
        straight into the padded tensor's first rows (no copy of y). A padded product goes
        through torch.mm whatever projection_kernel says: sequence parallelism serves prefill
        steps, and gemv has no output argument."""
        rows, tp = x.shape[0], self.ctx.tp
        padded = -(-rows // tp) * tp
        if padded == rows:
            return linear(x, self.weight, kernel=self.projection_kernel)
        y = x.new_empty(padded, self.out_features)
        torch.mm(x, self.weight.t(), out=y[:rows])
        y[rows:].zero_()
        return y
