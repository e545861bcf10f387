"""The repository's scripts (benchmarks/, tools/) as modules, for the tests that call their
functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def load_script(path, name: Optional[str] = None) -> ModuleType:
    """The script at `path` (absolute, or relative to the repository root, e.g.
    "benchmarks/tp_report.py") as a module named `name` (default: its file name's stem), loaded
    once: it is registered in sys.modules before it runs (dataclasses look their module up while
    it loads) and its folder is put on sys.path (scripts import their neighbours)."""
    path = ROOT / path
    name = name or path.stem
    if name not in sys.modules:
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
