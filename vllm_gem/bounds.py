"""Lower bounds on any placement's MoE layer time, per step and layer.

Work is measured in *reference* microseconds (GroupModel.reference_speeds): rank r does a
unit of reference work in at most 1/speed[r] microseconds and always pays its fixed cost.

- Fluid bound: total work spread perfectly over all ranks,
  T >= max(max_r fixed_r, (W + sum_r speed_r * fixed_r) / sum_r speed_r).
  Splitting an expert (replicas) never lowers its work: more tiles and weight reads.
- Preemptive uniform-machine bound (Horvath, Lam & Sethi 1977): a piece of work runs on one
  rank, so the k largest pieces need at least the k fastest ranks,
  T >= min_r fixed_r + max_k (sum of k largest pieces) / (sum of k fastest speeds).
  With R redundant slots the pieces are what greedy replication gives (each extra replica
  to the expert with the largest per-replica work), which minimises those sums; tiles are
  relaxed to tokens / BLOCK_M there so the bound stays valid.
- Equal-slots bound (vLLM's constraint: every rank holds S = num_physical / ranks slots):
  rank r holds S pieces, so it does at least the S cheapest pieces' work,
  T >= max_r fixed_r + (sum of the S cheapest pieces) / speed_r. A piece is an expert's
  tokens split over the most replicas possible (1 + redundant slots), and one expert may
  fill several slots, so this holds for any placement. In decode, where every active expert
  costs about one weight read, this is what keeps a slower GPU from being relieved.
- Static equal-slots bound: the same on the steps' *mean* pieces, for one placement held over
  all the steps (mean of the max over ranks >= max over ranks of the means). Per step, a
  decode step's cheapest slots are idle experts; a fixed placement cannot follow them.
- Static LP bound: the linear relaxation of choosing one placement for all the steps, with
  every rank's own coefficients. The bounds above compare ranks through one reference speed
  each (the most favourable of its coefficient ratios), which is loose when two GPUs' fits
  trade one term for another (likely why an emulated 10% run on 2xH200 reported 59.5 us
  against plans near 175 us; its fits were not saved).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix, hstack, vstack

from .latency import GroupModel

LP_STEP_GROUPS = 8  # steps grouped by load for the LP: within 0.6% of 256 groups (design.md)
# 2 x experts x ranks: 2 GPUs x 256 experts or 4 x 128 (about 0.2 s for 12 layers of 2 x 128);
# 8 GPUs x 128 experts take 0.1 s a layer, too long for a recalibration's stall
LP_MAX_VARIABLES = 1024


def expert_work(loads: np.ndarray, group: GroupModel) -> np.ndarray:
    """loads: [..., experts] -> reference work of each expert run unsplit: [..., experts]."""
    ref, _ = group.reference_speeds()
    return group.item_features(loads) @ ref


def fluid_bound(loads: np.ndarray, group: GroupModel) -> np.ndarray:
    """loads: [steps, layers, experts] -> [steps, layers] fluid lower bound (us)."""
    _, speed = group.reference_speeds()
    work = expert_work(loads, group).sum(-1)
    fixed = group.fixed
    if np.isinf(speed).any():
        return np.full(work.shape, fixed.max())
    spread = (work + (speed * fixed).sum()) / speed.sum()
    return np.maximum(fixed.max(), spread)


def replicated_pieces(loads: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy replication of each step's loads onto `num_physical` slots.

    loads: [N, experts] -> (per-replica tokens [N, experts], replica counts [N, experts])
    """
    n, e = loads.shape
    cnt = np.ones((n, e), dtype=np.int64)
    rows = np.arange(n)
    for _ in range(num_physical - e):
        cnt[rows, np.argmax(loads / cnt, axis=1)] += 1
    return loads / cnt, cnt


def preemptive_bound(loads: np.ndarray, group: GroupModel, num_physical: int) -> np.ndarray:
    """loads: [steps, layers, experts] -> [steps, layers] preemptive lower bound (us)."""
    steps, layers, experts = loads.shape
    ref, speed = group.reference_speeds()
    if np.isinf(speed).any():
        return np.full((steps, layers), group.fixed.min())
    flat = loads.reshape(-1, experts).astype(np.float64)
    share, cnt = replicated_pieces(flat, num_physical)
    # relaxed piece work: per-expert + (per-tile / BLOCK_M + per-token) * tokens
    piece = (share > 0) * ref[0] + share * (ref[1] / group.block_m + ref[2])
    # expand each expert into its `cnt` equal pieces, then sort all pieces descending
    k_max = min(group.num_ranks, num_physical)
    order = np.argsort(-piece, axis=1)
    p_sorted = np.take_along_axis(piece, order, axis=1)
    c_sorted = np.take_along_axis(cnt, order, axis=1)
    # top k_max pieces: walk experts in order, each contributing c_sorted copies
    cum_cnt = np.cumsum(c_sorted, axis=1)
    kk = np.arange(1, k_max + 1)
    idx = _first_reaching(cum_cnt, kk)
    top = np.take_along_axis(p_sorted, idx, axis=1)  # [N, k_max] k-th largest piece
    top_sum = np.cumsum(top, axis=1)
    fast = np.cumsum(np.sort(speed)[::-1][:k_max])
    bound = group.fixed.min() + (top_sum / fast[None, :]).max(axis=1)
    return bound.reshape(steps, layers)


