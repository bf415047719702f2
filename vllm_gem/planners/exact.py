"""GEM's plan improved by the certificate's search (vllm_gem.certify), for small instances.

certify.certify runs on GEM's plan for `time_limit` seconds per layer (in all, spent where
the gap is): the relaxation and, where it is solved, the exact MILP (replicas split evenly,
the per-rank latency model as it is, objective = mean over the planning steps of the slowest
rank's time), each solution's copies scored as a real placement. The best plan per layer is
kept: never worse than GEM's on the planning steps, and `report` says how many layers were
proven optimal and the certified lower bound.
"""

from __future__ import annotations

import numpy as np

from ..certify import certify
from .base import PlacementPolicy, PlacementProblem
from .gem import GemPolicy, sample_steps


class ExactPolicy(PlacementPolicy):
    name = "exact"

    def __init__(self, *, max_steps: int = 32, time_limit: float = 20.0, seed: int = 0) -> None:
        super().__init__(max_steps=max_steps, time_limit=time_limit, seed=seed)
        self.report: dict[str, float] = {}

    def place(self, problem: PlacementProblem) -> np.ndarray:
        """time_limit: seconds per layer (certify spends them where the gap is)."""
        loads = sample_steps(problem.loads.astype(np.float64), self.params["max_steps"],
                             self.params["seed"])
        g = problem.group
        start = GemPolicy().place(PlacementProblem(loads, g, problem.num_physical, problem.num_groups,
                                                   problem.num_nodes, problem.old_phys_to_log))
        cert = certify(loads, start, g, self.params["time_limit"] * problem.num_layers)
        self.report = {"proven_layers": cert.proven_layers, "layers": problem.num_layers,
                       "planning_us": cert.best_us, "certified_bound_us": cert.bound_us,
                       "gem_start_us": cert.plan_us}
        return cert.best_phys_to_log
