"""The Zamba (v1) and Zamba2 families in the model registry: config parsing with transformers'
(5.18) defaults, checkpoint tensor shapes, and presets at the dimensions of public checkpoints.
The model is tpssm.models.hybrid.HybridForCausalLM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from tpssm.models.attention import ACTIVATIONS, AttentionConfig
from tpssm.models.config import SSMConfig
from tpssm.models.hybrid import HybridForCausalLM
from tpssm.models.registry import ModelFamily, dtype_of, register

__all__ = ["HybridConfig", "parse_zamba_config", "zamba_weight_shapes"]


@dataclass
class HybridConfig:
    family: str                      # "zamba" | "zamba2"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: List[str]           # "mamba" | "hybrid" per layer
    rms_norm_eps: float
    tie_word_embeddings: bool
    mixer: SSMConfig                 # every layer's Mamba mixer
    attention: AttentionConfig       # the shared blocks
    n_mamba_heads: int = 1           # Zamba v1: independent Mamba-1 heads per mixer
    num_mem_blocks: int = 1          # shared blocks; hybrid visit k uses block k % num_mem_blocks
    # transformers (5.18) ties the visits of a block to one weight set only together with the
    # word embeddings: an untied checkpoint stores (and runs) an independent block per visit.
    share_blocks: bool = True
    max_position_embeddings: int = 4096
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    dtype: Optional[torch.dtype] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def hybrid_layers(self) -> List[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "hybrid"]

    @property
    def is_zamba2(self) -> bool:
        return self.family == "zamba2"

    def block_of_visit(self, visit: int) -> int:
        """The shared block hybrid visit `visit` runs (its weights stored at that block's first
        visit)."""
        return visit % self.num_mem_blocks if self.share_blocks else visit


# transformers 5.18 renames "mamba" to "linear_attention"; both spellings are accepted.
_LAYER_TYPES = {"mamba": "mamba", "linear_attention": "mamba", "hybrid": "hybrid"}


def _zamba_default_layers(n: int, period: int, offset: int) -> List[str]:
    """Zamba v1 without layers_block_type: two Mamba layers, a hybrid one, then a hybrid layer
    wherever (index - 3) % period == offset (transformers' rule)."""
    head = ["mamba", "mamba", "hybrid"][:n]
    return head + ["hybrid" if i % period == offset else "mamba" for i in range(n - 3)]


# Zamba2 without layers_block_type: transformers' fixed 54-layer pattern (Zamba2-2.7B's).
_ZAMBA2_DEFAULT_LAYERS = (["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4
                          + ["hybrid"] + ["mamba"] * 3 + ["hybrid"] + ["mamba"] * 2)


def _layer_types(cfg: Dict[str, Any], family: str, n: int) -> List[str]:
    given = cfg.get("layers_block_type") or cfg.get("layer_types")
    if given is None:
        given = (_zamba_default_layers(n, int(cfg.get("attn_layer_period", 6)),
                                       int(cfg.get("attn_layer_offset", 4)))
                 if family == "zamba" else list(_ZAMBA2_DEFAULT_LAYERS))
    bad = sorted({t for t in given if t not in _LAYER_TYPES})
    if bad:
        raise ValueError(f"layers_block_type has unknown layer types {bad}; expected 'mamba' "
                         f"(or 'linear_attention') and 'hybrid'")
    types = [_LAYER_TYPES[t] for t in given]
    if len(types) != n:
        raise ValueError(f"layers_block_type lists {len(types)} layers but num_hidden_layers is "
                         f"{n}")
    return types


def _family(cfg: Dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    return ("zamba2" if (cfg.get("model_type") == "zamba2"
                         or any(a.startswith("Zamba2") for a in archs)) else "zamba")


def _num_layers(cfg: Dict[str, Any], family: str) -> int:
    """num_hidden_layers, or transformers' default (Zamba-7B's 76, Zamba2-2.7B's 54)."""
    n = cfg.get("num_hidden_layers")
    n = int(n) if n is not None else (76 if family == "zamba" else 54)
    if n < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {n}")
    return n


def parse_zamba_config(cfg: Dict[str, Any], gated_norm: Optional[str] = None) -> HybridConfig:
    """HybridConfig from a ZambaForCausalLM / Zamba2ForCausalLM config.json dictionary."""
    family = _family(cfg)
    if gated_norm not in (None, "per_group"):
        raise ValueError(f"gated_norm: {family} normalises per group; got {gated_norm!r}")
    get = lambda key, default: default if cfg.get(key) is None else cfg[key]  # noqa: E731
    D = int(get("hidden_size", 3712 if family == "zamba" else 2560))
    n = _num_layers(cfg, family)
    heads = int(get("num_attention_heads", 16 if family == "zamba" else 32))
    kv_heads = int(get("num_key_value_heads", heads))
    if kv_heads != heads:
        raise ValueError(f"num_key_value_heads ({kv_heads}) must equal num_attention_heads "
                         f"({heads}): grouped-query attention is not supported for {family}")
    if (2 * D) % heads:
        raise ValueError(f"num_attention_heads ({heads}) must divide the attention width 2 * "
                         f"hidden_size ({2 * D})")
    act = get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if get("hidden_mamba_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_mamba_act must be 'silu' (the only conv activation the ops "
                         f"fuse), got {cfg['hidden_mamba_act']!r}")
    eps = float(get("rms_norm_eps", 1e-5))
    expand = get("mamba_expand", 2)
    E = int(expand * D)
    N = int(get("mamba_d_state", 16 if family == "zamba" else 64))
    K = int(get("mamba_d_conv", 4))
    if not 2 <= K <= 4:
        raise ValueError(f"mamba_d_conv must be in 2..4 (the conv ops' widths), got {K}")
    mh = int(get("n_mamba_heads", 2 if family == "zamba" else 8))
    if E % mh:
        raise ValueError(f"n_mamba_heads ({mh}) must divide mamba_expand * hidden_size ({E})")
    common = dict(vocab_size=int(get("vocab_size", 32000)), hidden_size=D, num_hidden_layers=n,
                  state_size=N, expand=expand, intermediate_size=E, conv_kernel=K,
                  layer_norm_epsilon=eps, residual_in_fp32=False, tie_word_embeddings=False)
    if family == "zamba":
        rank = get("mamba_dt_rank", "auto")
        mixer = SSMConfig(family="mamba", use_bias=bool(get("mamba_proj_bias", False)),
                          use_conv_bias=bool(get("mamba_conv_bias", True)),
                          time_step_rank=math.ceil(D / 16) if rank == "auto" else int(rank),
                          **common)
        attention = AttentionConfig(D, heads, 2 * D // heads, int(get("intermediate_size", 14848)),
                                    act, eps, packed_gate_up=False)
        blocks, mamba_heads = 1, mh
    else:
        G = int(get("mamba_ngroups", 1))
        if mh % G:
            raise ValueError(f"mamba_ngroups ({G}) must divide n_mamba_heads ({mh})")
        bias = bool(get("add_bias_linear", False))
        # Zamba2's mixer: per-group gated norm with eps 1e-5 whatever rms_norm_eps is, a conv
        # bias always, dt >= time_step_min in prefill only.
        mixer = SSMConfig(family="mamba2", use_bias=bias, use_conv_bias=True,
                          num_heads=mh, head_dim=E // mh, n_groups=G,
                          time_step_limit=(float(get("time_step_min", 0.001)), math.inf),
                          clamp_dt_in_decode=bool(cfg.get("tpssm_clamp_dt_in_decode", False)),
                          gated_norm="per_group", **dict(common, layer_norm_epsilon=1e-5))
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if get("use_mem_rope", False) and rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.rope_type {rope['rope_type']!r} is not supported "
                             f"(only 'default')")
        attention = AttentionConfig(
            D, heads, 2 * D // heads, int(get("intermediate_size", 4 * D)), act, eps,
            packed_gate_up=True, mlp_bias=bias, adapter_rank=int(get("adapter_rank", 128)),
            attention_adapters=bool(get("use_shared_attention_adapter", False)),
            rope_theta=theta if get("use_mem_rope", False) else 0.0)
        blocks, mamba_heads = int(get("num_mem_blocks", 1)), 1
        if blocks < 1:
            raise ValueError(f"num_mem_blocks must be >= 1, got {blocks}")
    if attention.rope_theta and attention.head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {attention.head_dim}")
    eos = cfg.get("eos_token_id", 2)
    return HybridConfig(
        family=family, vocab_size=common["vocab_size"], hidden_size=D, num_hidden_layers=n,
        layer_types=_layer_types(cfg, family, n), rms_norm_eps=eps,
        tie_word_embeddings=bool(get("tie_word_embeddings", True)),
        share_blocks=bool(get("tie_word_embeddings", True)), mixer=mixer,
        attention=attention, n_mamba_heads=mamba_heads, num_mem_blocks=blocks,
        max_position_embeddings=int(get("max_position_embeddings", 4096)),
        pad_token_id=cfg.get("pad_token_id", 0), bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=eos, dtype=dtype_of(cfg.get("dtype", cfg.get("torch_dtype"))), raw=cfg)


def zamba_weight_shapes(config: HybridConfig) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor a Hugging Face Zamba / Zamba2 checkpoint stores (shared
    blocks once, under the layer of their first visit)."""
    D, V, m, a = config.hidden_size, config.vocab_size, config.mixer, config.attention
    E, N, K = m.intermediate_size, m.state_size, m.conv_kernel
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (V, D),
                                          "model.final_layernorm.weight": (D,)}
    hybrid = config.hybrid_layers
    block_name = "shared_transformer" if config.is_zamba2 else "shared_transf"
    for i, kind in enumerate(config.layer_types):
        p = f"model.layers.{i}."
        mp = p + ("mamba_decoder." if kind == "hybrid" else "")
        shapes[mp + "input_layernorm.weight"] = (D,)
        x = mp + "mamba."
        if config.is_zamba2:
            H, G = m.num_heads, m.n_groups
            conv = E + 2 * G * N
            shapes[x + "in_proj.weight"] = (2 * E + 2 * G * N + H, D)
            shapes[x + "conv1d.weight"] = (conv, 1, K)
            shapes[x + "conv1d.bias"] = (conv,)
            shapes[x + "dt_bias"] = (H,)
            shapes[x + "A_log"] = (H,)
            shapes[x + "D"] = (H,)
            shapes[x + "norm.weight"] = (E,)
        else:
            Hm, R = config.n_mamba_heads, m.time_step_rank
            hd = E // Hm
            shapes[x + "in_proj.weight"] = (2 * E, D)
            shapes[x + "conv1d.weight"] = (E, 1, K)
            if m.use_conv_bias:
                shapes[x + "conv1d.bias"] = (E,)
            shapes[x + "x_proj_weight"] = (Hm, R + 2 * N, hd)
            shapes[x + "dt_proj_weight"] = (Hm, hd, R)
            shapes[x + "dt_proj_bias"] = (Hm, hd)
            shapes[x + "A_log"] = (Hm, hd, N)
            shapes[x + "D"] = (Hm, hd)
        shapes[x + "out_proj.weight"] = (D, E)
        if m.use_bias:
            shapes[x + "in_proj.bias"] = (shapes[x + "in_proj.weight"][0],)
            shapes[x + "out_proj.bias"] = (D,)
        if kind == "hybrid":
            shapes[p + "linear.weight"] = (D, D)
    for visit, layer in enumerate(hybrid):
        b = config.block_of_visit(visit)
        p = f"model.layers.{hybrid[b]}.{block_name}."
        if visit == b:  # the block's own weights, stored at its first visit
            Di, I = 2 * D, a.intermediate_size
            shapes[p + "input_layernorm.weight"] = (Di,)
            shapes[p + "pre_ff_layernorm.weight"] = (D,)
            for proj in ("q_proj", "k_proj", "v_proj"):
                shapes[p + f"self_attn.{proj}.weight"] = (a.num_heads * a.head_dim, Di)
            shapes[p + "self_attn.o_proj.weight"] = (D, a.num_heads * a.head_dim)
            if a.packed_gate_up:
                shapes[p + "feed_forward.gate_up_proj.weight"] = (2 * I, D)
                if a.mlp_bias:
                    shapes[p + "feed_forward.gate_up_proj.bias"] = (2 * I,)
            else:
                shapes[p + "feed_forward.gate_proj.weight"] = (I, D)
                shapes[p + "feed_forward.up_proj.weight"] = (I, D)
            shapes[p + "feed_forward.down_proj.weight"] = (D, I)
            if a.mlp_bias:
                shapes[p + "feed_forward.down_proj.bias"] = (D,)
        r = a.adapter_rank
        if r:
            f = p + f"feed_forward.gate_up_proj_adapter_list.{visit}."
            shapes[f + "0.weight"] = (r, D)
            shapes[f + "1.weight"] = (2 * a.intermediate_size, r)
            if a.attention_adapters:
                for proj in "qkv":
                    f = p + f"self_attn.linear_{proj}_adapter_list.{visit}."
                    shapes[f + "0.weight"] = (r, 2 * D)
                    shapes[f + "1.weight"] = (2 * D, r)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def _with_num_layers(cfg: Dict[str, Any], n: int) -> Dict[str, Any]:
    family = _family(cfg)
    types = _layer_types(cfg, family, _num_layers(cfg, family))
    return dict(cfg, num_hidden_layers=n, layers_block_type=types[:n])


def _every_sixth(n: int, offset: int) -> List[str]:
    return ["hybrid" if i % 6 == offset else "mamba" for i in range(n)]


# Dimensions of the public checkpoints (docs/models.md lists the sources). Zamba2-1.2B's and
# Zamba2-7B's hybrid positions (every sixth layer) and the 2.7B / 7B rotary and adapter flags are
# assumptions with the right counts, not read from the released configs.
_ZAMBA_PRESETS: Dict[str, dict] = {
    "zamba-7b-v1": dict(architectures=["ZambaForCausalLM"], model_type="zamba",
                        vocab_size=32000, hidden_size=3712, num_hidden_layers=76,
                        intermediate_size=14848, num_attention_heads=16, n_mamba_heads=2,
                        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, hidden_act="gelu",
                        attn_layer_period=6, attn_layer_offset=4, tie_word_embeddings=True),
}
_ZAMBA2_COMMON = dict(architectures=["Zamba2ForCausalLM"], model_type="zamba2", vocab_size=32000,
                      mamba_d_conv=4, mamba_expand=2, hidden_act="gelu", adapter_rank=128,
                      max_position_embeddings=4096, tie_word_embeddings=True)
_ZAMBA2_PRESETS: Dict[str, dict] = {
    "zamba2-1.2b": dict(_ZAMBA2_COMMON, hidden_size=2048, num_hidden_layers=38,
                        layers_block_type=_every_sixth(38, 5), n_mamba_heads=64,
                        mamba_d_state=128, mamba_ngroups=1, num_attention_heads=32,
                        intermediate_size=8192, num_mem_blocks=1,
                        use_shared_attention_adapter=True, use_mem_rope=True),
    "zamba2-2.7b": dict(_ZAMBA2_COMMON, hidden_size=2560, num_hidden_layers=54,
                        layers_block_type=list(_ZAMBA2_DEFAULT_LAYERS), n_mamba_heads=80,
                        mamba_d_state=64, mamba_ngroups=1, num_attention_heads=32,
                        intermediate_size=10240, num_mem_blocks=2,
                        use_shared_attention_adapter=False, use_mem_rope=True),
    "zamba2-7b": dict(_ZAMBA2_COMMON, hidden_size=3584, num_hidden_layers=81,
                      layers_block_type=_every_sixth(81, 5), n_mamba_heads=112,
                      mamba_d_state=64, mamba_ngroups=2, num_attention_heads=32,
                      intermediate_size=14336, num_mem_blocks=2,
                      use_shared_attention_adapter=False, use_mem_rope=True),
}

register(ModelFamily(name="zamba", architectures=("ZambaForCausalLM", "ZambaModel"),
                     model_types=("zamba",), parse=parse_zamba_config,
                     model_class=HybridForCausalLM, weight_shapes=zamba_weight_shapes,
                     presets=_ZAMBA_PRESETS, with_num_layers=_with_num_layers))
register(ModelFamily(name="zamba2", architectures=("Zamba2ForCausalLM", "Zamba2Model"),
                     model_types=("zamba2",), parse=parse_zamba_config,
                     model_class=HybridForCausalLM, weight_shapes=zamba_weight_shapes,
                     presets=_ZAMBA2_PRESETS, with_num_layers=_with_num_layers))
