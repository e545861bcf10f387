"""Running a function on N tensor-parallel ranks: spawned local processes, or torchrun's.

`run_ranks(fn, tp, ...)` spawns `tp` processes on this machine (gloo on CPU, NCCL when there are
at least `tp` GPUs), initialises torch.distributed in each with a collective timeout, calls
`fn(*args)` and returns the values of every rank, in rank order. A rank that raises, dies or
outlives the deadline makes the whole call fail with `RankError` naming the rank and the cause;
the other ranks are terminated - never a hang.

Under torchrun (WORLD_SIZE and RANK in the environment), `run_ranks` instead initialises the
process group from the environment, calls `fn` once in this process and returns [its value]: the
same program runs unchanged on one machine or several.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["RankError", "run_ranks", "under_torchrun", "default_backend", "init_distributed"]


class RankError(RuntimeError):
    """A rank failed (raised, died or timed out); the message names the rank and the cause."""


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def default_backend(world_size: int) -> str:
    """NCCL when every rank can have a GPU of its own, gloo otherwise."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> None:
    """Initialise torch.distributed from the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
    binding the rank to its GPU (LOCAL_RANK) under NCCL."""
    world = int(os.environ["WORLD_SIZE"])
    backend = backend or default_backend(world)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, backend: Optional[str],
               collective_timeout_s: float, fn: Callable, args: Sequence[Any],
               results: "mp.Queue") -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Each rank gets its share of the cores; oversubscription makes gloo ranks crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        if backend is not None:
            init_distributed(backend, collective_timeout_s)
        # Plain pickle: torch's queue reductions would pass tensors as shared memory owned by
        # this process, which exits right after.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException as exc:  # reported to the parent, which raises RankError
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, tp: int, args: Sequence[Any] = (), *, backend: Optional[str] = None,
              timeout_s: float = 600.0, collective_timeout_s: float = 120.0,
              init_process_group: bool = True) -> List[Any]:
    """Run fn(*args) on `tp` ranks and return their values in rank order (see the module doc).

    fn must be importable by name (a module-level function): ranks are spawned processes.
    timeout_s bounds the whole call; collective_timeout_s bounds each collective, so a rank
    stuck waiting for a dead peer fails instead of waiting forever. With
    init_process_group=False the ranks get torchrun's environment variables but fn initialises
    torch.distributed itself.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if under_torchrun():
        created = not dist.is_initialized()
        if created:
            init_distributed(backend, collective_timeout_s)
        try:
            if dist.get_world_size() != tp:
                raise ValueError(f"--tp {tp} does not match torchrun's WORLD_SIZE "
                                 f"{dist.get_world_size()}")
            value = fn(*args)
            if created:
                dist.barrier()  # no rank tears the group down while a peer still uses it
            return [value]
        finally:
            # A process group left alive at interpreter exit aborts the process.
            if created:
                dist.destroy_process_group()
    backend = (backend or default_backend(tp)) if init_process_group else None
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, name=f"tpssm-rank{r}",
                         args=(r, tp, port, backend, collective_timeout_s, fn, args, results),
                         daemon=False)
             for r in range(tp)]
    for p in procs:
        p.start()
    values: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < tp:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(tp)) - set(values))
                    raise RankError(f"rank(s) {missing} did not finish within {timeout_s:.0f} s")
                for r, p in enumerate(procs):
                    if r not in values and not p.is_alive() and p.exitcode not in (0, None):
                        raise RankError(f"rank {r} died with exit code {p.exitcode}")
                continue
            if not ok:
                # A peer's death makes the survivors fail in their next collective: name the
                # dead rank as the cause when there is one.
                time.sleep(0.5)
                for r, p in enumerate(procs):
                    if not p.is_alive() and p.exitcode not in (0, None):
                        raise RankError(f"rank {r} died with exit code {p.exitcode} "
                                        f"(rank {rank} then failed: {value.splitlines()[0]})")
                raise RankError(f"rank {rank} failed: {value}")
            values[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [values[r] for r in range(tp)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
