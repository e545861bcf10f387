"""HybridForCausalLM: Zamba (v1) and Zamba2 under tensor parallelism.

Every layer has its own Mamba mixer (Zamba: multi-head Mamba-1, Zamba2: Mamba-2); a hybrid layer
first runs a shared transformer block on concat([hidden, embedding]) (the raw token embedding),
maps the block's output through its own D x D `linear`, and adds it to the mixer's input only:

    mamba layer:   hidden = hidden + mixer(norm(hidden))
    hybrid layer:  t = linear(block(concat(hidden, emb)));  hidden = hidden + mixer(norm(hidden + t))

Residual adds run in the model dtype. Zamba2 has num_mem_blocks shared blocks: hybrid visit k
(the k-th hybrid layer) uses block k % num_mem_blocks with visit k's LoRA adapters (an untied
checkpoint has a block per visit: HybridConfig.share_blocks). Each visit has its own keys and
values in the state cache (see tpssm.cache). Sharding: mixers as the Mamba families (channels /
heads), shared blocks by attention heads and MLP channels (tpssm.models.attention), lm_head by
vocabulary rows (tpssm.models.model); embedding, norms and `linear` replicated.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpssm.cache import SSMStateCache
from tpssm.models import registry
from tpssm.models.attention import KVBatch, SharedBlock
from tpssm.models.mixers import (BatchMeta, InputNorm, Mamba2Mixer, MultiHeadMamba1Mixer,
                                 check_decode_rows)
from tpssm.models.model import CausalLM, RMSNorm
from tpssm.models.weights import WeightSource, check_weights
from tpssm.parallel import AllReduce, TPContext, linear

__all__ = ["HybridForCausalLM", "HybridLayer"]


class HybridLayer(nn.Module):
    def __init__(self, config, layer_idx: int, ctx: TPContext, dtype: torch.dtype,
                 **mixer_kwargs):
        super().__init__()
        self.hybrid = config.layer_types[layer_idx] == "hybrid"
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, ctx.device)
        if config.is_zamba2:
            self.mixer = Mamba2Mixer(config.mixer, layer_idx, ctx, dtype, **mixer_kwargs)
        else:
            self.mixer = MultiHeadMamba1Mixer(config.mixer, config.n_mamba_heads, layer_idx, ctx,
                                              dtype, **mixer_kwargs)
        self.linear = (nn.Parameter(torch.empty(config.hidden_size, config.hidden_size,
                                                dtype=dtype, device=ctx.device),
                                    requires_grad=False) if self.hybrid else None)


class HybridForCausalLM(CausalLM):
    """A TP Zamba / Zamba2 model on the ranks of `ctx` (tp = 1 without one); the interface of
    SSMForCausalLM. Build with tpssm.models.load_model(path, ctx) or construct +
    load_weights(source)."""

    def __init__(self, config, ctx: Optional[TPContext] = None,
                 dtype: torch.dtype = torch.float32, backend: str = "ops",
                 allreduce: Union[str, AllReduce] = "exact", allreduce_min_bytes: int = 0,
                 allreduce_group_size: int = 128, vocab_parallel: bool = True):
        super().__init__()
        self._init_ends(config, ctx, dtype, config.rms_norm_eps, allreduce, allreduce_min_bytes,
                        allreduce_group_size, vocab_parallel)
        comm = dict(allreduce=self.allreduce)
        self.layers = nn.ModuleList([HybridLayer(config, i, self.ctx, dtype, backend=backend,
                                                 **comm)
                                     for i in range(config.num_hidden_layers)])
        self.hybrid_layers = config.hybrid_layers
        nvisits = len(self.hybrid_layers)
        self.visit_of_layer = {layer: k for k, layer in enumerate(self.hybrid_layers)}
        self.block_of_visit = [config.block_of_visit(k) for k in range(nvisits)]
        nblocks = max(self.block_of_visit, default=-1) + 1
        self.blocks = nn.ModuleList([
            SharedBlock(config.attention, [k for k in range(nvisits)
                                           if self.block_of_visit[k] == b],
                        self.ctx, dtype, backend=backend, **comm)
            for b in range(nblocks)])

    # ----------------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_weights(self, source: WeightSource) -> None:
        """Each rank reads only its slices; a shared block is read at its first visit (where
        the checkpoint stores it), so the loader walks the layers in order."""
        block_name = "shared_transformer" if self.config.is_zamba2 else "shared_transf"
        # transformers stores a shared block again under later visits' layers (or lists it
        # there in a state dict); the loader reads its first visit's.
        copies = [f"model.layers.{layer}.{block_name}." for k, layer
                  in enumerate(self.hybrid_layers) if self.block_of_visit[k] != k]
        check_weights(source, registry.weight_shapes(self.config), "model.embed_tokens.weight",
                      self.config.tie_word_embeddings, copies)
        self.embeddings.copy_(source.get("model.embed_tokens.weight"))
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            mamba = prefix + ("mamba_decoder." if layer.hybrid else "")
            layer.norm.weight.copy_(source.get(mamba + "input_layernorm.weight"))
            layer.mixer.load(source, mamba + "mamba.")
            if layer.hybrid:
                visit = self.visit_of_layer[i]
                if self.block_of_visit[visit] == visit:  # the block's first visit
                    self.blocks[visit].load(source, f"{prefix}{block_name}.")
                layer.linear.copy_(source.get(prefix + "linear.weight"))
        self.norm_f.weight.copy_(source.get("model.final_layernorm.weight"))
        self._load_lm_head(source)

    def decode_weight_bytes(self, batch: int = 1) -> int:
        """CausalLM's, with each shared block read again at every later visit (its adapters
        are the visit's own, counted once)."""
        total = super().decode_weight_bytes(batch)
        for block in self.blocks:
            shared = sum(p.numel() * p.element_size() for name, p in block.named_parameters()
                         if not name.startswith(("qkv_adapters.", "mlp_adapters.")))
            total += (len(block.visits) - 1) * shared
        return total

    # ----------------------------------------------------------------------------- cache
    def allocate_cache(self, num_slots: int, ssm_dtype: torch.dtype = torch.float32,
                       conv_dtype: Optional[torch.dtype] = None,
                       max_seq_len: Optional[int] = None) -> SSMStateCache:
        """State pools for num_slots requests on this rank: conv and SSM states per layer, keys
        and values per hybrid visit for up to max_seq_len tokens a request (default: the
        config's max_position_embeddings). cache.bytes_per_slot() reports what a request costs;
        the KV part grows with max_seq_len and dominates at long contexts."""
        kv = [self.blocks[b].kv_shape() for b in self.block_of_visit]
        return SSMStateCache([layer.mixer.state_shape() for layer in self.layers], num_slots,
                             self.ctx.device, self._conv_dtype(conv_dtype), ssm_dtype,
                             kv_shapes=kv,
                             max_seq_len=max_seq_len or self.config.max_position_embeddings)

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, query_start_loc: Optional[torch.Tensor] = None,
                cache_indices: Optional[torch.Tensor] = None,
                has_initial_state: Optional[torch.Tensor] = None,
                cache: Optional[SSMStateCache] = None,
                return_all_logits: bool = False, gather_logits: bool = True,
                decode_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (float32) of a packed batch; arguments as SSMForCausalLM.forward. A request's
        keys and values are appended to its slot's KV cache (has_initial_state False starts it
        over); a request longer than the cache's max_seq_len raises KVCacheOverflowError."""
        if query_start_loc is None and cache is None:
            raise ValueError("a decode batch (query_start_loc=None) needs a cache")
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D (total_tokens,), got shape "
                             f"{tuple(input_ids.shape)}")
        if cache is not None and self.blocks and len(cache.k_states) != len(self.hybrid_layers):
            raise ValueError(f"cache has KV pools for {len(cache.k_states)} attention visits, the "
                             f"model has {len(self.hybrid_layers)}: allocate it with "
                             f"model.allocate_cache")
        check_decode_rows(decode_rows, query_start_loc)
        # The attention visits' shared view of the batch (a model without hybrid layers still
        # needs a prefill batch's decode tokens for the dt rule below).
        kv = (KVBatch.build(cache if self.blocks else None, input_ids.shape[0], query_start_loc,
                            cache_indices, has_initial_state, self.device)
              if self.blocks or query_start_loc is not None else None)
        meta = BatchMeta(query_start_loc, cache_indices,
                         None if query_start_loc is None else has_initial_state,
                         kv.decode_tokens(self.device, decode_rows)
                         if kv is not None and cache is not None else None)
        if self._sequence_parallel_applies(input_ids, meta):
            return self._forward_sequence_parallel(input_ids, meta, kv, cache,
                                                   return_all_logits, gather_logits)
        emb = F.embedding(input_ids, self.embeddings)
        hidden = emb
        norms_in_in_proj = self._norms_in_in_proj(hidden, meta)
        for i, layer in enumerate(self.layers):
            conv = cache.conv_states[i] if cache is not None else None
            ssm = cache.ssm_states[i] if cache is not None else None
            x = self._mixer_input(i, hidden, emb, kv, cache)
            if norms_in_in_proj:  # the norm is in_proj's prologue
                norm = InputNorm(layer.norm.weight, layer.norm.eps)
                hidden = layer.mixer(x, conv, ssm, meta, residual=hidden, norm=norm)
            else:
                hidden = layer.mixer(layer.norm(x), conv, ssm, meta, residual=hidden)
        if cache is not None and self.blocks:
            kv.advance(cache)
        return self._logits(hidden, query_start_loc, return_all_logits,
                            gather_logits=gather_logits)

    def _mixer_input(self, i: int, hidden: torch.Tensor, emb: torch.Tensor,
                     kv: Optional[KVBatch], cache: Optional[SSMStateCache],
                     total: Optional[int] = None) -> torch.Tensor:
        """Layer i's input before its norm: hidden, plus on a hybrid layer its linear of the
        shared block's output on concat(hidden, emb) (`total`: rows of a stream split by
        tokens, see SharedBlock.forward)."""
        layer = self.layers[i]
        if not layer.hybrid:
            return hidden
        k = self.visit_of_layer[i]
        kc = cache.k_states[k] if cache is not None else None
        vc = cache.v_states[k] if cache is not None else None
        block = self.blocks[self.block_of_visit[k]]
        t = block(torch.cat([hidden, emb], dim=-1), k, kv, kc, vc, total=total)
        return hidden + linear(t, layer.linear, kernel=self.projection_kernel)

    def _forward_sequence_parallel(self, input_ids: torch.Tensor, meta: BatchMeta,
                                   kv: Optional[KVBatch], cache: Optional[SSMStateCache],
                                   return_all_logits: bool, gather_logits: bool
                                   ) -> torch.Tensor:
        """forward for a prefill step with the stream split by tokens (docs/tp-design.md): this
        rank holds its rows of hidden and of the embedding; the norms, the shared blocks' norms
        and each hybrid layer's `linear` run on those rows; the mixers and the blocks' attention
        and MLP see the whole step through all-gathers."""
        ctx, T = self.ctx, input_ids.shape[0]
        emb_whole = F.embedding(input_ids, self.embeddings)
        emb, start = self._own_rows(emb_whole)
        hidden = emb
        for i, layer in enumerate(self.layers):
            conv = cache.conv_states[i] if cache is not None else None
            ssm = cache.ssm_states[i] if cache is not None else None
            if i == 0 and not layer.hybrid:
                # The input is the replicated embedding: normalising all T rows costs less
                # than all-gathering them.
                whole = layer.norm(emb_whole)
            else:
                x = self._mixer_input(i, hidden, emb, kv, cache, total=T)
                whole = ctx.all_gather_rows(layer.norm(x), T)
            out = layer.mixer(whole, conv, ssm, meta, scatter=True)
            hidden = hidden + out
        if cache is not None and self.blocks:
            kv.advance(cache)
        return self._shared_logits(self.norm_f(hidden), start, meta, T, return_all_logits,
                                   gather_logits)
