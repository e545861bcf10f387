"""Tiny transformers models used as the oracle: built, fully randomised and saved by the tests."""

from __future__ import annotations

import math
from typing import Dict, Sequence

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

HYBRID_SPECS: Dict[str, dict] = {
    # Hybrids: 4 attention heads (tp 1 / 2 / 4 even, 3 uneven); Zamba's 2 Mamba heads of 64
    # channels are split between ranks at tp 3 (the x_proj all-reduce and per-run scans).
    "zamba": dict(cls="ZambaForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=4, n_mamba_heads=2, intermediate_size=96, mamba_d_state=8,
        mamba_dt_rank=6, mamba_d_conv=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid",
                                                            "mamba"])),
    # One shared block, q / k / v adapters and rotary on.
    "zamba2_1blk": dict(cls="Zamba2ForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
        n_mamba_heads=8, mamba_ngroups=1, mamba_d_state=16, mamba_d_conv=4, intermediate_size=96,
        num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba"])),
    # Two shared blocks (block 0 visited twice), the MLP adapter only, no rotary, 2 groups.
    "zamba2_2blk": dict(cls="Zamba2ForCausalLM", cfg=dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=8, mamba_d_conv=3, intermediate_size=96,
        num_mem_blocks=2, use_shared_attention_adapter=False, adapter_rank=8, use_mem_rope=False,
        layers_block_type=["hybrid", "mamba", "hybrid", "mamba", "hybrid", "mamba"])),
}


_MODEL_TYPES = dict(MambaForCausalLM="mamba", FalconMambaForCausalLM="falcon_mamba",
                    Mamba2ForCausalLM="mamba2", ZambaForCausalLM="zamba",
                    Zamba2ForCausalLM="zamba2")


def tpssm_config(family: str, **overrides):
    """A family's test config as tpssm parses it (the config.json transformers would write),
    without building the transformers model."""
    from tpssm.models import parse_config

    spec = {**FAMILY_SPECS, **HYBRID_SPECS}[family]
    return parse_config(dict(spec["cfg"], architectures=[spec["cls"]],
                             model_type=_MODEL_TYPES[spec["cls"]], **overrides))


def build_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    spec = {**FAMILY_SPECS, **HYBRID_SPECS}[family]
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
        elif name.endswith(("dt_proj.bias", "dt_proj_bias", "dt_bias")):
            dt = torch.exp(rand(shape) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            v = dt + torch.log(-torch.expm1(-dt))
        elif "norm" in name:
            v = 1.0 + 0.2 * randn(shape)
        elif "conv1d.weight" in name:
            v = 0.5 * randn(shape)
        elif name.endswith("bias"):
            v = 0.1 * randn(shape)
        elif "embedding" in name or "embed_tokens" in name:
            # Small next to the mixer outputs, so a tied head does not just echo the input token.
            v = 0.05 * randn(shape)
        else:
            v = randn(shape) / math.sqrt(shape[-1])
        p.copy_(v.to(p.dtype))


def save_hf_model(model, path: str) -> None:
    model.save_pretrained(path, safe_serialization=True)


def save_overflowing_checkpoint(path: str) -> None:
    """A tiny Mamba whose final norm weights are 1e6: its normed hidden state overflows
    float16 (largest finite value 65504), not float32."""
    model = build_hf_model("mamba", seed=3)
    with torch.no_grad():
        model.backbone.norm_f.weight.mul_(1e6)
    save_hf_model(model, path)


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
    # The SSM families return and take `cache_params`, the hybrids `past_key_values`.
    key = "past_key_values" if model.config.model_type.startswith("zamba") else "cache_params"
    out = model(torch.tensor([list(prompt)]), use_cache=True)
    cache = getattr(out, key)
    logits = [out.logits[0, -1].float()]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps):
        out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{key: cache})
        cache = getattr(out, key)
        logits.append(out.logits[0, -1].float())
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


@torch.no_grad()
def teacher_forced_error(model, ids: torch.Tensor, qsl: torch.Tensor, cache, slots,
                         oracle: dict, steps: int) -> float:
    """Our model (tpssm) prefills the packed prompts into `slots` of `cache`, then decodes
    `steps` steps fed with transformers' greedy tokens (oracle["tokens"]): the largest
    max_rel_err of every request's logits against oracle["step_logits"]."""
    n = len(slots)
    rows = torch.tensor(slots, dtype=torch.int32)
    out = model(ids, qsl, rows, torch.zeros(n, dtype=torch.bool), cache)
    errs = [max_rel_err(out[i], oracle["step_logits"][i][0]) for i in range(n)]
    for step in range(steps):
        out = model.decode(torch.tensor([oracle["tokens"][i][step] for i in range(n)]), rows,
                           cache)
        errs += [max_rel_err(out[i], oracle["step_logits"][i][step + 1]) for i in range(n)]
    return max(errs)


def sequence_parallel_errors(model, ids: torch.Tensor, qsl: torch.Tensor, lens, oracle: dict,
                             all_logits: torch.Tensor, last: torch.Tensor, cache,
                             steps: int) -> dict:
    """The checks both oracle files run with sequence parallelism already on: the reduce-scatters
    of one full prefill (sp_scatters), its logits against transformers (sp_full) and against the
    all-reduce path's `all_logits` (sp_vs_plain), the last-token logits against `last`
    (sp_last), and a teacher-forced decode after a prefill into a fresh `cache` (sp_decode)."""
    before = model.allreduce.calls["scatter"]
    sp_all = model(ids, qsl, return_all_logits=True)
    res = {"sp_scatters": model.allreduce.calls["scatter"] - before,
           "sp_full": max(max_rel_err(a, b) for a, b in zip(sp_all.split(lens), oracle["full"])),
           "sp_vs_plain": max_rel_err(sp_all, all_logits),
           "sp_last": max_rel_err(model(ids, qsl), last)}
    res["sp_decode"] = teacher_forced_error(model, ids, qsl, cache, cache.allocate(len(lens)),
                                            oracle, steps)
    return res


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the logit error relative to the logit scale (element-wise ratios
    blow up at logits near zero)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def cpu_kernels_available() -> bool:
    """True when the compiled ops have CPU implementations in this build."""
    import tpssm  # noqa: F401  (registers the op schemas)

    names = ("causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update")
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"tpssm::{n}", "CPU") for n in names)


def pick_backend() -> str:
    """The op backend the model tests run on: TPSSM_TEST_BACKEND if set, else the compiled ops
    when they have CPU kernels, else the pure-PyTorch references."""
    import os

    env = os.environ.get("TPSSM_TEST_BACKEND")
    if env:
        return env
    return "ops" if cpu_kernels_available() else "reference"


def per_group_gated_norm(model) -> None:
    """Switches a transformers Mamba2 model's gated RMSNorm to the per-group convention
    (mamba_ssm's), the oracle for tpssm's gated_norm="per_group"."""
    import types

    import torch.nn.functional as F

    def forward(self, hidden_states, gate=None, _groups=model.config.n_groups):
        dtype = hidden_states.dtype
        h = hidden_states.float()
        if gate is not None:
            h = h * F.silu(gate.float())
        shape = h.shape
        h = h.view(*shape[:-1], _groups, shape[-1] // _groups)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.view(shape).to(dtype)

    for layer in model.backbone.layers:
        layer.mixer.norm.forward = types.MethodType(forward, layer.mixer.norm)
