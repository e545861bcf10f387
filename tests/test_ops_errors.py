"""Bad input: one test per validation rule of each op, each matching the message that names the
argument and the rule."""

from __future__ import annotations

import re

import pytest
import torch

import tpssm
from conftest import (
    conv_inputs,
    conv_update_inputs,
    place_overlapping,
    scan_inputs,
    ssu_inputs,
)
from tpssm import ops

I32 = torch.int32


def setk(**updates):
    return lambda k: k.update(updates)


def expand_slots(name, num_slots):
    """A state pool of num_slots slots that owns almost no memory (an expanded tensor)."""
    def mutate(k):
        s = k[name]
        k[name] = s[:1].expand(num_slots, *s.shape[1:])
    return mutate


def channels_last_stride2(name):
    """The tensor with the same values but stride 2 in its last dimension."""
    def mutate(k):
        t = k[name]
        k[name] = torch.stack([t, t], dim=-1)[..., 0]
    return mutate


def transposed_last(name):
    def mutate(k):
        t = k[name]
        k[name] = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return mutate


# (id, op, builder, mutation, message)
CONV = (ops.causal_conv1d, conv_inputs)
CONV_VARLEN = (ops.causal_conv1d, lambda: conv_inputs(varlen=True, seqlens=(3, 0, 4),
                                                      slots=(1, 0, 4),
                                                      initial=(True, False, False)))
UPD = (ops.causal_conv1d_update, conv_update_inputs)
SCAN = (ops.selective_scan, scan_inputs)
SCAN_VARLEN = (ops.selective_scan, lambda: scan_inputs(varlen=True, seqlens=(3, 0, 4),
                                                       slots=(1, 0, 3),
                                                       initial=(True, False, False)))
SCAN_M1 = (ops.selective_scan, lambda: scan_inputs(form="mamba1", nheads=5, dstate=4, ngroups=1,
                                                   group_dim=False))
SSU = (ops.selective_state_update, ssu_inputs)
SSU_3D = (ops.selective_state_update, lambda: ssu_inputs(x3d=True))
SSU_DTP = (ops.selective_state_update,
           lambda: ssu_inputs(form="mamba1", nheads=6, dstate=8, ngroups=1, group_dim=False,
                              dt_rank=5))

BIG = 2 ** 31

