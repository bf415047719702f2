"""Exact placement by mixed-integer programming (vllm_gem.certify), for small instances.

Each layer is solved as certify.solve_layer's MILP: replicas included (a replicated expert's
tokens split evenly over its copies, as vLLM splits them), the per-rank latency model as it
is, objective = mean over the planning steps of the slowest rank's time. GEM's own plan is
the first incumbent (as the MILP's cutoff): the result is never worse than GEM's on the
planning steps, and `report` says how many layers were proven optimal and the certified
lower bound.
"""

from __future__ import annotations

import numpy as np

from ..certify import copies_to_phys_to_log, solve_layer
from ..simulate import rank_times
from .base import PlacementPolicy, PlacementProblem
from .gem import GemPolicy, sample_steps


class ExactPolicy(PlacementPolicy):
    name = "exact"

    def __init__(self, *, max_steps: int = 32, time_limit: float = 20.0, seed: int = 0) -> None:
        super().__init__(max_steps=max_steps, time_limit=time_limit, seed=seed)
        self.report: dict[str, float] = {}

    def place(self, problem: PlacementProblem) -> np.ndarray:
        """time_limit: seconds per layer."""
        loads = sample_steps(problem.loads.astype(np.float64), self.params["max_steps"],
                             self.params["seed"])
        g = problem.group
        start = GemPolicy().place(PlacementProblem(loads, g, problem.num_physical, problem.num_groups,
                                                   problem.num_nodes, problem.old_phys_to_log))
        start_us = rank_times(loads, start, g).max(-1).mean(0)  # [layers]
        out, bounds, best, proven = start.copy(), [], [], 0
        for layer in range(problem.num_layers):
            sol = solve_layer(loads[:, layer, :], g, problem.num_physical, self.params["time_limit"],
                              cutoff=float(start_us[layer]))
            if sol.copies is not None and sol.objective < start_us[layer]:
                out[layer] = copies_to_phys_to_log(sol.copies, problem.slots_per_rank)
            best.append(min(sol.objective, float(start_us[layer])))
            bounds.append(sol.bound)
            proven += sol.proven
        self.report = {"proven_layers": proven, "layers": problem.num_layers,
                       "planning_us": float(np.mean(best)), "certified_bound_us": float(np.mean(bounds)),
                       "gem_start_us": float(start_us.mean())}
        return out
