"""Tiny transformers models used as the oracle: built, fully randomised and saved by the tests."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

FAMILY_SPECS: Dict[str, dict] = {
    # hidden 64, vocab 256, 2-3 layers; every family varies something (bias, conv width, groups).
    "mamba": dict(cls="MambaForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, state_size=16, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True)),
    "falcon_mamba": dict(cls="FalconMambaForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
        conv_kernel=3, use_bias=True, use_conv_bias=True, mixer_rms_eps=1e-6,
        time_step_rank=6)),
    "mamba2_g1": dict(cls="Mamba2ForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
        head_dim=16, num_heads=8, n_groups=1, conv_kernel=4, chunk_size=8, use_bias=False,
        use_conv_bias=True, tie_word_embeddings=False)),
    "mamba2_g4": dict(cls="Mamba2ForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2,
        head_dim=16, num_heads=8, n_groups=4, conv_kernel=3, chunk_size=8, use_bias=True,
        use_conv_bias=True, tie_word_embeddings=False)),
}


def build_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    spec = FAMILY_SPECS[family]
    cls = getattr(transformers, spec["cls"])
    cfg_cls = getattr(transformers, spec["cls"].replace("ForCausalLM", "Config"))
    cfg = cfg_cls(**{**spec["cfg"], **overrides})
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Random values for every parameter: default inits (equal A_log rows, D = 1, unit norm
    weights) would hide channel-, head- and group-order bugs."""
    g = torch.Generator().manual_seed(seed + 1)

    def randn(shape):
        return torch.randn(shape, generator=g)

    def rand(shape):
        return torch.rand(shape, generator=g)

    for name, p in model.named_parameters():
        shape = p.shape
        if name.endswith("A_log"):
            v = torch.log(1.0 + 15.0 * rand(shape))
        elif name.endswith(".D"):
            v = randn(shape)
        elif name.endswith("dt_proj.bias") or name.endswith("dt_bias"):
            dt = torch.exp(rand(shape) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            v = dt + torch.log(-torch.expm1(-dt))
        elif "norm" in name:
            v = 1.0 + 0.2 * randn(shape)
        elif "conv1d.weight" in name:
            v = 0.5 * randn(shape)
        elif name.endswith("bias"):
            v = 0.1 * randn(shape)
        elif "embedding" in name:
            # Small next to the mixer outputs, so a tied head does not just echo the input token.
            v = 0.05 * randn(shape)
        else:
            v = randn(shape) / math.sqrt(shape[-1])
        p.copy_(v.to(p.dtype))


def save_hf_model(model, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True)


@torch.no_grad()
def hf_full_logits(model, prompt: Sequence[int]) -> torch.Tensor:
    """(L, V) logits of every prompt token, one request, no cache."""
    out = model(torch.tensor([list(prompt)]), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def hf_greedy(model, prompt: Sequence[int], steps: int):
    """Prefill, then `steps` greedy 1-token decode steps through transformers' cache.
    Returns (tokens (steps + 1,), logits (steps + 1, V)): the prefill's last-token logits and
    each decode step's."""
    out = model(torch.tensor([list(prompt)]), use_cache=True)
    cache = out.cache_params
    logits = [out.logits[0, -1].float()]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps):
        out = model(torch.tensor([[tokens[-1]]]), cache_params=cache, use_cache=True)
        cache = out.cache_params
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the logit error relative to the logit scale (element-wise ratios
    blow up at logits near zero)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
