"""A benchmarks/*.py script as a module, for the studies that reuse its cases (benchmarks/
stays off sys.path: its kernels.py would shadow the `kernels` package of transformers)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType


@functools.cache
def bench(name: str) -> ModuleType:
    """benchmarks/NAME.py, loaded once by path."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", Path(__file__).parents[1] / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses of the module look themselves up there
    spec.loader.exec_module(mod)
    return mod
