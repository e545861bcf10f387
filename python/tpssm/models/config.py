"""Model configuration parsed from a Hugging Face config.json, with the defaults transformers
(5.18) applies for MambaForCausalLM, FalconMambaForCausalLM and Mamba2ForCausalLM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from tpssm.models.registry import dtype_of, read_config_json

__all__ = ["SSMConfig", "FAMILIES", "load_config", "parse_config"]

FAMILIES = ("mamba", "falcon_mamba", "mamba2")

_ARCH_TO_FAMILY = {
    "MambaForCausalLM": "mamba",
    "MambaModel": "mamba",
    "FalconMambaForCausalLM": "falcon_mamba",
    "FalconMambaModel": "falcon_mamba",
    "Mamba2ForCausalLM": "mamba2",
    "Mamba2Model": "mamba2",
}

_COMMON_DEFAULTS: Dict[str, Any] = dict(
    layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
    hidden_act="silu", residual_in_fp32=True, time_step_rank="auto",
    pad_token_id=None, bos_token_id=None, eos_token_id=None,
)

_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mamba": dict(_COMMON_DEFAULTS, vocab_size=50280, hidden_size=768, state_size=16,
                  num_hidden_layers=32, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0,
                  eos_token_id=0),
    "falcon_mamba": dict(_COMMON_DEFAULTS, vocab_size=50280, hidden_size=768, state_size=16,
                         num_hidden_layers=32, tie_word_embeddings=True, mixer_rms_eps=1e-6,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "mamba2": dict(_COMMON_DEFAULTS, vocab_size=32768, hidden_size=4096, state_size=128,
                   num_hidden_layers=64, num_heads=128, head_dim=64, n_groups=8,
                   time_step_limit=(0.0, math.inf), chunk_size=256, tie_word_embeddings=False,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2),
}

# Names the original (non-HF) configs use.
_ALIASES = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_state": "state_size",
            "d_conv": "conv_kernel", "ngroups": "n_groups", "headdim": "head_dim",
            "rms_norm_eps": "layer_norm_epsilon"}

# How the Mamba-2 gated RMSNorm (y * silu(z), then RMS-normalise) groups channels:
#   "whole":     over all of E, whatever n_groups is (transformers' Mamba2ForCausalLM);
#   "per_group": over each group's E / n_groups channels (mamba_ssm, Zamba2).
# They agree for n_groups = 1. A config.json may pick one with the key "tpssm_gated_norm".
GATED_NORM_CONVENTIONS = ("whole", "per_group")


@dataclass
class SSMConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    state_size: int
    expand: float
    intermediate_size: int
    conv_kernel: int
    use_bias: bool
    use_conv_bias: bool
    layer_norm_epsilon: float
    residual_in_fp32: bool
    tie_word_embeddings: bool
    time_step_rank: int = 0                 # Mamba1 / Falcon-Mamba
    mixer_rms_eps: float = 1e-6             # Falcon-Mamba's weight-free dt / B / C norms
    num_heads: int = 0                      # Mamba-2
    head_dim: int = 0
    n_groups: int = 1
    time_step_limit: Tuple[float, float] = (0.0, math.inf)
    # Zamba2 (as transformers runs it) clamps dt to the limits in prefill only.
    clamp_dt_in_decode: bool = True
    gated_norm: str = "whole"
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    dtype: Optional[torch.dtype] = None     # the checkpoint's dtype, when config.json names it
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_mamba2(self) -> bool:
        return self.family == "mamba2"

    @property
    def conv_dim(self) -> int:
        if self.is_mamba2:
            return self.intermediate_size + 2 * self.n_groups * self.state_size
        return self.intermediate_size


def _family_of(cfg: Dict[str, Any]) -> str:
    for arch in cfg.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    model_type = cfg.get("model_type")
    if model_type in FAMILIES:
        return model_type
    raise ValueError(
        f"unsupported model: architectures={cfg.get('architectures')!r}, "
        f"model_type={model_type!r}; supported: MambaForCausalLM, FalconMambaForCausalLM, "
        f"Mamba2ForCausalLM")


def parse_config(cfg: Dict[str, Any], gated_norm: Optional[str] = None) -> SSMConfig:
    """SSMConfig from a config.json dictionary. gated_norm overrides the Mamba-2 norm convention
    (default: config key "tpssm_gated_norm", else "whole", transformers' convention)."""
    cfg = {_ALIASES.get(k, k): v for k, v in cfg.items()}
    family = _family_of(cfg)
    merged = dict(_DEFAULTS[family])
    merged.update({k: v for k, v in cfg.items() if v is not None or k.endswith("token_id")})
    hidden = int(merged["hidden_size"])
    expand = merged["expand"]
    intermediate = int(expand * hidden)
    act = merged["hidden_act"]
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act must be 'silu' (the only conv activation the ops fuse), "
                         f"got {act!r}")
    rank = merged["time_step_rank"]
    rank = math.ceil(hidden / 16) if rank == "auto" else int(rank)
    if int(merged["num_hidden_layers"]) < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {merged['num_hidden_layers']}")
    out = SSMConfig(
        family=family, vocab_size=int(merged["vocab_size"]), hidden_size=hidden,
        num_hidden_layers=int(merged["num_hidden_layers"]), state_size=int(merged["state_size"]),
        expand=expand, intermediate_size=intermediate, conv_kernel=int(merged["conv_kernel"]),
        use_bias=bool(merged["use_bias"]), use_conv_bias=bool(merged["use_conv_bias"]),
        layer_norm_epsilon=float(merged["layer_norm_epsilon"]),
        residual_in_fp32=bool(merged["residual_in_fp32"]),
        tie_word_embeddings=bool(merged["tie_word_embeddings"]), time_step_rank=rank,
        pad_token_id=merged.get("pad_token_id"), bos_token_id=merged.get("bos_token_id"),
        eos_token_id=merged.get("eos_token_id"),
        dtype=dtype_of(merged.get("dtype", merged.get("torch_dtype"))), raw=cfg)
    if family == "falcon_mamba":
        out.mixer_rms_eps = float(merged["mixer_rms_eps"])
    if family == "mamba2":
        out.num_heads = int(merged["num_heads"])
        out.head_dim = int(merged["head_dim"])
        out.n_groups = int(merged["n_groups"])
        lim = merged["time_step_limit"]
        out.time_step_limit = (float(lim[0]), float(lim[1]))
        if out.num_heads * out.head_dim != intermediate:
            raise ValueError(
                f"Mamba-2 config: hidden_size * expand ({intermediate}) must equal num_heads * "
                f"head_dim ({out.num_heads * out.head_dim})")
        if out.num_heads % out.n_groups:
            raise ValueError(f"Mamba-2 config: n_groups ({out.n_groups}) must divide num_heads "
                             f"({out.num_heads})")
        conv = gated_norm or cfg.get("tpssm_gated_norm", "whole")
        if conv not in GATED_NORM_CONVENTIONS:
            raise ValueError(f"gated_norm must be one of {GATED_NORM_CONVENTIONS}, got {conv!r}")
        out.gated_norm = conv
    if out.conv_kernel < 2 or out.conv_kernel > 4:
        raise ValueError(f"conv_kernel must be in 2..4 (the conv ops' widths), got "
                         f"{out.conv_kernel}")
    return out


def load_config(path: str, gated_norm: Optional[str] = None) -> SSMConfig:
    """Parses <path>/config.json (or path itself when it is a file) of a Mamba-family model
    (tpssm.models.load_config takes every registered family)."""
    return parse_config(read_config_json(path), gated_norm=gated_norm)
