"""TP ranks as threads of this process, for checks that need every rank's tensors in one
address space: on one GPU, a tp > 1 decode step of all ranks captured into one CUDA graph with
the collectives between them (NCCL puts no two ranks on one device; gloo collectives cannot be
captured).

    results = run_thread_ranks(fn, world_size, arg1, arg2, timeout=120)

fn(rank, world_size, *args) runs in a thread of its own with torch's in-process "threaded"
process group as the default group (torch.testing's multi-threaded group: collectives are torch
ops that rank 0's thread issues on every rank's tensors, so on CUDA they run on rank 0's current
stream - in order with the work of the other ranks only when every rank issues on that one
stream). Its return value comes back in results[rank]. A rank that raises wakes the others out
of their collectives, and the call fails with tpssm.launch.RankError naming the first failure;
ranks still running at the deadline are woken the same way and the error names them (threads
cannot be killed: one stuck outside a collective is left behind, daemonic, and the next call
waits for it or refuses to start).
One threaded world at a time; the process's usual torch.distributed state is restored after.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Tuple

import torch
import torch.distributed as dist
from torch.testing._internal.distributed import multi_threaded_pg as threaded_pg

from tpssm.launch import RankError

__all__ = ["run_thread_ranks"]

_one_world = threading.Lock()
# What a rank raises when another rank's failure wakes it: out of a collective (the threaded
# group exits the thread), or out of a barrier the failing rank aborted.
_WOKEN = (SystemExit, threading.BrokenBarrierError)
# Rank threads that outlived their world's deadline: every world's default group has the same
# name in the threaded group's registry, so one of them reaching a collective would join the
# next world's. A new world waits for them, and refuses to start while one still runs.
_left_behind: List[threading.Thread] = []


def run_thread_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0
                     ) -> List[Any]:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    results: List[Any] = [None] * world_size
    failures: List[Tuple[int, BaseException]] = []  # in the order they happened
    with _one_world:
        for t in _left_behind:
            t.join(10.0)
        _left_behind[:] = [t for t in _left_behind if t.is_alive()]
        if _left_behind:
            raise RankError(f"rank threads of an earlier world still run "
                            f"({[t.name for t in _left_behind]}): no new world beside them")
        threaded_pg._install_threaded_pg()
        world = dist.distributed_c10d._world
        if not hasattr(world, "comms"):
            # torch 2.11 (the GPU machines' image) destroys the world group by walking
            # _world.comms, a list its threaded world does not have: every rank then failed.
            world.comms = []
        torch._C._distributed_c10d._set_thread_isolation_mode(True)
        threaded_pg.ProcessLocalGroup.reset()
        late: List[int] = []
        try:
            store = dist.HashStore()
            over = threading.Event()  # set when the call returns: a thread left behind then
            #                           touches the restored torch.distributed state no more

            def rank_main(rank: int) -> None:
                try:
                    dist.init_process_group("threaded", rank=rank, world_size=world_size,
                                            store=store)
                    try:
                        results[rank] = fn(rank, world_size, *args)
                    finally:
                        if not over.is_set():
                            dist.destroy_process_group()
                except BaseException as exc:  # _WOKEN: another rank failed first
                    failures.append((rank, exc))
                    if not over.is_set():
                        threaded_pg.ProcessLocalGroup.exception_handle(exc)

            threads = [threading.Thread(target=rank_main, args=(r,), name=f"tp-rank-{r}",
                                        daemon=True) for r in range(world_size)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + timeout
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            late = [r for r, t in enumerate(threads) if t.is_alive()]
            if late:
                threaded_pg.ProcessLocalGroup.exception_handle(TimeoutError())
                for t in threads:
                    t.join(5.0)
                _left_behind.extend(t for t in threads if t.is_alive())
            over.set()
        finally:
            threaded_pg.ProcessLocalGroup.reset()
            torch._C._distributed_c10d._set_thread_isolation_mode(False)
            threaded_pg._uninstall_threaded_pg()
    # The first failure that is not a rank woken by another's is the cause (a woken rank may
    # record its error before the rank that woke it does).
    causes = [(r, e) for r, e in failures if not isinstance(e, _WOKEN)]
    if causes:
        rank, exc = causes[0]
        raise RankError(f"rank {rank} failed: {exc!r}") from exc
    if late:
        raise RankError(f"ranks {late} still running after {timeout:g} s (a stalled rank keeps "
                        "the others waiting in their collectives)")
    if failures:
        rank, exc = failures[0]
        raise RankError(f"rank {rank} failed: {exc!r}") from exc
    return results
