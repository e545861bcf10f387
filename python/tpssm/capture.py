"""Whether the work being issued now is captured into a graph rather than run.

Code that must act differently under capture (skip a check that reads device data on the host,
refuse to grow a buffer whose address the graph holds) asks `capturing(device)`. On CUDA that is
the capture state of the device's current stream; a capture on another device - the CPU
stand-in the test suite uses for the engine's decode graphs - marks its extent with
`marked()`."""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["capturing", "marked"]

_state = threading.local()


def capturing(device: torch.device) -> bool:
    if device.type == "cuda":
        # The current stream of `device`, which need not be the current device.
        with torch.cuda.device(device):
            return torch.cuda.is_current_stream_capturing()
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def marked():
    """Marks a non-CUDA capture on this thread for as long as the block runs."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