CASES = [
    # ---- causal_conv1d
    ("conv/x_dtype", *CONV, setk(x=torch.randn(2, 9, 37, dtype=torch.float64)),
     "causal_conv1d: x must be float32, float16 or bfloat16, got float64"),
    ("conv/x_dense_3d", *CONV, lambda k: k.update(x=k["x"][0]),
     "x must be 3-D (batch, seqlen, channels) without query_start_loc"),
    ("conv/x_varlen_2d", *CONV_VARLEN, lambda k: k.update(x=k["x"][None]),
     "x must be 2-D (total_tokens, channels) when query_start_loc is given"),
    ("conv/x_channel_stride", *CONV, channels_last_stride2("x"),
     "x must have stride 1 in its last dimension (channels)"),
    ("conv/seqlen_int32", *CONV, setk(x=torch.randn(1, 1, 1).expand(1, BIG, 1)),
     "seqlen must fit in int32"),
    ("conv/qsl_dtype", *CONV_VARLEN,
     lambda k: k.update(query_start_loc=k["query_start_loc"].long()),
     "query_start_loc must be int32, got int64"),
    ("conv/qsl_1d", *CONV_VARLEN,
     lambda k: k.update(query_start_loc=k["query_start_loc"][None]),
     "query_start_loc must be 1-D (batch + 1,)"),
    ("conv/qsl_start", *CONV_VARLEN,
     setk(query_start_loc=torch.tensor([1, 3, 3, 7], dtype=I32)),
     "query_start_loc must start at 0, got 1"),
    ("conv/qsl_monotonic", *CONV_VARLEN,
     setk(query_start_loc=torch.tensor([0, 4, 3, 7], dtype=I32)),
     "query_start_loc must be non-decreasing"),
    ("conv/qsl_end", *CONV_VARLEN,
     setk(query_start_loc=torch.tensor([0, 3, 3, 6], dtype=I32)),
     "query_start_loc must end at total_tokens (x.size(0) = 7), got 6"),
    ("conv/qsl_negative", *CONV_VARLEN,
     setk(query_start_loc=torch.tensor([-1, 3, 3, 7], dtype=I32)),
     "query_start_loc must start at 0, got -1"),
    ("conv/qsl_past_total_tokens", *CONV_VARLEN,
     setk(query_start_loc=torch.tensor([0, 3, 9, 7], dtype=I32)),
     "query_start_loc[2] = 9 > query_start_loc[3] = 7"),
    ("conv/weight_dtype", *CONV, lambda k: k.update(weight=k["weight"].half()),
     "weight must have the dtype of x (float32), got float16"),
    ("conv/weight_shape", *CONV, lambda k: k.update(weight=k["weight"][:5]),
     "weight must have shape (dim, width) with dim = 37"),
    ("conv/width_5", *CONV, setk(weight=torch.randn(37, 5)), "weight width must be 2, 3 or 4"),
    ("conv/width_1", *CONV, setk(weight=torch.randn(37, 1)), "weight width must be 2, 3 or 4"),
    ("conv/bias_dtype", *CONV, lambda k: k.update(bias=k["bias"].bfloat16()),
     "bias must have the dtype of x"),
    ("conv/bias_shape", *CONV, setk(bias=torch.randn(36)), "bias must have shape (dim,)"),
    ("conv/bias_contiguous", *CONV, setk(bias=torch.randn(74)[::2]), "bias must be contiguous"),
    ("conv/states_dtype", *CONV, lambda k: k.update(conv_states=k["conv_states"].half()),
     "conv_states must have the dtype of x"),
    ("conv/states_shape", *CONV, setk(conv_states=torch.randn(5, 37, 2)),
     "conv_states must have shape (num_slots, dim, width - 1) = (*, 37, 3)"),
    ("conv/states_internal_overlap", *CONV, expand_slots("conv_states", 5),
     "conv_states must not overlap itself"),
    ("conv/num_slots_int32", *CONV, expand_slots("conv_states", BIG),
     "num_slots must fit in int32"),
    ("conv/cache_indices_dtype", *CONV,
     lambda k: k.update(cache_indices=k["cache_indices"].long()),
     "cache_indices must be int32, got int64"),
    ("conv/cache_indices_shape", *CONV, setk(cache_indices=torch.tensor([0, 1, 2], dtype=I32)),
     "cache_indices must have shape (batch,)"),
    ("conv/cache_indices_contiguous", *CONV,
     setk(cache_indices=torch.tensor([3, 9, 0, 9], dtype=I32)[::2]),
     "cache_indices must be contiguous"),
    ("conv/slot_range_high", *CONV, setk(cache_indices=torch.tensor([5, 0], dtype=I32)),
     "cache_indices[0] = 5 is out of range: a slot must satisfy 0 <= slot < num_slots (5)"),
    ("conv/slot_range_negative", *CONV, setk(cache_indices=torch.tensor([0, -2], dtype=I32)),
     "cache_indices[1] = -2 is out of range"),
    ("conv/slot_distinct", *CONV, setk(cache_indices=torch.tensor([2, 2], dtype=I32)),
     "cache_indices must be distinct among non-padded rows, slot 2 appears twice"),
    ("conv/implicit_slots", *CONV,
     lambda k: k.update(cache_indices=None, conv_states=k["conv_states"][:1]),
     "without cache indices row b uses slot b, so conv_states needs at least batch (2) slots"),
    ("conv/pad_slot_id_int32", *CONV, setk(pad_slot_id=BIG), "pad_slot_id must fit in int32"),
    ("conv/has_initial_state_dtype", *CONV,
     lambda k: k.update(has_initial_state=k["has_initial_state"].to(I32)),
     "has_initial_state must be bool, got int32"),
    ("conv/has_initial_state_shape", *CONV,
     setk(has_initial_state=torch.tensor([True, False, True])),
     "has_initial_state must have shape (batch,)"),
    ("conv/has_initial_state_needs_states", *CONV, setk(conv_states=None),
     "has_initial_state requires conv_states"),
    ("conv/out_dtype", *CONV, lambda k: k.update(out=k["out"].half()),
     "out must have the dtype of x (float32), got float16"),
    ("conv/out_shape", *CONV, lambda k: k.update(out=k["out"][:, 1:]),
     "out must have the shape of x"),
    ("conv/out_channel_stride", *CONV, channels_last_stride2("out"),
     "out must have stride 1 in its last dimension (channels)"),
    ("conv/out_internal_overlap", *CONV, lambda k: k.update(out=k["out"][:1].expand(2, 9, 37)),
     "out must not overlap itself"),
    ("conv/out_overlaps_x", *CONV, lambda k: k.update(out=k["x"]),
     "out must not overlap x (in-place use is not supported)"),
    ("conv/out_overlaps_states", *CONV,
     lambda k: k.update(conv_states=k["out"].view(-1)[:5 * 37 * 3].view(5, 37, 3)),
     "out must not overlap conv_states"),
    ("conv/activation", *CONV, setk(activation="relu"), "activation must be None, 'silu'"),
    # ---- causal_conv1d_update
    ("update/x_dtype", *UPD, lambda k: k.update(x=k["x"].double()),
     "causal_conv1d_update: x must be float32, float16 or bfloat16, got float64"),
    ("update/x_dims", *UPD, lambda k: k.update(x=k["x"][0]),
     "x must be 2-D (batch, dim) or 3-D (batch, seqlen, dim)"),
    ("update/x_channel_stride", *UPD, channels_last_stride2("x"),
     "x must have stride 1 in its last dimension (channels)"),
    ("update/batch_int32", *UPD, setk(x=torch.randn(1, 37).expand(BIG, 37)),
     "the batch size must fit in int32"),
    ("update/width", *UPD, setk(weight=torch.randn(37, 6)), "weight width must be 2, 3 or 4"),
    ("update/weight_shape", *UPD, setk(weight=torch.randn(36, 4)),
     "weight must have shape (dim, width) with dim = 37"),
    ("update/bias_shape", *UPD, setk(bias=torch.randn(38)), "bias must have shape (dim,)"),
    ("update/state_dtype", *UPD, lambda k: k.update(conv_state=k["conv_state"].bfloat16()),
     "conv_state must have the dtype of x"),
    ("update/state_shape", *UPD, setk(conv_state=torch.randn(5, 37, 4)),
     "conv_state must have shape (num_slots, dim, width - 1) = (*, 37, 3)"),
    ("update/state_internal_overlap", *UPD, expand_slots("conv_state", 5),
     "conv_state must not overlap itself"),
    ("update/slot_range", *UPD, setk(cache_indices=torch.tensor([4, 1, 5], dtype=I32)),
     "cache_indices[2] = 5 is out of range"),
    ("update/slot_negative", *UPD, setk(cache_indices=torch.tensor([4, -7, 2], dtype=I32)),
     "cache_indices[1] = -7 is out of range"),
    ("update/slot_distinct", *UPD, setk(cache_indices=torch.tensor([4, 1, 4], dtype=I32)),
     "cache_indices must be distinct among non-padded rows, slot 4 appears twice"),
    ("update/cache_indices_shape", *UPD, setk(cache_indices=torch.tensor([4, 1], dtype=I32)),
     "cache_indices must have shape (batch,)"),
    ("update/implicit_slots", *UPD,
     lambda k: k.update(cache_indices=None, conv_state=k["conv_state"][:2]),
     "conv_state needs at least batch (3) slots, got 2"),
    ("update/out_shape", *UPD, lambda k: k.update(out=k["out"][:2]),
     "out must have the shape of x"),
    ("update/out_overlaps_x", *UPD, lambda k: k.update(out=k["x"]), "out must not overlap x"),
    # ---- selective_scan
    ("scan/u_dtype", *SCAN, lambda k: k.update(u=k["u"].double()),
     "selective_scan: u must be float32, float16 or bfloat16, got float64"),
    ("scan/u_dense_3d", *SCAN, lambda k: k.update(u=k["u"][0]),
     "u must be 3-D (batch, seqlen, channels) without query_start_loc"),
    ("scan/u_varlen_2d", *SCAN_VARLEN, lambda k: k.update(u=k["u"][None]),
     "u must be 2-D (total_tokens, channels) when query_start_loc is given"),
    ("scan/u_channel_stride", *SCAN, channels_last_stride2("u"),
     "u must have stride 1 in its last dimension (channels)"),
    ("scan/A_dtype", *SCAN, lambda k: k.update(A=k["A"].double()), "A must be float32, got float64"),
    ("scan/A_dims", *SCAN, setk(A=-torch.rand(6, 8, 1)),
     "A must be 2-D (dim, dstate) (Mamba1) or 1-D (nheads,) (Mamba2)"),
    ("scan/dim_divisible_by_nheads", *SCAN, setk(A=-torch.rand(4)),
     "dim (18) must be divisible by nheads (A.size(0) = 4)"),
    ("scan/A_dstate", *SCAN_M1, setk(A=-torch.rand(5, 3)),
     "A must have shape (dim, dstate) with dstate = B.size(-1) = 4"),
    ("scan/nheads_divisible_by_ngroups", *SCAN,
     lambda k: k.update(B=torch.randn(2, 7, 4, 8), C=torch.randn(2, 7, 4, 8)),
     "nheads (6) must be divisible by ngroups (4)"),
    ("scan/B_dims", *SCAN, lambda k: k.update(B=k["B"][..., None]),
     "B must be (batch, seqlen, ngroups, dstate) or (batch, seqlen, dstate)"),
    ("scan/B_dtype", *SCAN, lambda k: k.update(B=k["B"].half()), "B must have the dtype of u"),
    ("scan/B_tokens", *SCAN, lambda k: k.update(B=k["B"][:, 1:]), "B must have shape"),
    ("scan/C_shape", *SCAN, lambda k: k.update(C=k["C"][:, :, :1]), "C must have shape"),
    ("scan/B_dstate_stride", *SCAN, channels_last_stride2("B"),
     "B must have stride 1 in its last dimension (dstate)"),
    ("scan/delta_dtype", *SCAN, lambda k: k.update(delta=k["delta"].half()),
     "delta must have the dtype of u"),
    ("scan/delta_shape", *SCAN, setk(delta=torch.randn(2, 7, 18)),
     "delta must have shape (batch, seqlen, nheads)"),
    ("scan/delta_stride", *SCAN, channels_last_stride2("delta"),
     "delta must have stride 1 in its last dimension (heads)"),
    ("scan/D_dtype", *SCAN, lambda k: k.update(D=k["D"].half()), "D must be float32, got float16"),
    ("scan/D_shape", *SCAN, setk(D=torch.randn(18)), "D must have shape (nheads,)"),
    ("scan/delta_bias_contiguous", *SCAN, setk(delta_bias=torch.randn(12)[::2]),
     "delta_bias must be contiguous"),
    ("scan/z_shape", *SCAN, lambda k: k.update(z=k["z"][:, 1:]), "z must have the shape of u"),
    ("scan/z_dtype", *SCAN, lambda k: k.update(z=k["z"].half()), "z must have the dtype of u"),
    ("scan/z_stride", *SCAN, channels_last_stride2("z"),
     "z must have stride 1 in its last dimension (channels)"),
    ("scan/states_dtype", *SCAN, lambda k: k.update(ssm_states=k["ssm_states"].half()),
     "ssm_states must be float32 or the activation dtype (float32), got float16"),
    ("scan/states_shape", *SCAN, setk(ssm_states=torch.randn(4, 6, 3, 7)),
     "ssm_states must have shape (num_slots, nheads, headdim, dstate) = (*, 6, 3, 8)"),
    ("scan/states_shape_3d", *SCAN, setk(ssm_states=torch.randn(4, 17, 8)),
     "ssm_states must have shape (num_slots, dim, dstate) = (*, 18, 8)"),
    ("scan/states_dstate_stride", *SCAN, transposed_last("ssm_states"),
     "ssm_states must have stride 1 in its last dimension (dstate)"),
    ("scan/states_internal_overlap", *SCAN, expand_slots("ssm_states", 4),
     "ssm_states must not overlap itself"),
    ("scan/slot_range", *SCAN, setk(cache_indices=torch.tensor([1, 4], dtype=I32)),
     "cache_indices[1] = 4 is out of range"),
    ("scan/slot_distinct", *SCAN, setk(cache_indices=torch.tensor([3, 3], dtype=I32)),
     "cache_indices must be distinct among non-padded rows"),
    ("scan/implicit_slots", *SCAN,
     lambda k: k.update(cache_indices=None, ssm_states=k["ssm_states"][:1]),
     "ssm_states needs at least batch (2) slots"),
    ("scan/has_initial_state_needs_states", *SCAN, setk(ssm_states=None),
     "has_initial_state requires ssm_states"),
    ("scan/has_initial_state_dtype", *SCAN,
     lambda k: k.update(has_initial_state=k["has_initial_state"].float()),
     "has_initial_state must be bool"),
    ("scan/qsl_start", *SCAN_VARLEN, setk(query_start_loc=torch.tensor([2, 3, 3, 7], dtype=I32)),
     "query_start_loc must start at 0, got 2"),
    ("scan/slot_negative", *SCAN_VARLEN, setk(cache_indices=torch.tensor([1, -5, 3], dtype=I32)),
     "cache_indices[1] = -5 is out of range"),
    ("scan/slot_range_varlen", *SCAN_VARLEN,
     setk(cache_indices=torch.tensor([1, 0, 4], dtype=I32)),
     "cache_indices[2] = 4 is out of range: a slot must satisfy 0 <= slot < num_slots (4)"),
    ("scan/qsl_monotonic", *SCAN_VARLEN,
     setk(query_start_loc=torch.tensor([0, 5, 3, 7], dtype=I32)),
     "query_start_loc must be non-decreasing"),
    ("scan/qsl_end", *SCAN_VARLEN, setk(query_start_loc=torch.tensor([0, 3, 3, 8], dtype=I32)),
     "query_start_loc must end at total_tokens"),
    ("scan/cache_indices_shape", *SCAN_VARLEN,
     setk(cache_indices=torch.tensor([1, 0], dtype=I32)), "cache_indices must have shape (batch,)"),
    ("scan/out_dtype", *SCAN, lambda k: k.update(out=k["out"].bfloat16()),
     "out must have the dtype of u"),
    ("scan/out_shape", *SCAN, lambda k: k.update(out=k["out"][..., 1:]),
     "out must have the shape of u"),
    ("scan/out_overlaps_z", *SCAN, lambda k: k.update(out=k["z"]), "out must not overlap z"),
    ("scan/out_overlaps_u", *SCAN, lambda k: k.update(out=k["u"]), "out must not overlap u"),
    ("scan/lanes_per_channel", *SCAN, setk(lanes_per_channel=3),
     "selective_scan: lanes_per_channel must be 0 (the launcher decides), 1, 2, 4 or 8, got 3"),
    ("scan/split_len", *SCAN, setk(split_len=-1),
     "selective_scan: split_len must be >= 0 (0: the launcher decides), got -1"),
    ("scan/total_tokens_int32", *SCAN_VARLEN,
     lambda k: k.update(u=torch.randn(1, 18).expand(BIG, 18)),
     "total_tokens must fit in int32"),
    # ---- selective_state_update
    ("ssu/x_dtype", *SSU, lambda k: k.update(x=k["x"].double()),
     "selective_state_update: x must be float32, float16 or bfloat16, got float64"),
    ("ssu/x_dims", *SSU, lambda k: k.update(x=k["x"][0]),
     "x must be 2-D (batch, dim) or 3-D (batch, nheads, headdim)"),
    ("ssu/x_dense_channels", *SSU_3D, transposed_last("x"), "x must have dense channels"),
    ("ssu/x_nheads", *SSU_3D, lambda k: k.update(x=k["x"].reshape(3, 2, 6).contiguous(),
                                                 out=k["out"].reshape(3, 2, 6)),
     "x of shape (batch, nheads, headdim) must have nheads = A.size(0) = 4"),
    ("ssu/dt_shape", *SSU, setk(dt=torch.randn(3, 12)), "dt must have shape (batch, nheads)"),
    ("ssu/dt_dtype", *SSU, lambda k: k.update(dt=k["dt"].half()), "dt must have the dtype of x"),
    ("ssu/A_dims", *SSU, setk(A=torch.randn(4, 8, 2)), "A must be 2-D (dim, dstate)"),
    ("ssu/dim_divisible_by_nheads", *SSU, setk(A=-torch.rand(5)),
     "dim (12) must be divisible by nheads (A.size(0) = 5)"),
    ("ssu/nheads_divisible_by_ngroups", *SSU,
     lambda k: k.update(B=torch.randn(3, 3, 8), C=torch.randn(3, 3, 8)),
     "nheads (4) must be divisible by ngroups (3)"),
    ("ssu/B_dims", *SSU, lambda k: k.update(B=k["B"][..., None]),
     "B must be (batch, ngroups, dstate) or (batch, dstate)"),
    ("ssu/C_shape", *SSU, lambda k: k.update(C=k["C"][:2]), "C must have shape"),
    ("ssu/dt_bias_shape", *SSU, setk(dt_bias=torch.randn(3)), "dt_bias must have shape (nheads,)"),
    ("ssu/z_shape", *SSU, lambda k: k.update(z=k["z"][:2]), "z must have the shape of x"),
    ("ssu/state_dtype", *SSU, lambda k: k.update(ssm_state=k["ssm_state"].half()),
     "ssm_state must be float32 or the activation dtype"),
    ("ssu/state_shape", *SSU, setk(ssm_state=torch.randn(6, 4, 3, 9)),
     "ssm_state must have shape (num_slots, nheads, headdim, dstate) = (*, 4, 3, 8)"),
    ("ssu/state_dstate_stride", *SSU, transposed_last("ssm_state"),
     "ssm_state must have stride 1 in its last dimension (dstate)"),
    ("ssu/num_slots_int32", *SSU, expand_slots("ssm_state", BIG),
     "num_slots must fit in int32"),
    ("ssu/src_dtype", *SSU,
     lambda k: k.update(state_batch_indices=k["state_batch_indices"].long()),
     "state_batch_indices must be int32, got int64"),
    ("ssu/dst_shape", *SSU, setk(dst_state_batch_indices=torch.tensor([1, 2], dtype=I32)),
     "dst_state_batch_indices must have shape (batch,)"),
    ("ssu/src_range", *SSU, setk(state_batch_indices=torch.tensor([2, 6, 4], dtype=I32)),
     "state_batch_indices[1] = 6 is out of range: a slot must satisfy 0 <= slot < num_slots (6)"),
    ("ssu/src_negative", *SSU, setk(state_batch_indices=torch.tensor([2, 0, -4], dtype=I32)),
     "state_batch_indices[2] = -4 is out of range"),
    ("ssu/dst_range", *SSU, setk(dst_state_batch_indices=torch.tensor([1, -3, 3], dtype=I32)),
     "dst_state_batch_indices[1] = -3 is out of range"),
    ("ssu/write_slots_distinct", *SSU,
     setk(dst_state_batch_indices=torch.tensor([1, 5, 1], dtype=I32)),
     "write slots must be distinct among non-padded rows, slot 1 is written twice"),
    ("ssu/write_slot_read_by_other_row", *SSU,
     setk(dst_state_batch_indices=torch.tensor([1, 5, 2], dtype=I32)),
     "a write slot must not be another row's read slot"),
    ("ssu/implicit_slots", *SSU,
     lambda k: k.update(state_batch_indices=None, ssm_state=k["ssm_state"][:2]),
     "ssm_state needs at least batch (3) slots, got 2"),
    ("ssu/out_shape", *SSU, lambda k: k.update(out=k["out"][:, 1:]), "out must have the shape of x"),
    ("ssu/out_overlaps_x", *SSU, lambda k: k.update(out=k["x"]), "out must not overlap x"),
    ("ssu/out_overlaps_state", *SSU,
     lambda k: k.update(out=k["ssm_state"].view(-1)[:36].view(3, 12)),
     "out must not overlap ssm_state"),
    ("ssu/dt_proj_mamba2_form", *SSU, setk(dt_proj_weight=torch.randn(4, 5)),
     "dt_proj_weight requires the Mamba-1 form (A of shape (dim, dstate), headdim 1), got A of "
     "shape [4] and headdim 3"),
    ("ssu/dt_proj_a_per_state_headdim", SSU[0], lambda: ssu_inputs(a_per_state=True),
     setk(dt_proj_weight=torch.randn(4, 5)),
     "dt_proj_weight requires the Mamba-1 form (A of shape (dim, dstate), headdim 1), got A of "
     "shape [4, 8] and headdim 3"),
    ("ssu/dt_proj_shape", *SSU_DTP, setk(dt_proj_weight=torch.randn(5, 5)),
     "dt_proj_weight must have shape (nheads, dt_rank) = (6, dt.size(1)), got [5, 5]"),
    ("ssu/dt_proj_dims", *SSU_DTP, setk(dt_proj_weight=torch.randn(6)),
     "dt_proj_weight must have shape (nheads, dt_rank) = (6, dt.size(1)), got [6]"),
    ("ssu/dt_proj_dtype", *SSU_DTP,
     lambda k: k.update(dt_proj_weight=k["dt_proj_weight"].half()),
     "dt_proj_weight must have the dtype of x (float32), got float16"),
    ("ssu/dt_proj_stride", *SSU_DTP, transposed_last("dt_proj_weight"),
     "dt_proj_weight must have stride 1 in its last dimension (dt_rank)"),
    ("ssu/dt_proj_dt_shape", *SSU_DTP, setk(dt=torch.randn(3, 6)),
     "dt must have shape (batch, dt_rank) with dt_proj_weight = [3, 5], got [3, 6]"),
    ("ssu/dt_proj_dt_stride", *SSU_DTP, transposed_last("dt"),
     "dt must have stride 1 in its last dimension (dt_rank)"),
    ("ssu/out_overlaps_dt_proj_weight", *SSU_DTP,
     lambda k: k.update(out=k["dt_proj_weight"].reshape(-1)[:18].view(3, 6)),
     "out must not overlap dt_proj_weight"),
]


