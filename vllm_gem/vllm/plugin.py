"""The vLLM general plugin: installed, it only adds flags; `--plugin gem` switches GEM on.

vLLM calls `register()` in every process (API server while it builds its parser, engine
core, each worker before the model exists), possibly several times: it is idempotent and
touches no GPU. It wraps a few vLLM methods; each wrapper first checks whether this run
asked for GEM (additional_config["gem"]) and otherwise calls vLLM's method untouched.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys

from .engine import place_before_serving
from .flags import add_flags, merge_flags, prepare_engine_args
from .routing import install as install_routing

logger = logging.getLogger("vllm.gem")  # under vLLM's logger: its handler and level apply
_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    _patch_engine_args()
    _patch_worker()
    _patch_engine_core()
    install_routing()


def _patch_engine_args() -> None:
    # vLLM's modules are imported when patched, from inside register(), never before
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args  # a staticmethod: a plain function here

    def add_cli_args_with_gem(parser):
        return add_flags(add_cli_args(parser))

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_gem)

    from_cli_args = EngineArgs.from_cli_args.__func__

    @classmethod
    def from_cli_args_with_gem(cls, args):
        engine_args = from_cli_args(cls, args)
        engine_args.additional_config = merge_flags(args, engine_args.additional_config)
        return engine_args

    EngineArgs.from_cli_args = from_cli_args_with_gem

    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def create_engine_config_with_gem(self, *args, **kwargs):
        prepare_engine_args(self)
        return create_engine_config(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config_with_gem


def _after_import(module: str, patch) -> None:
    """Run patch(module) once `module` is imported, without importing it here.

    The GPU worker module is heavy; the API server and engine core never need it, so it is
    patched through an import hook in the processes that do import it.
    """
    if module in sys.modules:
        patch(sys.modules[module])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != module:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_patch(mod):
                exec_module(mod)
                patch(mod)
            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Finder())


def _patch_worker() -> None:
    _after_import("vllm.v1.worker.gpu_worker", _patch_worker_class)


def _patch_worker_class(module) -> None:
    from . import entry  # the planners (scipy, numba) load only in worker processes
    Worker = module.Worker

    load_model = Worker.load_model

    @functools.wraps(load_model)
    def load_model_with_gem(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        entry.attach(self)
        return out

    Worker.load_model = load_model_with_gem

    shutdown = Worker.shutdown

    @functools.wraps(shutdown)
    def shutdown_with_gem(self, *args, **kwargs):
        entry.detach(self)
        return shutdown(self, *args, **kwargs)

    Worker.shutdown = shutdown_with_gem

    # reachable by name through collective_rpc (and vLLM's dev-mode POST /collective_rpc)
    Worker.gem_place = lambda self, planner: entry.switch_placement(self, planner)
    Worker.gem_record = lambda self, on: entry.set_recording(self, on)


def _patch_engine_core() -> None:
    from vllm.v1.engine.core import DPEngineCoreProc, EngineCore, EngineCoreProc

    # Serving: the engine core lives in its own process and register() runs inside
    # EngineCore.__init__, too late to wrap it; the busy loop starts after it.
    for cls in (EngineCoreProc, DPEngineCoreProc):
        loop = cls.__dict__["run_busy_loop"]

        def run_busy_loop(self, _loop=loop):
            place_before_serving(self)
            return _loop(self)

        cls.run_busy_loop = functools.wraps(loop)(run_busy_loop)

    # In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0): plugins are loaded before the
    # engine core is built, so its __init__ can be wrapped.
    init = EngineCore.__init__

    @functools.wraps(init)
    def init_with_gem(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is EngineCore:
            place_before_serving(self)

    EngineCore.__init__ = init_with_gem
