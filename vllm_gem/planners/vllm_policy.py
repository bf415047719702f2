"""vLLM's own EPLB policy class, read from the installed vllm package's files.

vLLM's `distributed/eplb/policy/abstract.py` and `default.py` need only numpy and torch, but
importing them as `vllm.distributed.eplb.policy.default` first runs `vllm/__init__` and
`vllm.distributed`, which need vLLM's whole dependency set (transformers, pydantic, zmq, ...)
and seconds of imports. So where vLLM is not imported already, the two files are executed as
they are under a private package name: vLLM's code, not a copy of it, with vllm installed
with or without its dependencies (the demo's set-up installs it with `--no-deps`).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_PACKAGE = "vllm_gem._vllm_eplb_policy"


def default_eplb_policy() -> type:
    """vLLM's DefaultEplbPolicy class (ImportError when vllm or torch is not installed)."""
    imported = sys.modules.get("vllm.distributed.eplb.policy.default")
    if imported is not None:  # inside a vLLM server: the class vLLM itself uses
        return imported.DefaultEplbPolicy
    if f"{_PACKAGE}.default" not in sys.modules:
        spec = importlib.util.find_spec("vllm")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("No module named 'vllm'")
        folder = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "eplb" / "policy"
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]  # default.py's `from .abstract import ...` resolves here
        sys.modules[_PACKAGE] = package
        try:
            for name in ("abstract", "default"):
                file_spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}",
                                                                   folder / f"{name}.py")
                if file_spec is None:
                    raise ImportError(f"vllm {folder / name}.py is missing")
                module = importlib.util.module_from_spec(file_spec)
                sys.modules[file_spec.name] = module
                file_spec.loader.exec_module(module)
        except BaseException:
            for name in (f"{_PACKAGE}.default", f"{_PACKAGE}.abstract", _PACKAGE):
                sys.modules.pop(name, None)
            raise
    return sys.modules[f"{_PACKAGE}.default"].DefaultEplbPolicy
