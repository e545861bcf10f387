"""A simple generate helper on top of any tpssm.models model: one packed prefill of all prompts,
then one decode step per new token from the state cache. Greedy by default; sampling with
temperature, top-k and top-p. Under TP every rank must call it with the same arguments: greedy
tokens come out equal on every rank (model.greedy_tokens); a sampled token is rank 0's,
broadcast, so all ranks stay in lockstep."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from tpssm.cache import SSMStateCache

__all__ = ["generate", "select_tokens", "argmax_tokens", "finite", "check_sampling_args",
           "NON_FINITE_LOGITS"]

# Why a row got no token (-1): an overflowed model's argmax would be an arbitrary token.
NON_FINITE_LOGITS = ("the model's logits are not finite (NaN or inf): most likely an activation "
                     "overflowed its dtype (float16's range is the usual cause; bfloat16 or "
                     "float32 avoid it)")


def check_sampling_args(temperature: float, top_k: int, top_p: float = 1.0) -> None:
    """ValueError naming the argument unless temperature is finite and >= 0, top_k >= 0 and
    0 < top_p <= 1."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def finite(x: torch.Tensor) -> torch.Tensor:
    """Where x is neither NaN nor infinite: abs < inf, two kernels where isfinite is several
    (it runs in every captured decode step)."""
    return x.abs() < float("inf")


def argmax_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token per row of logits (rows, vocab) -> int64 (rows,): the first largest logit's
    index, or -1 where the row's largest logit is NaN or infinite (a NaN anywhere in the row
    makes its maximum NaN; -inf entries beside a finite maximum are fine)."""
    values, tokens = logits.max(-1)
    return torch.where(finite(values), tokens, -1)


def select_tokens(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of logits (batch, vocab) -> int64 (batch,); -1 for a row whose
    largest logit is NaN or infinite (NON_FINITE_LOGITS), greedy or sampled."""
    check_sampling_args(temperature, top_k, top_p)
    # Below float32's smallest normal number the draw is one-hot anyway, and the division would
    # underflow the temperature to 0 (0 / 0 for the top token): the top token.
    if not do_sample or temperature < torch.finfo(torch.float32).tiny:
        return argmax_tokens(logits)
    # Shifted by the row's maximum first: a tiny temperature then sends the other tokens to -inf
    # (a one-hot draw) instead of overflowing every score to inf (NaN probabilities).
    scores = logits.float()
    top = scores.amax(-1, keepdim=True)
    bad = ~finite(top)
    # A row without a finite maximum draws from zeros (any token), then gets -1.
    scores = ((scores - top) / temperature).masked_fill(bad, 0.0)
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked before it already cover top_p.
        drop = (cum - sorted_scores.softmax(-1)) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(-1)
    drawn = torch.multinomial(probs, 1, generator=generator)
    return drawn.masked_fill(bad, -1).squeeze(-1)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             cache: Optional[SSMStateCache] = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Optional[Union[int, Sequence[int]]] = None,
             generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """New tokens (prompt excluded) for each prompt; a request stops after max_new_tokens or
    after emitting an eos token (included). Uses `cache` (slots are allocated and freed here) or
    a fresh one with a slot per prompt. RuntimeError (NON_FINITE_LOGITS, naming the prompt) when
    a prompt's logits are not finite."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    check_sampling_args(temperature, top_k, top_p)
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        # An id out of range would reach the embedding: a device-side assert on CUDA.
        raise ValueError(f"prompts: token ids must be in [0, {vocab}), got {bad[:5]}")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    ctx = model.ctx
    dev = ctx.device
    if cache is None:
        cache = model.allocate_cache(len(prompts),
                                     max_seq_len=max(len(p) for p in prompts) + max_new_tokens)
    slots = cache.allocate(len(prompts))
    eos = set() if eos_token_id is None else (
        {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))

    def pick(shard):
        # shard: this rank's logit columns (the whole vocabulary unless the head is split).
        if not do_sample or temperature <= 0.0:
            return model.greedy_tokens(shard)
        tok = select_tokens(model.gather_logits(shard), True, temperature, top_k, top_p,
                            generator)
        return ctx.broadcast(tok.contiguous(), src=0)

    try:
        with torch.no_grad():
            ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
            lens = torch.tensor([0] + [len(p) for p in prompts], dtype=torch.int32)
            qsl = torch.cumsum(lens, 0, dtype=torch.int32).to(dev)
            slot_t = torch.tensor(slots, dtype=torch.int32, device=dev)
            his = torch.zeros(len(prompts), dtype=torch.bool, device=dev)
            logits = model(ids, qsl, slot_t, his, cache, gather_logits=False)
            out: List[List[int]] = [[] for _ in prompts]
            active = list(range(len(prompts)))
            tokens = pick(logits).tolist()
            for step in range(max_new_tokens):
                still = []
                for row, tok in zip(active, tokens):
                    if tok < 0:  # equal on every rank: they all raise
                        raise RuntimeError(f"prompt {row}, new token {step}: "
                                           f"{NON_FINITE_LOGITS}")
                    out[row].append(int(tok))
                    if int(tok) not in eos and step + 1 < max_new_tokens:
                        still.append(row)
                if not still:
                    break
                keep = [active.index(r) for r in still]
                active = still
                ids = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=dev)
                slot_t = torch.tensor([slots[r] for r in active], dtype=torch.int32, device=dev)
                logits = model.decode(ids, slot_t, cache, gather_logits=False)
                tokens = pick(logits).tolist()
            return out
    finally:
        cache.free(slots)
