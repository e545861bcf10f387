"""SSMStateCache: the per-rank pools of recurrent state, addressed by slot.

One cache object owns, for every layer, the conv state and the SSM state of `num_slots` requests,
for this rank's channels only (the state is sharded exactly like the mixer, so decode needs no
communication to read or write it):

    conv_states[layer]: (num_slots, local conv channels, conv_width - 1), the activation dtype
    ssm_states[layer]:  Mamba1 (num_slots, local E, N); Mamba2 (num_slots, local H, P, N);
                        float32 by default, 16-bit optional

The tensors are allocated once and never reallocated, so a decode step that reads and writes them
in place can be captured in a CUDA graph. Slot bookkeeping (allocate / free) runs on the host.
A new request's first forward passes has_initial_state=False, which ignores whatever its slot
holds, so freed slots need no clearing; `reset` zeroes slots explicitly when wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["CacheFullError", "LayerStateShape", "SSMStateCache"]


class CacheFullError(RuntimeError):
    """Raised when more slots are requested than are free."""


@dataclass(frozen=True)
class LayerStateShape:
    """The per-slot state of one layer on one rank."""
    conv_channels: int              # local conv channels (Mamba1: local E; Mamba2: x + B + C)
    conv_width: int                 # the conv kernel width K; the state keeps K - 1 inputs
    ssm_shape: Tuple[int, ...]      # (local E, N) or (local H, P, N)


class SSMStateCache:
    def __init__(self, layer_shapes: Sequence[LayerStateShape], num_slots: int,
                 device: Union[str, torch.device] = "cpu", conv_dtype: torch.dtype = torch.float32,
                 ssm_dtype: torch.dtype = torch.float32):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if ssm_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"ssm_dtype must be float32, float16 or bfloat16, got {ssm_dtype}")
        self.layer_shapes = list(layer_shapes)
        self.num_slots = int(num_slots)
        self.device = torch.device(device)
        self.conv_dtype = conv_dtype
        self.ssm_dtype = ssm_dtype
        self.conv_states: List[torch.Tensor] = [
            torch.zeros(num_slots, s.conv_channels, s.conv_width - 1, dtype=conv_dtype,
                        device=self.device) for s in self.layer_shapes]
        self.ssm_states: List[torch.Tensor] = [
            torch.zeros(num_slots, *s.ssm_shape, dtype=ssm_dtype, device=self.device)
            for s in self.layer_shapes]
        self._free: List[int] = list(range(num_slots))
        self._used = set()

    @property
    def num_layers(self) -> int:
        return len(self.layer_shapes)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def allocated_slots(self) -> List[int]:
        return sorted(self._used)

    def allocate(self, n: Optional[int] = None, reset: bool = False) -> Union[int, List[int]]:
        """One slot (n=None) or a list of n slots, lowest free first. reset zeroes them."""
        want = 1 if n is None else int(n)
        if want < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if want > len(self._free):
            raise CacheFullError(
                f"SSMStateCache is out of slots: {want} requested, {len(self._free)} free of "
                f"{self.num_slots}; free finished requests or allocate a larger cache")
        self._free.sort()
        slots, self._free = self._free[:want], self._free[want:]
        self._used.update(slots)
        if reset:
            self.reset(slots)
        return slots[0] if n is None else slots

    def free(self, slots: Union[int, Iterable[int]]) -> None:
        """Returns slots to the pool; freeing a slot that is not allocated raises."""
        slots = [slots] if isinstance(slots, int) else [int(s) for s in slots]
        for s in slots:
            self._check_range(s)
            if s not in self._used:
                raise ValueError(f"slot {s} is not allocated (double free?)")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots {slots} contain duplicates (double free)")
        for s in slots:
            self._used.remove(s)
            self._free.append(s)

    def reset(self, slots: Union[int, Iterable[int]]) -> None:
        """Zeroes the conv and SSM states of the given slots in every layer."""
        slots = [slots] if isinstance(slots, int) else [int(s) for s in slots]
        for s in slots:
            self._check_range(s)
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        for conv, ssm in zip(self.conv_states, self.ssm_states):
            conv.index_fill_(0, idx, 0)
            ssm.index_fill_(0, idx, 0)

    def reset_all(self) -> None:
        for conv, ssm in zip(self.conv_states, self.ssm_states):
            conv.zero_()
            ssm.zero_()

    def bytes_per_slot(self) -> int:
        """State bytes of one request on this rank, over all layers."""
        total = 0
        for conv, ssm in zip(self.conv_states, self.ssm_states):
            total += conv[0].numel() * conv.element_size() + ssm[0].numel() * ssm.element_size()
        return total

    def total_bytes(self) -> int:
        return self.bytes_per_slot() * self.num_slots

    def _check_range(self, s: int) -> None:
        if not 0 <= s < self.num_slots:
            raise ValueError(f"slot {s} is out of range [0, {self.num_slots})")

    def __repr__(self) -> str:
        return (f"SSMStateCache(num_layers={self.num_layers}, num_slots={self.num_slots}, "
                f"free={self.num_free}, bytes_per_slot={self.bytes_per_slot()}, "
                f"ssm_dtype={self.ssm_dtype}, device={self.device})")
