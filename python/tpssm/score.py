"""Scoring a token sequence: the log-probability of each token given the tokens before it (for
perplexity over long documents, or per-position loss curves).

The sequence runs through the model in chunks that one state-cache slot carries from chunk to
chunk (chunked prefill), so a step's memory is bounded by the chunk, not the sequence: a Mamba
state has one size at any length (a hybrid's KV cache grows with it). Under tensor parallelism
every rank calls it with the same arguments and gets the same result; a vocabulary-parallel head
exchanges three numbers a token and rank, never the logits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tpssm.cache import SSMStateCache
from tpssm.generate import NON_FINITE_LOGITS
from tpssm.progress import Progress

__all__ = ["token_logprobs"]


def token_logprobs(model, tokens: Sequence[int], *, chunk_tokens: int = 2048,
                   cache: Optional[SSMStateCache] = None, progress: bool = False
                   ) -> torch.Tensor:
    """float32 (n - 1,) on the CPU: log p(tokens[i] | tokens[:i]) for i = 1 .. n - 1, natural
    log (n = len(tokens) >= 2; the mean of its negation is the cross-entropy, its exp the
    perplexity). chunk_tokens: tokens a forward step takes (the step's logits are chunk_tokens
    x the rank's vocabulary columns in float32, and the log-softmax about as much again).
    cache: the model's SSMStateCache with a free slot (taken and freed here; a hybrid's needs
    max_seq_len >= n - 1), or None for a one-slot cache of its own. progress: a progress line
    on stderr (rank 0) for long sequences. ValueError for bad arguments before any work;
    RuntimeError naming the position when the logits are not finite (NON_FINITE_LOGITS)."""
    n = len(tokens)
    if n < 2:
        raise ValueError(f"tokens: scoring needs at least 2 tokens (the first is only "
                         f"context), got {n}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab = model.config.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"tokens: token ids must be in [0, {vocab}), got {bad[:5]}")
    dev = model.ctx.device
    if cache is None:
        cache = model.allocate_cache(1, max_seq_len=n - 1)
    elif cache.has_kv and cache.max_seq_len < n - 1:
        raise ValueError(f"cache: its max_seq_len {cache.max_seq_len} holds fewer than the "
                         f"{n - 1} tokens a hybrid model's keys must keep to score {n}")
    slot = cache.allocate()
    ids = torch.tensor(tokens, dtype=torch.long, device=dev)  # moved once, sliced per chunk
    out = torch.empty(n - 1, dtype=torch.float32)
    counter = Progress(n - 1, "scoring", unit=" tokens", quiet_s=2.0) if progress else None
    try:
        with torch.no_grad():
            slots = torch.tensor([slot], dtype=torch.int32, device=dev)
            for a in range(0, n - 1, chunk_tokens):
                b = min(a + chunk_tokens, n - 1)  # rows a .. b - 1 predict tokens a + 1 .. b
                shard = model(ids[a:b],
                              torch.tensor([0, b - a], dtype=torch.int32, device=dev), slots,
                              torch.tensor([a > 0], device=dev), cache,
                              return_all_logits=True, gather_logits=False,
                              decode_rows=torch.zeros(1, dtype=torch.bool))
                got = model.target_logprobs(shard, ids[a + 1:b + 1]).cpu()
                # Equal on every rank (all-gathered or broadcast): every rank raises alike.
                bad_rows = (~got.isfinite()).nonzero()
                if len(bad_rows):
                    raise RuntimeError(f"tokens: position {a + 1 + int(bad_rows[0])}: "
                                       f"{NON_FINITE_LOGITS}")
                out[a:b] = got
                if counter is not None:
                    counter.update(b - a)
        if counter is not None:
            counter.close()
        return out
    finally:
        if counter is not None:
            counter.stop()  # after an error: the line ends, unfinished
        cache.free(slot)
