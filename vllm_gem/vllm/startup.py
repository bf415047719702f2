"""What runs at start and on request: the placement before the first request, A/B switches
(`gem_place`) and the recorder switch (`gem_record`), as collective_rpc targets. Each reads
the worker's GemWorker through runtime.current()."""

from __future__ import annotations

import logging
from typing import Any

from ..calibrate import gather_objects
from .apply import WeightsLostError
from .config import ON_WORDS

logger = logging.getLogger("vllm.gem")


def _worker():
    """This process's GemWorker, or None (runtime imports this module: looked up late)."""
    from .runtime import current
    return current()


def _inactive_ranks() -> str:
    """'' when GEM is active on every EP rank, else which ranks it is not active on.

    Collective: a rank whose GemWorker could not be built must not leave the others waiting
    in a collective it never joins, so all ranks first agree.
    """
    w = _worker()
    if w is not None:
        group = w.ep.cpu_group
    else:
        from vllm.distributed.parallel_state import get_ep_group
        group = get_ep_group().cpu_group
    why = "" if w is not None else "GEM is not active on this worker"
    states = gather_objects(why, group)
    return "; ".join(f"rank {r}: {s}" for r, s in enumerate(states) if s)


def place_at_start(worker: Any) -> dict[str, Any]:
    """collective_rpc target: the one placement before the first request."""
    missing = _inactive_ranks()
    if missing:
        return {"applied": False, "why": missing}
    w = _worker()
    if not w.cfg.place:
        w.started = True
        return {"applied": False, "why": "place=false: recording only"}
    try:
        report = w.place("start")
    except WeightsLostError as e:  # the engine core refuses to serve on it (engine.py)
        report = {"applied": False, "weights_lost": str(e)}
    except Exception as e:
        if w.cfg.strict:
            raise
        report = {"applied": False, "why": f"{type(e).__name__}: {e}"}
    w.started = True
    return report


def switch_placement(worker: Any, planner: str) -> dict[str, Any]:
    """collective_rpc target `gem_place` (HTTP: POST /collective_rpc with VLLM_SERVER_DEV_MODE=1):
    re-place now with `planner`, from the start-up's GPU profiles and routing history;
    'initial' restores vLLM's start map. For A/B benchmarks inside one server: every placement
    runs on the same compiled model, CUDA graphs and GPUs. Not a serving feature."""
    missing = _inactive_ranks()
    if missing:
        return {"applied": False, "why": missing}
    w = _worker()
    try:
        report = w.place("switch", switch_to=planner)
    except WeightsLostError:  # serving on would give wrong outputs: stop the worker
        raise
    except Exception as e:  # the placement in use stays (apply_placement undoes a failed move)
        return {"applied": False, "planner": planner, "why": f"{type(e).__name__}: {e}"}
    if w.rank == 0:
        logger.info("vllm-gem switch to %s: %s", planner, report)
    return report


def set_recording(worker: Any, on: str | bool) -> dict[str, Any]:
    """collective_rpc target `gem_record`: turn the routing recorder on or off (its overhead,
    measured inside one server). `on` is a string when it comes over HTTP."""
    if _worker() is None:
        return {"recording": False, "why": "GEM is not active on this worker"}
    _worker().cfg.record = on if isinstance(on, bool) else on.strip().lower() in ON_WORDS
    return {"recording": _worker().cfg.record}
