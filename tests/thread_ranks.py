"""TP ranks as threads of this process, for checks that need every rank's tensors in one
address space: on one GPU, a tp > 1 decode step of all ranks captured into one CUDA graph with
the collectives between them (NCCL puts no two ranks on one device; gloo collectives cannot be
captured).

    results = run_thread_ranks(fn, world_size, arg1, arg2, timeout=120)

fn(rank, world_size, *args) runs in a thread of its own with torch's in-process "threaded"
process group as the default group (torch.testing's multi-threaded group: collectives are torch
ops that rank 0's thread issues on every rank's tensors, so on CUDA they run on rank 0's current
stream, in order with the work every rank issued before it). Its return value comes back in
results[rank]. A rank that raises wakes the others out of their collectives, and the call fails
with tpssm.launch.RankError naming it; ranks still running at the deadline are woken the same
way and the error names them (threads cannot be killed: one stuck outside a collective is left
behind, daemonic, cut off from later worlds).
One threaded world at a time; the process's usual torch.distributed state is restored after.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
from torch.testing._internal.distributed import multi_threaded_pg as threaded_pg

from tpssm.launch import RankError

__all__ = ["run_thread_ranks"]

_one_world = threading.Lock()


def run_thread_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0
                     ) -> List[Any]:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    results: List[Any] = [None] * world_size
    errors: Dict[int, BaseException] = {}
    with _one_world:
        threaded_pg._install_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(True)
        threaded_pg.ProcessLocalGroup.reset()
        try:
            store = dist.HashStore()
            over = threading.Event()  # set when the call returns: a thread left behind then
            #                           touches neither the next world nor the restored one

            def rank_main(rank: int) -> None:
                try:
                    dist.init_process_group("threaded", rank=rank, world_size=world_size,
                                            store=store)
                    try:
                        results[rank] = fn(rank, world_size, *args)
                    finally:
                        if not over.is_set():
                            dist.destroy_process_group()
                except BaseException as exc:  # SystemExit: woken out of a collective
                    errors[rank] = exc
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
                over.set()
                raise RankError(f"ranks {late} still running after {timeout:g} s (a stalled "
                                "rank keeps the others waiting in their collectives)")
            over.set()
        finally:
            threaded_pg.ProcessLocalGroup.reset()
            torch._C._distributed_c10d._set_thread_isolation_mode(False)
            threaded_pg._uninstall_threaded_pg()
    # The rank that failed first is the one that did not exit on being woken.
    causes = [r for r, e in sorted(errors.items()) if not isinstance(e, SystemExit)]
    if causes or errors:
        rank = (causes or sorted(errors))[0]
        raise RankError(f"rank {rank} failed: {errors[rank]!r}") from errors[rank]
    return results