# ---- overlap rules: no buffer an op writes may share a byte with any tensor it reads or with
# another buffer it writes. Builders with every optional input present.
OVERLAP_OPS = {
    "conv": (ops.causal_conv1d,
             lambda: conv_inputs(varlen=True, seqlens=(3, 0, 4), slots=(1, 0, 4),
                                 initial=(True, False, True)),
             ("out", "conv_states"),
             ("x", "weight", "bias", "query_start_loc", "cache_indices", "has_initial_state")),
    "update": (ops.causal_conv1d_update, conv_update_inputs, ("out", "conv_state"),
               ("x", "weight", "bias", "cache_indices")),
    "scan": (ops.selective_scan,
             lambda: scan_inputs(varlen=True, seqlens=(3, 0, 4), slots=(1, 0, 3),
                                 initial=(True, False, True)),
             ("out", "ssm_states"),
             ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "query_start_loc",
              "cache_indices", "has_initial_state")),
    "ssu": (ops.selective_state_update, lambda: ssu_inputs(dst=(1, 3, 5)), ("out", "ssm_state"),
            ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices",
             "dst_state_batch_indices")),
    "ssu_dt_proj": (ops.selective_state_update,
                    lambda: ssu_inputs(form="mamba1", nheads=6, dstate=8, ngroups=1,
                                       group_dim=False, dt_rank=5, dst=(1, 3, 5)),
                    ("out", "ssm_state"),
                    ("x", "dt", "dt_proj_weight", "A", "B", "C", "D", "z", "dt_bias",
                     "state_batch_indices", "dst_state_batch_indices")),
}

