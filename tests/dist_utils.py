"""Run a test function on N torch.distributed ranks (gloo, CPU) in spawned processes.

    results = run_distributed(fn, world_size, arg1, arg2, timeout=120)

fn(rank, world_size, *args) runs in every rank after init_process_group (or, with backend=None,
in torchrun's environment without it); it must be importable (a module-level function). Its
return value comes back in results[rank]. A rank that raises, dies or misses the deadline fails
the call with tpssm.launch.RankError naming it, so a broken collective never hangs a test run.
This is tpssm.launch.run_ranks with the rank passed in and one thread per rank.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from tpssm.launch import run_ranks

__all__ = ["free_port_for_tests", "run_distributed"]


def free_port_for_tests() -> int:
    """A free local TCP port (for launchers that take one, such as torchrun)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_rank(fn: Callable, args: tuple) -> Any:
    torch.set_num_threads(1)
    if dist.is_initialized():
        return fn(dist.get_rank(), dist.get_world_size(), *args)
    return fn(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), *args)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0,
                    backend: Optional[str] = "gloo") -> List[Any]:
    """backend=None leaves torch.distributed uninitialised: fn finds torchrun's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and initialises it itself."""
    return run_ranks(_with_rank, world_size, (fn, args), backend=backend or "gloo",
                     timeout_s=timeout, collective_timeout_s=timeout,
                     init_process_group=backend is not None)
