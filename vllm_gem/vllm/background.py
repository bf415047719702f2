"""A recalibration's planning off the serving thread.

Rank 0 plans in a background thread while every rank keeps serving; all ranks agree on the
plan and move at a given later engine step (Recalibration.finish_pending, recalibration.py). Why a thread:
planning is numpy (mostly GIL-free) and a little Python. Beside a stand-in serving loop it cost
serving 0.012-0.035 s, against 0.30 s held for it inside the step (2 CPU cores,
benchmarks/studies/planning_overlap.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .planning import PlanDecision

PLAN_WAIT_LIMIT_S = 120.0  # how long a due background plan may hold serving (planning takes < 10 s)
WAITED_S = 0.01  # serving waited longer than this for a due plan: give the next one more steps


def next_delay(delay_steps: int, waited_s: float) -> int:
    """The next background plan's delay in engine steps: doubled while serving had to wait
    for the last one (a large model plans for seconds: 3-8 s for DeepSeek-V3-like and
    Qwen3-235B-like models, docs/scale.md), so that planning stops holding serving. The
    caller still caps it at half the recalibration interval."""
    return 2 * delay_steps if waited_s > WAITED_S else delay_steps


@dataclass
class PlanJob:
    """Rank 0's planning, ready to run on or off the serving thread."""

    run: Callable[[], tuple[PlanDecision | None, str]]  # -> (decision, '') or (None, error)
    planned_from: np.ndarray  # [layers, num_physical] the map in use when its inputs were read


class PendingPlan:
    """A recalibration being planned in a background thread (rank 0; nothing runs on the
    others), to be agreed on and applied by every rank at engine step `due_step`."""

    def __init__(self, job: PlanJob | None, head: dict[str, Any], planner: str, started_step: int,
                 due_step: int, stall_seconds: float) -> None:
        self.job, self.head, self.planner = job, head, planner
        self.started_step, self.due_step = started_step, due_step
        self.stall_seconds = stall_seconds  # serving held while the inputs were gathered
        self.result: tuple[PlanDecision | None, str] = (None, "")
        self.wall_seconds = self.waited_seconds = 0.0
        self.thread = None
        if job is not None:
            self.thread = threading.Thread(target=self._run, name="vllm-gem-planner", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        self.result = self.job.run()  # never raises: errors come back as text
        self.wall_seconds = time.perf_counter() - t0

    def wait(self, limit_s: float = PLAN_WAIT_LIMIT_S) -> tuple[PlanDecision | None, str]:
        """(decision, '') or (None, error); a planning still running after `limit_s` seconds of
        waiting is an error (its thread is left to end on its own), not a hung server."""
        if self.thread is not None:
            t0 = time.perf_counter()
            self.thread.join(limit_s)
            self.waited_seconds = time.perf_counter() - t0
            if self.thread.is_alive():
                return None, (f"planning ({self.planner}) was not done {limit_s:g} s after its due "
                              f"step; the placement in use stays")
        return self.result
