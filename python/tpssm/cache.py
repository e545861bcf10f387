"""SSMStateCache: the per-rank pools of recurrent state, addressed by slot.

One cache object owns, for every layer, the conv state and the SSM state of `num_slots` requests,
for this rank's channels only (the state is sharded exactly like the mixer, so decode needs no
communication to read or write it):

    conv_states[layer]: (num_slots, local conv channels, conv_width - 1), the activation dtype
    ssm_states[layer]:  Mamba1 (num_slots, local E, N); Mamba2 (num_slots, local H, P, N);
                        float32 by default, 16-bit optional

Hybrid models (Zamba, Zamba2) add an attention KV cache per visit of a shared transformer block
(the blocks' weights are shared, their keys and values are not), for this rank's heads:

    k_states[visit], v_states[visit]: (num_slots + 1, local heads, max_seq_len, head_dim), the
                        activation dtype; the extra last row absorbs padding rows' writes
    kv_lengths:         (num_slots + 1,) int64, tokens cached per slot (one count for every
                        visit: all visits see the same tokens)

The tensors are allocated once and never reallocated, so a decode step that reads and writes them
in place can be captured in a CUDA graph. Slot bookkeeping (allocate / free) runs on the host.
A new request's first forward passes has_initial_state=False, which ignores whatever its slot
holds (its KV length restarts at 0), so freed slots need no clearing; `reset` zeroes slots
explicitly when wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["CacheFullError", "KVCacheOverflowError", "KVShape", "LayerStateShape",
           "SSMStateCache"]


class CacheFullError(RuntimeError):
    """Raised when more slots are requested than are free."""


class KVCacheOverflowError(RuntimeError):
    """Raised when a request would hold more tokens than the KV cache's max_seq_len."""


@dataclass(frozen=True)
class LayerStateShape:
    """The per-slot state of one layer on one rank."""
    conv_channels: int              # local conv channels (Mamba1: local E; Mamba2: x + B + C)
    conv_width: int                 # the conv kernel width K; the state keeps K - 1 inputs
    ssm_shape: Tuple[int, ...]      # (local E, N) or (local H, P, N)


@dataclass(frozen=True)
class KVShape:
    """The per-slot keys (and values) of one attention visit on one rank."""
    num_heads: int                  # local heads
    head_dim: int


class SSMStateCache:
    def __init__(self, layer_shapes: Sequence[LayerStateShape], num_slots: int,
                 device: Union[str, torch.device] = "cpu", conv_dtype: torch.dtype = torch.float32,
                 ssm_dtype: torch.dtype = torch.float32, kv_shapes: Sequence[KVShape] = (),
                 max_seq_len: int = 0):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if kv_shapes and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1 for a cache with attention, got "
                             f"{max_seq_len}")
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
        self.kv_shapes = list(kv_shapes)
        self.max_seq_len = int(max_seq_len) if self.kv_shapes else 0
        self.k_states: List[torch.Tensor] = [
            torch.zeros(num_slots + 1, s.num_heads, self.max_seq_len, s.head_dim,
                        dtype=conv_dtype, device=self.device) for s in self.kv_shapes]
        self.v_states: List[torch.Tensor] = [torch.zeros_like(k) for k in self.k_states]
        self.kv_lengths = torch.zeros(num_slots + 1, dtype=torch.int64, device=self.device)
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
        for t in self.conv_states + self.ssm_states + self.k_states + self.v_states:
            t.index_fill_(0, idx, 0)
        self.kv_lengths.index_fill_(0, idx, 0)

    def copy(self, src: Union[int, Iterable[int]], dst: Union[int, Iterable[int]]) -> None:
        """Copies the state of slot src[i] into slot dst[i] in every layer (conv and SSM states;
        a hybrid's keys, values and cached length): a fork, so that several continuations of
        one prompt, or requests sharing a prefix, start from its state without recomputing it.
        src may be one slot for every dst. Every source is read before any destination is
        written, so the two lists may overlap; destinations must be distinct. Slots are not
        required to be allocated (forward takes any slot), only in range. Under tensor
        parallelism each rank copies its own shard (every rank calls it with the same slots).
        A hybrid's keys and values move only up to the longest source's cached length (one
        host read of the lengths), not max_seq_len tokens a visit."""
        dst = [dst] if isinstance(dst, int) else [int(s) for s in dst]
        src = [src] * len(dst) if isinstance(src, int) else [int(s) for s in src]
        if len(src) != len(dst):
            raise ValueError(f"copy needs one source slot or one per destination: got "
                             f"{len(src)} sources for {len(dst)} destinations")
        for s in src + dst:
            self._check_range(s)
        if len(set(dst)) != len(dst):
            raise ValueError(f"destination slots {dst} contain duplicates")
        pairs = [(s, d) for s, d in zip(src, dst) if s != d]
        if not pairs:
            return
        sources = sorted({s for s, _ in pairs})
        src_idx = torch.tensor(sources, dtype=torch.long, device=self.device)
        tokens = int(self.kv_lengths.index_select(0, src_idx).max()) if self.k_states else 0
        # The destinations of each source, written in one launch from its snapshot row.
        groups = [(i, torch.tensor([d for s2, d in pairs if s2 == s], dtype=torch.long,
                                   device=self.device)) for i, s in enumerate(sources)]
        # One snapshot per distinct source (not per destination: a fork into n slots holds one
        # copy of the source), taken before any destination is written.
        parts = (self.conv_states + self.ssm_states + [self.kv_lengths]
                 + [t[:, :, :tokens] for t in self.k_states + self.v_states])
        for part in parts:
            snapshot = part.index_select(0, src_idx)
            for i, dst_idx in groups:
                row = snapshot[i:i + 1]
                part.index_copy_(0, dst_idx, row.expand(len(dst_idx), *row.shape[1:]))

    def reset_all(self) -> None:
        for t in self.conv_states + self.ssm_states + self.k_states + self.v_states:
            t.zero_()
        self.kv_lengths.zero_()

    @property
    def has_kv(self) -> bool:
        return bool(self.kv_shapes)

    def kv_bytes_per_slot(self) -> int:
        """Key / value bytes of one request at max_seq_len on this rank, over all visits."""
        return sum(2 * k[0].numel() * k.element_size() for k in self.k_states)

    def bytes_per_slot(self) -> int:
        """State bytes of one request on this rank, over all layers (KV cache included)."""
        total = self.kv_bytes_per_slot()
        for conv, ssm in zip(self.conv_states, self.ssm_states):
            total += conv[0].numel() * conv.element_size() + ssm[0].numel() * ssm.element_size()
        return total

    def total_bytes(self) -> int:
        return self.bytes_per_slot() * self.num_slots

    def _check_range(self, s: int) -> None:
        if not 0 <= s < self.num_slots:
            raise ValueError(f"slot {s} is out of range [0, {self.num_slots})")

    def __repr__(self) -> str:
        kv = (f"kv_visits={len(self.kv_shapes)}, max_seq_len={self.max_seq_len}, "
              if self.kv_shapes else "")
        return (f"SSMStateCache(num_layers={self.num_layers}, num_slots={self.num_slots}, "
                f"free={self.num_free}, {kv}bytes_per_slot={self.bytes_per_slot()}, "
                f"ssm_dtype={self.ssm_dtype}, device={self.device})")
