"""Weight sources that hand a rank only the slices it holds.

SafetensorsSource reads a Hugging Face checkpoint directory (model.safetensors, or shards listed by
model.safetensors.index.json) through safetensors' lazy slicing, so a rank never materialises a
whole tensor it shards: host memory per rank scales with 1/tp. DictSource serves an in-memory
state dict (e.g. a transformers model's) through the same interface.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["WeightSource", "SafetensorsSource", "DictSource", "check_weights"]

Ranges = Sequence[Tuple[int, int]]

# Older Mamba checkpoints name the embedding "embedding" (transformers renames it on load).
_RENAMES = (("backbone.embeddings.", "backbone.embedding."),)


class WeightSource:
    """get / get_rows / get_cols return tensors in the stored dtype, on the CPU (generated
    sources: on their device); bytes_read counts what was materialised (the per-rank memory the
    loader needed)."""

    def __init__(self):
        self.bytes_read = 0

    def keys(self) -> List[str]:
        raise NotImplementedError

    def _resolve(self, name: str) -> str:
        keys = self._key_set()
        if name in keys:
            return name
        for new, old in _RENAMES:
            alt = name.replace(new, old)
            if alt in keys:
                return alt
        raise KeyError(f"tensor {name!r} is not in the checkpoint")

    def has(self, name: str) -> bool:
        try:
            self._resolve(name)
            return True
        except KeyError:
            return False

    def _key_set(self):
        raise NotImplementedError

    def shape(self, name: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def stored_dtype(self, name: str) -> str:
        """The stored element type, in safetensors' spelling (F32, BF16, I8, F8_E4M3, ...)."""
        return "F32"

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_rows(self, name: str, ranges: Ranges) -> torch.Tensor:
        """Rows [a, b) of dim 0 for each range, concatenated (a range may repeat: each distinct
        range is read once)."""
        raise NotImplementedError

    def get_cols(self, name: str, ranges: Ranges) -> torch.Tensor:
        """Columns [a, b) of dim 1 for each range, concatenated."""
        raise NotImplementedError

    def get_block(self, name: str, index: Tuple[slice, ...]) -> torch.Tensor:
        """tensor[index] for a tuple of slices (step 1), reading only that block (small
        per-head tensors such as Zamba's x_proj_weight)."""
        raise NotImplementedError


def concat_ranges(read, ranges: Ranges, dim: int) -> torch.Tensor:
    """read(range) for each range, concatenated along dim; a repeated range is read once."""
    cache: Dict[Tuple[int, int], torch.Tensor] = {}
    parts = []
    for r in ranges:
        r = (int(r[0]), int(r[1]))
        if r not in cache:
            cache[r] = read(r)
        parts.append(cache[r])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class SafetensorsSource(WeightSource):
    def __init__(self, path: str):
        super().__init__()
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map (tensor name -> file) object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p)
                           for p in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors file in {path}")
            weight_map = None
        self._handles = {}
        for f in files:
            file = os.path.join(path, f)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index} lists {f}, which is not in {path}")
            try:
                self._handles[f] = safe_open(file, framework="pt", device="cpu")
            except Exception as exc:  # safetensors' messages do not name the file
                raise ValueError(f"cannot read {file}: {exc}") from exc
        if weight_map is None:
            # Without an index every file is read; a name stored twice would be ambiguous.
            weight_map = {}
            for f, h in self._handles.items():
                for k in h.keys():
                    if k in weight_map:
                        raise ValueError(f"tensor {k!r} is stored in both {weight_map[k]} and "
                                         f"{f} in {path}; remove the stale file or add a "
                                         f"model.safetensors.index.json")
                    weight_map[k] = f
        self._map = weight_map

    def keys(self) -> List[str]:
        return sorted(self._map)

    def _key_set(self):
        return self._map

    def _slice(self, name: str):
        name = self._resolve(name)
        return self._handles[self._map[name]].get_slice(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        name = self._resolve(name)
        return self._count(self._handles[self._map[name]].get_tensor(name))

    def get_rows(self, name: str, ranges: Ranges) -> torch.Tensor:
        sl = self._slice(name)
        return concat_ranges(lambda r: self._count(sl[r[0]:r[1]]), ranges, 0)

    def get_cols(self, name: str, ranges: Ranges) -> torch.Tensor:
        sl = self._slice(name)
        return concat_ranges(lambda r: self._count(sl[:, r[0]:r[1]]), ranges, 1)

    def get_block(self, name: str, index: Tuple[slice, ...]) -> torch.Tensor:
        return self._count(self._slice(name)[index])


class DictSource(WeightSource):
    def __init__(self, state_dict: Dict[str, torch.Tensor]):
        super().__init__()
        self._sd = {k: v.detach() for k, v in state_dict.items()}

    def keys(self) -> List[str]:
        return sorted(self._sd)

    def _key_set(self):
        return self._sd

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._sd[self._resolve(name)].shape)

    def stored_dtype(self, name: str) -> str:
        dtype = self._sd[self._resolve(name)].dtype
        return _SAFETENSORS_DTYPE.get(dtype, str(dtype).replace("torch.", ""))

    def get(self, name: str) -> torch.Tensor:
        return self._count(self._sd[self._resolve(name)].cpu())

    def get_rows(self, name: str, ranges: Ranges) -> torch.Tensor:
        t = self._sd[self._resolve(name)]
        return concat_ranges(lambda r: self._count(t[r[0]:r[1]].cpu()), ranges, 0)

    def get_cols(self, name: str, ranges: Ranges) -> torch.Tensor:
        t = self._sd[self._resolve(name)]
        return concat_ranges(lambda r: self._count(t[:, r[0]:r[1]].cpu()), ranges, 1)

    def get_block(self, name: str, index: Tuple[slice, ...]) -> torch.Tensor:
        return self._count(self._sd[self._resolve(name)][index].cpu().contiguous())


