"""SSMStateCache: shapes, slot bookkeeping, errors, fixed tensors, and the model's cache layout."""

from __future__ import annotations

import pytest
import torch

from tpssm.cache import CacheFullError, LayerStateShape, SSMStateCache
from tpssm.models import SSMForCausalLM, parse_config

MAMBA1 = [LayerStateShape(128, 4, (128, 16))] * 3
MAMBA2 = [LayerStateShape(128 + 2 * 2 * 16, 4, (8, 16, 16))] * 2


def test_shapes_dtypes_and_bytes_per_slot():
    c = SSMStateCache(MAMBA1, num_slots=5, conv_dtype=torch.bfloat16)
    assert len(c.conv_states) == len(c.ssm_states) == 3
    assert c.conv_states[0].shape == (5, 128, 3) and c.conv_states[0].dtype == torch.bfloat16
    assert c.ssm_states[0].shape == (5, 128, 16) and c.ssm_states[0].dtype == torch.float32
    assert c.bytes_per_slot() == 3 * (128 * 3 * 2 + 128 * 16 * 4)
    assert c.total_bytes() == 5 * c.bytes_per_slot()
    c2 = SSMStateCache(MAMBA2, num_slots=2, ssm_dtype=torch.float16)
    assert c2.ssm_states[1].shape == (2, 8, 16, 16) and c2.ssm_states[1].dtype == torch.float16
    assert c2.conv_states[1].shape == (2, 192, 3)
    assert c2.bytes_per_slot() == 2 * (192 * 3 * 4 + 8 * 16 * 16 * 2)


def test_allocate_free_and_reuse():
    c = SSMStateCache(MAMBA1, num_slots=4)
    assert c.allocate() == 0
    assert c.allocate(2) == [1, 2]
    assert c.num_free == 1
    c.free([1])
    c.free(0)
    assert c.allocate(3) == [0, 1, 3]  # lowest free first
    assert c.allocated_slots == [0, 1, 2, 3] and c.num_free == 0
    assert c.allocate(0) == []


def test_exhaustion_and_double_free_raise_clear_errors():
    c = SSMStateCache(MAMBA1, num_slots=2)
    c.allocate(2)
    with pytest.raises(CacheFullError, match=r"out of slots: 1 requested, 0 free of 2"):
        c.allocate()
    c.free(1)
    with pytest.raises(ValueError, match=r"slot 1 is not allocated \(double free\?\)"):
        c.free(1)
    with pytest.raises(ValueError, match=r"slot 7 is out of range \[0, 2\)"):
        c.free(7)
    with pytest.raises(ValueError, match="duplicates"):
        c.free([0, 0])
    assert c.allocated_slots == [0]  # a rejected free changes nothing
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        SSMStateCache(MAMBA1, num_slots=0)
    with pytest.raises(ValueError, match="ssm_dtype must be"):
        SSMStateCache(MAMBA1, num_slots=1, ssm_dtype=torch.int8)


def test_reset_zeroes_only_the_given_slots_and_tensors_stay_fixed():
    c = SSMStateCache(MAMBA2, num_slots=3)
    ptrs = [t.data_ptr() for t in c.conv_states + c.ssm_states]
    for t in c.conv_states + c.ssm_states:
        t.fill_(1.5)
    slots = c.allocate(2, reset=True)
    assert slots == [0, 1]
    for t in c.conv_states + c.ssm_states:
        assert torch.all(t[:2] == 0) and torch.all(t[2] == 1.5)
    c.free(slots)
    c.reset(2)
    assert all(torch.all(t == 0) for t in c.conv_states + c.ssm_states)
    # Allocation, free and reset never reallocate: a captured decode graph keeps its pointers.
    assert ptrs == [t.data_ptr() for t in c.conv_states + c.ssm_states]


def _config(family, **kw):
    arch = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM",
            "mamba2": "Mamba2ForCausalLM"}[family]
    base = dict(architectures=[arch], vocab_size=64, hidden_size=32, num_hidden_layers=2,
                state_size=8)
    if family == "mamba2":
        base.update(num_heads=4, head_dim=16, n_groups=2)
    base.update(kw)
    return parse_config(base)


def test_model_cache_layout_at_tp1():
    m1 = SSMForCausalLM(_config("mamba", conv_kernel=3))
    c1 = m1.allocate_cache(3)
    assert c1.conv_states[0].shape == (3, 64, 2) and c1.ssm_states[1].shape == (3, 64, 8)
    m2 = SSMForCausalLM(_config("mamba2"))
    c2 = m2.allocate_cache(2, ssm_dtype=torch.bfloat16)
    assert c2.conv_states[0].shape == (2, 64 + 2 * 2 * 8, 3)
    assert c2.ssm_states[0].shape == (2, 4, 16, 8) and c2.ssm_states[0].dtype == torch.bfloat16
