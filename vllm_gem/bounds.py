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
"""

from __future__ import annotations

import numpy as np

from .latency import GroupModel


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


def lower_bounds(loads: np.ndarray, group: GroupModel, num_physical: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fluid, tight, static): fluid and tight [steps, layers], tight = max(fluid, preemptive,
    equal-slots), each bounding any placement, even one chosen per step; static [layers],
    bounding the mean layer time of one placement held over all the steps."""
    fluid = fluid_bound(loads, group)
    slots, static = slot_bounds(loads, group, num_physical)
    tight = np.maximum(preemptive_bound(loads, group, num_physical), slots)
    return fluid, np.maximum(fluid, tight), static


def placement_bound(tight: np.ndarray, static: np.ndarray) -> float:
    """tight: [steps, layers], static: [layers] -> the bound on one placement's mean layer time."""
    return float(np.maximum(tight.mean(0), static).mean())
