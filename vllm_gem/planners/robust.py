"""Robust placement: plan for the GPUs' speeds as they may really be, not only as profiled.

A profile is off by its own error (held-out calibration error 2-4% RMS, clocks and
temperature drifting), and GEM balances ranks so exactly that a rank slower than believed by
a few percent becomes the straggler of every layer. A RobustPolicy wraps a planner and, where
the group's models carry errors (GroupModel.errors, from each profile's `error`):

1. plans candidates: the inner planner on the group as fitted and with its speed differences
   shrunk toward the mean (GroupModel.shrunk, alpha in ALPHAS: trusting the profiled
   differences less), plus the reference planner's plan (vLLM's token-balancing policy);
2. scores every candidate on the planning steps under `scenarios` draws of true speeds,
   each rank's speed times 1 + N(0, its error) (GroupModel.perturbed), the same draws for all;
3. keeps the candidate with the least expected slowest-rank time among those that are never
   more than `tolerance` slower than the reference in any draw (the reference always is).

With no error (all zeros, or speeds given as exact) it returns the inner planner's plan
unchanged: today's plans, slot for slot. docs/design.md says why this objective and these
candidates, with the numbers that decided them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..latency import GroupModel
from ..simulate import scenario_times
from .base import PlacementPolicy, PlacementProblem, PlannerUnavailable

ALPHAS = (1.0, 0.75, 0.5, 0.25, 0.0)  # how much of the profiled speed differences a candidate trusts
MAX_SCORING_STEPS = 32  # steps the candidates are scored on (spread evenly over the history)


class RobustPolicy(PlacementPolicy):
    """A planner made robust to speed errors by scenario scoring of candidate plans."""

    def __init__(self, make_inner: Callable[[], PlacementPolicy], reference: PlacementPolicy | None,
                 *, scenarios: int = 64, tolerance: float = 0.005, seed: int = 0,
                 speed_error: float | None = None) -> None:
        inner = make_inner()
        self.name = inner.name
        super().__init__(**inner.params, scenarios=scenarios, robust_tolerance=tolerance,
                         speed_error=speed_error)
        self._make_inner, self._reference = make_inner, reference
        self._seed = seed
        self.report: dict[str, Any] = {}

    def place(self, problem: PlacementProblem) -> np.ndarray:
        p = self.params
        group = problem.group if p["speed_error"] is None else problem.group.with_errors(p["speed_error"])
        if group.max_error == 0.0 or group.num_ranks == 1:  # exact speeds: the inner plan as it is
            inner = self._make_inner()
            plan = inner.place(problem)
            self.report = dict(getattr(inner, "report", {}))
            return plan
        t0 = time.perf_counter()
        candidates: dict[str, np.ndarray] = {}
        reports: dict[str, dict] = {}
        for alpha in ALPHAS:
            inner = self._make_inner()
            shrunk = PlacementProblem(problem.loads, group.shrunk(alpha), problem.num_physical,
                                      problem.num_groups, problem.num_nodes, problem.old_phys_to_log)
            candidates[f"alpha {alpha:g}"] = inner.place(shrunk)
            reports[f"alpha {alpha:g}"] = dict(getattr(inner, "report", {}))
        if self._reference is not None:
            try:
                candidates["reference"] = self._reference.place(problem)
            except PlannerUnavailable:  # vLLM not importable: no constraint against its plan
                pass
        steps = problem.loads.shape[0]
        idx = np.unique(np.linspace(0, steps - 1, min(steps, MAX_SCORING_STEPS)).round().astype(int))
        loads = problem.loads[idx]
        truths = group.perturbed(p["scenarios"], self._seed)
        scores = {k: scenario_times(loads, v, truths) for k, v in candidates.items()}
        base = scores.get("reference")
        worst = {k: float((s / base).max()) if base is not None else float("nan") for k, s in scores.items()}
        allowed = [k for k in candidates if base is None or worst[k] <= 1.0 + p["robust_tolerance"]]
        choice = min(allowed, key=lambda k: (scores[k].mean(), k != "reference"))
        self.report = dict(reports.get(choice, {}))
        self.report["robust"] = {
            "choice": choice, "speed_errors": group.errors.round(4).tolist(), "scenarios": p["scenarios"],
            "scoring_steps": len(idx), "tolerance": p["robust_tolerance"],
            "seconds": time.perf_counter() - t0,
            "candidates": {k: {"expected_us": float(scores[k].mean()), "worst_draw_us": float(scores[k].max()),
                               "worst_vs_reference": worst[k]} for k in candidates},
        }
        return candidates[choice]