OVERLAP_CASES = []
for _key, (_op, _make, _written, _read) in OVERLAP_OPS.items():
    for _i, _w in enumerate(_written):
        for _r in _written[_i + 1:] + _read:
            OVERLAP_CASES.append((f"{_key}/{_w}-{_r}", _op, _make, _w, _r))


@pytest.mark.parametrize("name,op,make,written,read", OVERLAP_CASES,
                         ids=[c[0] for c in OVERLAP_CASES])
def test_written_buffer_overlaps(name, op, make, written, read):
    kw = make()
    place_overlapping(kw, written, read)
    with pytest.raises(RuntimeError,
                       match=re.escape(f"{written} must not overlap {read} (in-place use")):
        op(**kw)


@pytest.mark.parametrize("name,op,make,written,read", OVERLAP_CASES,
                         ids=[c[0] for c in OVERLAP_CASES])
def test_written_buffer_adjacent_is_accepted(name, op, make, written, read):
    """One storage, disjoint byte ranges: not an overlap (the rule compares byte ranges)."""
    kw = make()
    place_overlapping(kw, written, read, overlap=False)
    op(**kw)


@pytest.mark.parametrize("name,op,make,written,read", OVERLAP_CASES,
                         ids=[c[0] for c in OVERLAP_CASES])
