"""Progress lines: a long load reports within a tensor, counts say how much is left, short work
prints nothing."""

import torch

from tpssm.presets import RandomWeightSource, preset_config
from tpssm.progress import Progress, ProgressSource


def test_random_weight_load_reports_within_one_tensor():
    """The embedding of a 50K-token vocabulary is one tensor: its chunks advance the progress
    while it is generated, not only once it is done."""
    config = preset_config("mamba-2.8b", num_layers=1)
    source = RandomWeightSource(config, seed=0)
    rows, width = 1024, config.hidden_size
    seen = []
    with ProgressSource(source, rows * width, "load") as tracked:
        hook = source.on_generated
        source.on_generated = lambda n: (seen.append(n), hook(n))
        t = tracked.get_rows("backbone.embeddings.weight", [(0, rows)])
        assert tracked._progress.done == rows * width
    assert t.shape == (rows, width)
    assert len(seen) > 1 and sum(seen) == rows * width  # several chunks, all counted
    assert source.on_generated is None  # the hook is released with the progress


def test_progress_lines_say_what_is_left(capsys):
    p = Progress(4, "bench tp 1", unit=" points")
    p.update()
    line = capsys.readouterr().err.strip()
    assert line.startswith("bench tp 1: 1/4 points (") and "s left)" in line
    p.close()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bench tp 1: 4/4 points (") and "left" not in last


def test_quick_work_prints_nothing(capsys):
    p = Progress(100, "load", unit="%", quiet_s=60.0)
    for _ in range(100):
        p.update()
    p.close()
    assert capsys.readouterr().err == ""


def test_checkpoint_reads_are_counted_per_tensor():
    from tpssm.models.weights import DictSource

    source = DictSource({"a": torch.zeros(3, 4), "b": torch.zeros(5)})
    with ProgressSource(source, 17, "load") as tracked:
        tracked.get_rows("a", [(0, 2)])
        assert tracked._progress.done == 8
        tracked.get("b")
        assert tracked._progress.done == 13
    assert tracked._progress.done == 17  # leaving completes it (quietly: it was quick)


def test_stopped_work_ends_its_line_without_claiming_completion(capsys):
    """An error part way: on a terminal the redrawn line gets its newline (the error starts a
    line of its own) and no 4/4 line is printed; elsewhere nothing more is printed."""
    for tty in (True, False):
        p = Progress(4, "scoring", unit=" tokens")
        p.tty = tty
        p.update()
        p.stop()
        p.close()  # a close after a stop prints nothing either
        err = capsys.readouterr().err
        assert "1/4 tokens" in err and "4/4" not in err
        assert err.endswith("\n")
        assert err.count("\n") == 1
