"""What runs on a recalibration while serving: a speed check or re-profile every
reprofile_every-th time, a plan in the background, the move at its due step; a failure
keeps the placement in use. One part of a GemWorker (runtime.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .apply import WeightsLostError
from .background import next_delay
from .context import RankContext, ServingProgress
from .placing import Placer

logger = logging.getLogger("vllm.gem")


class Recalibration:
    """When and how a serving rank re-places: through `placer`, counting in `progress`;
    `plan_delay` (engine steps from the start of a background plan to its move) grows while
    plans are not ready in time."""

    def __init__(self, ctx: RankContext, progress: ServingProgress, placer: Placer) -> None:
        self.ctx, self.progress, self.placer = ctx, progress, placer
        self.plan_delay = ctx.cfg.plan_delay_steps

    def recalibrate(self, horizon_steps: int) -> dict[str, Any] | None:
        """Quick re-profile and re-plan while serving (from the last `horizon_steps` steps of
        routing); moves only if the predicted gain beats min_gain and its saving over
        saving_horizon (until the next recalibration, or as long as the placement in use has
        served, whichever is longer) beats the move's cost. The GPUs are re-profiled on every
        cfg.reprofile_every-th recalibration if a speed check finds one GPU's speed moved
        against the other GPUs' by more than cfg.speed_tolerance; the others re-plan with the last
        profiles. With cfg.plan_delay_steps the planning runs in the background and the plan
        is applied that many steps later (at most horizon_steps // 2; after_step). Returns the
        report (None when planning in the background, or when it failed: logged, serving goes
        on)."""
        reprofile = self.progress.recalibrations % self.ctx.cfg.reprofile_every == 0
        self.progress.recalibrations += 1
        # applied within half an interval, so the next recalibration never finds one pending
        delay = min(self.plan_delay, horizon_steps // 2)
        return self.serving_safely(lambda: self.placer.place(
            "recalibration", quick_profile=True, horizon_steps=horizon_steps, reprofile=reprofile,
            delay_steps=delay))

    def serving_safely(self, recalibration: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Run a recalibration's part and log its report; a failure keeps the placement in use
        (one warning) unless strict. Lost weights always stop the worker."""
        try:
            report = recalibration()
            if report is not None and self.ctx.rank == 0:
                logger.info("vllm-gem recalibration: %s", report)
            return report
        except WeightsLostError:  # serving on would give wrong outputs: stop the worker
            raise
        except Exception as e:  # keep serving on the last good placement
            if self.ctx.cfg.strict:
                raise
            logger.warning("vllm-gem: recalibration failed, keeping the current placement: %s", e)
            return None

    def finish_pending(self) -> dict[str, Any] | None:
        """Agree on and apply the plan a background planning produced (every rank, same step)."""
        pending, self.placer.pending = self.placer.pending, None
        t0 = time.perf_counter()
        decision, error = result = pending.wait()
        if decision is not None and not np.array_equal(
                pending.job.planned_from, self.ctx.model_state.physical_to_logical_map.cpu().numpy()):
            decision.apply = False  # a switch moved experts while this plan was made
            decision.info["move_check"] = "the map changed while planning; the plan is dropped"
        report = self.placer.agree_and_apply(result, pending.head, pending.planner, t0,
                                      stall_before=pending.stall_seconds)
        report.update(planning_wall_seconds=round(pending.wall_seconds, 3),
                      waited_seconds=round(pending.waited_seconds, 3),
                      plan_delay_steps=pending.due_step - pending.started_step)
        self.plan_delay = next_delay(self.plan_delay, pending.waited_seconds)
        return report