def test_overlap_through_another_storage(name, op, make, written, read):
    """The same bytes seen through a second storage object (as from_dlpack, from_numpy or
    frombuffer make): still an overlap - the rule compares addresses, not storages."""
    kw = make()
    place_overlapping(kw, written, read)
    kw[read] = torch.from_dlpack(kw[read])
    assert kw[read].untyped_storage()._cdata != kw[written].untyped_storage()._cdata
    with pytest.raises(RuntimeError,
                       match=re.escape(f"{written} must not overlap {read} (in-place use")):
        op(**kw)


SELF_OVERLAP_CASES = [(f"{key}/{w}", op, make, w)
                      for key, (op, make, written, _) in OVERLAP_OPS.items() for w in written]


@pytest.mark.parametrize("name,op,make,written", SELF_OVERLAP_CASES,
                         ids=[c[0] for c in SELF_OVERLAP_CASES])
def test_written_buffer_overlapping_itself(name, op, make, written):
    """A written buffer whose outer stride is one element short of its inner extent: two of its
    indices name one element, though no stride is 0."""
    kw = make()
    t = kw[written].contiguous()
    strides = list(t.stride())
    strides[0] -= 1
    kw[written] = torch.zeros(t.numel(), dtype=t.dtype).as_strided(t.shape, strides)
    with pytest.raises(RuntimeError, match=re.escape(f"{written} must not overlap itself")):
        op(**kw)


