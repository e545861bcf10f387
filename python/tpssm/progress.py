"""Progress output for long work (loading, benchmark sweeps), on stderr and from rank 0 only.

On a terminal the line redraws in place; elsewhere (CI logs, pipes) a line is printed at each
tenth of the way, so logs stay short.
"""

from __future__ import annotations

import os
import re
import sys
import time

__all__ = ["Progress", "ProgressSource"]


class Progress:
    def __init__(self, total: int, desc: str):
        self.total = max(1, int(total))
        self.desc = desc
        self.done = 0
        self.start = time.perf_counter()
        self.enabled = int(os.environ.get("RANK", "0")) == 0
        self.tty = sys.stderr.isatty()
        self._last_tenth = -1

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        tenth = 10 * self.done // self.total
        if self.tty or tenth != self._last_tenth:
            self._last_tenth = tenth
            elapsed = time.perf_counter() - self.start
            line = f"{self.desc}: {self.done}/{self.total} ({elapsed:.1f} s)"
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


class ProgressSource:
    """Wraps a weight source and advances a Progress as the loader moves through the layers."""

    _LAYER = re.compile(r"\.layers\.(\d+)\.")

    def __init__(self, source, num_layers: int, desc: str):
        self._source = source
        self._progress = Progress(num_layers, desc)
        self._layer = -1

    def _seen(self, name: str) -> None:
        m = self._LAYER.search(name)
        if m and int(m.group(1)) > self._layer:
            self._layer = int(m.group(1))
            self._progress.update(self._layer + 1 - self._progress.done)
        elif name.endswith(("norm_f.weight", "final_layernorm.weight", "lm_head.weight")):
            self._progress.update(self._progress.total - self._progress.done)
            self._progress.close()

    def get(self, name):
        self._seen(name)
        return self._source.get(name)

    def get_rows(self, name, ranges):
        self._seen(name)
        return self._source.get_rows(name, ranges)

    def get_cols(self, name, ranges):
        self._seen(name)
        return self._source.get_cols(name, ranges)

    def get_block(self, name, index):
        self._seen(name)
        return self._source.get_block(name, index)

    def __getattr__(self, attr):
        return getattr(self._source, attr)
