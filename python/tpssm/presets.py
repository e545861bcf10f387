"""Model presets at the real dimensions of public checkpoints, and random weights for them.

The command line's `bench --preset` and `demo` run models whose weights nobody needs to download:
`RandomWeightSource` serves every tensor of a Hugging Face-format state dict, generated on demand
from a seed (the same tensor for every rank and every tp degree, so a tp 2 run computes the same
function as a tp 1 run), through the same slicing interface as a checkpoint on disk.
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, List, Optional, Tuple

import torch

from tpssm.models.config import SSMConfig, parse_config
from tpssm.models.weights import WeightSource

__all__ = ["PRESETS", "DEMO_CONFIG", "preset_config", "RandomWeightSource", "hf_weight_shapes"]

# config.json dictionaries as the public checkpoints ship them (dimensions only).
PRESETS: Dict[str, dict] = {
    "mamba-2.8b": dict(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=50280,
                       hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2,
                       conv_kernel=4, time_step_rank=160, use_bias=False, use_conv_bias=True,
                       tie_word_embeddings=True),
    "falcon-mamba-7b": dict(architectures=["FalconMambaForCausalLM"], model_type="falcon_mamba",
                            vocab_size=65024, hidden_size=4096, num_hidden_layers=64,
                            state_size=16, expand=2, conv_kernel=4, time_step_rank=256,
                            use_bias=False, use_conv_bias=True, mixer_rms_eps=1e-6,
                            tie_word_embeddings=False),
    "mamba2-2.7b": dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2",
                        vocab_size=50288, hidden_size=2560, num_hidden_layers=64, state_size=128,
                        expand=2, conv_kernel=4, num_heads=80, head_dim=64, n_groups=1,
                        use_bias=False, use_conv_bias=True, tie_word_embeddings=False),
}

# The demo's small Mamba: big enough that tp 2 has real work to split, small enough for 2 cores.
DEMO_CONFIG = dict(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=1024,
                   hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4,
                   time_step_rank=16, use_bias=False, use_conv_bias=True,
                   tie_word_embeddings=True)


def preset_config(name: str, num_layers: Optional[int] = None) -> SSMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = dict(PRESETS[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg["num_hidden_layers"] = num_layers
    return parse_config(cfg)


def hf_weight_shapes(config: SSMConfig) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor a Hugging Face checkpoint of this config stores."""
    D, E, N, K = config.hidden_size, config.intermediate_size, config.state_size, config.conv_kernel
    shapes: Dict[str, Tuple[int, ...]] = {"backbone.embeddings.weight": (config.vocab_size, D),
                                          "backbone.norm_f.weight": (D,)}
    for i in range(config.num_hidden_layers):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (D,)
        m = p + "mixer."
        if config.is_mamba2:
            H, G = config.num_heads, config.n_groups
            conv = E + 2 * G * N
            shapes[m + "in_proj.weight"] = (2 * E + 2 * G * N + H, D)
            shapes[m + "conv1d.weight"] = (conv, 1, K)
            if config.use_conv_bias:
                shapes[m + "conv1d.bias"] = (conv,)
            shapes[m + "dt_bias"] = (H,)
            shapes[m + "A_log"] = (H,)
            shapes[m + "D"] = (H,)
            shapes[m + "norm.weight"] = (E,)
        else:
            R = config.time_step_rank
            shapes[m + "in_proj.weight"] = (2 * E, D)
            shapes[m + "conv1d.weight"] = (E, 1, K)
            if config.use_conv_bias:
                shapes[m + "conv1d.bias"] = (E,)
            shapes[m + "x_proj.weight"] = (R + 2 * N, E)
            shapes[m + "dt_proj.weight"] = (E, R)
            shapes[m + "dt_proj.bias"] = (E,)
            shapes[m + "A_log"] = (E, N)
            shapes[m + "D"] = (E,)
        shapes[m + "out_proj.weight"] = (D, E)
        if config.use_bias:
            shapes[m + "in_proj.bias"] = (shapes[m + "in_proj.weight"][0],)
            shapes[m + "out_proj.bias"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, D)
    return shapes


def _random_tensor(name: str, shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    """A plausible, numerically tame value for each kind of tensor (fp32, CPU)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
    if name.endswith("A_log"):
        return torch.log(torch.rand(shape, generator=g) * 15 + 1)       # A in [-16, -1]
    if name.endswith(".D"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("dt_proj.bias") or name.endswith("dt_bias"):
        dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))                           # softplus^-1(dt)
    if module in ("norm", "norm_f"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g)
    fan_in = shape[-1] if len(shape) > 1 else 1
    if name.endswith("embeddings.weight") or name.endswith("lm_head.weight"):
        return 0.02 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


class RandomWeightSource(WeightSource):
    """Every tensor of `config`'s checkpoint, random but reproducible from (seed, name)."""

    def __init__(self, config: SSMConfig, seed: int = 0):
        super().__init__()
        self._shapes = hf_weight_shapes(config)
        self._seed = seed
        self._last: Optional[Tuple[str, torch.Tensor]] = None

    def keys(self) -> List[str]:
        return sorted(self._shapes)

    def _key_set(self):
        return self._shapes

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[self._resolve(name)]

    def _full(self, name: str) -> torch.Tensor:
        name = self._resolve(name)
        if self._last is None or self._last[0] != name:
            self._last = (name, _random_tensor(name, self._shapes[name], self._seed))
        return self._last[1]

    def get(self, name: str) -> torch.Tensor:
        return self._count(self._full(name))

    def get_rows(self, name: str, ranges) -> torch.Tensor:
        t = self._full(name)
        return self._count(torch.cat([t[a:b] for a, b in ranges], 0))

    def get_cols(self, name: str, ranges) -> torch.Tensor:
        t = self._full(name)
        return self._count(torch.cat([t[:, a:b] for a, b in ranges], 1))