def test_every_overlap_pair_is_listed():
    """Each op's written buffers and read tensors above are all of its tensor arguments."""
    import inspect

    for key, (op, make, written, read) in OVERLAP_OPS.items():
        kw = make()
        tensors = {n for n, v in kw.items() if isinstance(v, torch.Tensor)}
        params = set(inspect.signature(op).parameters)
        assert tensors == set(written) | set(read), key
        assert set(written) | set(read) <= params, key


@pytest.mark.parametrize("name,op,make,mutate,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, op, make, mutate, message):
    kw = make()
    mutate(kw)
    with pytest.raises((RuntimeError, ValueError), match=re.escape(message)):
        op(**kw)


# Every op with a builder of valid inputs, for the rules that hold for every tensor argument.
ALL_OPS = {key: (op, make) for key, (op, make, _, _) in OVERLAP_OPS.items()} | {
    "add_rms_norm": (ops.add_rms_norm,
                     lambda: dict(x=torch.randn(3, 8), weight=torch.randn(8), eps=1e-5,
                                  residual=torch.randn(3, 8), out=torch.empty(3, 8))),
    "gated_rms_norm": (ops.gated_rms_norm,
                       lambda: dict(x=torch.randn(3, 8), weight=torch.randn(8),
                                    z=torch.randn(3, 8), group_size=4, out=torch.empty(3, 8))),
    "gated_sum_squares": (ops.gated_sum_squares,
                          lambda: dict(x=torch.randn(3, 8), z=torch.randn(3, 8), group_size=4,
                                       out=torch.empty(3, 2))),
    "decode_attention": (ops.decode_attention,
                         lambda: dict(q=torch.randn(2, 3, 8), k_cache=torch.randn(4, 3, 5, 8),
                                      v_cache=torch.randn(4, 3, 5, 8),
                                      rows=torch.tensor([2, 0]), lengths=torch.tensor([5, 3]),
                                      scale=0.35, out=torch.empty(2, 3, 8))),
    "gemv": (ops.gemv,
             lambda: dict(x=torch.randn(2, 8), weight=torch.randn(6, 8), bias=torch.randn(6),
                          norm_weight=torch.randn(8), residual=torch.randn(2, 8),
                          residual_out=torch.empty(2, 8), out=torch.empty(2, 6))),
    "gemv_conv_update": (ops.gemv_conv_update,
                         lambda: dict(x=torch.randn(2, 8), weight=torch.randn(6, 8),
                                      bias=torch.randn(6), conv_state=torch.randn(3, 4, 3),
                                      conv_weight=torch.randn(4, 4), conv_bias=torch.randn(4),
                                      conv_start=1, cache_indices=torch.tensor([2, 0], dtype=I32),
                                      out=torch.empty(2, 6))),
}


def _tensor_args(kw):
    return [n for n, v in kw.items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("key", list(ALL_OPS))
def test_arguments_requiring_grad_are_refused(key):
    """The ops have no backward and write in place: under grad mode no argument may require
    grad (a graph through them would give wrong gradients silently); under no_grad they run."""
    op, make = ALL_OPS[key]
    sample = make()
    names = [n for n in _tensor_args(sample) if sample[n].is_floating_point()]
    assert names, key
    for name in names:
        kw = make()
        kw[name].requires_grad_(True)
        with pytest.raises(RuntimeError, match=re.escape(f"{name} requires grad; tpssm ops")):
            op(**kw)
        with torch.no_grad():
            op(**kw)


@pytest.mark.parametrize("key", list(ALL_OPS))
def test_one_meta_tensor_among_cpu_ones_is_refused(key):
    """The dispatcher sends such a call to the op's fake implementation, where nothing runs: it
    must fail there, naming the argument, not return untouched outputs."""
    op, make = ALL_OPS[key]
    first, *others = _tensor_args(make())
    for name in others:
        kw = make()
        kw[name] = kw[name].to("meta")
        with pytest.raises(RuntimeError,
                           match=re.escape(f"{name} must be on the device of {first} (cpu), "
                                           "got meta")):
            op(**kw)


def test_builders_are_valid():
    """The unmodified inputs pass: each failure above comes from its one mutation."""
    for op, make in {CONV, CONV_VARLEN, UPD, SCAN, SCAN_VARLEN, SCAN_M1, SSU, SSU_3D, SSU_DTP,
                     *ALL_OPS.values()}:
        op(**make())


def test_fake_impl_checks_out_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 9, 37)
        with pytest.raises(RuntimeError, match=re.escape("out must have the shape of x")):
            torch.ops.tpssm.causal_conv1d(x, torch.empty(37, 4), None, None, None, None, None,
                                          True, -1, torch.empty(2, 8, 37))


_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and tpssm.has_cuda_kernels()),
                           reason="needs a GPU and the CUDA kernels")


