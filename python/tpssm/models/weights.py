"""Weight sources that hand a rank only the slices it holds.

SafetensorsSource reads a Hugging Face checkpoint directory (model.safetensors, or shards listed by
model.safetensors.index.json) through safetensors' lazy slicing, so a rank never materialises a
whole tensor it shards: host memory per rank scales with 1/tp. DictSource serves an in-memory
state dict (e.g. a transformers model's) through the same interface.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["WeightSource", "SafetensorsSource", "DictSource"]

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
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p)
                           for p in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors file in {path}")
            weight_map = None
        self._handles = {f: safe_open(os.path.join(path, f), framework="pt", device="cpu")
                         for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
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
