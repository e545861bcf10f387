"""SSMForCausalLM: a tensor-parallel Mamba / Falcon-Mamba / Mamba-2 language model that loads a
Hugging Face checkpoint slice by slice and runs packed varlen batches against an SSMStateCache.

Embedding and lm_head are replicated on every rank (tied checkpoints share one tensor): they are
small next to the mixers of the models this targets, and replicating them costs no communication
(a vocab-parallel head would add an all-gather of the logits per step).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpssm.cache import SSMStateCache
from tpssm.models import registry
from tpssm.models.config import SSMConfig
from tpssm.models.kernels import get_backend
from tpssm.models.mixers import BatchMeta, Mamba1Mixer, Mamba2Mixer
from tpssm.models.weights import DictSource, SafetensorsSource, WeightSource
from tpssm.ops import SCAN_ALGORITHMS
from tpssm.parallel import AllReduce, TPContext

__all__ = ["CausalLM", "RMSNorm", "SSMBlock", "SSMForCausalLM"]


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
    and the next layer's norm as one fused op (tpssm.ops.add_rms_norm); the block holds the norm
    weight and the mixer."""

    def __init__(self, config: SSMConfig, layer_idx: int, ctx: TPContext, dtype: torch.dtype,
                 **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, dtype, ctx.device)
        cls = Mamba2Mixer if config.is_mamba2 else Mamba1Mixer
        self.mixer = cls(config, layer_idx, ctx, dtype, **mixer_kwargs)


