"""Exact placement by mixed-integer programming, and the certified lower bound it proves.

The problem GEM solves, per MoE layer, as a MILP (scipy.optimize.milp, HiGHS). An expert e
with k copies gives each copy loads[s, e] / k tokens in step s (vLLM splits a replicated
expert's tokens evenly over its copies), so one copy of it on rank g costs the constant

    w[k, g, s, e] = coef_g . (active, ceil(t / BLOCK_M), t)  at  t = loads[s, e] / k

and the latency model stays exactly the simulator's (simulate.rank_times). Variables:
n[e, g, k] integer copies of e on rank g when e has k copies in all, u[e, k] binary (e has
k copies), z[s] the slowest rank's time in step s:

    minimise  (1/S) sum_s z_s
    s.t.      z_s >= fixed_g + sum_{e,k} w[k, g, s, e] n[e, g, k]    every step s, rank g
              sum_g n[e, g, k] = k u[e, k],   sum_k u[e, k] = 1      every expert e
              sum_{e,k} n[e, g, k] = slots per rank                  every rank g

A known placement (GEM's) enters as the cutoff `objective <= its value`. HiGHS then searches
only for better placements, and its proven dual bound d holds for every placement with
those slots: one that is not better than the cutoff is at least the cutoff >= d. So
min(d, cutoff) is a certified lower bound on the mean slowest-rank time of *any* placement
on these loads, and the plan in hand is certified within (its time / bound - 1) of optimal.
The certificate reports the larger of that and the existing bounds (bounds.lower_bounds:
per-step and static, also valid for any placement), and the MILP's own bound beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix, vstack

from .bounds import lower_bounds
from .formats import ranks_to_phys_to_log
from .latency import GroupModel
from .simulate import rank_times


@dataclass
class LayerSolution:
    """One layer's MILP outcome. copies: [experts, ranks] copies of each expert on each rank
    (the best placement found, or None); objective: its mean slowest-rank time (us);
    bound: a certified lower bound on every placement's (us); proven: optimal within HiGHS's
    relative gap tolerance (1e-4)."""

    copies: np.ndarray | None
    objective: float
    bound: float
    proven: bool
    seconds: float


def copy_costs(loads: np.ndarray, group: GroupModel, max_copies: int) -> np.ndarray:
    """loads: [steps, experts] one layer -> w: [max_copies, ranks, steps, experts], the cost
    of one copy of expert e on rank g in step s when e has k + 1 copies (slot cost, no fixed)."""
    k = np.arange(1, max_copies + 1, dtype=np.float64)[:, None, None]
    feat = group.item_features(loads[None] / k)  # [K, S, E, 3]
    return np.einsum("ksef,gf->kgse", feat, group.slot_coef)


def solve_layer(loads: np.ndarray, group: GroupModel, num_physical: int, time_limit: float,
                cutoff: float | None = None) -> LayerSolution:
    """The MILP above for one layer. loads: [steps, experts]; cutoff: the mean slowest-rank
    time of a known placement (searched below it; the bound then counts it, see the module)."""
    t0 = time.perf_counter()
    steps, experts = loads.shape
    ranks = group.num_ranks
    slots = num_physical // ranks
    max_copies = 1 + num_physical - experts  # every other expert keeps one copy
    w = copy_costs(loads, group, max_copies)  # [K, G, S, E]
    nk = experts * max_copies
    nx = nk * ranks  # n[e, g, k] at ((e * K) + k - 1) * G + g
    nu = nk  # u[e, k] at nx + e * K + k - 1
    nvar = nx + nu + steps
    col_n = np.arange(nx)
    ek, g_of_n = np.divmod(col_n, ranks)  # ek = e * K + (k - 1)
    e_of_n, k_of_n = np.divmod(ek, max_copies)
    # (1) sum_g n[e,g,k] - k u[e,k] = 0
    copies_rows = coo_matrix(
        (np.concatenate([np.ones(nx), -(np.arange(nk) % max_copies + 1.0)]),
         (np.concatenate([ek, np.arange(nk)]), np.concatenate([col_n, nx + np.arange(nk)]))),
        shape=(nk, nvar))
    # (2) sum_k u[e,k] = 1
    one_count = coo_matrix((np.ones(nu), (np.arange(nu) // max_copies, nx + np.arange(nu))),
                           shape=(experts, nvar))
    # (3) sum_{e,k} n[e,g,k] = slots
    slot_rows = coo_matrix((np.ones(nx), (g_of_n, col_n)), shape=(ranks, nvar))
    # (4) sum_{e,k} w n[e,g,k] - z_s <= -fixed_g, row s * G + g
    s_rep = np.repeat(np.arange(steps), nx)
    n_rep = np.tile(col_n, steps)
    vals = w[k_of_n[n_rep], g_of_n[n_rep], s_rep, e_of_n[n_rep]]
    keep = vals != 0
    rows = s_rep[keep] * ranks + g_of_n[n_rep][keep]
    z_rows = np.arange(steps * ranks)
    time_rows = coo_matrix(
        (np.concatenate([vals[keep], -np.ones(steps * ranks)]),
         (np.concatenate([rows, z_rows]), np.concatenate([n_rep[keep], nx + nu + z_rows // ranks]))),
        shape=(steps * ranks, nvar))
    cost = np.concatenate([np.zeros(nx + nu), np.full(steps, 1.0 / steps)])
    eq = vstack([copies_rows, one_count, slot_rows]).tocsr()
    eq_rhs = np.concatenate([np.zeros(nk), np.ones(experts), np.full(ranks, float(slots))])
    cons = [LinearConstraint(eq, eq_rhs, eq_rhs),
            LinearConstraint(time_rows.tocsr(), -np.inf, np.tile(-group.fixed, steps))]
    if cutoff is not None:  # search below the known placement (a tiny slack for rounding)
        cons.append(LinearConstraint(cost[None, :], -np.inf, cutoff * (1 + 1e-9) + 1e-9))
    integrality = np.concatenate([np.ones(nx + nu), np.zeros(steps)])
    ub = np.concatenate([np.repeat(np.arange(1.0, max_copies + 1), ranks)[None].repeat(experts, 0).ravel(),
                         np.ones(nu), np.full(steps, np.inf)])
    res = milp(cost, constraints=cons, integrality=integrality, bounds=Bounds(np.zeros(nvar), ub),
               options={"time_limit": max(time_limit, 0.05)})
    dual = getattr(res, "mip_dual_bound", None)
    dual = float(dual) if dual is not None and np.isfinite(dual) else -np.inf
    if res.x is not None:
        n = np.rint(res.x[:nx]).reshape(experts, max_copies, ranks).sum(1).astype(np.int64)
        objective = float(res.fun)
    else:
        n, objective = None, np.inf
    if res.status == 2 and cutoff is not None:  # nothing below the cutoff: the known one is optimal
        dual = cutoff
    bound = min(dual, cutoff) if cutoff is not None else dual
    proven = res.status == 0 or (res.status == 2 and cutoff is not None)
    return LayerSolution(n, objective, bound, proven, time.perf_counter() - t0)


def copies_to_phys_to_log(copies: np.ndarray, slots: int) -> np.ndarray:
    """copies: [experts, ranks] -> phys_to_log row [ranks * slots], rank-major, ids ascending
    (formats.ranks_to_phys_to_log, which also checks the equal slots)."""
    experts, ranks = copies.shape
    per_item = copies.T.ravel()  # rank-major (rank, expert) pairs
    log = np.repeat(np.tile(np.arange(experts), ranks), per_item)
    rank = np.repeat(np.repeat(np.arange(ranks), experts), per_item)
    assert len(log) == ranks * slots, f"{len(log)} copies for {ranks} ranks x {slots} slots"
    return ranks_to_phys_to_log(log[None], rank[None], ranks)[0]


@dataclass
class Certificate:
    """How close a placement is to optimal on given loads (mean over steps and layers of the
    slowest rank's time, us). bound: certified lower bound for every placement with these
    slots, the larger per layer of the MILP's (milp_bound) and the existing bounds'
    (existing_bound); best: the best placement's time the solver found (the given one if
    none better); proven_layers: layers where the solver proved optimality."""

    plan_us: float
    bound_us: float
    milp_bound_us: float
    existing_bound_us: float
    best_us: float
    proven_layers: int
    layers: int
    seconds: float
    best_phys_to_log: np.ndarray = field(repr=False, default=None)

    @property
    def gap(self) -> float:
        """plan / certified bound - 1: the plan is at most this far from optimal."""
        if self.bound_us > 0:
            return self.plan_us / self.bound_us - 1.0
        return 0.0 if self.plan_us <= 0 else float("inf")  # no load: every plan is optimal

    def as_dict(self) -> dict[str, float]:
        return {"plan_us": self.plan_us, "certified_bound_us": self.bound_us,
                "milp_bound_us": self.milp_bound_us, "existing_bound_us": self.existing_bound_us,
                "exact_best_us": self.best_us, "certified_gap": self.gap,
                "proven_layers": self.proven_layers, "layers": self.layers,
                "certify_seconds": self.seconds}


def certify(loads: np.ndarray, phys_to_log: np.ndarray, group: GroupModel, seconds: float
            ) -> Certificate:
    """Certify `phys_to_log` [layers, num_physical] on loads [steps, layers, experts]: solve
    every layer's MILP with the placement as cutoff, `seconds` in all (split over layers)."""
    t0 = time.perf_counter()
    steps, layers, _ = loads.shape
    num_physical = phys_to_log.shape[1]
    slots = num_physical // group.num_ranks
    per_layer = rank_times(loads, phys_to_log, group).max(-1).mean(0)  # [layers]
    _, tight, static = lower_bounds(loads, group, num_physical)
    existing = np.maximum(tight.mean(0), static)  # [layers], valid for any placement
    best = phys_to_log.copy()
    bounds, best_us, proven = [], [], 0
    for layer in range(layers):
        left = seconds - (time.perf_counter() - t0)
        sol = solve_layer(loads[:, layer, :], group, num_physical, left / (layers - layer),
                          cutoff=float(per_layer[layer]))
        bounds.append(max(sol.bound, 0.0))  # no dual bound yet (time ran out first): 0
        proven += sol.proven
        if sol.copies is not None and sol.objective < per_layer[layer]:
            best[layer] = copies_to_phys_to_log(sol.copies, slots)
            best_us.append(sol.objective)
        else:
            best_us.append(float(per_layer[layer]))
    milp_bound = np.array(bounds)
    return Certificate(float(per_layer.mean()), float(np.maximum(milp_bound, existing).mean()),
                       float(milp_bound.mean()), float(existing.mean()), float(np.mean(best_us)),
                       proven, layers, time.perf_counter() - t0, best)
