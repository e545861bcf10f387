"""Tensor-parallel SSM mixers (Mamba1 / Falcon-Mamba and Mamba-2) over packed varlen batches.

Activations are token-major, (total_tokens, channels), end to end: in_proj's output columns are
sliced (no copies, no transposes) into the conv, the scan and the gate, and the scan output feeds
out_proj directly. Each mixer holds only its rank's channels / heads and the matching slices of
every packed tensor (see docs/tp-design.md); the SSM state lives in an SSMStateCache sharded the
same way.

A batch is described by `BatchMeta`: a prefill-style batch (query_start_loc given) may mix new
requests, continuation chunks and single decode tokens (has_initial_state says which continue from
their slot); a decode batch (query_start_loc None) has exactly one token per request, all
continuing from their slots, and runs the allocation-free update ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpssm.cache import LayerStateShape
from tpssm.models.config import SSMConfig
from tpssm.models.kernels import get_backend
from tpssm.parallel import (AllReduce, ColumnParallelLinear, RowParallelLinear, TPContext,
                            gemv_applies, shard_range)

__all__ = ["BatchMeta", "InputNorm", "Mamba1Mixer", "Mamba2Mixer", "MultiHeadMamba1Mixer",
           "check_decode_rows", "check_query_start_loc", "mamba2_local_groups"]


@dataclass
class BatchMeta:
    """query_start_loc: int32 (batch + 1,) or None for a decode batch (one token per request);
    cache_indices: int32 (batch,) slots or None (row b uses slot b); has_initial_state: bool
    (batch,) or None (no request continues; ignored for decode batches).
    decode_tokens: bool (T,) or None: the tokens of a prefill-style batch that are decode steps
    riding along (see check_decode_rows), for mixers whose dt limits apply in prefill only
    (Zamba2); None when there are none or nobody needs to know."""
    query_start_loc: Optional[torch.Tensor]
    cache_indices: Optional[torch.Tensor]
    has_initial_state: Optional[torch.Tensor]
    decode_tokens: Optional[torch.Tensor] = None

    @property
    def is_decode(self) -> bool:
        return self.query_start_loc is None


def check_decode_rows(decode_rows: Optional[torch.Tensor],
                      query_start_loc: Optional[torch.Tensor]) -> None:
    """decode_rows: bool (batch,) or None, a model forward's flags saying which sequences of a
    prefill-style batch are decode steps (a request's one new token) rather than prompt chunks.
    None: every continuing sequence of one token is taken as a decode step, as a cached one-token
    forward is in transformers; an engine that may prefill a one-token chunk passes the flags.
    Ignored for decode batches (query_start_loc None). Checked here without a host sync; the
    rule that a decode row is one continuing token is checked where the rows are read."""
    if decode_rows is None or query_start_loc is None:
        return
    batch = query_start_loc.shape[0] - 1
    if (not isinstance(decode_rows, torch.Tensor) or decode_rows.dtype != torch.bool
            or tuple(decode_rows.shape) != (batch,)):
        got = (f"{decode_rows.dtype} tensor of shape {tuple(decode_rows.shape)}"
               if isinstance(decode_rows, torch.Tensor) else type(decode_rows).__name__)
        raise ValueError(f"decode_rows must be a bool tensor of shape ({batch},), one flag per "
                         f"sequence of query_start_loc, got {got}")


def check_query_start_loc(bounds: List[int], num_tokens: int) -> None:
    """A prefill batch's offsets as the model reads them: from 0 to the token count, every
    sequence at least one token long (its last token's logits are returned)."""
    if not bounds or bounds[0] != 0 or bounds[-1] != num_tokens:
        shown = bounds if len(bounds) <= 6 else bounds[:3] + ["..."] + bounds[-2:]
        raise ValueError(f"query_start_loc must run from 0 to the number of tokens "
                         f"({num_tokens}), got {shown}")
    for i in range(len(bounds) - 1):
        if bounds[i + 1] <= bounds[i]:
            raise ValueError(f"query_start_loc: every sequence needs at least one token, but "
                             f"sequence {i} spans [{bounds[i]}, {bounds[i + 1]})")


@dataclass
class InputNorm:
    """A layer's input norm left to in_proj's launch (a decode step whose in_proj runs through
    gemv): the mixer gets the un-normalised x and in_proj reads add_rms_norm(x, weight, eps,
    residual=...) of it, with the updated stream residual + x written to residual_out (both None
    for the first layer, whose stream the caller starts itself)."""
    weight: torch.Tensor
    eps: float
    residual: Optional[torch.Tensor] = None
    residual_out: Optional[torch.Tensor] = None


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _causal_conv(kernels, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 conv_state: Optional[torch.Tensor], meta: BatchMeta) -> torch.Tensor:
    """The mixers' conv + SiLU: the update op for a decode batch, the varlen op otherwise."""
    if meta.is_decode:
        return kernels.causal_conv1d_update(x, conv_state, weight, bias, activation="silu",
                                            cache_indices=meta.cache_indices)
    return kernels.causal_conv1d(x, weight, bias, conv_states=conv_state,
                                 query_start_loc=meta.query_start_loc,
                                 cache_indices=meta.cache_indices,
                                 has_initial_state=meta.has_initial_state, activation="silu")


def _in_proj_conv(kernels, in_proj: ColumnParallelLinear, hidden: torch.Tensor, conv_start: int,
                  conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                  conv_state: Optional[torch.Tensor], meta: BatchMeta,
                  norm: Optional[InputNorm] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """in_proj(hidden) (T, local rows) and the conv + SiLU of its columns [conv_start, conv_start
    + conv channels). A decode step whose in_proj runs through gemv takes one launch for both:
    the conv is gemv_conv_update's epilogue and its output replaces those columns; with `norm`
    (only there) the layer's norm of hidden is its prologue. Otherwise in_proj, then the conv
    into a tensor of its own."""
    dim = conv_weight.shape[0]
    if meta.is_decode and gemv_applies(hidden, in_proj.projection_kernel):
        norm_args = {} if norm is None else dict(
            norm_weight=norm.weight, residual=norm.residual, residual_out=norm.residual_out,
            norm_eps=norm.eps)
        out = kernels.gemv_conv_update(hidden, in_proj.weight, in_proj.bias, conv_state,
                                       conv_weight, conv_bias, conv_start=conv_start,
                                       activation="silu", cache_indices=meta.cache_indices,
                                       **norm_args)
        return out, out[:, conv_start:conv_start + dim]
    if norm is not None:
        raise ValueError("an input norm inside in_proj needs a decode step through gemv")
    proj = in_proj(hidden)
    return proj, _causal_conv(kernels, proj[:, conv_start:conv_start + dim], conv_weight,
                              conv_bias, conv_state, meta)


class Mamba1Mixer(nn.Module):
    """Mamba1 / Falcon-Mamba mixer on this rank's E / tp channels (uneven: the first ranks take one
    extra channel). Two all-reduces per layer: x_proj's T x (R + 2N) and out_proj's T x D.

    Subclasses change how in_proj rows are stored (_in_proj_rows, _load_in_proj) and how the
    x_proj / dt_proj stage and the scan run (_build_ssm_inputs, _load_ssm_inputs, _ssm)."""

    def __init__(self, config: SSMConfig, layer_idx: int, ctx: TPContext,
                 dtype: torch.dtype = torch.float32, backend: str = "ops",
                 allreduce: Union[str, AllReduce] = "exact"):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.ctx = ctx
        self.kernels = get_backend(backend)
        self.allreduce = AllReduce.of(ctx, allreduce)
        # selective_scan's algorithm for prefill (tpssm.ops.selective_scan); the model's
        # set_scan_algorithm changes it for every layer.
        self.scan_algorithm = "auto"
        # Decode batches up to this size project dt inside the state update (see _ssm). 8 is a
        # guess, not yet measured: small decode steps are launch-bound, so the launch saved
        # outweighs the weight re-reads; at 64 rows the re-reads (~105 MB of L2 traffic at
        # mamba-2.8b tp 1, against ~42 MB of state) would not.
        self.fuse_dt_proj_max_batch = 8
        self.falcon = config.family == "falcon_mamba"
        E, D, N, R, K = (config.intermediate_size, config.hidden_size, config.state_size,
                         config.time_step_rank, config.conv_kernel)
        self.e_range = ctx.shard_range(E, "intermediate_size (d_inner)")
        e0, e1 = self.e_range
        self.local_dim = e1 - e0
        self.dt_rank, self.d_state, self.d_conv = R, N, K
        dev = ctx.device
        self.in_proj = ColumnParallelLinear(D, self._in_proj_rows(), config.use_bias, ctx, dtype)
        self.conv_weight = _param(torch.empty(self.local_dim, K, dtype=dtype, device=dev))
        self.conv_bias = (_param(torch.empty(self.local_dim, dtype=dtype, device=dev))
                          if config.use_conv_bias else None)
        self._build_ssm_inputs(dtype)
        self.register_buffer("dt_bias", torch.empty(self.local_dim, dtype=torch.float32,
                                                    device=dev))
        self.register_buffer("A", torch.empty(self.local_dim, N, dtype=torch.float32, device=dev))
        self.register_buffer("D", torch.empty(self.local_dim, dtype=torch.float32, device=dev))
        self.out_proj = RowParallelLinear([(e0, e1)], D, config.use_bias, ctx, dtype,
                                          allreduce=self.allreduce)

    # --- the parts subclasses change
    def _in_proj_rows(self) -> List[Tuple[int, int]]:
        E, (e0, e1) = self.config.intermediate_size, self.e_range
        return [(e0, e1), (E + e0, E + e1)]  # x rows, then z rows

    def _build_ssm_inputs(self, dtype: torch.dtype) -> None:
        R, N = self.dt_rank, self.d_state
        self.x_proj = RowParallelLinear([self.e_range], R + 2 * N, False, self.ctx, dtype,
                                        allreduce=self.allreduce)
        self.dt_proj_weight = _param(torch.empty(self.local_dim, R, dtype=dtype,
                                                 device=self.ctx.device))

    def _load_in_proj(self, source, prefix: str) -> None:
        self.in_proj.load(source, prefix + "in_proj.weight", prefix + "in_proj.bias")

    def _load_ssm_inputs(self, source, prefix: str) -> None:
        rows = [self.e_range]
        self.x_proj.load(source, prefix + "x_proj.weight")
        self.dt_proj_weight.copy_(source.get_rows(prefix + "dt_proj.weight", rows))
        self.dt_bias.copy_(source.get_rows(prefix + "dt_proj.bias", rows))
        self.A.copy_(-torch.exp(source.get_rows(prefix + "A_log", rows).float()))
        self.D.copy_(source.get_rows(prefix + "D", rows))

    def _ssm(self, x: torch.Tensor, z: torch.Tensor, ssm_state: Optional[torch.Tensor],
             meta: BatchMeta) -> torch.Tensor:
        """Conv output x and gate z (T, local E) -> the gated scan output (T, local E)."""
        x_dbl = self.x_proj(x)  # all-reduce #1
        R, N = self.dt_rank, self.d_state
        dt, B, C = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
        if self.falcon:
            # Falcon-Mamba's weightless fp32 RMS norms of dt, B and C in one launch: three groups
            # of x_dbl's columns, R then N and N wide.
            x_dbl = self.kernels.gated_rms_norm(x_dbl, None, self.config.mixer_rms_eps,
                                                group_size=N, first_group_size=R)
            dt, B, C = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
        if meta.is_decode and x.shape[0] <= self.fuse_dt_proj_max_batch:
            # The state update projects the low-rank dt itself: one launch fewer per layer. Its
            # blocks re-read the weight rows for every batch row (from L2), so large decode
            # batches keep the GEMM, which reads the weight once.
            return self._scan(x, dt, self.A, B, C, self.D, z, self.dt_bias, ssm_state, meta,
                              dt_proj_weight=self.dt_proj_weight)
        dt = F.linear(dt, self.dt_proj_weight)
        return self._scan(x, dt, self.A, B, C, self.D, z, self.dt_bias, ssm_state, meta)

    # --- shared
    def _scan(self, x, dt, A, B, C, D, z, dt_bias, ssm_state, meta: BatchMeta, out=None,
              dt_proj_weight=None):
        """dt_proj_weight (decode only): dt is low-rank and the state update projects it."""
        k = self.kernels
        if meta.is_decode:
            return k.selective_state_update(ssm_state, x, dt, A, B, C, D, z, dt_bias,
                                            dt_proj_weight=dt_proj_weight, dt_softplus=True,
                                            state_batch_indices=meta.cache_indices, out=out)
        return k.selective_scan(x, dt, A, B, C, D, z, dt_bias, delta_softplus=True,
                                ssm_states=ssm_state, query_start_loc=meta.query_start_loc,
                                cache_indices=meta.cache_indices,
                                has_initial_state=meta.has_initial_state,
                                algorithm=self.scan_algorithm, out=out)

    def state_shape(self) -> LayerStateShape:
        return LayerStateShape(self.local_dim, self.d_conv, (self.local_dim, self.d_state))

    @torch.no_grad()
    def load(self, source, prefix: str) -> None:
        rows = [self.e_range]
        self._load_in_proj(source, prefix)
        self.conv_weight.copy_(source.get_rows(prefix + "conv1d.weight", rows)
                               .reshape(self.local_dim, self.d_conv))
        if self.conv_bias is not None:
            self.conv_bias.copy_(source.get_rows(prefix + "conv1d.bias", rows))
        self._load_ssm_inputs(source, prefix)
        self.out_proj.load(source, prefix + "out_proj.weight", prefix + "out_proj.bias")

    def forward(self, hidden: torch.Tensor, conv_state: Optional[torch.Tensor],
                ssm_state: Optional[torch.Tensor], meta: BatchMeta,
                residual: Optional[torch.Tensor] = None,
                norm: Optional[InputNorm] = None, scatter: bool = False) -> torch.Tensor:
        """hidden: (T, D) normalised input (with `norm`: the input that in_proj's launch
        normalises) -> (T, D), reduced over the TP group (+ residual, added by the reduction
        where it can). scatter=True (sequence parallelism): only this rank's rows of the
        result, reduce-scattered - T padded to a multiple of tp, T_pad / tp rows a rank (see
        RowParallelLinear)."""
        xz, x = _in_proj_conv(self.kernels, self.in_proj, hidden, 0, self.conv_weight,
                              self.conv_bias, conv_state, meta, norm)
        z = xz[:, self.local_dim:]
        return self.out_proj(self._ssm(x, z, ssm_state, meta), residual,  # all-reduce #2
                             scatter=scatter)


def mamba2_local_groups(num_heads: int, n_groups: int, h0: int, h1: int) -> Tuple[List[int], int]:
    """The B / C groups a rank holding heads [h0, h1) needs, as the list of global groups of its
    local ("virtual") groups, and the number of local heads per local group.

    Head h uses group h // (H / G). The rank's heads split into runs sharing a group; with d the
    gcd of the run lengths, each run of length r becomes r / d local groups that copy its global
    group, so local head j uses local group j // d exactly as the kernels expect. When G % tp == 0
    (even head split) every run is a whole group and nothing is copied; when the rank's heads all
    fall in one group (e.g. G = 1) the rank holds that one group.
    """
    hpg = num_heads // n_groups
    runs: List[Tuple[int, int]] = []
    for h in range(h0, h1):
        g = h // hpg
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1] + 1)
        else:
            runs.append((g, 1))
    d = 0
    for _, r in runs:
        d = math.gcd(d, r)
    groups = [g for g, r in runs for _ in range(r // d)]
    return groups, d


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer on this rank's heads (uneven splits allowed). in_proj is sharded per segment
    z | x | B | C | dt; B / C groups are sharded when G % tp == 0 and otherwise replicated as the
    rank's heads need (any G dividing H). One all-reduce per layer (out_proj, T x D), plus an fp32
    T x (norm groups) all-reduce of sums of squares when a gated-norm group spans ranks (the
    "whole" convention at tp > 1, or "per_group" when G % tp != 0)."""

    def __init__(self, config: SSMConfig, layer_idx: int, ctx: TPContext,
                 dtype: torch.dtype = torch.float32, backend: str = "ops",
                 allreduce: Union[str, AllReduce] = "exact"):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.ctx = ctx
        self.kernels = get_backend(backend)
        self.allreduce = AllReduce.of(ctx, allreduce)
        # selective_scan's algorithm for prefill (tpssm.ops.selective_scan); the model's
        # set_scan_algorithm changes it for every layer.
        self.scan_algorithm = "auto"
        H, P, G, N = config.num_heads, config.head_dim, config.n_groups, config.state_size
        E, D, K = config.intermediate_size, config.hidden_size, config.conv_kernel
        self.h_range = ctx.shard_range(H, "num_heads")
        h0, h1 = self.h_range
        self.local_heads = h1 - h0
        self.local_dim = self.local_heads * P
        self.head_dim, self.d_state, self.d_conv = P, N, K
        self.groups, self.heads_per_local_group = mamba2_local_groups(H, G, h0, h1)
        self.local_groups = len(self.groups)
        gn = self.local_groups * N
        self.conv_channels = self.local_dim + 2 * gn
        c0, c1 = h0 * P, h1 * P
        b_rows = [(g * N, (g + 1) * N) for g in self.groups]
        in_rows = ([(c0, c1), (E + c0, E + c1)]
                   + [(2 * E + a, 2 * E + b) for a, b in b_rows]
                   + [(2 * E + G * N + a, 2 * E + G * N + b) for a, b in b_rows]
                   + [(2 * E + 2 * G * N + h0, 2 * E + 2 * G * N + h1)])
        self.conv_rows = ([(c0, c1)] + [(E + a, E + b) for a, b in b_rows]
                          + [(E + G * N + a, E + G * N + b) for a, b in b_rows])
        dev = ctx.device
        self.in_proj = ColumnParallelLinear(D, in_rows, config.use_bias, ctx, dtype)
        self.conv_weight = _param(torch.empty(self.conv_channels, K, dtype=dtype, device=dev))
        self.conv_bias = (_param(torch.empty(self.conv_channels, dtype=dtype, device=dev))
                          if config.use_conv_bias else None)
        self.register_buffer("dt_bias", torch.empty(self.local_heads, dtype=torch.float32,
                                                    device=dev))
        self.register_buffer("A", torch.empty(self.local_heads, dtype=torch.float32, device=dev))
        self.register_buffer("D", torch.empty(self.local_heads, dtype=torch.float32, device=dev))
        self.norm_weight = _param(torch.empty(self.local_dim, dtype=dtype, device=dev))
        self.out_proj = RowParallelLinear([(c0, c1)], D, config.use_bias, ctx, dtype,
                                          allreduce=self.allreduce)
        self.dt_limits = config.time_step_limit
        self.clamp_dt = self.dt_limits[0] > 0.0 or self.dt_limits[1] != math.inf
        self.clamp_dt_in_decode = self.clamp_dt and config.clamp_dt_in_decode
        self._setup_norm(config, c0, c1)

    def _setup_norm(self, config: SSMConfig, c0: int, c1: int) -> None:
        E, P = config.intermediate_size, config.head_dim
        self.norm_groups = 1 if config.gated_norm == "whole" else config.n_groups
        self.norm_group_size = gs = E // self.norm_groups
        # Whether some norm group spans ranks is a property of the whole split, not of this
        # rank: every rank must then join the (fp32, T x norm_groups) sum-of-squares all-reduce.
        tp = self.ctx.world_size
        bounds = [shard_range(config.num_heads, tp, r, "num_heads") for r in range(tp)]
        self.norm_allreduce = any((a * P) % gs or (b * P) % gs for a, b in bounds)
        # Global norm group of every local channel, for the spanning case.
        self.register_buffer("norm_group_index",
                             torch.arange(c0, c1, device=self.ctx.device) // gs,
                             persistent=False)

    def state_shape(self) -> LayerStateShape:
        return LayerStateShape(self.conv_channels, self.d_conv,
                               (self.local_heads, self.head_dim, self.d_state))

    @torch.no_grad()
    def load(self, source, prefix: str) -> None:
        heads = [self.h_range]
        self.in_proj.load(source, prefix + "in_proj.weight", prefix + "in_proj.bias")
        self.conv_weight.copy_(source.get_rows(prefix + "conv1d.weight", self.conv_rows)
                               .reshape(self.conv_channels, self.d_conv))
        if self.conv_bias is not None:
            self.conv_bias.copy_(source.get_rows(prefix + "conv1d.bias", self.conv_rows))
        self.dt_bias.copy_(source.get_rows(prefix + "dt_bias", heads))
        self.A.copy_(-torch.exp(source.get_rows(prefix + "A_log", heads).float()))
        self.D.copy_(source.get_rows(prefix + "D", heads))
        P = self.head_dim
        self.norm_weight.copy_(source.get_rows(prefix + "norm.weight",
                                               [(self.h_range[0] * P, self.h_range[1] * P)]))
        self.out_proj.load(source, prefix + "out_proj.weight", prefix + "out_proj.bias")

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """RMSNorm(y * silu(z)) * weight, normalising over the configured groups (fp32)."""
        eps = self.config.layer_norm_epsilon
        k = self.kernels
        if not self.norm_allreduce:  # every norm group lies inside this rank: one fused op
            return k.gated_rms_norm(y, self.norm_weight, eps, z=z, group_size=self.norm_group_size)
        if self.norm_groups == 1:  # one group over every rank's columns: local sums, all-reduce
            ss = self.ctx.all_reduce(k.gated_sum_squares(y, z=z), "exact")
            return k.gated_rms_norm(y, self.norm_weight, eps, z=z, sum_sq=ss,
                                    norm_size=self.norm_group_size)
        # Several groups, some cut by rank boundaries (per-group norm, G % tp != 0): the sums go
        # per global group through an index_add, in torch.
        g = y.float() * F.silu(z.float())
        ss = torch.zeros(g.shape[0], self.norm_groups, dtype=torch.float32, device=g.device)
        ss.index_add_(1, self.norm_group_index, g.pow(2))
        ss = self.ctx.all_reduce(ss, "exact")
        var = ss.index_select(1, self.norm_group_index) / self.norm_group_size
        return self.norm_weight * (g * torch.rsqrt(var + eps)).to(y.dtype)

    def forward(self, hidden: torch.Tensor, conv_state: Optional[torch.Tensor],
                ssm_state: Optional[torch.Tensor], meta: BatchMeta,
                residual: Optional[torch.Tensor] = None,
                norm: Optional[InputNorm] = None, scatter: bool = False) -> torch.Tensor:
        """hidden: (T, D) normalised input (with `norm`: the input that in_proj's launch
        normalises) -> (T, D), reduced over the TP group (+ residual, added by the reduction
        where it can). scatter=True (sequence parallelism): only this rank's rows of the
        result, reduce-scattered - T padded to a multiple of tp, T_pad / tp rows a rank (see
        RowParallelLinear)."""
        k = self.kernels
        El, gn = self.local_dim, self.local_groups * self.d_state
        zxbcdt, xBC = _in_proj_conv(k, self.in_proj, hidden, El, self.conv_weight, self.conv_bias,
                                    conv_state, meta, norm)
        z = zxbcdt[:, :El]
        dt = zxbcdt[:, El + self.conv_channels:]
        x = xBC[:, :El]
        B = xBC[:, El:El + gn].unflatten(-1, (self.local_groups, self.d_state))
        C = xBC[:, El + gn:].unflatten(-1, (self.local_groups, self.d_state))
        if meta.is_decode:
            dt_bias, softplus = self.dt_bias, True
            if self.clamp_dt_in_decode:
                # The state update has no dt limits: apply bias, softplus and the limits here and
                # pass the final dt through unchanged.
                dt = F.softplus(dt.float() + self.dt_bias).clamp(*self.dt_limits).to(x.dtype)
                dt_bias, softplus = None, False
            y = k.selective_state_update(ssm_state, x, dt, self.A, B, C, self.D, None, dt_bias,
                                         dt_softplus=softplus,
                                         state_batch_indices=meta.cache_indices)
        else:
            dt_min, dt_max = self.dt_limits if self.clamp_dt else (None, None)
            dt_bias, softplus = self.dt_bias, True
            if (self.clamp_dt and not self.clamp_dt_in_decode
                    and meta.decode_tokens is not None):
                # Decode tokens riding in a prefill batch keep their dt unclamped, as in a
                # decode step: the limits go per token here, not in the op.
                full = F.softplus(dt.float() + self.dt_bias)
                dt = torch.where(meta.decode_tokens[:, None], full,
                                 full.clamp(*self.dt_limits)).to(x.dtype)
                # dt_min 0 changes no value (softplus >= 0) and tells the op dt >= 0, so that
                # it keeps the SSD kernel (ops.selective_scan's `algorithm`).
                dt_min, dt_max, dt_bias, softplus = 0.0, None, None, False
            y = k.selective_scan(x, dt, self.A, B, C, self.D, None, dt_bias,
                                 delta_softplus=softplus, ssm_states=ssm_state,
                                 query_start_loc=meta.query_start_loc,
                                 cache_indices=meta.cache_indices,
                                 has_initial_state=meta.has_initial_state,
                                 dt_min=dt_min, dt_max=dt_max, algorithm=self.scan_algorithm)
        y = self._gated_norm(y, z)
        return self.out_proj(y, residual, scatter=scatter)


class MultiHeadMamba1Mixer(Mamba1Mixer):
    """Zamba's Mamba-1 mixer with n_mamba_heads independent heads on this rank's E / tp channels.

    Head h owns channels [h * hd, (h + 1) * hd) and its own x_proj / dt_proj: its dt, B and C come
    from its channels only. In the kernels' Mamba-1 form a head is a B / C group. The rank's
    channels fall into runs, one per head they touch; x_proj needs no all-reduce when no head is
    split between ranks (Zamba-7B's two heads at tp 2), otherwise (each of them over two ranks at
    tp 4) every rank sums the per-head partial products in one T x (n_mamba_heads * (R + 2N))
    all-reduce. in_proj rows are stored
    interleaved (row 2c: x of channel c, row 2c + 1: its gate z): each rank reads its one
    contiguous block of rows and de-interleaves it once at load.
    """

    def __init__(self, config: SSMConfig, num_heads: int, layer_idx: int, ctx: TPContext,
                 dtype: torch.dtype = torch.float32, backend: str = "ops",
                 allreduce: Union[str, AllReduce] = "exact"):
        E = config.intermediate_size
        if E % num_heads:
            raise ValueError(f"n_mamba_heads ({num_heads}) must divide the mixer width {E}")
        self._num_heads = num_heads
        super().__init__(config, layer_idx, ctx, dtype, backend, allreduce)

    def _in_proj_rows(self) -> List[Tuple[int, int]]:
        e0, e1 = self.e_range
        return [(2 * e0, 2 * e1)]  # interleaved x / z: de-interleaved in _load_in_proj

    def _build_ssm_inputs(self, dtype: torch.dtype) -> None:
        E, R, N = self.config.intermediate_size, self.dt_rank, self.d_state
        self.num_heads, self.head_channels = self._num_heads, E // self._num_heads
        hd = self.head_channels
        e0, e1 = self.e_range
        # (head, first local channel, end local channel, first channel within the head)
        self.runs = [(h, max(e0, h * hd) - e0, min(e1, (h + 1) * hd) - e0, max(e0, h * hd) - h * hd)
                     for h in range(e0 // hd, (e1 - 1) // hd + 1)]
        tp = self.ctx.world_size
        bounds = [shard_range(E, tp, r, "intermediate_size (d_inner)") for r in range(tp)]
        self.x_proj_allreduce = self.ctx.communicates and any(b % hd for _, b in bounds[:-1])
        # Equal runs: one kernel call with a B / C group per run; unequal (a head split at an
        # odd place): one call per run on column views of the activations and states.
        self.one_call = len({b - a for _, a, b, _ in self.runs}) == 1
        dev = self.ctx.device
        self.x_proj_weights = nn.ParameterList([
            _param(torch.empty(R + 2 * N, b - a, dtype=dtype, device=dev))
            for _, a, b, _ in self.runs])
        self.dt_proj_weights = nn.ParameterList([
            _param(torch.empty(b - a, R, dtype=dtype, device=dev)) for _, a, b, _ in self.runs])

    def _load_in_proj(self, source, prefix: str) -> None:
        e0, e1 = self.e_range
        L = self.local_dim
        w = source.get_rows(prefix + "in_proj.weight", [(2 * e0, 2 * e1)])
        self.in_proj.weight.copy_(w.view(L, 2, -1).transpose(0, 1).reshape(2 * L, -1))
        if self.in_proj.bias is not None:
            b = source.get_rows(prefix + "in_proj.bias", [(2 * e0, 2 * e1)])
            self.in_proj.bias.copy_(b.view(L, 2).t().reshape(-1))

    def _load_ssm_inputs(self, source, prefix: str) -> None:
        get = source.get_block
        for i, (h, a, b, c) in enumerate(self.runs):
            head, chans = slice(h, h + 1), slice(c, c + b - a)
            self.x_proj_weights[i].copy_(get(prefix + "x_proj_weight",
                                             (head, slice(None), chans))[0])
            self.dt_proj_weights[i].copy_(get(prefix + "dt_proj_weight", (head, chans))[0])
            self.dt_bias[a:b].copy_(get(prefix + "dt_proj_bias", (head, chans))[0])
            self.A[a:b].copy_(-torch.exp(get(prefix + "A_log", (head, chans))[0].float()))
            self.D[a:b].copy_(get(prefix + "D", (head, chans))[0])

    def _x_proj(self, x: torch.Tensor) -> torch.Tensor:
        """(T, local E) -> (T, runs, R + 2N): each run's head's dt / B / C inputs."""
        parts = [F.linear(x[:, a:b], w) for (_, a, b, _), w in zip(self.runs, self.x_proj_weights)]
        if not self.x_proj_allreduce:
            return torch.stack(parts, dim=1)
        W = self.dt_rank + 2 * self.d_state
        full = x.new_zeros(x.shape[0], self.num_heads, W)
        for (h, _, _, _), p in zip(self.runs, parts):
            full[:, h] = p
        full = self.allreduce(full.view(x.shape[0], -1))
        heads = [h for h, _, _, _ in self.runs]
        return full.view(x.shape[0], self.num_heads, W)[:, heads[0]:heads[-1] + 1]

    def _ssm(self, x: torch.Tensor, z: torch.Tensor, ssm_state: Optional[torch.Tensor],
             meta: BatchMeta) -> torch.Tensor:
        dbl = self._x_proj(x)
        R, N = self.dt_rank, self.d_state
        # Per-head dt_proj: the GEMMs stay even in decode. The fused projection of the state
        # update takes one (dim, dt_rank) weight against one low-rank dt per batch row, while
        # each head here projects its own low-rank dt.
        dt = torch.cat([F.linear(dbl[:, i, :R], w) for i, w in enumerate(self.dt_proj_weights)],
                       dim=1)
        B, C = dbl[..., R:R + N], dbl[..., R + N:]
        if self.one_call:
            return self._scan(x, dt, self.A, B, C, self.D, z, self.dt_bias, ssm_state, meta)
        y = torch.empty_like(x)
        for i, (_, a, b, _) in enumerate(self.runs):
            self._scan(x[:, a:b], dt[:, a:b], self.A[a:b], B[:, i], C[:, i], self.D[a:b],
                       z[:, a:b], self.dt_bias[a:b],
                       None if ssm_state is None else ssm_state[:, a:b], meta, y[:, a:b])
        return y