class CausalLM(nn.Module):
    """What every family's model shares: loading, weight accounting, the scan switch, decode.

    A subclass builds its layers in __init__(config, ctx, dtype, backend=, allreduce=,
    allreduce_min_bytes=, allreduce_group_size=) with `self.layers[i].mixer` for every layer,
    and implements load_weights(source), allocate_cache(num_slots, ...) and forward(...).
    `self.allreduce` is the model's one AllReduce strategy (tpssm.parallel), built in
    _init_ends from those three arguments (or given as `allreduce`), shared by every
    row-parallel reduction.
    """

    config: object
    ctx: TPContext

    def _init_ends(self, config, ctx: Optional[TPContext], dtype: torch.dtype,
                   norm_eps: float, allreduce: Union[str, AllReduce], allreduce_min_bytes: int,
                   allreduce_group_size: int) -> None:
        """config / ctx / dtype, the all-reduce strategy and the replicated ends of the model:
        the embedding, the final norm and lm_head (the embedding itself when tied)."""
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
        if config.tie_word_embeddings:
            self.lm_head = self.embeddings
        else:
            self.lm_head = nn.Parameter(torch.empty_like(self.embeddings), requires_grad=False)

    @classmethod
    def from_pretrained(cls, path: str, ctx: Optional[TPContext] = None,
                        dtype: Optional[torch.dtype] = None, backend: str = "ops",
                        allreduce: Union[str, AllReduce] = "exact",
                        allreduce_min_bytes: int = 0, allreduce_group_size: int = 128,
                        **config_options) -> "CausalLM":
        """Loads a local Hugging Face checkpoint directory (config.json + model.safetensors, or
        shards with model.safetensors.index.json); each rank reads only its slices. dtype
        defaults to the checkpoint's (float32 when config.json names none). config_options go
        to the family's config parser (e.g. gated_norm for Mamba-2)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        config = registry.load_config(path, **config_options)
        model_cls = registry.model_class(config)
        if not issubclass(model_cls, cls):
            raise ValueError(f"{path} holds a {config.family} model, which {cls.__name__} does "
                             f"not build; use tpssm.models.load_model")
        model = model_cls(config, ctx, dtype or config.dtype or torch.float32, backend=backend,
                          allreduce=allreduce, allreduce_min_bytes=allreduce_min_bytes,
                          allreduce_group_size=allreduce_group_size)
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

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def set_scan_algorithm(self, algorithm: str) -> None:
        """The prefill scan algorithm of every layer: 'auto', 'recurrent' or 'ssd' (see
        tpssm.ops.selective_scan); results agree to rounding, speed differs."""
        if algorithm not in SCAN_ALGORITHMS:
            raise ValueError(f"scan algorithm must be one of {SCAN_ALGORITHMS}, got {algorithm!r}")
        for layer in self.layers:
            layer.mixer.scan_algorithm = algorithm

    def decode(self, input_ids: torch.Tensor, cache_indices: Optional[torch.Tensor],
               cache: SSMStateCache) -> torch.Tensor:
        """One decode step: input_ids (batch,) -> logits (batch, vocab)."""
        return self.forward(input_ids, None, cache_indices, None, cache)

    # --- pieces the subclasses' load_weights / forward share
    def _load_lm_head(self, source: WeightSource) -> None:
        if not self.config.tie_word_embeddings:
            if not source.has("lm_head.weight"):
                raise KeyError("config has tie_word_embeddings=False but the checkpoint has no "
                               "lm_head.weight")
            self.lm_head.copy_(source.get("lm_head.weight"))

    def _logits(self, hidden: torch.Tensor, query_start_loc: Optional[torch.Tensor],
                return_all_logits: bool, normed: bool = False) -> torch.Tensor:
        """Final norm (unless `normed`) and head: float32 logits of each request's last token
        (every token's with return_all_logits; a decode batch's rows are its requests)."""
        if not return_all_logits and query_start_loc is not None:
            hidden = hidden.index_select(0, query_start_loc[1:].long() - 1)
        if not normed:
            hidden = self.norm_f(hidden)
        return F.linear(hidden.to(self.dtype), self.lm_head).float()


class SSMForCausalLM(CausalLM):
    """A TP model on the ranks of `ctx` (tp = 1 without one).

    Build with SSMForCausalLM.from_pretrained(path, ctx, ...) or construct + load_weights(source).
    Every rank runs forward with the same inputs; every rank gets the same logits.
    """

    def __init__(self, config: SSMConfig, ctx: Optional[TPContext] = None,
                 dtype: torch.dtype = torch.float32, backend: str = "ops",
                 allreduce: Union[str, AllReduce] = "exact", allreduce_min_bytes: int = 0,
                 allreduce_group_size: int = 128):
        super().__init__()
        self._init_ends(config, ctx, dtype, config.layer_norm_epsilon, allreduce,
                        allreduce_min_bytes, allreduce_group_size)
        self.layers = nn.ModuleList([
            SSMBlock(config, i, self.ctx, dtype, backend=backend, allreduce=self.allreduce)
            for i in range(config.num_hidden_layers)])
        self.add_rms_norm = get_backend(backend).add_rms_norm

    # ----------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_weights(self, source: WeightSource) -> None:
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
                             self.ctx.device, conv_dtype or self.dtype, ssm_dtype)

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, query_start_loc: Optional[torch.Tensor] = None,
                cache_indices: Optional[torch.Tensor] = None,
                has_initial_state: Optional[torch.Tensor] = None,
                cache: Optional[SSMStateCache] = None,
                return_all_logits: bool = False) -> torch.Tensor:
        """Logits (float32) of a packed batch.

        input_ids: (T,) int64, the tokens of all requests concatenated.
        query_start_loc: int32 (batch + 1,) token offsets (every request has >= 1 token). A batch
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
        token when return_all_logits.
        """
        if query_start_loc is None and cache is None:
            raise ValueError("a decode batch (query_start_loc=None) needs a cache")
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (total_tokens,), got shape "
                             f"{tuple(input_ids.shape)}")
        meta = BatchMeta(query_start_loc, cache_indices,
                         None if query_start_loc is None else has_initial_state)
        hidden = F.embedding(input_ids, self.embeddings)
        # The residual stream (fp32 with residual_in_fp32) is updated in place by the fused add +
        # norm between layers: out of layer i and the norm of layer i + 1 (or the final norm) are
        # one op, the arithmetic of `residual + out` followed by RMSNorm(stream in the model dtype).
        residual = hidden.float() if self.config.residual_in_fp32 else hidden.clone()
        eps = self.config.layer_norm_epsilon
        h = self.add_rms_norm(hidden, self.layers[0].norm.weight, eps)
        for i, layer in enumerate(self.layers):
            conv = cache.conv_states[i] if cache is not None else None
            ssm = cache.ssm_states[i] if cache is not None else None
            out = layer.mixer(h, conv, ssm, meta)
            following = (self.layers[i + 1].norm if i + 1 < len(self.layers) else self.norm_f)
            h = self.add_rms_norm(out, following.weight, eps, residual=residual)
        return self._logits(h, query_start_loc, return_all_logits, normed=True)
