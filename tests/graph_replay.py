"""A CPU stand-in for a captured CUDA graph, so that the engine's graph decode path runs in the
CPU suite with the semantics a real capture imposes.

`ReplayGraphCapture` has the interface of `tpssm.engine.CudaGraphCapture`. Its capture records
every operator the step dispatches (ATen, tpssm and c10d ops) with the very tensors it used;
a replay runs that record again on those tensors and nothing else. What a CUDA graph freezes is
frozen here too:
- Python runs only at capture: branches taken, Python numbers and counters, tensors allocated,
  host-side values all stay as they were then.
- Tensors keep their addresses: a replayed op writes its result into the tensor it produced at
  capture; views made at capture keep aliasing the same storage.
- Capture computes nothing that lasts: storages that existed before it and were written during
  it get their contents back at its end, and storages it allocated are filled with 0xFF bytes
  (NaN in floating point, -1 in integers), so a result the replay does not recompute shows.
- Reading device data on the host while capturing (.item(), .tolist(), .cpu(), .numpy(),
  data-dependent output shapes, boolean-mask indexing) raises, as it fails a CUDA capture; so
  does building a tensor from host data (torch.tensor of a list: a pageable copy on CUDA).
What it cannot see: the CUDA-only branches of the code (it runs the CPU path), allocator and
stream rules, copies to the host spelled .to("cpu") (a no-op between CPU tensors), and host
reads of CPU tensors that bypass both the dispatcher and the patched methods.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tpssm import capture as tpssm_capture

__all__ = ["CaptureError", "ReplayGraphCapture"]


class CaptureError(RuntimeError):
    """The captured step did something a CUDA graph capture refuses."""


_aten = torch.ops.aten
# Operators that read device values on the host or size their output from the data: each
# synchronises with the device, which a CUDA capture forbids.
_HOST_READS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
    _aten.equal.default, _aten.is_nonzero.default, _aten._unique.default,
    _aten._unique2.default, _aten.unique_consecutive.default, _aten.unique_dim.default,
    _aten.repeat_interleave.Tensor, _aten.bincount.default,
}
# Indexing with a boolean mask sizes its result (or its write) from the mask's values.
_MASK_INDEXING = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
                  _aten._index_put_impl_.default}
# A tensor built from host data (a Python list, a NumPy array): on CUDA a pageable host copy,
# which a capture refuses; its values would be frozen into the graph anyway.
_HOST_DATA = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
# Tensor methods that bring device data to the host without passing the dispatcher on CPU.
_HOST_METHODS = ("tolist", "numpy", "cpu", "__array__")


def _tensors(value) -> List[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _bound_arguments(func, args, kwargs):
    """(schema argument, value) for every argument the call passed."""
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            yield arg, args[i]
        elif arg.name in kwargs:
            yield arg, kwargs[arg.name]


def _indexes_by_mask(func, args) -> bool:
    indices = args[1] if func in _MASK_INDEXING and len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices)


def _per_return(func, result) -> tuple:
    """result as one entry per schema return (a single Tensor[] return is one entry)."""
    return tuple(result) if len(func._schema.returns) > 1 else (result,)


def _is_collective(func) -> bool:
    return func.namespace == "c10d"


def _written(func, args, kwargs) -> List[torch.Tensor]:
    """Tensors the op writes in place. c10d's schemas carry no alias annotations: a collective
    writes the tensors it is given."""
    if _is_collective(func):
        return _tensors((args, kwargs))
    return [t for arg, value in _bound_arguments(func, args, kwargs)
            if arg.alias_info is not None and arg.alias_info.is_write for t in _tensors(value)]


def _is_view(func) -> bool:
    returns = func._schema.returns
    return (not _is_collective(func) and bool(returns)
            and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


def _fresh_returns(func) -> List[bool]:
    """Per return: True when it is a new tensor (not an alias of an argument)."""
    if _is_collective(func):
        return [False] * len(func._schema.returns)
    return [r.alias_info is None for r in func._schema.returns]


def _wait_for_work(result) -> None:
    for item in tree_flatten(result)[0]:
        if isinstance(item, torch.ScriptObject) and item._has_method("wait"):
            item.wait()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[Tuple[Any, tuple, dict, Any]] = []
        self.created: Dict[int, torch.UntypedStorage] = {}
        self.saved: Dict[int, Tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            raise CaptureError(f"{func} reads device data on the host during graph capture")
        if func in _HOST_DATA:
            raise CaptureError("a tensor built from host data (torch.tensor / as_tensor of "
                               "Python or NumPy values) during graph capture")
        if _indexes_by_mask(func, args):
            raise CaptureError(f"{func} with a boolean mask reads device data on the host "
                               "during graph capture (its size depends on the mask)")
        for t in _written(func, args, kwargs):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.created and key not in self.saved:
                self.saved[key] = (storage, storage.clone())
        result = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, result))
        if not _is_view(func):
            # A return that shares an argument's storage (an alias the schema does not
            # annotate, e.g. _unsafe_view) is not new memory.
            inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            for fresh, value in zip(_fresh_returns(func), _per_return(func, result)):
                for t in _tensors(value) if fresh else ():
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    if key and key not in inputs:
                        self.created.setdefault(key, storage)
        return result


def _refuse_host_read(name):
    def method(self, *args, **kwargs):
        raise CaptureError(f"Tensor.{name}() reads device data on the host during graph "
                           "capture")
    return method


class ReplayGraphCapture:
    """See the module docstring. Interface of tpssm.engine.CudaGraphCapture."""

    def __init__(self):
        self.ops: List[Tuple[Any, tuple, dict, Any]] = []
        self.replays = 0
        self._inference = False

    @staticmethod
    def host_buffer(size: int, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
        return torch.full((size,), fill, dtype=dtype)

    def capture(self, step):
        for _ in range(2):  # the warm-up runs eagerly, as before a CUDA capture
            step()
        recorder = _Recorder()
        originals = {name: getattr(torch.Tensor, name) for name in _HOST_METHODS}
        self._inference = torch.is_inference_mode_enabled()
        try:
            for name in _HOST_METHODS:
                setattr(torch.Tensor, name, _refuse_host_read(name))
            with tpssm_capture.marked(), recorder:
                outputs = step()
            for storage in recorder.created.values():
                storage.fill_(0xFF)
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)
            # A capture, failed or not, leaves the memory that was there as it found it.
            for storage, backup in recorder.saved.values():
                storage.copy_(backup)
        self.ops = recorder.ops
        return outputs

    def replay(self) -> None:
        grad_mode = torch.inference_mode() if self._inference else torch.no_grad()
        with grad_mode:
            for func, args, kwargs, recorded in self.ops:
                if _is_view(func):
                    continue  # the view made at capture still aliases the same storage
                result = func(*args, **kwargs)
                _wait_for_work(result)
                for fresh, new, old in zip(_fresh_returns(func), _per_return(func, result),
                                           _per_return(func, recorded)):
                    if not fresh:
                        continue
                    for n, o in zip(_tensors(new), _tensors(old)):
                        if n.shape != o.shape:
                            raise CaptureError(f"{func} returned shape {tuple(n.shape)} on "
                                               f"replay, {tuple(o.shape)} at capture")
                        o.copy_(n)
        self.replays += 1

    def wait(self) -> None:
        """Replays run synchronously on the CPU: nothing to wait for."""