_SAFETENSORS_DTYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
                      torch.float64: "F64", torch.int8: "I8", torch.uint8: "U8"}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# A shared block's low-rank adapters for every visit, which transformers stores (or lists in a
# state dict) with each copy of the block; the expected shapes name the ones the model reads.
_ADAPTER_COPIES = re.compile(r"_adapter_list\.\d+\.")
# Elements compared at a time when a tied config's checkpoint also stores the head.
_COMPARE_ELEMENTS = 1 << 24


def check_weights(source: WeightSource, expected: Dict[str, Tuple[int, ...]],
                  embedding_name: str, tied_head: bool, copies: Sequence[str] = ()) -> None:
    """Checks a checkpoint against the tensors its config implies (`expected`: name -> shape,
    the family's weight_shapes) before the model's weights are read, so that a checkpoint the
    config does not describe is refused instead of read with shifted rows or broadcast values:
    - every expected tensor present has exactly the expected shape and a float dtype (missing
      ones are named by the loader);
    - a tensor of a module the model loads that the config does not expect (a bias with
      use_bias false, say) is an error; other unused tensors (extra layers, other modules) give
      a warning. Names under a `copies` prefix (a hybrid's shared block stored again at later
      visits) and shared-block adapters are copies the loader does not read, and pass;
    - with tie_word_embeddings, a stored lm_head.weight must equal the embedding (compared a
      block of rows at a time)."""
    used = set()
    for name, shape in expected.items():
        if not source.has(name):
            continue
        used.add(source._resolve(name))
        got = tuple(source.shape(name))
        if got != tuple(shape):
            raise ValueError(f"checkpoint tensor {name} has shape {got}, but its config implies "
                             f"{tuple(shape)}: config.json does not describe this checkpoint")
        kind = source.stored_dtype(name)
        if kind not in _FLOAT_DTYPES:
            raise ValueError(f"checkpoint tensor {name} is stored as {kind}; tpssm loads float "
                             f"weights ({', '.join(_FLOAT_DTYPES)}), not quantized checkpoints")
    unused = sorted(n for n in source.keys() if n not in used
                    and not n.startswith(tuple(copies)) and not _ADAPTER_COPIES.search(n))
    if tied_head and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")
        _check_tied_head(source, embedding_name)
    modules = {n.rsplit(".", 1)[0] for n in expected}
    foreign = [n for n in unused if n.rsplit(".", 1)[0] in modules]
    if foreign:
        raise ValueError(f"checkpoint tensors {foreign[:5]} belong to modules the model loads "
                         f"but its config does not expect them (e.g. use_bias or "
                         f"use_conv_bias false): config.json does not describe this checkpoint")
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensor(s) that this config does not use are "
                      f"ignored: {unused[:5]}{' ...' if len(unused) > 5 else ''}", stacklevel=3)


def _check_tied_head(source: WeightSource, embedding_name: str) -> None:
    shape, emb_shape = tuple(source.shape("lm_head.weight")), tuple(source.shape(embedding_name))
    same = shape == emb_shape
    if same:
        step = max(1, _COMPARE_ELEMENTS // max(1, math.prod(shape[1:])))
        same = all(torch.equal(source.get_rows("lm_head.weight", [(a, min(a + step, shape[0]))]),
                               source.get_rows(embedding_name, [(a, min(a + step, shape[0]))]))
                   for a in range(0, shape[0], step))
    if not same:
        raise ValueError(f"the config ties lm_head to the embedding (tie_word_embeddings true), "
                         f"but the checkpoint stores an lm_head.weight {shape} that differs from "
                         f"the embedding {emb_shape}; set tie_word_embeddings false in "
                         f"config.json to use it")
