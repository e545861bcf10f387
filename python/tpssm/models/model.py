"""SSMForCausalLM: a tensor-parallel Mamba / Falcon-Mamba / Mamba-2 language model that loads a
Hugging Face checkpoint slice by slice and runs packed varlen batches against an SSMStateCache.

The embedding is replicated on every rank (a lookup reads only the batch's rows). Under TP the LM
head is vocabulary-parallel by default: rank r holds and multiplies only its rows of the
vocabulary (a view of the embedding when tied), so the largest matrix a decode step streams
shrinks with tp like the mixers. Full logits are an all-gather of the ranks' columns; greedy
decoding needs only each rank's (max, token) pair (`greedy_tokens`).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpssm.cache import SSMStateCache
from tpssm.generate import argmax_tokens, finite
from tpssm.models import registry
from tpssm.models.config import SSMConfig
from tpssm.models.kernels import get_backend
from tpssm.models.mixers import (BatchMeta, InputNorm, Mamba1Mixer, Mamba2Mixer,
                                 check_decode_rows, check_query_start_loc)
from tpssm.models.weights import DictSource, SafetensorsSource, WeightSource, check_weights
from tpssm.ops import SCAN_ALGORITHMS, index_values_checked
from tpssm.parallel import (PROJECTION_KERNELS, AllReduce, TPContext, gemv_applies, linear,
                            shard_range)

# Decode steps of at most this many rows take gemv's norm prologue: every in_proj block re-reads
# the rows and the residual stream from L2 for its norm, about 3 x rows / (rows a block) of the
# weight's bytes (3 / 8 a row with the plan at the presets' shapes), so larger batches keep
# add_rms_norm until a GPU has timed both (bench_projections.py --in-proj-conv).
NORM_PROLOGUE_MAX_ROWS = 2

# Prefill steps of at least this many tokens run sequence-parallel when the model has it on
# (set_sequence_parallel). It trades the norm's replicated bytes (12 x T x D a layer with the
# fp32 stream, (tp - 1) / tp of them saved) against a second collective's latency: at D = 2560,
# tp 4 and ~3 TB/s that is ~0.8 us saved per 100 tokens against ~5-10 us of NVLink latency, so
# ~650-1300 tokens to break even (derived, not measured).
SEQUENCE_PARALLEL_MIN_TOKENS = 1024

__all__ = ["CausalLM", "RMSNorm", "SSMBlock", "SSMForCausalLM", "SEQUENCE_PARALLEL_MIN_TOKENS"]


class RMSNorm(nn.Module):
    """transformers' Mamba RMSNorm: normalise in fp32, round to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm upcasts 16-bit inputs, normalises in fp32 and rounds once to x's dtype: the
        # same as the eight-op chain it replaces (bit for bit on the CPU, checked in
        # tests/test_models.py), in one kernel on CUDA (aten::_fused_rms_norm); decode runs it
        # once per layer per token.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class SSMBlock(nn.Module):
    """A Mamba-family layer: hidden + mixer(norm(hidden)). SSMForCausalLM runs the residual add
    and the next layer's norm as one fused op (tpssm.ops.add_rms_norm), or in a decode step
    through gemv as the prologue of the next in_proj's launch; the block holds the norm weight
    and the mixer."""

    def __init__(self, config: SSMConfig, layer_idx: int, ctx: TPContext, dtype: torch.dtype,
                 **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, dtype, ctx.device)
        cls = Mamba2Mixer if config.is_mamba2 else Mamba1Mixer
        self.mixer = cls(config, layer_idx, ctx, dtype, **mixer_kwargs)


