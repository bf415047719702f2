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

Past 4 GPUs with redundant slots that MILP rarely has a bound within a minute; the
certificate (certify) solves split_relaxation first, whose bound is valid for every
placement too (each placement's relaxed time is at most its real time), and the exact MILP
only where the relaxation is solved and the best plan is not. It reports, per layer, the
larger of these and the existing bounds (bounds.lower_bounds: per-step and static, also
valid for any placement), and the search's own bound beside it.
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

CLOSE_ENOUGH = 1e-3  # a layer whose best plan is this close to its bound gets no more time
MIN_SOLVE_SECONDS = 0.2  # HiGHS needs about this long to set up a layer of 8 GPUs x 128 experts


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
                cutoff: float | None = None, step_floor: np.ndarray | None = None,
                mean_floor: float | None = None) -> LayerSolution:
    """The MILP above for one layer. loads: [steps, experts]; cutoff: the mean slowest-rank
    time of a known placement (searched below it; the bound then counts it, see the module);
    step_floor [steps], mean_floor: lower bounds already proven for every placement, as cuts."""
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
    if mean_floor is not None:
        cons.append(LinearConstraint(cost[None, :], mean_floor, np.inf))
    integrality = np.concatenate([np.ones(nx + nu), np.zeros(steps)])
    ub = np.concatenate([np.repeat(np.arange(1.0, max_copies + 1), ranks)[None].repeat(experts, 0).ravel(),
                         np.ones(nu), np.full(steps, np.inf)])
    lb = np.zeros(nvar)
    if step_floor is not None:
        lb[nx + nu:] = step_floor
    res = milp(cost, constraints=cons, integrality=integrality, bounds=Bounds(lb, ub),
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


def copies_of(phys_to_log: np.ndarray, ranks: int, experts: int) -> np.ndarray:
    """phys_to_log row [ranks * slots] (rank-major) -> copies [experts, ranks] of each expert
    on each rank (copies_to_phys_to_log's inverse, but for the order of slots in a rank)."""
    rank = np.arange(len(phys_to_log)) // (len(phys_to_log) // ranks)
    out = np.zeros((experts, ranks), dtype=np.int64)
    np.add.at(out, (phys_to_log, rank), 1)
    return out


def copies_to_phys_to_log(copies: np.ndarray, slots: int) -> np.ndarray:
    """copies: [experts, ranks] -> phys_to_log row [ranks * slots], rank-major, ids ascending
    (formats.ranks_to_phys_to_log, which also checks the equal slots)."""
    experts, ranks = copies.shape
    per_item = copies.T.ravel()  # rank-major (rank, expert) pairs
    log = np.repeat(np.tile(np.arange(experts), ranks), per_item)
    rank = np.repeat(np.repeat(np.arange(ranks), experts), per_item)
    assert len(log) == ranks * slots, f"{len(log)} copies for {ranks} ranks x {slots} slots"
    return ranks_to_phys_to_log(log[None], rank[None], ranks)[0]


def split_relaxation(loads: np.ndarray, group: GroupModel, num_physical: int, time_limit: float, *,
                     step_floor: np.ndarray | None = None, mean_floor: float | None = None,
                     start: np.ndarray | None = None) -> LayerSolution:
    """A relaxation of solve_layer's MILP that HiGHS solves far faster past 4 GPUs, for the
    certificate. loads: [steps, experts] one layer; step_floor: [steps] and mean_floor: lower
    bounds already proven for every placement (per step, and on the mean), added as valid cuts.

    An expert is either *single* (one copy: binary s[e, g], its cost exactly the simulator's)
    or *split*: integer copies y[e, g] with sum_g y >= 2 and token shares x[e, g] <= y,
    sum_g x = 1 (shares need not be even: the relaxation). A split copy pays its weight read
    (per_expert y), its tokens (per_token L x) and its tiles: one per copy below 2 BLOCK_M
    tokens (k >= 2 copies of L < 2 BLOCK_M tokens each fit one tile: exact), else
    L x / BLOCK_M (a copy of L / k tokens has at least L / (k BLOCK_M) tiles). Each is at
    most what the even split costs, so every placement's relaxed time is at most its real
    time and the dual bound holds for all placements. With no redundant slots every expert is
    single and this is solve_layer's MILP exactly.

    start: copies [experts, ranks] of a known placement, handed to HiGHS as its first
    incumbent (it prunes with it from the start, and has a solution, hence a dual bound, at
    once). Solved with highspy, which takes the incumbent and reports the dual bound of a
    search stopped before its own first solution; scipy's milp does neither.

    Returns copies [experts, ranks] = s + y of the best relaxed solution found (a real
    placement: integer copies, every expert once at least, equal slots; its real time is for
    the caller to score), objective: its *relaxed* time, bound: the proven dual bound,
    proven: the relaxation solved.
    """
    t0 = time.perf_counter()
    steps, experts = loads.shape
    ranks = group.num_ranks
    slots, bm = num_physical // ranks, group.block_m
    spare = num_physical - experts  # 0: no expert can be split
    per_expert, per_tile, per_token = group.slot_coef.T  # [ranks] each
    eg = experts * ranks
    o_s, o_y, o_x, o_z = 0, eg, 2 * eg, 3 * eg  # s[e, g], y[e, g], x[e, g] at e * ranks + g, z[s]
    nvar = o_z + steps
    idx = np.arange(eg)
    e_of, g_of = np.divmod(idx, ranks)
    ones = np.ones(eg)
    # sum_g s + sum_g x = 1;  x <= y;  sum_g y + 2 sum_g s >= 2;  sum_e s + y = slots
    blocks = [(np.r_[e_of, e_of], np.r_[o_s + idx, o_x + idx], np.r_[ones, ones], np.ones(experts),
               np.ones(experts)),
              (np.r_[idx, idx], np.r_[o_x + idx, o_y + idx], np.r_[ones, -ones], np.full(eg, -np.inf),
               np.zeros(eg)),
              (np.r_[e_of, e_of], np.r_[o_y + idx, o_s + idx], np.r_[ones, 2 * ones], np.full(experts, 2.0),
               np.full(experts, np.inf)),
              (np.r_[g_of, g_of], np.r_[o_s + idx, o_y + idx], np.r_[ones, ones], np.full(ranks, float(slots)),
               np.full(ranks, float(slots)))]
    # time rows, row s * ranks + g: single and split costs - z_s <= -fixed_g
    single = np.einsum("sef,gf->seg", group.item_features(loads), group.slot_coef)  # [S, E, G]
    one_tile = ((loads > 0) & (loads < 2 * bm)).astype(np.float64)[..., None]  # [S, E, 1]
    on_x = loads[..., None] * (per_token + (1 - one_tile) * per_tile / bm)  # [S, E, G]
    on_y = (loads > 0)[..., None] * per_expert + one_tile * per_tile
    s_rows = np.repeat(np.arange(steps), eg) * ranks + np.tile(g_of, steps)  # [S * E * G]
    z_rows = np.arange(steps * ranks)
    use = [(o_s, single)] + ([(o_x, on_x), (o_y, on_y)] if spare else [])
    blocks.append((np.concatenate([s_rows] * len(use) + [z_rows]),
                   np.concatenate([np.tile(o + idx, steps) for o, _ in use] + [o_z + z_rows // ranks]),
                   np.concatenate([v.ravel() for _, v in use] + [-np.ones(steps * ranks)]),
                   np.full(steps * ranks, -np.inf), np.tile(-group.fixed, steps)))
    cost = np.zeros(nvar)
    cost[o_z:] = 1.0 / steps
    if mean_floor is not None:
        blocks.append((np.zeros(steps, dtype=np.int64), o_z + np.arange(steps), cost[o_z:], [mean_floor], [np.inf]))
    offsets = np.cumsum([0] + [len(b[3]) for b in blocks])
    a = coo_matrix((np.concatenate([b[2] for b in blocks]),
                    (np.concatenate([b[0] + off for b, off in zip(blocks, offsets)]),
                     np.concatenate([b[1] for b in blocks]))), shape=(offsets[-1], nvar))
    lb, ub = np.zeros(nvar), np.full(nvar, np.inf)
    ub[o_s:o_y] = 1.0
    ub[o_y:o_z] = 0.0 if not spare else np.r_[np.full(eg, float(spare + 1)), np.ones(eg)]
    if step_floor is not None:
        lb[o_z:] = step_floor
    integrality = np.zeros(nvar)
    integrality[:o_x] = 1
    first = None
    if start is not None:  # the known placement as relaxed variables: its relaxed time per step
        k = start.sum(1, keepdims=True)  # [E, 1] copies of each expert
        is_single = (k == 1).astype(np.float64)
        sv, yv, xv = start * is_single, start * (1 - is_single), start / k * (1 - is_single)
        rank_us = group.fixed + np.einsum("seg,eg->sg", single, sv) + (
            np.einsum("seg,eg->sg", on_x, xv) + np.einsum("seg,eg->sg", on_y, yv) if spare else 0.0)
        z = np.maximum(rank_us.max(1), lb[o_z:])
        if mean_floor is not None:
            z += max(0.0, mean_floor - z.mean())
        first = np.r_[sv.ravel(), yv.ravel(), xv.ravel(), z]
    x, objective, dual, optimal = _highs(cost, a.tocsr(), np.concatenate([b[3] for b in blocks]),
                                         np.concatenate([b[4] for b in blocks]), lb, ub, integrality,
                                         time_limit, first)
    copies = None
    if x is not None:
        copies = np.rint(x[o_s:o_y] + x[o_y:o_x]).reshape(experts, ranks).astype(np.int64)
    return LayerSolution(copies, objective, dual, optimal, time.perf_counter() - t0)


def _highs(cost: np.ndarray, a, row_lo: np.ndarray, row_hi: np.ndarray, lb: np.ndarray, ub: np.ndarray,
           integrality: np.ndarray, time_limit: float, start: np.ndarray | None
           ) -> tuple[np.ndarray | None, float, float, bool]:
    """min cost.x s.t. row_lo <= a x <= row_hi, lb <= x <= ub, integrality (1: integer), by
    HiGHS through highspy, `start` (a feasible x) its first incumbent. Returns (the best x
    found or None, its objective or inf, the proven dual bound or -inf, solved to optimality)."""
    import highspy  # certificates only: the planner and the plugin never load it

    inf = highspy.kHighsInf
    csc = a.tocsc()
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), csc.shape[0]
    lp.col_cost_, lp.col_lower_ = cost, lb
    lp.col_upper_ = np.where(np.isinf(ub), inf, ub)
    lp.row_lower_ = np.where(np.isinf(row_lo), -inf, row_lo)
    lp.row_upper_ = np.where(np.isinf(row_hi), inf, row_hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = csc.indptr, csc.indices, csc.data
    lp.integrality_ = [highspy.HighsVarType.kInteger if v else highspy.HighsVarType.kContinuous
                       for v in integrality]
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(max(time_limit, 0.05)))
    h.setOptionValue("threads", 1)  # the certificate's time is one core's
    h.setOptionValue("mip_rel_gap", 1e-6)  # "proven optimal" as close as the bound it reports
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = start.tolist()
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    info = h.getInfo()
    optimal = h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    found = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = np.array(h.getSolution().col_value) if found else None
    objective = float(info.objective_function_value) if found else np.inf
    # the dual bound only, never the objective: "optimal" is within HiGHS's relative gap
    # (1e-4), and a bound a hair above the optimum would certify a plan below itself; its
    # feasibility tolerance is given back as bounds.static_lp_bound does
    dual = float(info.mip_dual_bound)
    dual = dual * (1 - 1e-6) if np.isfinite(dual) and abs(dual) < inf else -np.inf
    return x, objective, dual, optimal


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

    @property
    def best_gap(self) -> float:
        """best / certified bound - 1: how far the best plan found is from optimal at most."""
        if self.bound_us > 0:
            return self.best_us / self.bound_us - 1.0
        return 0.0 if self.best_us <= 0 else float("inf")

    def as_dict(self) -> dict[str, float]:
        return {"plan_us": self.plan_us, "certified_bound_us": self.bound_us, "best_certified_gap": self.best_gap,
                "milp_bound_us": self.milp_bound_us, "existing_bound_us": self.existing_bound_us,
                "exact_best_us": self.best_us, "certified_gap": self.gap,
                "proven_layers": self.proven_layers, "layers": self.layers,
                "certify_seconds": self.seconds}


def certify(loads: np.ndarray, phys_to_log: np.ndarray, group: GroupModel, seconds: float
            ) -> Certificate:
    """Certify `phys_to_log` [layers, num_physical] on loads [steps, layers, experts] within
    `seconds` in all: per layer the larger of the earlier bounds and split_relaxation's
    proven bound (the earlier bounds enter it as cuts). Time goes where the gap is: a first
    pass gives half of it evenly to the layers not already within CLOSE_ENOUGH, then the
    layer with the largest open gap (us) is solved again with twice its last time, until the
    time is spent; a layer whose relaxation is solved but whose best plan is not proven goes
    on in solve_layer's exact MILP, below its best plan. Each solution's copies are a real
    placement; where one is faster on these loads it becomes the layer's best plan
    (best_phys_to_log)."""
    t0 = time.perf_counter()
    layers = loads.shape[1]
    num_physical = phys_to_log.shape[1]
    slots = num_physical // group.num_ranks
    loads = loads.astype(np.float64)
    per_layer = rank_times(loads, phys_to_log, group).max(-1).mean(0)  # [layers]
    _, tight, static = lower_bounds(loads, group, num_physical)
    existing = np.maximum(tight.mean(0), static)  # [layers], valid for any placement
    best = phys_to_log.copy()
    best_us = per_layer.copy()
    bound = existing.copy()
    relaxed = np.full(layers, -np.inf)  # the relaxation's own bound, where it found one
    solved = np.zeros(layers, dtype=bool)  # no more time helps: proven optimal
    relaxation_done = np.zeros(layers, dtype=bool)  # split_relaxation solved to optimality
    last = np.zeros(layers)  # seconds given to each layer's last solve

    def solve(layer: int, limit: float) -> None:
        floors = {"step_floor": tight[:, layer], "mean_floor": float(bound[layer])}
        if relaxation_done[layer]:  # the relaxation is solved but its plan is not: the exact MILP
            sol = solve_layer(loads[:, layer, :], group, num_physical, limit, cutoff=float(best_us[layer]),
                              **floors)
            solved[layer] |= sol.proven
        else:
            sol = split_relaxation(loads[:, layer, :], group, num_physical, limit, **floors,
                                   start=copies_of(best[layer], group.num_ranks, loads.shape[2]))
            relaxation_done[layer] |= sol.proven
            solved[layer] |= sol.proven and num_physical == loads.shape[2]  # then it is exact
        last[layer] = limit
        relaxed[layer] = max(relaxed[layer], sol.bound)
        bound[layer] = max(bound[layer], sol.bound)
        if sol.copies is not None:
            row = copies_to_phys_to_log(sol.copies, slots)
            us = float(rank_times(loads[:, layer:layer + 1], row[None], group).max(-1).mean())
            if us < best_us[layer]:
                best[layer], best_us[layer] = row, us

    def open_gap() -> np.ndarray:  # us between each layer's best plan and its bound
        gap = best_us - bound
        gap[solved | (best_us <= bound * (1 + CLOSE_ENOUGH))] = -np.inf
        return gap

    todo = np.nonzero(np.isfinite(open_gap()))[0]
    for i, layer in enumerate(todo):
        left = 0.5 * seconds - (time.perf_counter() - t0)
        if left <= 0:
            break
        solve(int(layer), max(left / (len(todo) - i), MIN_SOLVE_SECONDS))
    while (left := seconds - (time.perf_counter() - t0)) > MIN_SOLVE_SECONDS:
        gap = open_gap()
        layer = int(np.argmax(gap))
        if not np.isfinite(gap[layer]):
            break
        solve(layer, min(left, 2 * max(last[layer], MIN_SOLVE_SECONDS)))
    proven = int(np.sum(best_us <= bound * (1 + 1e-4)))
    milp = np.where(np.isfinite(relaxed), relaxed, 0.0)
    return Certificate(float(per_layer.mean()), float(bound.mean()), float(milp.mean()),
                       float(existing.mean()), float(best_us.mean()), proven, layers,
                       time.perf_counter() - t0, best)
