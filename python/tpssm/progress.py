"""Progress output for long work (loading, benchmark sweeps), on stderr and from rank 0 only.

On a terminal the line redraws in place; elsewhere (CI logs, pipes) a line is printed at each
tenth of the way, so logs stay short. Each line says how much is left: the count still to do
and, once a step has finished, an estimate of the time (the mean time per step so far).
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "ProgressSource"]


class Progress:
    """Counts `total` units. unit="" prints "3/8"; unit="%" prints a percentage (for counts
    that mean nothing to a reader, such as weight elements). Nothing is printed before
    `quiet_s` seconds have passed: work that ends sooner needs no progress line."""

    def __init__(self, total: int, desc: str, unit: str = "", quiet_s: float = 0.0):
        self.total = max(1, int(total))
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.start = time.perf_counter()
        self.enabled = int(os.environ.get("RANK", "0")) == 0
        self.tty = sys.stderr.isatty()
        self.quiet_s = quiet_s
        self._last_tenth = 0
        self._printed = False
        self._closed = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.unit == "%":
            count = f"{100 * self.done // self.total}%"
        else:
            count = f"{self.done}/{self.total}{self.unit}"
        text = f"{self.desc}: {count} ({elapsed:.1f} s"
        if 0 < self.done < self.total:
            left = elapsed * (self.total - self.done) / self.done
            text += f", ~{left:.0f} s left"
        return text + ")"

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled or self._closed:
            return
        if time.perf_counter() - self.start < self.quiet_s:
            return
        tenth = 10 * self.done // self.total
        if self.tty or tenth != self._last_tenth or not self._printed:
            self._last_tenth = tenth
            self._printed = True
            line = self.line()
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def stop(self) -> None:
        """Ends the work unfinished (an error): a line redrawn on a terminal gets its newline,
        so what is printed next starts a line of its own; nothing claims completion."""
        if self.enabled and self.tty and self._printed and not self._closed:
            print(file=sys.stderr, flush=True)
        self._closed = True

    def close(self) -> None:
        """Marks the work complete (its final line says so when it had not yet)."""
        if self._closed:
            return
        if self._printed:
            self.update(self.total - self.done)
        self.done = self.total
        self._closed = True
        if self.enabled and self.tty and self._printed:
            print(file=sys.stderr, flush=True)


class ProgressSource:
    """A weight source that advances a Progress by the elements it serves.

    A source that generates its tensors (RandomWeightSource) reports every generated chunk
    through its `on_generated` hook, so a tensor that takes a minute to generate (a large
    vocabulary's embedding on a CPU) shows progress while it is made; other sources are counted
    per tensor read. Use as a context manager: leaving it completes the progress line (the total
    is an estimate - the elements of the rank's parameters and buffers - which a source that
    serves a tensor twice, or a tensor the model converts, can miss in either direction).
    """

    def __init__(self, source, total_elements: int, desc: str):
        self._source = source
        self._progress = Progress(total_elements, desc, unit="%", quiet_s=2.0)
        self._reports_itself = hasattr(source, "on_generated")
        if self._reports_itself:
            source.on_generated = self._progress.update

    def __enter__(self) -> "ProgressSource":
        return self

    def __exit__(self, *exc) -> None:
        if self._reports_itself:
            self._source.on_generated = None
        if exc[0] is None:
            self._progress.close()

    def _served(self, t):
        if not self._reports_itself:
            self._progress.update(t.numel())
        return t

    def get(self, name):
        return self._served(self._source.get(name))

    def get_rows(self, name, ranges):
        return self._served(self._source.get_rows(name, ranges))

    def get_cols(self, name, ranges):
        return self._served(self._source.get_cols(name, ranges))

    def get_block(self, name, index):
        return self._served(self._source.get_block(name, index))

    def __getattr__(self, attr):
        return getattr(self._source, attr)
