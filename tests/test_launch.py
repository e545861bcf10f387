"""run_ranks: values in rank order, and every failure mode ends in a RankError, never a hang."""

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from tpssm.launch import RankError, run_ranks


def _sum_of_ranks(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return (dist.get_rank(), t.item())


def _parent_pid():
    return os.getppid()


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


START_METHODS = ("spawn", "forkserver")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_values_in_rank_order(start_method):
    assert run_ranks(_sum_of_ranks, 2, (10.0,), start_method=start_method) == [
        (0, 21.0), (1, 21.0)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_raising_rank_is_named(start_method):
    with pytest.raises(RankError, match="rank 1 failed: ValueError: bad shard on rank 1"):
        run_ranks(_rank1_raises, 2, collective_timeout_s=20, start_method=start_method)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_dead_rank_is_named(start_method):
    with pytest.raises(RankError, match="rank 1 died with exit code 7"):
        run_ranks(_rank1_dies, 2, collective_timeout_s=20, start_method=start_method)


@pytest.mark.timeout(120)
def test_hung_rank_times_out():
    """Rank 0's barrier times out (5 s) long before the call's deadline: the rank that waited
    is not the culprit, and the one still running is named - in the line the CLI prints too."""
    from tpssm.runner import one_line

    start = time.monotonic()
    with pytest.raises(RankError, match=re.escape("rank 0 failed while rank(s) [1] had not "
                                                  "finished")) as err:
        run_ranks(_rank1_hangs, 2, timeout_s=45, collective_timeout_s=5)
    assert time.monotonic() - start < 60
    assert "rank(s) [1] had not finished" in one_line(str(err.value))


def _record_pid_and_sleep(folder):
    with open(os.path.join(folder, f"rank{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is gone too
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_ranks_do_not_outlive_their_launcher(tmp_path, sig, start_method):
    """SIGTERM: the launcher terminates its ranks, then the signal ends it as it would have;
    SIGKILL (no cleanup can run): the kernel kills them (PR_SET_PDEATHSIG) - under forkserver
    once the fork server, their parent, has seen the launcher go."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'python'}{os.pathsep}{root / 'tests'}"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys, test_launch as t; from tpssm.launch import run_ranks;"
         " run_ranks(t._record_pid_and_sleep, 2, (sys.argv[1],), start_method=sys.argv[2])",
         str(tmp_path), start_method],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert launcher.poll() is None, launcher.stderr.read().decode()
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
        launcher.send_signal(getattr(signal, sig))
        code = launcher.wait(timeout=30)
        assert code == -getattr(signal, sig)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        launcher.kill()
        for p in tmp_path.glob("rank*.pid"):
            try:
                os.kill(int(p.read_text()), 9)
            except ProcessLookupError:
                pass


def test_bad_tp():
    with pytest.raises(ValueError, match="tp must be >= 1"):
        run_ranks(_sum_of_ranks, 0, (0.0,))
    with pytest.raises(ValueError, match="start_method must be one of"):
        run_ranks(_sum_of_ranks, 2, (0.0,), start_method="fork")


def test_start_method_from_the_environment(monkeypatch):
    monkeypatch.setenv("TPSSM_START_METHOD", "fork")
    with pytest.raises(ValueError, match="TPSSM_START_METHOD must be one of"):
        run_ranks(_sum_of_ranks, 2, (0.0,))
    # A spawned rank's parent is the launcher; a forkserver rank's is the fork server.
    for method, launcher_is_parent in (("spawn", True), ("forkserver", False)):
        monkeypatch.setenv("TPSSM_START_METHOD", method)
        assert [p == os.getpid() for p in run_ranks(_parent_pid, 2)] == [launcher_is_parent] * 2
