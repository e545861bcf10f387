"""The Mamba, Falcon-Mamba and Mamba-2 families in the model registry: config parsing
(tpssm.models.config), the model (tpssm.models.model.SSMForCausalLM), checkpoint tensor shapes and
presets at the dimensions of public checkpoints."""

from __future__ import annotations

from typing import Dict, Tuple

from tpssm.models.config import SSMConfig, parse_config
from tpssm.models.model import SSMForCausalLM
from tpssm.models.registry import ModelFamily, register

__all__ = ["ssm_weight_shapes"]

# config.json dictionaries as the public checkpoints ship them (dimensions only).
_PRESETS: Dict[str, dict] = {
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


def ssm_weight_shapes(config: SSMConfig) -> Dict[str, Tuple[int, ...]]:
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


def _presets_of(family: str) -> Dict[str, dict]:
    return {n: c for n, c in _PRESETS.items() if c["model_type"] == family}


for _name, _archs in (("mamba", ("MambaForCausalLM", "MambaModel")),
                      ("falcon_mamba", ("FalconMambaForCausalLM", "FalconMambaModel")),
                      ("mamba2", ("Mamba2ForCausalLM", "Mamba2Model"))):
    register(ModelFamily(name=_name, architectures=_archs, model_types=(_name,),
                         parse=parse_config, model_class=SSMForCausalLM,
                         weight_shapes=ssm_weight_shapes, presets=_presets_of(_name)))
