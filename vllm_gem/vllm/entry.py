"""What vLLM calls in a worker process: `attach` after the model is loaded, `detach` at
shutdown, and the collective_rpc targets (the placement before the first request, A/B
switches `gem_place`, the recorder switch `gem_record`). This module owns the process's one
GemWorker (`current()`); runtime.py builds it and knows nothing of this module."""

from __future__ import annotations

import logging
import signal
from typing import Any

from ..calibrate import gather_objects
from .apply import WeightsLostError
from .config import ON_WORDS, from_additional
from .emulate import slow_down_experts
from .runtime import GemWorker

logger = logging.getLogger("vllm.gem")

_WORKER: GemWorker | None = None


def current() -> GemWorker | None:
    """This process's GemWorker, or None where GEM is not active."""
    return _WORKER


def attach(worker: Any) -> None:
    """After Worker.load_model: build this rank's GemWorker if GEM is asked for."""
    global _WORKER
    cfg = from_additional(worker.vllm_config.additional_config)
    if cfg is None:
        return
    try:
        _WORKER = GemWorker.of_vllm_worker(worker, cfg)
        if cfg.emulate_slowdown.get(_WORKER.ctx.rank):
            slow_down_experts(cfg.emulate_slowdown[_WORKER.ctx.rank])
        try:
            signal.signal(signal.SIGUSR1, _request_dump)
        except ValueError:  # not the main thread: dumps then happen at shutdown only
            pass
    except Exception as e:
        if cfg.strict:
            raise
        logger.warning("vllm-gem: not active on this worker (%s); serving on vLLM's placement", e)
        _WORKER = None


def _request_dump(signum, frame) -> None:
    if _WORKER is not None:
        _WORKER.dump_requested = True  # written after the current step, not inside a handler


def detach(worker: Any) -> None:
    """Worker shutdown: write the recorder's trace if a trace_dir is set."""
    if _WORKER is not None:
        try:
            _WORKER.dump_trace("shutdown")
        except Exception as e:
            logger.warning("vllm-gem: could not write the routing trace at shutdown: %s", e)


def _inactive_ranks() -> str:
    """'' when GEM is active on every EP rank, else which ranks it is not active on.

    Collective: a rank whose GemWorker could not be built must not leave the others waiting
    in a collective it never joins, so all ranks first agree.
    """
    w = current()
    if w is not None:
        group = w.ctx.ep.cpu_group
    else:
        from vllm.distributed.parallel_state import get_ep_group  # vLLM only where GEM runs in it
        group = get_ep_group().cpu_group
    why = "" if w is not None else "GEM is not active on this worker"
    states = gather_objects(why, group)
    return "; ".join(f"rank {r}: {s}" for r, s in enumerate(states) if s)


def place_at_start(worker: Any) -> dict[str, Any]:
    """collective_rpc target: the one placement before the first request."""
    missing = _inactive_ranks()
    if missing:
        return {"applied": False, "why": missing}
    w = current()
    if not w.ctx.cfg.place:
        w.progress.started = True
        return {"applied": False, "why": "place=false: recording only"}
    try:
        report = w.placer.place("start")
    except WeightsLostError as e:  # the engine core refuses to serve on it (engine.py)
        report = {"applied": False, "weights_lost": str(e)}
    except Exception as e:
        if w.ctx.cfg.strict:
            raise
        report = {"applied": False, "why": f"{type(e).__name__}: {e}"}
    w.progress.started = True
    return report


def switch_placement(worker: Any, planner: str) -> dict[str, Any]:
    """collective_rpc target `gem_place` (HTTP: POST /collective_rpc with VLLM_SERVER_DEV_MODE=1):
    re-place now with `planner`, from the start-up's GPU profiles and routing history;
    'initial' restores vLLM's start map. For A/B benchmarks inside one server: every placement
    runs on the same compiled model, CUDA graphs and GPUs. Not a serving feature."""
    missing = _inactive_ranks()
    if missing:
        return {"applied": False, "why": missing}
    w = current()
    try:
        report = w.placer.place("switch", switch_to=planner)
    except WeightsLostError:  # serving on would give wrong outputs: stop the worker
        raise
    except Exception as e:  # the placement in use stays (apply_placement undoes a failed move)
        return {"applied": False, "planner": planner, "why": f"{type(e).__name__}: {e}"}
    if w.ctx.rank == 0:
        logger.info("vllm-gem switch to %s: %s", planner, report)
    return report


def set_recording(worker: Any, on: str | bool) -> dict[str, Any]:
    """collective_rpc target `gem_record`: turn the routing recorder on or off (its overhead,
    measured inside one server). `on` is a string when it comes over HTTP."""
    w = current()
    if w is None:
        return {"recording": False, "why": "GEM is not active on this worker"}
    w.ctx.cfg.record = on if isinstance(on, bool) else on.strip().lower() in ON_WORDS
    return {"recording": w.ctx.cfg.record}
