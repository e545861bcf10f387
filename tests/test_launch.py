"""run_ranks: values in rank order, and every failure mode ends in a RankError, never a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tpssm.launch import RankError, run_ranks


def _sum_of_ranks(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return (dist.get_rank(), t.item())


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("bad shard on rank 1")
    dist.barrier()


def _rank1_dies():
    if dist.get_rank() == 1:
        os._exit(7)
    dist.barrier()


def _rank1_hangs():
    if dist.get_rank() == 1:
        time.sleep(600)
    dist.barrier()


@pytest.mark.timeout(120)
def test_values_in_rank_order():
    assert run_ranks(_sum_of_ranks, 2, (10.0,)) == [(0, 21.0), (1, 21.0)]


@pytest.mark.timeout(120)
def test_raising_rank_is_named():
    with pytest.raises(RankError, match="rank 1 failed: ValueError: bad shard on rank 1"):
        run_ranks(_rank1_raises, 2, collective_timeout_s=20)


@pytest.mark.timeout(120)
def test_dead_rank_is_named():
    with pytest.raises(RankError, match="rank 1 died with exit code 7"):
        run_ranks(_rank1_dies, 2, collective_timeout_s=20)


@pytest.mark.timeout(120)
def test_hung_rank_times_out():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"did not finish within|rank 0 failed"):
        run_ranks(_rank1_hangs, 2, timeout_s=15, collective_timeout_s=5)
    assert time.monotonic() - start < 60


def test_bad_tp():
    with pytest.raises(ValueError, match="tp must be >= 1"):
        run_ranks(_sum_of_ranks, 0, (0.0,))