@_cuda
def test_device_mismatch():
    kw = conv_inputs()
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw["weight"] = kw["weight"].cpu()
    with pytest.raises(RuntimeError, match=re.escape("weight must be on the device of x")):
        ops.causal_conv1d(**kw)


@_cuda
def test_cuda_slot_values_checked_only_in_debug_mode(monkeypatch):
    kw = conv_update_inputs()
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw["cache_indices"] = torch.tensor([4, 1, 9], dtype=I32, device="cuda")
    monkeypatch.setenv("TPSSM_DEBUG_CHECKS", "1")
    with pytest.raises(RuntimeError, match=re.escape("cache_indices[2] = 9 is out of range")):
        ops.causal_conv1d_update(**kw)
    monkeypatch.setenv("TPSSM_DEBUG_CHECKS", "0")
    ops.causal_conv1d_update(**kw)  # no host sync: the kernel skips the bad slot
    torch.cuda.synchronize()


@pytest.mark.parametrize("call, message", [
    (lambda: ops.gated_sum_squares(torch.randn(2, 0)), "x must have at least one column"),
    (lambda: ops.gated_sum_squares(torch.randn(2, 8), group_size=-2),
     "group_size and first_group_size must be >= 0, got -2 and 0"),
    (lambda: ops.gated_sum_squares(torch.randn(8)), "x must be 2-D"),
    (lambda: ops.gemv(torch.tensor(1.0), torch.randn(4, 4)), "gemv: x must be 2-D (M, K)"),
    (lambda: ops.gemv(torch.randn(1, 4), torch.tensor(1.0)), "gemv: weight must be 2-D (N, K)"),
    (lambda: ops.gemv_conv_update(torch.tensor(1.0), torch.randn(4, 4), None,
                                  torch.randn(2, 4, 3), torch.randn(4, 4), conv_start=0),
     "x must be 2-D (M, K)"),
])
def test_wrappers_leave_malformed_arguments_to_the_ops_errors(call, message):
    """A wrapper that allocates `out` must not fail first with an unrelated Python error."""
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call()