def _first_reaching(cum: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """For each row of cum [N, E] (non-decreasing) the first column with cum >= k: [N, len(ks)]."""
    n, e = cum.shape
    out = np.empty((n, len(ks)), dtype=np.int64)
    chunk = max(1, (1 << 24) // (e * len(ks)))  # bound the [chunk, k, E] temporary
    for a in range(0, n, chunk):
        out[a:a + chunk] = (cum[a:a + chunk, None, :] < ks[None, :, None]).sum(-1)
    return np.minimum(out, e - 1)


def slot_bounds(loads: np.ndarray, group: GroupModel, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """loads: [steps, layers, experts] -> equal-slots lower bounds (us): per step [steps, layers],
    and static [layers], for ONE placement held over all the steps (what GEM serves between
    moves), on its mean layer time.

    A piece is an expert's tokens split over the most replicas possible. Static: mean_steps(max_r
    T_r) >= max_r mean_steps(T_r), and rank r's mean time is at least its fixed cost plus its S
    cheapest *mean* pieces. The per-step bound lets every step pick its own cheapest slots,
    which in decode are idle experts costing nothing; a placement cannot follow the steps.
    Neither bound dominates the other (bounds.placement_bound takes the larger per layer).
    """
    mult = 1 + num_physical - loads.shape[-1]  # copies of one expert's smallest piece a rank may hold
    ref, _ = group.reference_speeds()
    piece = group.item_features(loads / mult) @ ref  # [S, L, E], computed once for both
    return (_cheapest_slots_time(piece, mult, group, num_physical),
            _cheapest_slots_time(piece.mean(0), mult, group, num_physical))


def _cheapest_slots_time(piece: np.ndarray, mult: int, group: GroupModel, num_physical: int) -> np.ndarray:
    """piece: [..., experts] smallest-piece work -> [...] max over ranks of fixed + the S
    cheapest pieces (one expert filling at most `mult` slots) / speed."""
    experts = piece.shape[-1]
    slots = num_physical // group.num_ranks
    _, speed = group.reference_speeds()
    n_full, rest = divmod(slots, mult)
    take = min(experts, n_full + (rest > 0))
    small = np.sort(np.partition(piece, take - 1, axis=-1)[..., :take], axis=-1)
    cheapest = mult * small[..., :n_full].sum(-1) + (rest * small[..., n_full] if rest else 0.0)
    with np.errstate(divide="ignore"):
        per_rank = group.fixed + cheapest[..., None] / speed  # [..., G]
    return per_rank.max(-1)


def static_lp_bound(loads: np.ndarray, group: GroupModel, num_physical: int,
                    step_groups: int = LP_STEP_GROUPS, max_variables: int = LP_MAX_VARIABLES) -> np.ndarray:
    """loads: [steps, layers, experts] -> [layers] lower bound on the mean layer time of any ONE
    placement held over all the steps (equal slots per rank), by linear programming.

    A placement puts n[e, r] of expert e's n_e slots on rank r; the simulator gives each slot
    L / n_e tokens. With x = n / n_e (rank r's token share of e) and y = n (its slots), rank
    r's time at a step is fixed_r + sum_e pe_r a y + pt_r n ceil(L / (n_e B)) + ptok_r L x,
    a = [L > 0]. Relaxed: x, y real, sum_r x = 1, x <= y <= 1 + spare slots, sum_e y = S, and
    the tile term replaced by pt_r x max(L / B, a) (<= it, as n >= x and n_e >= 1). Steps are
    grouped by load into step_groups groups; a group's mean of the max over ranks is at least
    the max of its means, so grouping keeps the bound valid. Above max_variables the bound
    is the largest fixed cost (trivially valid).
    """
    steps, layers, experts = loads.shape
    ranks, slots = group.num_ranks, num_physical // group.num_ranks
    c = group.coef  # [R, 4]: fixed, per_expert, per_tile, per_token
    nv = 2 * experts * ranks  # x[e, r] then y[e, r], e-major
    if nv > max_variables:
        return np.full(layers, float(c[:, 0].max()))
    groups = max(1, min(steps, step_groups))
    # equalities: sum_r x[e, r] = 1, sum_e y[e, r] = S
    eq_x = coo_matrix((np.ones(experts * ranks), (np.repeat(np.arange(experts), ranks),
                                                  np.arange(experts * ranks))), (experts, nv))
    eq_y = coo_matrix((np.ones(experts * ranks), (np.tile(np.arange(ranks), experts),
                                                  experts * ranks + np.arange(experts * ranks))),
                      (ranks, nv))
    a_eq = vstack([eq_x, eq_y])
    b_eq = np.concatenate([np.ones(experts), np.full(ranks, float(slots))])
    # x[e, r] - y[e, r] <= 0
    er = np.arange(experts * ranks)
    x_le_y = coo_matrix((np.r_[np.ones(experts * ranks), -np.ones(experts * ranks)],
                         (np.r_[er, er], np.r_[er, experts * ranks + er])), (experts * ranks, nv))
    bounds = [(0.0, 1.0)] * (experts * ranks) + [(0.0, 1.0 + num_physical - experts)] * (experts * ranks)
    out = np.empty(layers)
    for layer in range(layers):
        lay = loads[:, layer].astype(np.float64)
        parts = np.array_split(np.argsort(lay.sum(-1)), groups)
        weight = np.array([len(p) / steps for p in parts])
        act = np.stack([(lay[p] > 0).mean(0) for p in parts])  # [G, E] mean of a
        tile = np.stack([np.maximum(lay[p] / group.block_m, lay[p] > 0).mean(0) for p in parts])
        tok = np.stack([lay[p].mean(0) for p in parts])
        # step-group k, rank r: sum_e (coef_x x[e, r] + coef_y y[e, r]) - T_k <= -fixed_r
        cx = tile[:, :, None] * c[None, None, :, 2] + tok[:, :, None] * c[None, None, :, 3]  # [G, E, R]
        cy = act[:, :, None] * c[None, None, :, 1]
        k, e, r = np.meshgrid(np.arange(groups), np.arange(experts), np.arange(ranks), indexing="ij")
        row, col = (k * ranks + r).ravel(), (e * ranks + r).ravel()  # [G * E * R], as cx.ravel()
        work = coo_matrix((np.r_[cx.ravel(), cy.ravel()],
                           (np.r_[row, row], np.r_[col, experts * ranks + col])), (groups * ranks, nv))
        t_cols = coo_matrix((-np.ones(groups * ranks), (np.arange(groups * ranks),
                                                        np.repeat(np.arange(groups), ranks))),
                            (groups * ranks, groups))
        a_ub = vstack([hstack([work, t_cols]), hstack([x_le_y, coo_matrix((experts * ranks, groups))])])
        b_ub = np.r_[-np.tile(c[:, 0], groups), np.zeros(experts * ranks)]
        res = linprog(np.r_[np.zeros(nv), weight], A_ub=a_ub.tocsr(), b_ub=b_ub,
                      A_eq=hstack([a_eq, coo_matrix((experts + ranks, groups))]).tocsr(), b_eq=b_eq,
                      bounds=bounds + [(None, None)] * groups, method="highs-ipm")  # 3x the simplex
        # the solver's tolerance could put its optimum a hair above the true one: give it back;
        # an LP it cannot finish bounds nothing: fall back to the trivial bound
        out[layer] = res.fun * (1 - 1e-6) if res.status == 0 else float(c[:, 0].max())
    return out


def lower_bounds(loads: np.ndarray, group: GroupModel, num_physical: int,
                 lp_max_variables: int = LP_MAX_VARIABLES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fluid, tight, static): fluid and tight [steps, layers], tight = max(fluid, preemptive,
    equal-slots), each bounding any placement, even one chosen per step; static [layers],
    bounding the mean layer time of one placement held over all the steps (the larger of the
    static equal-slots and the static LP bound, the latter only up to lp_max_variables)."""
    fluid = fluid_bound(loads, group)
    slots, static = slot_bounds(loads, group, num_physical)
    lp = static_lp_bound(loads, group, num_physical, max_variables=lp_max_variables)
    static = np.maximum(static, lp)
    tight = np.maximum(preemptive_bound(loads, group, num_physical), slots)
    return fluid, np.maximum(fluid, tight), static


def placement_bound(tight: np.ndarray, static: np.ndarray) -> float:
    """tight: [steps, layers], static: [layers] -> the bound on one placement's mean layer time."""
    return float(np.maximum(tight.mean(0), static).mean())