class CausalLM(nn.Module):
    """What every family's model shares: loading, weight accounting, the scan switch, decode.

    A subclass builds its layers in __init__(config, ctx, dtype, backend=, allreduce=,
    allreduce_min_bytes=, allreduce_group_size=, vocab_parallel=) with `self.layers[i].mixer`
    for every layer, and implements load_weights(source), allocate_cache(num_slots, ...) and
    forward(...).
    `self.allreduce` is the model's one AllReduce strategy (tpssm.parallel), built in
    _init_ends from those three arguments (or given as `allreduce`), shared by every
    row-parallel reduction.
    """

    config: object
    ctx: TPContext
    # See set_sequence_parallel.
    sequence_parallel = False
    sequence_parallel_min_tokens = SEQUENCE_PARALLEL_MIN_TOKENS

    def _init_ends(self, config, ctx: Optional[TPContext], dtype: torch.dtype,
                   norm_eps: float, allreduce: Union[str, AllReduce], allreduce_min_bytes: int,
                   allreduce_group_size: int, vocab_parallel: bool) -> None:
        """config / ctx / dtype, the all-reduce strategy and the ends of the model: the
        embedding, the final norm and lm_head - this rank's vocabulary rows when
        vocab_parallel and tp > 1, else all of them (rows of the embedding when tied)."""
        self.config = config
        self.ctx = ctx if ctx is not None else TPContext()
        self.dtype = dtype
        self.allreduce = AllReduce.of(self.ctx, allreduce, allreduce_min_bytes,
                                      allreduce_group_size)
        dev = self.ctx.device
        self.embeddings = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype, device=dev),
            requires_grad=False)
        self.norm_f = RMSNorm(config.hidden_size, norm_eps, dtype, dev)
        self.projection_kernel = "torch"  # the head's; set_projection_kernel
        V, tp = config.vocab_size, self.ctx.tp
        self.vocab_parallel = bool(vocab_parallel) and tp > 1
        self.vocab_range = (self.ctx.shard_range(V, "vocab_size") if self.vocab_parallel
                            else (0, V))
        start, end = self.vocab_range
        if config.tie_word_embeddings:
            # The rank's rows of the embedding itself (a view: the same storage).
            self.lm_head = (self.embeddings.narrow(0, start, end - start)
                            if self.vocab_parallel else self.embeddings)
        else:
            self.lm_head = nn.Parameter(
                torch.empty(end - start, config.hidden_size, dtype=dtype, device=dev),
                requires_grad=False)
        if self.vocab_parallel:
            # gather_logits pads every rank's columns to the widest rank's and gathers them in
            # rank order; this index picks the real columns (token order) out of that layout.
            widths = [b - a for a, b in (shard_range(V, tp, r) for r in range(tp))]
            self._vocab_width = max(widths)
            # A buffer (not saved): it follows the model through .to() / .cuda().
            self.register_buffer("_vocab_gather_index", None if V == tp * self._vocab_width
                                 else torch.tensor([r * self._vocab_width + j for r in range(tp)
                                                    for j in range(widths[r])], device=dev),
                                 persistent=False)

    def _apply(self, fn, *args, **kwargs):
        """.to(dtype) / .half() / .bfloat16() convert the weights and update self.dtype; the
        float buffers (A, D, dt bias, rotary frequencies: float32 by design) keep their values
        and dtype. A model stays on its TP context's device: moving it is refused."""
        here = torch.empty(0, device=self.ctx.device)
        there = fn(here)
        if isinstance(there, torch.Tensor) and there.device != here.device:
            raise ValueError(f"a tpssm model lives on its TP context's device ({here.device}); "
                             f"build it on {there.device} instead (TPContext(device=...) or "
                             f"from_pretrained's ctx) rather than moving it")
        kept = [(m, name, b) for m in self.modules() for name, b in m._buffers.items()
                if b is not None and b.is_floating_point()]
        result = super()._apply(fn, *args, **kwargs)
        for m, name, b in kept:
            m._buffers[name] = b
        self.dtype = self.embeddings.dtype
        # A tied vocabulary-parallel head is a view of the embedding, which has new storage now:
        # take it again, or it would keep the old tensor.
        if getattr(self, "vocab_parallel", False) and self.config.tie_word_embeddings:
            start, end = self.vocab_range
            self.lm_head = self.embeddings.narrow(0, start, end - start)
        return result

    @classmethod
    def from_pretrained(cls, path: str, ctx: Optional[TPContext] = None,
                        dtype: Optional[torch.dtype] = None, backend: str = "ops",
                        allreduce: Union[str, AllReduce] = "exact",
                        allreduce_min_bytes: int = 0, allreduce_group_size: int = 128,
                        vocab_parallel: bool = True, **config_options) -> "CausalLM":
        """Loads a local Hugging Face checkpoint directory (config.json + model.safetensors, or
        shards with model.safetensors.index.json); each rank reads only its slices. dtype
        defaults to the checkpoint's (float32 when config.json names none). vocab_parallel:
        split the LM head by vocabulary rows under TP (False: every rank holds all of it).
        config_options go to the family's config parser (e.g. gated_norm for Mamba-2)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        config = registry.load_config(path, **config_options)
        model_cls = registry.model_class(config)
        if not issubclass(model_cls, cls):
            raise ValueError(f"{path} holds a {config.family} model, which {cls.__name__} does "
                             f"not build; use tpssm.models.load_model")
        model = model_cls(config, ctx, dtype or config.dtype or torch.float32, backend=backend,
                          allreduce=allreduce, allreduce_min_bytes=allreduce_min_bytes,
                          allreduce_group_size=allreduce_group_size,
                          vocab_parallel=vocab_parallel)
        source = SafetensorsSource(path)
        model.load_weights(source)
        model.bytes_read = source.bytes_read
        return model

    @classmethod
    def from_state_dict(cls, config, state_dict, ctx: Optional[TPContext] = None,
                        dtype: torch.dtype = torch.float32, **kwargs) -> "CausalLM":
        """From an in-memory Hugging Face state dict (e.g. a transformers model's)."""
        model = cls(config, ctx, dtype, **kwargs)
        model.load_weights(DictSource(state_dict))
        return model

    def parameter_bytes(self) -> int:
        """Bytes of this rank's weights (parameters and the fp32 A / D / dt-bias buffers)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + [b for n, b in self.named_buffers()
                                            if not n.endswith(("norm_group_index", "inv_freq"))]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def decode_weight_bytes(self, batch: int = 1) -> int:
        """Bytes of this rank's weights one decode step of `batch` tokens reads: every weight
        once (parameter_bytes), except the embedding table, of which the step reads `batch`
        rows; the head's rows whole (a tied head's are the embedding's own rows). The
        weight-streaming floor of a step is this over the copy bandwidth."""
        emb = self.embeddings
        head = (self.lm_head.numel() * self.lm_head.element_size()
                if self.config.tie_word_embeddings else 0)  # untied: among the parameters
        return (self.parameter_bytes() - emb.numel() * emb.element_size() + head
                + batch * emb.shape[1] * emb.element_size())

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def _conv_dtype(self, conv_dtype: Optional[torch.dtype]) -> torch.dtype:
        """The conv (and KV) pools' dtype: the model's, the only one the ops read them in."""
        if conv_dtype is not None and conv_dtype != self.dtype:
            raise ValueError(f"conv_dtype must be the model's dtype ({self.dtype}): the conv and "
                             f"attention read their cached states in the activation dtype, got "
                             f"{conv_dtype}")
        return self.dtype

    def set_scan_algorithm(self, algorithm: str) -> None:
        """The prefill scan algorithm of every layer: 'auto', 'recurrent' or 'ssd' (see
        tpssm.ops.selective_scan); results agree to rounding, speed differs."""
        if algorithm not in SCAN_ALGORITHMS:
            raise ValueError(f"scan algorithm must be one of {SCAN_ALGORITHMS}, got {algorithm!r}")
        for layer in self.layers:
            layer.mixer.scan_algorithm = algorithm

    def set_projection_kernel(self, kernel: str) -> None:
        """How the projections multiply - the mixers' in_proj, x_proj and out_proj, the hybrids'
        shared blocks (qkv, o_proj, gate_up, down_proj) and per-layer linear, and the LM head:
        'torch' (F.linear: cuBLAS on CUDA) or 'gemv' (tpssm.ops.gemv for decode-sized inputs
        of at most 8 token rows, F.linear otherwise); results agree to the order of the fp32
        sums. Zamba v1's per-head x_proj / dt_proj and the LoRA adapters stay on F.linear."""
        if kernel not in PROJECTION_KERNELS:
            raise ValueError(f"projection kernel must be one of {PROJECTION_KERNELS}, got "
                             f"{kernel!r}")
        for module in self.modules():  # every module with the attribute, this model included
            if hasattr(module, "projection_kernel"):
                module.projection_kernel = kernel

    def set_sequence_parallel(self, enabled: bool,
                              min_tokens: int = SEQUENCE_PARALLEL_MIN_TOKENS) -> None:
        """Sequence parallelism (see docs/tp-design.md) for prefill steps of at least min_tokens
        tokens under TP: the residual stream, the norms and the other per-token work between
        the row-parallel reductions run on a rank's share of the tokens; the all-reduces into the
        stream (out_proj, a shared block's o_proj and down_proj) become reduce-scatters, and an
        all-gather of the normalised rows feeds the next column-parallel projection (x_proj's
        and the gated norm's reductions inside a mixer stay all-reduces). Changes nothing at
        tp 1. Needs the exact all-reduce scheme (at any tp): the reduce-scatter has no quantized
        form here."""
        if enabled:
            if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
                raise ValueError(f"sequence parallelism: min_tokens must be an int >= 1, got "
                                 f"{min_tokens!r}")
            if self.allreduce.scheme != "exact":
                raise ValueError(f"sequence parallelism reduce-scatters exactly; this model's "
                                 f"all-reduce scheme is {self.allreduce.scheme!r} (use "
                                 f"allreduce='exact')")
            self.sequence_parallel_min_tokens = min_tokens
        self.sequence_parallel = bool(enabled)

    def decode(self, input_ids: torch.Tensor, cache_indices: Optional[torch.Tensor],
               cache: SSMStateCache, gather_logits: bool = True) -> torch.Tensor:
        """One decode step: input_ids (batch,) -> logits (batch, vocab), or this rank's
        columns (batch, vocab_range width) with gather_logits=False (see forward)."""
        return self.forward(input_ids, None, cache_indices, None, cache,
                            gather_logits=gather_logits)

    # --- the vocabulary-parallel head's two ways to whole-vocabulary results
    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) logits from every rank's (rows, vocab_range width) columns (forward /
        decode with gather_logits=False). A collective: every rank calls it with the same rows.
        The logits themselves when the head is not vocabulary-parallel."""
        if not self.vocab_parallel:
            return logits
        rows, width = logits.shape[0], self._vocab_width
        if logits.shape[1] < width:
            logits = F.pad(logits, (0, width - logits.shape[1]))
        parts = self.ctx.all_gather_stack(logits)              # (tp, rows, width)
        full = parts.permute(1, 0, 2).reshape(rows, -1)
        index = self._vocab_gather_index
        return full if index is None else full.index_select(1, index)

    def target_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """float32 (rows,) log-softmax over the whole vocabulary at targets (int64 (rows,),
        global token ids in [0, vocab_size): unchecked here), from this rank's columns
        (forward with gather_logits=False), equal on every rank. Vocabulary-parallel: one
        all-gather of (max, sum of exponentials, target logit) per row and rank, no logits
        moved; a whole head: rank 0's, broadcast. A collective like gather_logits. NaN or inf
        where the logits are not finite."""
        if not self.vocab_parallel:
            out = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
            return self.ctx.broadcast(out.contiguous(), src=0)
        lo, hi = self.vocab_range
        x = logits.float()
        top = x.amax(-1, keepdim=True)
        sums = (x - top).exp_().sum(-1, keepdim=True)
        mine = (targets >= lo) & (targets < hi)
        picked = x.gather(-1, (targets - lo).clamp(0, hi - lo - 1)[:, None])
        picked = picked.masked_fill(~mine[:, None], float("-inf"))
        every = self.ctx.all_gather_stack(torch.cat([top, sums, picked], -1))  # (tp, rows, 3)
        most = every[..., 0].amax(0)
        log_z = most + (every[..., 1] * (every[..., 0] - most).exp()).sum(0).log()
        return every[..., 2].amax(0) - log_z

    def greedy_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """int64 (rows,) argmax over the whole vocabulary from this rank's columns, equal on
        every rank: one all-gather of a (max, token) pair per row and rank, no logits moved.
        Ties go to the lowest token id, as torch.argmax over the whole vocabulary does; -1 for
        a row whose largest logit is NaN or infinite (generate.argmax_tokens). A collective
        like gather_logits. With a whole head on every rank under TP, rank 0's argmax,
        broadcast (ranks then stay in lockstep even if their logits differ in a bit)."""
        if not self.vocab_parallel:
            return self.ctx.broadcast(argmax_tokens(logits), src=0)
        value, token = logits.max(-1, keepdim=True)
        # fp64 holds both the fp32 maximum and the token id exactly.
        pairs = torch.cat([value.double(), (token + self.vocab_range[0]).double()], -1)
        every = self.ctx.all_gather_stack(pairs)             # (tp, rows, 2)
        # argmax takes the first of equal maxima: the lowest rank, which holds the lower ids;
        # and a NaN, if any rank has one.
        best = every[..., 0].argmax(0, keepdim=True)
        value, token = every.gather(0, best[..., None].expand(-1, -1, 2)).squeeze(0).unbind(-1)
        return torch.where(finite(value), token.long(), -1)

    # --- pieces the subclasses' load_weights / forward share
    def _norms_in_in_proj(self, hidden: torch.Tensor, meta: BatchMeta) -> bool:
        """Whether the mixers' input norms (with the residual adds before them) run inside
        in_proj's launch, gemv's norm prologue: decode steps of at most NORM_PROLOGUE_MAX_ROWS
        rows through gemv with the compiled ops, when the rows fit the shared memory a block of
        the device may have (the kernel's own sums and partial sums take up to 2 KB of it)."""
        if not (meta.is_decode and hidden.shape[0] <= NORM_PROLOGUE_MAX_ROWS
                and self.layers[0].mixer.kernels.name == "ops"
                and gemv_applies(hidden, self.projection_kernel)):
            return False
        if hidden.device.type != "cuda":
            return True
        most = torch.cuda.get_device_properties(hidden.device).shared_memory_per_block_optin
        return hidden.numel() * hidden.element_size() <= most - 2048

    def _sequence_parallel_applies(self, input_ids: torch.Tensor, meta: BatchMeta) -> bool:
        return (self.sequence_parallel and self.ctx.tp > 1 and not meta.is_decode
                and input_ids.shape[0] >= self.sequence_parallel_min_tokens)

    def _own_rows(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Sequence parallelism's split of a step's T tokens: this rank's S = ceil(T / tp) rows
        of x (T, ...), tokens [start, start + S) - past T, zero padding rows that are never read
        back - and start."""
        rows = -(-x.shape[0] // self.ctx.tp)
        start = self.ctx.rank * rows
        mine = x[start:start + rows]
        if mine.shape[0] < rows:  # the last ranks' padding rows (possibly all of them)
            mine = torch.cat([mine, mine.new_zeros((rows - mine.shape[0],) + x.shape[1:])])
        return mine, start

    def _shared_logits(self, normed: torch.Tensor, start: int, meta: BatchMeta, total: int,
                       return_all_logits: bool, gather_logits: bool) -> torch.Tensor:
        """_logits for a stream split by tokens: `normed` is the final norm of this rank's rows
        (tokens [start, start + len)) of a step of `total` tokens. Each request's last row comes
        back through _rows_of_owners; with return_all_logits every row, all-gathered."""
        if return_all_logits:
            h = self.ctx.all_gather_rows(normed, total)
        else:
            h = self._rows_of_owners(normed, meta.query_start_loc[1:].long() - 1, start)
        return self._logits(h, None, True, normed=True, gather_logits=gather_logits)

    def _rows_of_owners(self, h: torch.Tensor, wanted: torch.Tensor, start: int
                        ) -> torch.Tensor:
        """Rows `wanted` (global token indices) of the stream split by tokens, on every rank:
        each rank contributes the rows it holds (h's rows are tokens [start, start + len(h))),
        zeros elsewhere, and one exact all-reduce of (len(wanted), D) adds them - every sum has
        a single non-zero term, so the rows arrive bit for bit."""
        local = wanted - start
        held = (local >= 0) & (local < h.shape[0])
        picked = h.index_select(0, local.clamp(0, h.shape[0] - 1))
        picked = torch.where(held[:, None], picked, torch.zeros((), dtype=h.dtype,
                                                                 device=h.device))
        return self.ctx.all_reduce(picked.contiguous())

    def _load_lm_head(self, source: WeightSource) -> None:
        if not self.config.tie_word_embeddings:
            if not source.has("lm_head.weight"):
                raise KeyError("config has tie_word_embeddings=False but the checkpoint has no "
                               "lm_head.weight")
            self.lm_head.copy_(source.get_rows("lm_head.weight", [self.vocab_range]))

    def _logits(self, hidden: torch.Tensor, query_start_loc: Optional[torch.Tensor],
                return_all_logits: bool, normed: bool = False,
                gather_logits: bool = True) -> torch.Tensor:
        """Final norm (unless `normed`) and head: float32 logits of each request's last token
        (every token's with return_all_logits; a decode batch's rows are its requests) - this
        rank's vocabulary columns unless gather_logits."""
        if not return_all_logits and query_start_loc is not None:
            # Clamped: offsets unchecked on the device (an empty first sequence, an end past
            # the tokens) give undefined logits, never an out-of-range read.
            if hidden.shape[0] == 0:
                hidden = hidden.new_zeros(query_start_loc.shape[0] - 1, hidden.shape[1])
            else:
                last = (query_start_loc[1:].long() - 1).clamp(0, hidden.shape[0] - 1)
                hidden = hidden.index_select(0, last)
        if not normed:
            hidden = self.norm_f(hidden)
        logits = linear(hidden.to(self.dtype), self.lm_head,
                        kernel=self.projection_kernel).float()
        return self.gather_logits(logits) if gather_logits else logits


class SSMForCausalLM(CausalLM):
    """A TP model on the ranks of `ctx` (tp = 1 without one).

    Build with SSMForCausalLM.from_pretrained(path, ctx, ...) or construct + load_weights(source).
    Every rank runs forward with the same inputs; every rank gets the same logits.

    Sequence parallelism (set_sequence_parallel, off by default): without it every rank holds
    the whole residual stream and runs every layer's residual add + RMSNorm over all T tokens -
    work that does not shrink with tp (12 x T x D bytes a layer with the fp32 stream). With it,
    a prefill step of at least `sequence_parallel_min_tokens` tokens splits the stream by
    tokens: rank r holds rows [r * S, (r + 1) * S) of the step (S = ceil(T / tp); the padding
    rows past T are zero and never read back), out_proj's all-reduce becomes a reduce-scatter
    to the rank's rows, the add + norm runs on those rows, and an all-gather of the normalised
    rows gives the next mixer its (T, D) input - the two halves of the all-reduce with the norm
    between them (same wire bytes, one more collective's latency). The first layer's norm runs
    on all T rows of the replicated embedding instead of a gather. Decode steps and shorter
    steps keep the all-reduce. Exact scheme only.
    """

    def __init__(self, config: SSMConfig, ctx: Optional[TPContext] = None,
                 dtype: torch.dtype = torch.float32, backend: str = "ops",
                 allreduce: Union[str, AllReduce] = "exact", allreduce_min_bytes: int = 0,
                 allreduce_group_size: int = 128, vocab_parallel: bool = True):
        super().__init__()
        self._init_ends(config, ctx, dtype, config.layer_norm_epsilon, allreduce,
                        allreduce_min_bytes, allreduce_group_size, vocab_parallel)
        self.layers = nn.ModuleList([
            SSMBlock(config, i, self.ctx, dtype, backend=backend, allreduce=self.allreduce)
            for i in range(config.num_hidden_layers)])
        self.add_rms_norm = get_backend(backend).add_rms_norm

    # ----------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_weights(self, source: WeightSource) -> None:
        check_weights(source, registry.weight_shapes(self.config), "backbone.embeddings.weight",
                      self.config.tie_word_embeddings)
        self.embeddings.copy_(source.get("backbone.embeddings.weight"))
        for i, layer in enumerate(self.layers):
            prefix = f"backbone.layers.{i}."
            layer.norm.weight.copy_(source.get(prefix + "norm.weight"))
            layer.mixer.load(source, prefix + "mixer.")
        self.norm_f.weight.copy_(source.get("backbone.norm_f.weight"))
        self._load_lm_head(source)

    # ----------------------------------------------------------------------------- cache
    def allocate_cache(self, num_slots: int, ssm_dtype: torch.dtype = torch.float32,
                       conv_dtype: Optional[torch.dtype] = None,
                       max_seq_len: Optional[int] = None) -> SSMStateCache:
        """State pools for num_slots requests on this rank (conv state in the model dtype).
        max_seq_len is ignored: the state of an SSM does not grow with the sequence."""
        return SSMStateCache([layer.mixer.state_shape() for layer in self.layers], num_slots,
                             self.ctx.device, self._conv_dtype(conv_dtype), ssm_dtype)

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, query_start_loc: Optional[torch.Tensor] = None,
                cache_indices: Optional[torch.Tensor] = None,
                has_initial_state: Optional[torch.Tensor] = None,
                cache: Optional[SSMStateCache] = None,
                return_all_logits: bool = False, gather_logits: bool = True,
                decode_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (float32) of a packed batch.

        input_ids: (T,) int64, the tokens of all requests concatenated.
        query_start_loc: int32 (batch + 1,) token offsets, from 0 to T, every request with >= 1
          token (checked wherever the ops check index values: on the CPU, and on CUDA with
          TPSSM_DEBUG_CHECKS=1; the hybrid models always check, with duplicate slots). A batch
          may mix new requests (has_initial_state False: start from zero state), continuation
          chunks and single decode tokens (True: start from the slot's state). None = a pure
          decode batch: one token per request, all continuing from their slots (the update ops;
          no allocation beyond activations, no host sync).
        cache_indices: int32 (batch,) slots in `cache` (None: row b uses slot b); a slot of -1
          marks a padding row that is skipped (its logits are undefined).
        has_initial_state: bool (batch,), None = all False. Ignored for decode batches.
        cache: SSMStateCache from allocate_cache; every non-padding request's final conv and SSM
          state is written to its slot. None: stateless prefill (decode batches need a cache).
        Returns (batch, vocab) logits of each request's last token, or (T, vocab) for every
        token when return_all_logits. gather_logits=False: only this rank's vocabulary columns
        (vocab_range) - the whole vocabulary unless the head is vocabulary-parallel - for
        greedy_tokens / gather_logits (no logits all-gather).
        decode_rows: bool (batch,), which sequences of a prefill-style batch are decode steps
          (one new token of a request) rather than prompt chunks; None takes every continuing
          one-token sequence as a decode step. Only mixers whose dt limits apply in prefill only
          (Zamba2) read it; an engine that may prefill a one-token chunk passes it. Ignored for
          decode batches.
        """
        if query_start_loc is None and cache is None:
            raise ValueError("a decode batch (query_start_loc=None) needs a cache")
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (total_tokens,), got shape "
                             f"{tuple(input_ids.shape)}")
        check_decode_rows(decode_rows, query_start_loc)
        if query_start_loc is not None and index_values_checked(query_start_loc.device):
            check_query_start_loc(query_start_loc.tolist(), input_ids.shape[0])
        meta = BatchMeta(query_start_loc, cache_indices,
                         None if query_start_loc is None else has_initial_state)
        if self._sequence_parallel_applies(input_ids, meta):
            return self._forward_sequence_parallel(input_ids, meta, cache, return_all_logits,
                                                   gather_logits)
        hidden = F.embedding(input_ids, self.embeddings)
        # The residual stream (fp32 with residual_in_fp32): out of layer i and the norm of layer
        # i + 1 (or the final norm) are one op, the arithmetic of `residual + out` followed by
        # RMSNorm(stream in the model dtype) - add_rms_norm, updating the stream in place, or
        # layer i + 1's in_proj prologue. streams[i % len(streams)] is the stream layer i's out
        # is added to: one buffer for add_rms_norm; two for the prologue, whose blocks all read
        # the stream while one writes the update, so layer i reads one and writes the other.
        residual = hidden.float() if self.config.residual_in_fp32 else hidden.clone()
        eps = self.config.layer_norm_epsilon
        streams = [residual]
        norms_in_in_proj = self._norms_in_in_proj(hidden, meta)
        if norms_in_in_proj:
            streams.append(torch.empty_like(residual))
            h = hidden
        else:
            h = self.add_rms_norm(hidden, self.layers[0].norm.weight, eps)
        for i, layer in enumerate(self.layers):
            conv = cache.conv_states[i] if cache is not None else None
            ssm = cache.ssm_states[i] if cache is not None else None
            norm = None
            if norms_in_in_proj:
                norm = InputNorm(layer.norm.weight, eps)
                if i > 0:
                    norm.residual, norm.residual_out = streams[(i - 1) % 2], streams[i % 2]
            out = layer.mixer(h, conv, ssm, meta, norm=norm)
            if norms_in_in_proj and i + 1 < len(self.layers):
                h = out  # the next in_proj adds it to the stream and normalises
                continue
            following = (self.layers[i + 1].norm if i + 1 < len(self.layers) else self.norm_f)
            h = self.add_rms_norm(out, following.weight, eps,
                                  residual=streams[i % len(streams)])
        return self._logits(h, query_start_loc, return_all_logits, normed=True,
                            gather_logits=gather_logits)

    def _forward_sequence_parallel(self, input_ids: torch.Tensor, meta: BatchMeta,
                                   cache: Optional[SSMStateCache], return_all_logits: bool,
                                   gather_logits: bool) -> torch.Tensor:
        """forward for a prefill step with the residual stream split by tokens (class
        docstring): this rank adds and normalises only its rows (but for the first norm)."""
        ctx, eps, T = self.ctx, self.config.layer_norm_epsilon, input_ids.shape[0]
        # The embedding is replicated: every rank normalises all T rows for the first layer,
        # which costs less than all-gathering them (8 x T x D bytes of memory traffic against
        # 2 x T x D over the link and a collective's latency).
        hidden = F.embedding(input_ids, self.embeddings)
        whole = self.add_rms_norm(hidden, self.layers[0].norm.weight, eps)
        hidden, start = self._own_rows(hidden)
        residual = hidden.float() if self.config.residual_in_fp32 else hidden.clone()
        for i, layer in enumerate(self.layers):
            conv = cache.conv_states[i] if cache is not None else None
            ssm = cache.ssm_states[i] if cache is not None else None
            if i > 0:
                whole = ctx.all_gather_rows(h, T)
            out = layer.mixer(whole, conv, ssm, meta, scatter=True)
            following = (self.layers[i + 1].norm if i + 1 < len(self.layers) else self.norm_f)
            h = self.add_rms_norm(out, following.weight, eps, residual=residual)
        return self._shared_logits(h, start, meta, T, return_all_logits, gather_logits)
