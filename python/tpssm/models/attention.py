"""The shared transformer block of the hybrid models (Zamba, Zamba2) under tensor parallelism.

A block sees concat([hidden, embedding]) (width 2D) and returns MLP(pre_ff_norm(Attn(norm(x))))
(width D, no residual inside). Sharding (docs/models.md):
- attention by heads: q / k / v rows of the rank's heads in one column-parallel GEMM, o_proj
  row-parallel (all-reduce #1, T x D); the rank's keys and values live in its KV cache;
- MLP by intermediate channels: gate / up rows in one column-parallel GEMM, down_proj
  row-parallel (all-reduce #2, T x D);
- norms replicated; LoRA adapters (Zamba2, one set per visit of a shared block) without
  communication: A replicated (every rank computes x A^T, adapter_rank wide), B sharded exactly
  like the rows of the weight it augments.

Attention uses the models' scale (head_dim / 2) ** -0.5. A prefill-style batch runs torch's
scaled_dot_product_attention once per sequence over the slot's cached keys plus the chunk's (a
continuation chunk takes a lower-right-aligned causal mask); a decode batch is one
decode_attention call (tpssm.ops: reads each row's cached keys in place, only as many as the row
holds; the reference backend: gather of the slots + masked SDPA), entirely on the device (no
host sync: CUDA-graph capturable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpssm.cache import KVCacheOverflowError, KVShape, SSMStateCache
from tpssm.capture import capturing
from tpssm.models.kernels import get_backend
from tpssm.models.mixers import check_query_start_loc
from tpssm.models.model import RMSNorm
from tpssm.parallel import AllReduce, RowParallelLinear, TPContext, linear, ranges_size

__all__ = ["AttentionConfig", "KVBatch", "SharedBlock", "ACTIVATIONS"]

# Hugging Face activation names the MLP accepts ("gelu" is the exact, erf form).
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class AttentionConfig:
    hidden_size: int                 # D; the block's input is 2D wide
    num_heads: int
    head_dim: int                    # 2D / num_heads in both Zamba models
    intermediate_size: int           # MLP width
    hidden_act: str
    rms_norm_eps: float
    packed_gate_up: bool             # Zamba2: gate_up_proj (2I, D); Zamba: gate_proj / up_proj
    mlp_bias: bool = False
    adapter_rank: int = 0            # 0: no adapters
    attention_adapters: bool = False  # q / k / v adapters (the MLP adapter exists with rank > 0)
    rope_theta: float = 0.0          # 0: no rotary embedding

    @property
    def input_size(self) -> int:
        return 2 * self.hidden_size

    @property
    def scale(self) -> float:
        return (self.head_dim / 2) ** -0.5


@dataclass
class KVBatch:
    """What every attention visit of one forward shares (built once per forward by the model).

    Prefill-style batches: host lists (one sync to build them), per sequence: its token range,
    its slot (-1: padding, skipped), and the number of tokens already cached (the keys it attends
    to before its own). Decode batches: device tensors only.
    """
    decode: bool
    seq_bounds: List[Tuple[int, int]]        # prefill: [start, end) token range per sequence
    seq_slots: List[int]                     # prefill: slot or -1 (stateless: -1 is not padding)
    seq_past: List[int]                      # prefill: cached tokens before the chunk
    seq_continues: List[bool]                # prefill: has_initial_state per sequence
    stateless: bool                          # prefill without a cache
    positions: Optional[torch.Tensor]        # (T,) int64 rotary positions
    row_index: Optional[torch.Tensor]        # decode: (B,) int64 cache rows (pad -> scratch row)
    row_past: Optional[torch.Tensor]         # decode: (B,) int64 cached tokens per row
    # prefill: the single continuing tokens (decode steps riding along), attended in one
    # batched call like a decode batch: their token indices, or None when there are none
    single_tokens: Optional[torch.Tensor] = None
    # rotary cos / sin at `positions`, computed by the first visit and reused by the others
    _rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def rotary(self, inv_freq: torch.Tensor, dtype: torch.dtype
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, 1, head_dim) in `dtype`: NeoX rotation angles at `positions`,
        rounded to the activation dtype before use (as transformers does). Every visit of a
        forward shares them (all blocks have the same head_dim and theta)."""
        if self._rotary is None:
            freqs = self.positions.float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rotary = (emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :])
        return self._rotary

    @staticmethod
    def build(cache: Optional[SSMStateCache], num_tokens: int,
              query_start_loc: Optional[torch.Tensor], cache_indices: Optional[torch.Tensor],
              has_initial_state: Optional[torch.Tensor], device) -> "KVBatch":
        if query_start_loc is None:
            return KVBatch._build_decode(cache, num_tokens, cache_indices)
        bounds = query_start_loc.tolist()
        nseq = len(bounds) - 1
        check_query_start_loc(bounds, num_tokens)
        for name, t in (("has_initial_state", has_initial_state),
                        ("cache_indices", cache_indices)):
            if t is not None and tuple(t.shape) != (nseq,):
                raise ValueError(f"{name} must have shape ({nseq},), one entry per sequence of "
                                 f"query_start_loc, got {tuple(t.shape)}")
        seq_bounds = [(bounds[i], bounds[i + 1]) for i in range(nseq)]
        init = has_initial_state.tolist() if has_initial_state is not None else [False] * nseq
        if cache is None:
            past = [0] * nseq
            slots = [-1] * nseq
        else:
            slots = (cache_indices.tolist() if cache_indices is not None else list(range(nseq)))
            bad = [s for s in slots if not (s == -1 or 0 <= s < cache.num_slots)]
            if bad:
                raise ValueError(f"cache_indices must be slots in [0, {cache.num_slots}) or -1 "
                                 f"(padding), got {bad[:5]}")
            # Checked before any key is written: two rows of one slot would overwrite each
            # other's keys (and race in the SSM ops).
            seen = {}
            for i, s in enumerate(slots):
                if s >= 0 and s in seen:
                    raise ValueError(f"cache_indices must be distinct (but -1 padding): rows "
                                     f"{seen[s]} and {i} both use slot {s}")
                seen[s] = i
            lengths = cache.kv_lengths.tolist()
            past = [lengths[s] if (init[i] and s >= 0) else 0 for i, s in enumerate(slots)]
            for i, s in enumerate(slots):
                n = seq_bounds[i][1] - seq_bounds[i][0]
                if s >= 0 and past[i] + n > cache.max_seq_len:
                    raise KVCacheOverflowError(
                        f"request in slot {s} would hold {past[i] + n} tokens, past the KV "
                        f"cache's max_seq_len {cache.max_seq_len}; allocate the cache with a "
                        f"larger max_seq_len")
        pos = torch.empty(num_tokens, dtype=torch.int64)
        for (a, b), p in zip(seq_bounds, past):
            pos[a:b] = torch.arange(p, p + b - a)
        singles = [i for i, ((a, b), s) in enumerate(zip(seq_bounds, slots))
                   if cache is not None and s >= 0 and init[i] and b - a == 1]
        batch = KVBatch(False, seq_bounds, slots, past, [bool(i) for i in init], cache is None,
                        pos.to(device), None, None)
        if len(singles) > 1:
            batch.single_tokens = torch.tensor([seq_bounds[i][0] for i in singles],
                                               dtype=torch.int64, device=device)
            batch.row_index = torch.tensor([slots[i] for i in singles], dtype=torch.int64,
                                           device=device)
            batch.row_past = torch.tensor([past[i] for i in singles], dtype=torch.int64,
                                          device=device)
        return batch

    @staticmethod
    def _build_decode(cache: SSMStateCache, batch: int,
                      cache_indices: Optional[torch.Tensor]) -> "KVBatch":
        dev = cache.kv_lengths.device
        if cache_indices is None:
            if batch > cache.num_slots:
                raise ValueError(f"a decode batch of {batch} rows without cache_indices uses slots "
                                 f"0..{batch - 1}, but the cache has {cache.num_slots} slots")
            rows = torch.arange(batch, dtype=torch.int64, device=dev)
        else:
            rows = cache_indices.long()
            # Padding rows (and any slot outside the pool) read and write the scratch row.
            bad = (rows < 0) | (rows >= cache.num_slots)
            rows = torch.where(bad, torch.full_like(rows, cache.num_slots), rows)
        past = cache.kv_lengths.index_select(0, rows)
        if cache_indices is not None:
            # Padding rows write the scratch row's first key and attend over it alone: the
            # scratch row's length would otherwise grow by one every padded step, up to
            # max_seq_len keys read per padding row.
            past = past.masked_fill(bad, 0)
        if not capturing(dev):
            full = (past >= cache.max_seq_len) & (rows < cache.num_slots)
            if bool(full.any()):
                slot = int(rows[full][0])
                raise KVCacheOverflowError(
                    f"request in slot {slot} already holds {cache.max_seq_len} tokens, the KV "
                    f"cache's max_seq_len; allocate the cache with a larger max_seq_len")
        # Under capture the write position is clamped (a full slot overwrites its last key
        # instead of writing out of bounds); the engine rejects such requests up front.
        past = past.clamp(max=cache.max_seq_len - 1)
        return KVBatch(True, [], [], [], [], False, past, rows, past)

    def decode_tokens(self, device, decode_rows: Optional[torch.Tensor] = None
                      ) -> Optional[torch.Tensor]:
        """(T,) bool marking the tokens of a prefill-style batch that are decode steps riding
        along, or None when it has none. decode_rows: the forward's per-sequence flags (checked
        by check_decode_rows); None takes every continuing sequence of one token."""
        if self.decode:
            return None
        single = [c and b - a == 1 for (a, b), c in zip(self.seq_bounds, self.seq_continues)]
        if decode_rows is None:
            flags = single
        else:
            flags = [bool(f) for f in decode_rows.tolist()]
            for i, (flag, ok) in enumerate(zip(flags, single)):
                if flag and not ok:
                    a, b = self.seq_bounds[i]
                    raise ValueError(
                        f"decode_rows[{i}] is True, but sequence {i} is not one continuing "
                        f"token: it has {b - a} token(s) and has_initial_state "
                        f"{self.seq_continues[i]}")
        if not any(flags):
            return None
        mask = torch.zeros(self.seq_bounds[-1][1], dtype=torch.bool)
        for (a, b), flag in zip(self.seq_bounds, flags):
            mask[a:b] = flag
        return mask.to(device)

    def advance(self, cache: SSMStateCache) -> None:
        """Records the batch's tokens in the cache's per-slot lengths (after every visit)."""
        if self.decode:
            cache.kv_lengths.index_put_((self.row_index,), self.row_past + 1)
            return
        rows = [(s, p + b - a) for (a, b), s, p in zip(self.seq_bounds, self.seq_slots,
                                                       self.seq_past) if s >= 0]
        if rows:
            idx = torch.tensor([r[0] for r in rows], dtype=torch.int64)
            val = torch.tensor([r[1] for r in rows], dtype=torch.int64)
            cache.kv_lengths.index_put_((idx.to(cache.kv_lengths.device),),
                                        val.to(cache.kv_lengths.device))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Adapters(nn.Module):
    """LoRA adapters of one visit for a fused column-parallel GEMM of `parts` segments: the
    output of segment i gains (x A_i^T) B_i[rows_i]^T. A replicated, B sharded by rows."""

    def __init__(self, in_features: int, rank: int, part_rows: Sequence[Sequence[Tuple[int, int]]],
                 dtype, device):
        super().__init__()
        self.rank = rank
        self.part_rows = [list(r) for r in part_rows]
        self.A = nn.Parameter(torch.empty(len(part_rows) * rank, in_features, dtype=dtype,
                                          device=device), requires_grad=False)
        self.B = nn.ParameterList([
            nn.Parameter(torch.empty(ranges_size(rows), rank, dtype=dtype, device=device),
                         requires_grad=False) for rows in self.part_rows])

    def load(self, source, a_names: Sequence[str], b_names: Sequence[str]) -> None:
        r = self.rank
        for i, (a, b) in enumerate(zip(a_names, b_names)):
            self.A[i * r:(i + 1) * r].copy_(source.get(a))
            self.B[i].copy_(source.get_rows(b, self.part_rows[i]))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, part_cols: Sequence[Tuple[int, int]]):
        """out[:, cols_i] += (x A_i^T) B_i^T for every part (out is the fused GEMM's output)."""
        xa = F.linear(x, self.A)
        r = self.rank
        for i, (c0, c1) in enumerate(part_cols):
            out[:, c0:c1] += F.linear(xa[:, i * r:(i + 1) * r], self.B[i])


