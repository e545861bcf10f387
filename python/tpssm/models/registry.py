"""The model-family registry: everything the rest of the package needs to know about a family.

A family module (tpssm.models.mamba_family, tpssm.models.zamba) registers one `ModelFamily` per
Hugging Face architecture it serves: how to recognise and parse its config.json, the model class
(which builds the layer list, the per-layer state specs and the per-rank weight loading), the
names and shapes of the tensors its checkpoints store (random-weight presets use them), and its
presets at the dimensions of public checkpoints. Adding a family is one new module that calls
`register`; config loading, presets, the engine and the command line go through here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = ["ModelFamily", "register", "families", "family_of", "parse_config", "load_config",
           "model_class", "weight_shapes", "presets", "preset_config"]


@dataclass(frozen=True)
class ModelFamily:
    name: str                                   # config.family of the parsed config
    architectures: Tuple[str, ...]              # config.json "architectures" entries
    model_types: Tuple[str, ...]                # config.json "model_type" values
    parse: Callable[..., Any]                   # (config dict, **options) -> config object
    model_class: type                           # built with (config, ctx, dtype, **kwargs)
    weight_shapes: Callable[[Any], Dict[str, Tuple[int, ...]]]
    presets: Dict[str, dict] = field(default_factory=dict)   # name -> config.json dict
    # (config dict, num_layers) -> the dict cut to its first num_layers layers
    with_num_layers: Optional[Callable[[dict, int], dict]] = None


_FAMILIES: Dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    for other in _FAMILIES.values():
        clash = set(other.presets) & set(family.presets)
        if clash:
            raise ValueError(f"presets {sorted(clash)} defined by {other.name!r} and "
                             f"{family.name!r}")
    _FAMILIES[family.name] = family
    return family


def _ensure_loaded() -> None:
    # The family modules register themselves on import.
    import tpssm.models.mamba_family  # noqa: F401
    import tpssm.models.zamba  # noqa: F401


def families() -> Dict[str, ModelFamily]:
    _ensure_loaded()
    return dict(_FAMILIES)


def family_of(cfg: Dict[str, Any]) -> ModelFamily:
    """The family of a config.json dictionary (by architectures, then model_type)."""
    fams = families().values()
    for arch in cfg.get("architectures") or []:
        for fam in fams:
            if arch in fam.architectures:
                return fam
    model_type = cfg.get("model_type")
    for fam in fams:
        if model_type in fam.model_types:
            return fam
    supported = sorted(a for f in fams for a in f.architectures if a.endswith("ForCausalLM"))
    raise ValueError(f"unsupported model: architectures={cfg.get('architectures')!r}, "
                     f"model_type={model_type!r}; supported: {', '.join(supported)}")


def parse_config(cfg: Dict[str, Any], **options):
    """The family's config object for a config.json dictionary (as json.load gives it: the
    {"__float__": ...} spelling is decoded here too). options go to the family's parser (e.g.
    gated_norm for Mamba-2)."""
    cfg = _decode_floats_deep(cfg)
    return family_of(cfg).parse(cfg, **options)


def _decode_floats(obj):
    """transformers 5.18 writes non-finite floats as {"__float__": "Infinity"}."""
    if isinstance(obj, dict) and set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def _decode_floats_deep(obj):
    if isinstance(obj, dict):
        return _decode_floats({k: _decode_floats_deep(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode_floats_deep(v) for v in obj)
    return obj


def read_config_json(path: str) -> Dict[str, Any]:
    """<path>/config.json (or path itself when it is a file) as a dictionary."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(file) as f:
        return json.load(f, object_hook=_decode_floats)


def load_config(path: str, **options):
    return parse_config(read_config_json(path), **options)


def model_class(config) -> type:
    return families()[config.family].model_class


def weight_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor a Hugging Face checkpoint of this config stores."""
    return families()[config.family].weight_shapes(config)


def presets() -> Dict[str, dict]:
    """Every family's presets: name -> config.json dictionary."""
    return {name: cfg for fam in families().values() for name, cfg in fam.presets.items()}


def with_num_layers(cfg: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """A config.json dictionary cut to its first num_layers layers (a hybrid keeps its first
    layers' types)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    fam = family_of(cfg)
    return (fam.with_num_layers(cfg, num_layers) if fam.with_num_layers
            else dict(cfg, num_hidden_layers=num_layers))


def preset_config(name: str, num_layers: Optional[int] = None):
    """A preset's config, optionally cut to its first num_layers layers."""
    table = presets()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
    cfg = dict(table[name])
    if num_layers is not None:
        cfg = with_num_layers(cfg, num_layers)
    return parse_config(cfg)


def dtype_of(name: Any) -> Optional[torch.dtype]:
    """The torch dtype a config.json names ("bfloat16", "torch.float16", ...), or None."""
    if not isinstance(name, str):
        return None
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}.get(name.replace("torch.", ""))
