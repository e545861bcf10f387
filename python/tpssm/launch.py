"""Running a function on N tensor-parallel ranks: spawned local processes, or torchrun's.

`run_ranks(fn, tp, ...)` spawns `tp` processes on this machine (gloo on CPU, NCCL when there are
at least `tp` GPUs), initialises torch.distributed in each with a collective timeout, calls
`fn(*args)` and returns the values of every rank, in rank order. A rank that raises, dies or
outlives the deadline makes the whole call fail with `RankError` naming the rank and the cause;
the other ranks are terminated - never a hang. Nor do ranks outlive their launcher: SIGTERM or
SIGHUP to it terminates them before the signal ends it, and on Linux they die with it if it dies
any other way.

Ranks start as fresh interpreters (start_method="spawn", the default), each importing torch: a
few seconds of CPU per rank. start_method="forkserver" forks them instead from a server process
that imported torch once (the first call starts it): a fraction of a second per rank, for callers
that start ranks many times. The server keeps the environment and standard streams it was
started with: a rank sees those of the first forkserver call, not of later ones. The environment
variable TPSSM_START_METHOD sets the default (the command line's ranks, for instance).

Under torchrun (WORLD_SIZE and RANK in the environment), `run_ranks` instead initialises the
process group from the environment, calls `fn` once in this process and returns [its value]: the
same program runs unchanged on one machine or several.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import select
import signal
import socket
import sys
import threading
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


def _die_with_parent(launcher_pid: int, forked_by_server: bool) -> None:
    """Linux: have the kernel kill this rank when the launching process dies, however it dies
    (SIGKILL included), so that no rank outlives it holding CPU, GPU memory or its pipes.

    A spawned rank's parent is the launcher. A forkserver rank's parent is the fork server, which
    outlives the launcher while its ranks live (they hold its pipe from the launcher): such a
    rank watches the launcher itself."""
    if sys.platform != "linux":
        return
    if forked_by_server:
        threading.Thread(target=_exit_when_gone, args=(launcher_pid,), daemon=True,
                         name="tpssm-launcher-watch").start()
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != launcher_pid:  # the parent died before the request took effect
        os._exit(1)


def _exit_when_gone(pid: int) -> None:
    """Ends this process as soon as process `pid` has ended (a pid file descriptor becomes
    readable then; without one, polling twice a second)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (OSError, AttributeError):
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)
    select.select([fd], [], [])
    os._exit(1)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP reached the launching process (args: the signal number)."""


@contextlib.contextmanager
def _terminate_ranks_on_signal():
    """While the ranks run, SIGTERM and SIGHUP (when their handlers are the default) raise in the
    launcher, so that its cleanup - terminating the ranks - runs as on Ctrl-C; then the signal is
    delivered again with its default action, and the process ends as it would have. Signals
    reach only the main thread, and a handler the caller installed is left alone."""
    signals = [s for s in (signal.SIGTERM, signal.SIGHUP)
               if threading.current_thread() is threading.main_thread()
               and signal.getsignal(s) is signal.SIG_DFL]

    def handler(signum, frame):
        for s in signals:  # a second signal must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        raise _Terminated(signum)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    except _Terminated as stop:
        for s in signals:
            signal.signal(s, signal.SIG_DFL)
        os.kill(os.getpid(), stop.args[0])
        raise  # only if the signal did not end the process
    finally:
        for s in signals:
            signal.signal(s, signal.SIG_DFL)


def _rank_main(rank: int, world: int, port: int, backend: Optional[str],
               collective_timeout_s: float, fn: Callable, args: Sequence[Any],
               results: "mp.Queue", launcher_pid: int, forked_by_server: bool) -> None:
    _die_with_parent(launcher_pid, forked_by_server)
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


_START_METHODS = ("spawn", "forkserver")


def run_ranks(fn: Callable, tp: int, args: Sequence[Any] = (), *, backend: Optional[str] = None,
              timeout_s: float = 600.0, collective_timeout_s: float = 120.0,
              init_process_group: bool = True,
              start_method: Optional[str] = None) -> List[Any]:
    """Run fn(*args) on `tp` ranks and return their values in rank order (see the module doc).

    fn must be importable by name (a module-level function): ranks are new processes, started
    by `start_method`, "spawn" or "forkserver" (see the module doc; None: TPSSM_START_METHOD, or
    "spawn" when it is unset).
    timeout_s bounds the whole call; collective_timeout_s bounds each collective, so a rank
    stuck waiting for a dead peer fails instead of waiting forever. With
    init_process_group=False the ranks get torchrun's environment variables but fn initialises
    torch.distributed itself.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    source = "start_method"
    if start_method is None:
        source, start_method = "TPSSM_START_METHOD", os.environ.get("TPSSM_START_METHOD", "spawn")
    if start_method not in _START_METHODS:
        raise ValueError(f"{source} must be one of {_START_METHODS}, got {start_method!r}")
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
    with _terminate_ranks_on_signal():
        return _spawn_and_wait(fn, tp, args, backend, timeout_s, collective_timeout_s,
                               start_method)


def _spawn_and_wait(fn: Callable, tp: int, args: Sequence[Any], backend: Optional[str],
                    timeout_s: float, collective_timeout_s: float,
                    start_method: str) -> List[Any]:
    ctx = mp.get_context(start_method)
    forked_by_server = start_method == "forkserver"
    if forked_by_server:
        # Read when the server starts (the first call); later calls find it running.
        ctx.set_forkserver_preload(["torch"])
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, name=f"tpssm-rank{r}",
                         args=(r, tp, port, backend, collective_timeout_s, fn, args, results,
                               os.getpid(), forked_by_server),
                         daemon=False)
             for r in range(tp)]
    values: dict = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(values) < tp:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(tp)) - set(values))
                    raise RankError(f"rank(s) {missing} did not finish within {timeout_s:g} s")
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
                # A collective timeout blames the rank that waited: name those still running
                # (in the first line, which is what the command line prints).
                stuck = [r for r, p in enumerate(procs)
                         if r != rank and r not in values and p.is_alive()]
                lines = value.splitlines() or [""]
                said = f"{lines[0]} {lines[-1]}".lower()
                if stuck and any(w in said for w in ("timed out", "timeout", "timing out")):
                    raise RankError(f"rank {rank} failed while rank(s) {stuck} had not finished "
                                    f"(a rank stuck outside a collective makes its peers time "
                                    f"out): {value}")
                raise RankError(f"rank {rank} failed: {value}")
            values[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        return [values[r] for r in range(tp)]
    finally:
        started = [p for p in procs if p.pid is not None]
        for p in started:
            if p.is_alive():
                p.terminate()
        for p in started:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
