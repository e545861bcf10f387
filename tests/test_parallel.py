"""tpssm.parallel: shard arithmetic, Mamba-2 group placement, and the parallel linears on gloo."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from dist_utils import run_distributed  # noqa: E402
from tpssm.models.mixers import mamba2_local_groups  # noqa: E402
from tpssm.models.weights import DictSource  # noqa: E402
from tpssm.parallel import (  # noqa: E402
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    ranges_size,
    shard_range,
    shard_segments,
)


@pytest.mark.parametrize("size", [1, 4, 7, 8, 43, 128])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_shard_range_partitions_with_first_ranks_taking_the_extra(size, tp):
    if size < tp:
        with pytest.raises(ValueError, match=rf"heads of size {size} over tp={tp}"):
            shard_range(size, tp, 0, "heads")
        return
    parts = [shard_range(size, tp, r) for r in range(tp)]
    assert parts[0][0] == 0 and parts[-1][1] == size
    assert all(parts[r][1] == parts[r + 1][0] for r in range(tp - 1))
    lengths = [b - a for a, b in parts]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)


def test_shard_range_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(8, 2, 2)


def test_shard_segments_cuts_every_segment_separately():
    # x | z packed (Mamba1 in_proj, E = 6) at tp = 2: rows 0-2 and 6-8 on rank 0.
    assert shard_segments([(6, 1), (6, 1)], 2, 0) == [(0, 3), (6, 9)]
    assert shard_segments([(6, 1), (6, 1)], 2, 1) == [(3, 6), (9, 12)]
    # Per-head segments (unit 4) and a replicated one (unit 0).
    ranges = shard_segments([(12, 4), (5, 0), (3, 1)], 3, 2)
    assert ranges == [(8, 12), (12, 17), (19, 20)]
    assert ranges_size(ranges) == 4 + 5 + 1
    with pytest.raises(ValueError, match="is not a multiple of its unit"):
        shard_segments([(10, 4)], 2, 0, names=["x"])


@pytest.mark.parametrize("heads,groups", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (12, 6),
                                          (24, 4), (6, 3)])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5])
def test_mamba2_local_groups_map_every_head_to_its_group(heads, groups, tp):
    if heads < tp:
        return
    hpg = heads // groups
    for rank in range(tp):
        h0, h1 = shard_range(heads, tp, rank)
        local, per = mamba2_local_groups(heads, groups, h0, h1)
        n = h1 - h0
        assert n % per == 0 and len(local) == n // per
        # The kernels map local head j to local group j // per: it must be the global group.
        assert all(local[j // per] == (h0 + j) // hpg for j in range(n))
        if groups % tp == 0:
            assert len(set(local)) == len(local), "sharded groups must not be copied"


def test_single_process_context_is_tp1():
    ctx = TPContext()
    assert (ctx.rank, ctx.world_size) == (0, 1)
    x = torch.randn(3, 4)
    assert ctx.all_reduce(x, "int8") is x  # nothing to reduce at tp = 1
    with pytest.raises(ValueError, match="allreduce must be one of"):
        RowParallelLinear([(0, 4)], 3, False, ctx, allreduce="int4")


def test_local_shard_context_is_rank0_of_tp_without_a_group():
    ctx = TPContext.local_shard(4)
    assert (ctx.rank, ctx.world_size, ctx.group) == (0, 4, None) and not ctx.communicates
    assert ctx.shard_range(10) == (0, 3)
    x = torch.randn(3, 8)
    assert ctx.all_reduce(x, "int8") is x and ctx.broadcast(x) is x
    assert torch.equal(ctx.all_gather_cat(x, dim=0), torch.cat([x] * 4))
    ctx.barrier()
    assert TPContext().communicates is False
    with pytest.raises(ValueError, match="tp must be >= 1"):
        TPContext.local_shard(0)


def _linears(rank, world, full_w_col, full_b_col, full_w_row, full_b_row, x):
    import torch.distributed as dist

    ctx = TPContext()
    out = {}
    # Column parallel over a packed weight: two segments cut separately.
    seg = full_w_col.shape[0] // 2
    rows = shard_segments([(seg, 1), (seg, 1)], world, rank)
    col = ColumnParallelLinear(x.shape[1], rows, True, ctx)
    src = DictSource({"w": full_w_col, "b": full_b_col, "rw": full_w_row, "rb": full_b_row})
    col.load(src, "w", "b")
    y_local = col(x)
    full = torch.nn.functional.linear(x, full_w_col, full_b_col)
    expect = torch.cat([full[:, a:b] for a, b in rows], dim=1)
    out["col"] = float((y_local - expect).abs().max())

    # Row parallel: reduced output equals the full linear, bias counted once.
    cols = [ctx.shard_range(full_w_row.shape[1])]
    row = RowParallelLinear(cols, full_w_row.shape[0], True, ctx)
    row.load(src, "rw", "rb")
    xin = torch.randn(5, full_w_row.shape[1], generator=torch.Generator().manual_seed(3))
    xl = xin[:, cols[0][0]:cols[0][1]]
    ref = torch.nn.functional.linear(xin, full_w_row, full_b_row)
    out["row"] = float((row(xl) - ref).abs().max())

    # scatter=True (sequence parallelism): this rank's rows of the reduced result, 5 rows padded
    # to a multiple of tp with zero rows (plus the bias), bias counted once.
    mine = row(xl, scatter=True)
    per = -(-5 // world)
    padded = torch.cat([ref, full_b_row.expand(per * world - 5, -1)])
    out["row_scatter_shape"] = tuple(mine.shape)
    out["row_scatter"] = float((mine - padded[rank * per:(rank + 1) * per]).abs().max())
    out["scatter_calls"] = row.allreduce.calls["scatter"]

    # reduce_results=False: the caller's reduction of the partials gives the same result.
    part = RowParallelLinear(cols, full_w_row.shape[0], True, ctx, reduce_results=False)
    part.load(src, "rw", "rb")
    p = part(xl).contiguous()
    dist.all_reduce(p)
    out["row_partial"] = float((p - ref).abs().max())
    # ... and with a residual, which (like the bias) only rank 0 adds.
    res = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    p = part(xl, res).contiguous()
    dist.all_reduce(p)
    out["row_partial_residual"] = float((p - (ref + res)).abs().max())

    # Quantized schemes run the two-shot algorithm on the strategy's buffers, except under the
    # size threshold; the exchange is replaced by an exact sum here to check the routing.
    from tpssm import qallreduce
    from tpssm.reference.qallreduce import CODECS

    calls = []
    names = {v[0]: k for k, v in CODECS.items()}

    def fake_two_shot(t, group, n, codec, group_size, residual, send, recv, mine, gathered,
                      out_buf):
        calls.append((names[codec], t.numel(), group_size))
        r = t.clone()
        dist.all_reduce(r, group=group)
        return out_buf.copy_(r if residual is None else r + residual)

    qallreduce._two_shot = fake_two_shot
    q = RowParallelLinear(cols, full_w_row.shape[0], True, ctx, allreduce="int8")
    q.load(src, "rw", "rb")
    out["row_int8"] = float((q(xl) - ref).abs().max())
    small = RowParallelLinear(cols, full_w_row.shape[0], True, ctx, allreduce="fp8",
                              allreduce_min_bytes=1 << 20)
    small.load(src, "rw", "rb")
    out["row_small"] = float((small(xl) - ref).abs().max())
    # A last dim no supported quantization group divides is reduced exactly.
    odd = RowParallelLinear(cols, 6, False, ctx, allreduce="int8")
    with torch.no_grad():
        odd.weight.copy_(row.weight[:6])
    out["row_odd"] = float((odd(xl) - torch.nn.functional.linear(xin, full_w_row[:6])).abs().max())
    out["calls"] = calls

    g = ctx.all_gather_cat(torch.full((1, rank + 1), float(rank)), dim=1)
    out["gather"] = g.tolist()
    b = ctx.broadcast(torch.tensor([rank * 10 + 7]), src=0)
    out["bcast"] = int(b)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 3])
def test_parallel_linears_match_the_full_linear(tp):
    g = torch.Generator().manual_seed(0)
    w_col, b_col = torch.randn(14, 9, generator=g), torch.randn(14, generator=g)
    w_row, b_row = torch.randn(96, 11, generator=g), torch.randn(96, generator=g)
    x = torch.randn(4, 9, generator=g)
    res = run_distributed(_linears, tp, w_col, b_col, w_row, b_row, x, timeout=240)
    for rank, r in enumerate(res):
        assert r["col"] <= 1e-5, rank
        assert r["row"] <= 1e-5, rank
        assert r["row_partial"] <= 1e-5, rank
        assert r["row_partial_residual"] <= 1e-5, rank
        assert r["row_scatter_shape"] == (-(-5 // tp), 96) and r["row_scatter"] <= 1e-5, rank
        assert r["scatter_calls"] == 1
        assert r["row_int8"] <= 1e-5, rank
        assert r["row_small"] <= 1e-5, rank
        assert r["row_odd"] <= 1e-5, rank
        # fp8 stayed exact (under the size threshold); int8 quantized in groups of 32, the
        # largest supported size <= 128 dividing 96; the 6-wide output stayed exact.
        assert r["calls"] == [("int8", 5 * 96, 32)], r["calls"]
        assert r["gather"] == [[float(q) for q in range(tp) for _ in range(q + 1)]]
        assert r["bcast"] == 7


def test_reduce_scatter_rules_and_the_local_shards_rows():
    from tpssm.parallel import AllReduce

    shard = AllReduce(TPContext.local_shard(4))
    x = torch.arange(24.0).reshape(8, 3)
    # A local shard (rank 0 of tp 4, no group): its rows of x, nothing reduced.
    assert torch.equal(shard.reduce_scatter(x), x[:2]) and shard.calls["scatter"] == 0
    with pytest.raises(ValueError, match="multiple of tp"):
        shard.reduce_scatter(x[:7])
    with pytest.raises(ValueError, match="needs the exact scheme"):
        AllReduce(TPContext.local_shard(2), "int8").reduce_scatter(x)
    row = RowParallelLinear([(0, 4)], 3, True, TPContext.local_shard(4))
    with pytest.raises(ValueError, match="no residual"):
        row(torch.randn(5, 4), torch.randn(5, 3), scatter=True)
    with torch.no_grad():
        row.weight.normal_()
        row.bias.normal_()
    xs = torch.randn(5, 4)
    # 5 rows pad to 8; rank 0 of the shard gets rows 0-1 of the local product (+ bias).
    assert torch.allclose(row(xs, scatter=True), (xs @ row.weight.T + row.bias)[:2])


def test_a_split_finer_than_the_model_is_rejected_naming_the_dimension():
    from tpssm.models import Mamba1Mixer, Mamba2Mixer, parse_config

    ctx = TPContext()
    ctx.world_size, ctx.rank = 16, 3  # what a 16-rank group would see; no collective runs
    m2 = parse_config(dict(architectures=["Mamba2ForCausalLM"], hidden_size=64, num_heads=8,
                           head_dim=16, n_groups=2, state_size=16))
    with pytest.raises(ValueError, match=r"num_heads of size 8 over tp=16"):
        Mamba2Mixer(m2, 0, ctx, backend="reference")
    m1 = parse_config(dict(architectures=["MambaForCausalLM"], hidden_size=4, expand=2))
    with pytest.raises(ValueError, match=r"intermediate_size \(d_inner\) of size 8 over tp=16"):
        Mamba1Mixer(m1, 0, ctx, backend="reference")


def _from_env(rank, world):
    import torch.distributed as dist

    assert not dist.is_initialized()
    ctx = TPContext.from_env(backend="gloo")
    x = torch.tensor([float(rank + 1)])
    return ctx.rank, ctx.world_size, float(ctx.all_reduce(x)), str(ctx.device)


@pytest.mark.timeout(120)
def test_context_from_torchrun_environment():
    res = run_distributed(_from_env, 2, backend=None, timeout=90)
    assert res == [(0, 2, 3.0, "cpu"), (1, 2, 3.0, "cpu")]