class SharedBlock(nn.Module):
    """One shared transformer block on this rank: its weights once, and the LoRA adapters of
    each of its visits (Zamba2) in qkv_adapters / mlp_adapters, keyed by the global hybrid-visit
    number."""

    def __init__(self, cfg: AttentionConfig, visits: Sequence[int], ctx: TPContext,
                 dtype: torch.dtype, allreduce: Union[str, AllReduce] = "exact",
                 backend: str = "ops"):
        super().__init__()
        self.cfg = cfg
        self.decode_attention = get_backend(backend).decode_attention
        self.ctx = ctx
        allreduce = AllReduce.of(ctx, allreduce)
        dev = ctx.device
        D, Di, hd, H, I = (cfg.hidden_size, cfg.input_size, cfg.head_dim, cfg.num_heads,
                           cfg.intermediate_size)
        self.h_range = ctx.shard_range(H, "num_attention_heads")
        h0, h1 = self.h_range
        self.local_heads = h1 - h0
        self.head_rows = [(h0 * hd, h1 * hd)]
        self.i_range = ctx.shard_range(I, "intermediate_size (the MLP width)")
        i0, i1 = self.i_range
        self.local_inter = i1 - i0
        L = self.local_heads * hd
        self.input_norm = RMSNorm(Di, cfg.rms_norm_eps, dtype, dev)
        self.pre_ff_norm = RMSNorm(D, cfg.rms_norm_eps, dtype, dev)
        self.qkv_weight = nn.Parameter(torch.empty(3 * L, Di, dtype=dtype, device=dev),
                                       requires_grad=False)
        self.o_proj = RowParallelLinear(self.head_rows, D, False, ctx, dtype,
                                        allreduce=allreduce)
        self.gate_up_weight = nn.Parameter(torch.empty(2 * self.local_inter, D, dtype=dtype,
                                                       device=dev), requires_grad=False)
        self.gate_up_bias = (nn.Parameter(torch.empty(2 * self.local_inter, dtype=dtype,
                                                      device=dev), requires_grad=False)
                             if cfg.mlp_bias else None)
        self.down_proj = RowParallelLinear([self.i_range], D, cfg.mlp_bias, ctx, dtype,
                                           allreduce=allreduce)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.projection_kernel = "torch"  # qkv and gate_up; the model's set_projection_kernel
        self.visits = list(visits)
        self.qkv_adapters = nn.ModuleDict()
        self.mlp_adapters = nn.ModuleDict()
        if cfg.adapter_rank:
            for v in self.visits:
                if cfg.attention_adapters:
                    self.qkv_adapters[str(v)] = _Adapters(Di, cfg.adapter_rank,
                                                          [self.head_rows] * 3, dtype, dev)
                self.mlp_adapters[str(v)] = _Adapters(D, cfg.adapter_rank,
                                                      [[(i0, i1), (I + i0, I + i1)]], dtype, dev)
        if cfg.rope_theta:
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            self.register_buffer("inv_freq", inv.to(dev), persistent=False)

    def kv_shape(self) -> KVShape:
        return KVShape(self.local_heads, self.cfg.head_dim)

    # ------------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load(self, source, prefix: str) -> None:
        """prefix: 'model.layers.<i>.shared_transf(ormer).' of the block's first visit."""
        L = self.local_heads * self.cfg.head_dim
        att = prefix + "self_attn."
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            self.qkv_weight[i * L:(i + 1) * L].copy_(
                source.get_rows(att + name + ".weight", self.head_rows))
        self.o_proj.load(source, att + "o_proj.weight")
        self.input_norm.weight.copy_(source.get(prefix + "input_layernorm.weight"))
        self.pre_ff_norm.weight.copy_(source.get(prefix + "pre_ff_layernorm.weight"))
        ff = prefix + "feed_forward."
        i0, i1 = self.i_range
        I, Il = self.cfg.intermediate_size, self.local_inter
        if self.cfg.packed_gate_up:
            rows = [(i0, i1), (I + i0, I + i1)]
            self.gate_up_weight.copy_(source.get_rows(ff + "gate_up_proj.weight", rows))
            if self.gate_up_bias is not None:
                self.gate_up_bias.copy_(source.get_rows(ff + "gate_up_proj.bias", rows))
        else:
            self.gate_up_weight[:Il].copy_(source.get_rows(ff + "gate_proj.weight", [(i0, i1)]))
            self.gate_up_weight[Il:].copy_(source.get_rows(ff + "up_proj.weight", [(i0, i1)]))
        self.down_proj.load(source, ff + "down_proj.weight", ff + "down_proj.bias")
        for v in self.visits:
            if str(v) in self.qkv_adapters:
                names = [f"{att}linear_{p}_adapter_list.{v}" for p in "qkv"]
                self.qkv_adapters[str(v)].load(source, [n + ".0.weight" for n in names],
                                               [n + ".1.weight" for n in names])
            if str(v) in self.mlp_adapters:
                n = f"{ff}gate_up_proj_adapter_list.{v}"
                self.mlp_adapters[str(v)].load(source, [n + ".0.weight"], [n + ".1.weight"])

    # ------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, visit: int, kv: KVBatch,
                k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
                total: Optional[int] = None) -> torch.Tensor:
        """x: (T, 2D) = concat(hidden, embedding) -> (T, D), reduced over the TP group.
        Sequence parallelism (`total` = the step's T): x and the result are this rank's rows
        of them (T padded to a multiple of tp, T_pad / tp rows a rank); the two norms run on
        those rows, all-gathers of their outputs feed qkv and gate_up, o_proj and down_proj
        reduce-scatter."""
        cfg = self.cfg
        hd, Hl = cfg.head_dim, self.local_heads
        L = Hl * hd
        scatter = total is not None
        h = self.input_norm(x)
        if scatter:
            h = self.ctx.all_gather_rows(h, total)
        T = h.shape[0]
        qkv = linear(h, self.qkv_weight, kernel=self.projection_kernel)
        if str(visit) in self.qkv_adapters:
            self.qkv_adapters[str(visit)].add_to(qkv, h, [(0, L), (L, 2 * L), (2 * L, 3 * L)])
        q, k, v = (t.view(T, Hl, hd) for t in qkv.split(L, dim=-1))
        if cfg.rope_theta:
            cos, sin = kv.rotary(self.inv_freq, q.dtype)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if kv.decode:
            o = self._decode_attention(q, k, v, kv.row_index, kv.row_past, k_cache, v_cache)
        else:
            o = self._prefill_attention(q, k, v, kv, k_cache, v_cache)
        a = self.o_proj(o.reshape(T, L), scatter=scatter)  # all-reduce #1
        a = self.pre_ff_norm(a)
        if scatter:
            a = self.ctx.all_gather_rows(a, total)
        gu = linear(a, self.gate_up_weight, self.gate_up_bias, self.projection_kernel)
        Il = self.local_inter
        if str(visit) in self.mlp_adapters:
            self.mlp_adapters[str(visit)].add_to(gu, a, [(0, 2 * Il)])
        m = self.act(gu[:, :Il]) * gu[:, Il:]
        return self.down_proj(m, scatter=scatter)  # all-reduce #2

    def _prefill_attention(self, q, k, v, kv: KVBatch, k_cache, v_cache) -> torch.Tensor:
        """Per sequence: write the chunk's keys / values to its slot, attend to the slot's
        cached keys plus the chunk's (lower-right causal)."""
        o = torch.zeros_like(q)
        scale = self.cfg.scale
        singles = kv.single_tokens
        if singles is not None:
            o[singles] = self._decode_attention(q[singles], k[singles], v[singles], kv.row_index,
                                                kv.row_past, k_cache, v_cache)
        for (a, b), slot, past, cont in zip(kv.seq_bounds, kv.seq_slots, kv.seq_past,
                                            kv.seq_continues):
            if slot < 0 and not kv.stateless:
                continue  # padding row
            n = b - a
            if singles is not None and n == 1 and cont:
                continue  # attended above
            qs = q[a:b].transpose(0, 1)            # (H, n, hd)
            if kv.stateless:
                ks, vs = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
            else:
                k_cache[slot, :, past:past + n] = k[a:b].transpose(0, 1)
                v_cache[slot, :, past:past + n] = v[a:b].transpose(0, 1)
                ks, vs = k_cache[slot, :, :past + n], v_cache[slot, :, :past + n]
            if past == 0:
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
            else:
                # Query i (absolute position past + i) sees keys 0 .. past + i: is_causal would
                # align the mask to the top left instead.
                mask = (torch.arange(past + n, device=q.device)[None, :]
                        <= torch.arange(n, device=q.device)[:, None] + past)
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            o[a:b] = out.transpose(0, 1)
        return o

    def _decode_attention(self, q, k, v, rows, past, k_cache, v_cache) -> torch.Tensor:
        """One token per row, all on the device: write each row's key / value at position
        past[row] of cache row rows[row], then attend over the row's first past + 1 keys."""
        k_cache[rows, :, past] = k
        v_cache[rows, :, past] = v
        return self.decode_attention(q, k_cache, v_cache, rows, past + 1, self.cfg.scale)
