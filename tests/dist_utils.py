"""Run a function on N torch.distributed ranks (gloo, CPU) in spawned processes, with a deadline.

    results = run_distributed(fn, world_size, arg1, arg2, timeout=120)

fn(rank, world_size, *args) runs in every rank after init_process_group (or, with backend=None,
in torchrun's environment without it); it must be importable
(a module-level function). Its return value comes back in results[rank]. An exception in any rank
fails the call with that rank's traceback; a rank that does not finish by the deadline gets all
ranks killed and raises TimeoutError, so a broken collective can never hang a test run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Optional

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: Optional[str], timeout: float,
            fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        if backend is not None:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            out = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        # Plain pickle: torch's shared-memory reductions would tie the payload to this process.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0,
                    backend: Optional[str] = "gloo") -> List[Any]:
    """backend=None leaves torch.distributed uninitialised: fn finds torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and initialises it itself."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker,
                         args=(r, world_size, port, backend, timeout, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: List[Any] = [None] * world_size
    errors = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world_size):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"distributed run of {fn.__name__} on {world_size} ranks "
                                   f"exceeded {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"distributed run of {fn.__name__} on {world_size} ranks "
                                   f"exceeded {timeout:.0f} s") from None
            if ok:
                out[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
        if errors:
            # The first report is often a peer's broken connection: collect the root cause too.
            grace = time.monotonic() + 10.0
            while len(errors) < world_size and time.monotonic() < grace:
                try:
                    rank, ok, payload = results.get(timeout=max(0.1, grace - time.monotonic()))
                except queue.Empty:
                    break
                if not ok:
                    errors.append(f"rank {rank} failed:\n{payload}")
            raise RuntimeError("\n".join(errors))
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
