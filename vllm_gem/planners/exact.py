"""Exact placement for small instances, by mixed-integer programming (scipy.optimize.milp).

Without replicas each expert sits whole on one rank, so its cost on rank g in step s is a
constant ``w[g, s, e]`` and the expected slowest-rank time is linear in binary variables:

    minimise  (1/S) sum_s z_s
    s.t.      z_s >= fixed_g + sum_e w[g, s, e] x[e, g]     for every step s and rank g
              sum_g x[e, g] = 1  (each expert once),  sum_e x[e, g] = slots  (equal slots)

This measures the heuristics' gap on instances HiGHS can solve (tens of experts, a few ranks).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, vstack

from ..errors import GemInputError
from .base import PlacementPolicy, PlacementProblem, ranks_to_phys_to_log
from .gem import sample_steps


class ExactPolicy(PlacementPolicy):
    name = "exact"

    def __init__(self, *, max_steps: int = 32, time_limit: float = 20.0, seed: int = 0) -> None:
        super().__init__(max_steps=max_steps, time_limit=time_limit, seed=seed)
        self.report: dict[str, float] = {}

    def place(self, problem: PlacementProblem) -> np.ndarray:
        if problem.num_physical != problem.num_experts:
            raise GemInputError("planner", "num_physical", f"is {problem.num_physical}",
                                f"{problem.num_experts}: the exact planner handles no replicas")
        loads = sample_steps(problem.loads.astype(np.float64), self.params["max_steps"],
                             self.params["seed"])
        g = problem.group
        rank_of = np.empty((problem.num_layers, problem.num_experts), dtype=np.int64)
        gaps = []
        for layer in range(problem.num_layers):
            feat = g.item_features(loads[:, layer, :])  # [S, E, 3]
            w = np.einsum("sef,gf->gse", feat, g.slot_coef)  # [G, S, E]
            rank_of[layer], gap = self._solve(w, g.fixed, problem.slots_per_rank)
            gaps.append(gap)
        self.report = {"max_mip_gap": float(max(gaps))}
        log = np.broadcast_to(np.arange(problem.num_experts), rank_of.shape)
        return ranks_to_phys_to_log(np.ascontiguousarray(log), rank_of, g.num_ranks)

    def _solve(self, w: np.ndarray, fixed: np.ndarray, slots: int) -> tuple[np.ndarray, float]:
        ranks, steps, experts = w.shape
        nx = experts * ranks  # x[e, g] at e * ranks + g, then z[s]
        cost = np.concatenate([np.zeros(nx), np.full(steps, 1.0 / steps)])
        e_idx, g_idx = np.divmod(np.arange(nx), ranks)
        one_rank = coo_matrix((np.ones(nx), (e_idx, np.arange(nx))), shape=(experts, nx + steps))
        equal = coo_matrix((np.ones(nx), (g_idx, np.arange(nx))), shape=(ranks, nx + steps))
        # row (s, g): sum_e w[g,s,e] x[e,g] - z_s <= -fixed_g
        r = np.repeat(np.arange(steps * ranks), experts)
        s_of, g_of = np.divmod(r, ranks)
        e_of = np.tile(np.arange(experts), steps * ranks)
        vals = w[g_of, s_of, e_of]
        cols = e_of * ranks + g_of
        zr = np.arange(steps * ranks)
        time_rows = coo_matrix(
            (np.concatenate([vals, -np.ones(steps * ranks)]),
             (np.concatenate([r, zr]), np.concatenate([cols, nx + zr // ranks]))),
            shape=(steps * ranks, nx + steps))
        cons = [LinearConstraint(vstack([one_rank, equal]).tocsr(),
                                 np.concatenate([np.ones(experts), np.full(ranks, slots)]),
                                 np.concatenate([np.ones(experts), np.full(ranks, slots)])),
                LinearConstraint(time_rows.tocsr(), -np.inf, np.tile(-fixed, steps))]
        integrality = np.concatenate([np.ones(nx), np.zeros(steps)])
        lb = np.zeros(nx + steps)
        ub = np.concatenate([np.ones(nx), np.full(steps, np.inf)])
        res = milp(cost, constraints=cons, integrality=integrality, bounds=Bounds(lb, ub),
                   options={"time_limit": self.params["time_limit"]})
        if res.x is None:
            raise RuntimeError(f"MILP found no placement: {res.message}")
        x = res.x[:nx].reshape(experts, ranks)
        gap = getattr(res, "mip_gap", 0.0) or 0.0
        return x.argmax(1), float(gap)
