"""GEM: GPU-variability-aware expert placement.

Per MoE layer, on the planning history ``loads: [steps, layers, experts]``:

1. Classify experts into *consistent* (loaded near their mean in nearly every step) and
   *temporal* (bursty); report the split and how many temporal pairs fire together.
2. Choose replica counts for the redundant slots with the latency model: a replica halves
   an expert's tokens but adds a weight read, so it goes where it lowers the estimated
   slowest-rank time most (see choose_replicas).
3. Construct: place items (expert replicas), consistent ones first, heaviest first, each on
   the rank that minimises the *expected slowest-rank time over the steps* after adding it
   (ties: the rank where it finishes earliest). A fast rank absorbs more work before it
   becomes the slowest, so faster GPUs get heavier experts; experts that fire in the same
   steps raise the same steps' maxima, so they land on different ranks.
4. Improve by local search: swaps between the layer's bottleneck rank and any other rank,
   scored exactly on the expected slowest-rank time (a round's swaps in one compiled pass:
   swap_scores.best_swaps).
   Swaps keep every rank's slot count equal, as vLLM requires.

``stepwise=False`` gives the plain speed-aware greedy (LPT on mean loads, no local search):
the baseline that knows GPU speeds but not step-to-step variation.
``migration_weight`` (us of layer time per moved expert) makes it migration-aware: it starts
from the current placement and accepts only swaps whose gain pays for the moves they add.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..formats import ranks_to_phys_to_log
from ..latency import GroupModel
from .base import PlacementPolicy, PlacementProblem
from .swap_scores import best_swaps


def classify_experts(loads: np.ndarray, steady_frac: float = 0.9, level: float = 0.5) -> np.ndarray:
    """Consistent experts: loaded at >= `level` x their mean in >= `steady_frac` of steps.

    loads: [steps, layers, experts] -> consistent: [layers, experts] bool
    """
    mean = loads.mean(0)
    steady = (loads >= level * mean[None]) & (mean[None] > 0)
    return steady.mean(0) >= steady_frac


def coactivated_pairs(loads: np.ndarray, temporal: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Temporal expert pairs whose per-step loads correlate above `threshold`.

    loads: [steps, layers, experts]; temporal: [layers, experts] -> [layers] pair counts
    """
    out = np.zeros(loads.shape[1], dtype=np.int64)
    if loads.shape[0] < 3:
        return out
    for layer in range(loads.shape[1]):
        x = loads[:, layer, temporal[layer]]
        x = x[:, x.std(0) > 0]
        if x.shape[1] > 1:
            c = np.corrcoef(x, rowvar=False)
            out[layer] = int((np.triu(c, 1) > threshold).sum())
    return out


MAX_REPLICA_ROUNDS = 64  # beyond this many redundant slots, several are chosen per round


def choose_replicas(loads: np.ndarray, num_physical: int, group: GroupModel) -> np.ndarray:
    """Replica count per expert for the redundant slots, judged by the latency model.

    Each redundant slot goes to the expert whose extra replica most lowers the estimated
    layer time mean_s max(total work / total speed, largest piece / fastest speed); a
    replica splits an expert's tokens but adds a weight read, so in the memory-bound
    regime replicating a hot expert can cost more than it saves. Ties go to the expert with
    the largest per-replica peak load (vLLM's rule, on peaks rather than sums). With more
    than MAX_REPLICA_ROUNDS redundant slots (hundreds of GPUs), each round gives one more
    replica to each of the best few experts, so the rounds stay at most that many.

    loads: [steps, layers, experts] -> counts: [layers, experts], each row summing to num_physical
    """
    steps, layers, experts = loads.shape
    cnt = np.ones((layers, experts), dtype=np.int64)
    if num_physical == experts:
        return cnt
    ref, speed = group.reference_speeds()
    tot, top_speed = speed.sum(), speed.max()
    if not np.isfinite(tot):
        tot = top_speed = 1.0

    def piece(c: np.ndarray) -> np.ndarray:  # [S, L, E] work of one replica
        t = loads / c[None]
        return group.item_features(t) @ ref

    rows = np.arange(layers)
    peak = np.quantile(loads, 0.9, axis=0)
    cur = piece(cnt)  # [S, L, E] work of one replica now
    new = piece(cnt + 1)  # ... with one more replica
    work = (cur * cnt[None]).sum(-1)  # [S, L]
    grow = new * (cnt + 1)[None] - cur * cnt[None]  # [S, L, E] what one more replica adds to the work
    k_speed = tot / top_speed
    remaining = num_physical - experts
    batch = -(-remaining // MAX_REPLICA_ROUNDS)  # 1 unless there are many redundant slots
    while remaining:
        k = min(batch, remaining)
        remaining -= k
        # est = mean_s max(work + grow, k_speed * largest piece) / tot. A new replica's piece
        # is never above the largest one, so the largest piece is the step's largest, except
        # for that expert itself: there the second largest, or its own new piece
        top = cur.argmax(-1)  # [S, L]
        first = np.take_along_axis(cur, top[..., None], -1)[..., 0]
        masked = cur.copy()
        np.put_along_axis(masked, top[..., None], -np.inf, -1)
        second = masked.max(-1)  # -inf with one expert: its own new piece counts then
        floor = k_speed * first - work  # [S, L]
        est = np.maximum(grow, floor[..., None]).sum(0)  # [L, E], as sums over steps for now
        at_top = np.take_along_axis(grow, top[..., None], -1)[..., 0]
        own_new = np.take_along_axis(new, top[..., None], -1)[..., 0]
        fix = np.maximum(at_top, k_speed * np.maximum(second, own_new) - work) - np.maximum(at_top, floor)
        np.add.at(est, (np.broadcast_to(rows, top.shape), top), fix)
        est = (est / steps + work.mean(0)[:, None]) / tot
        score = est - 1e-6 * est.mean(1, keepdims=True) * (peak / cnt) / (peak.max(1, keepdims=True) + 1e-30)
        for e in (np.argpartition(score, k - 1, axis=1)[:, :k].T if k > 1 else score.argmin(1)[None]):
            # only expert e of each layer changed: update its columns, not the whole [S, L, E]
            work += grow[:, rows, e]
            cnt[rows, e] += 1
            cur[:, rows, e] = new[:, rows, e]
            new[:, rows, e] = group.item_features(loads[:, rows, e] / (cnt[rows, e] + 1)) @ ref
            grow[:, rows, e] = new[:, rows, e] * (cnt[rows, e] + 1) - cur[:, rows, e] * cnt[rows, e]
    return cnt


def sample_steps(loads: np.ndarray, max_steps: int, seed: int = 0) -> np.ndarray:
    """At most `max_steps` steps of loads [steps, layers, experts], chosen uniformly at random."""
    if loads.shape[0] <= max_steps:
        return loads
    idx = np.sort(np.random.default_rng(seed).choice(loads.shape[0], max_steps, replace=False))
    return loads[idx]


def augment_steps(loads: np.ndarray, min_steps: int, seed: int = 0) -> np.ndarray:
    """Pad a short history to `min_steps` with Poisson-resampled copies of its steps.

    A placement tuned to a handful of exact steps over-fits them; resampled copies keep each
    step's expected loads and add the token-level noise the next steps will have.
    loads: [steps, layers, experts] -> [max(steps, min_steps), layers, experts]
    """
    steps = loads.shape[0]
    if steps >= min_steps or steps == 0:
        return loads
    rng = np.random.default_rng(seed)
    extra = loads[rng.integers(0, steps, min_steps - steps)]
    return np.concatenate([loads, rng.poisson(extra).astype(np.float64)])


def hottest_replicas(loads: np.ndarray, num_physical: int) -> np.ndarray:
    """Replica counts by DeepSeek's EPLB rule: each redundant slot to the expert with the
    largest load per copy (summed over steps): loads [steps, layers, experts] -> counts
    [layers, experts], each row summing to num_physical."""
    total = loads.sum(0)  # [L, E]
    cnt = np.ones(total.shape, dtype=np.int64)
    rows = np.arange(total.shape[0])
    for _ in range(num_physical - total.shape[1]):
        cnt[rows, (total / cnt).argmax(1)] += 1
    return cnt


def coldest_replicas(loads: np.ndarray, num_physical: int) -> np.ndarray:
    """Replica counts that give the redundant slots to the least loaded experts, one each
    from the coldest up (round robin past the experts): loads [steps, layers, experts] ->
    counts [layers, experts], each row summing to num_physical."""
    steps, layers, experts = loads.shape
    order = np.argsort(loads.sum(0), axis=1, kind="stable")  # [L, E] coldest first
    extra = num_physical - experts
    cnt = np.ones((layers, experts), dtype=np.int64)
    picks = order[:, np.arange(extra) % experts]  # [L, extra]
    np.add.at(cnt, (np.arange(layers)[:, None], picks), 1)
    return cnt


def _item_features(loads: np.ndarray, item_log: np.ndarray, group: GroupModel) -> np.ndarray:
    """loads: [S, L, E], item_log: [L, P] -> features [L, S, P, 3] of every slot, its expert's
    tokens split evenly over that expert's copies."""
    experts = loads.shape[2]
    cnt_of_item = np.stack([np.bincount(r, minlength=experts)[r] for r in item_log])
    tok = np.take_along_axis(loads, item_log[None], axis=2) / cnt_of_item[None]
    return group.item_features(tok.transpose(1, 0, 2))


def _rank_times(feat: np.ndarray, rank_of: np.ndarray, group: GroupModel) -> np.ndarray:
    """feat: [L, S, P, 3]; rank_of: [L, P] -> T: [L, S, G] each rank's time per step."""
    layers, steps, _, _ = feat.shape
    own = np.einsum("lspf,lpf->lps", feat, group.slot_coef[rank_of])
    t = np.zeros((layers, group.num_ranks, steps))
    np.add.at(t, (np.arange(layers)[:, None], rank_of), own)
    return t.transpose(0, 2, 1) + group.fixed


class GemPolicy(PlacementPolicy):
    name = "gem"

    def __init__(self, *, max_steps: int = 32, min_steps: int = 32, stepwise: bool = True,
                 local_search: bool = True, max_iters: int = 200, candidates: int = 16,
                 min_gain: float = 1e-4, time_budget: float | None = None,
                 migration_weight: float | None = None, seed: int = 0,
                 construct_ranks: int = 16, option_margin: float = 0.0, node_move_cost: float = 0.25,
                 threads: int = min(os.cpu_count() or 1, 8), **params: Any) -> None:
        super().__init__(max_steps=max_steps, min_steps=min_steps, stepwise=stepwise,
                         local_search=local_search, max_iters=max_iters, candidates=candidates,
                         min_gain=min_gain, time_budget=time_budget,
                         migration_weight=migration_weight, seed=seed,
                         construct_ranks=construct_ranks, option_margin=option_margin,
                         node_move_cost=node_move_cost,
                         threads=threads, **params)
        self.report: dict[str, Any] = {}

    # ----------------------------------------------------------------- entry point
    def place(self, problem: PlacementProblem) -> np.ndarray:
        if self.params["threads"] <= 1:
            return self._place(problem)
        # the planning threads already fill the cores: BLAS threads under each of them
        # oversubscribe (58 x 256 x 64 GPUs, 320 slots, 2 cores: 1.44 s with, 1.13 s without)
        with threadpool_limits(1, user_api="blas"):
            return self._place(problem)

    def _place(self, problem: PlacementProblem) -> np.ndarray:
        p = self.params
        # time_budget bounds the whole plan: the local search stops at this deadline
        deadline = time.perf_counter() + p["time_budget"] if p["time_budget"] else float("inf")
        loads = sample_steps(problem.loads.astype(np.float64), p["max_steps"], p["seed"])
        loads = augment_steps(loads, p["min_steps"], p["seed"])
        steps, layers, experts = loads.shape
        consistent = classify_experts(loads)
        # layers are independent: each thread plans a share of them, start to finish
        share = -(-layers // p["threads"])
        parts = _map(lambda a: self._plan_layers(loads[:, a:a + share], consistent[a:a + share],
                                                 problem, a, deadline),
                     range(0, layers, share), p["threads"])
        item_log, rank_of, before, after = (np.concatenate([x[k] for x in parts]) for k in range(4))
        self.report = {
            "consistent_experts": int(consistent.sum()),
            "temporal_experts": int((~consistent).sum()),
            "coactivated_temporal_pairs": int(coactivated_pairs(loads, ~consistent).sum()),
            "redundant_slots_per_layer": problem.num_physical - experts,
            "planning_steps": steps,
            "threads": p["threads"],
        }
        if parts[0][4] is not None:
            self.report["local_search_swaps"] = sum(x[4] for x in parts)
        self.report.update(construct_us=float(before.mean()), final_us=float(after.mean()))
        return ranks_to_phys_to_log(item_log, rank_of, problem.group.num_ranks)

    def _plan_layers(self, loads: np.ndarray, consistent: np.ndarray, problem: PlacementProblem,
                     first: int, deadline: float) -> tuple:
        """Plan the L layers from `first` on: loads [S, L, E], consistent [L, E] ->
        (item_log [L, P], rank_of [L, P], constructed and final layer time [L] us, swaps or None)."""
        p = self.params
        steps, layers, experts = loads.shape
        group, num_physical = problem.group, problem.num_physical
        migrate = p["migration_weight"] is not None and problem.old_phys_to_log is not None
        if migrate:  # keep the current replica set; start from where everything is now
            item_log = problem.old_phys_to_log[first:first + layers].astype(np.int64)
            rank_of = np.broadcast_to(np.arange(num_physical) // problem.slots_per_rank,
                                      item_log.shape).copy()
            feat = _item_features(loads, item_log, group)
            rank_t = _rank_times(feat, rank_of, group)  # [L, S, G]
            before = rank_t.max(-1).mean(1)
        else:
            # three replica sets, kept per layer by their constructed time: the latency
            # model's choice; the hottest experts by load per copy (DeepSeek's and vLLM's
            # rule: a far hotter expert than the rest needs splitting whatever its reads
            # cost); the coldest (a copy of an idle expert costs nothing, where splitting a
            # hot one adds a weight read on a second GPU)
            counts = [choose_replicas(loads, num_physical, group)]
            if num_physical > experts:
                counts += [hottest_replicas(loads, num_physical),
                           coldest_replicas(loads, num_physical)]
            # the options are constructed together, stacked along the layer axis: one pass
            # of the construction loop instead of one per option
            k = len(counts)
            log = np.concatenate([np.stack([np.repeat(np.arange(experts), c) for c in cnt])
                                  for cnt in counts])  # [k * L, P]
            feat = _item_features(np.tile(loads, (1, k, 1)), log, group)
            stepwise = p["stepwise"] and group.num_ranks > 1
            rank_of = _construct(feat, log, np.tile(consistent, (k, 1)), group,
                                 problem.slots_per_rank, experts,
                                 min(p["construct_ranks"], group.num_ranks) if stepwise else None)
            rank_t = _rank_times(feat, rank_of, group)  # [k * L, S, G]
            times = rank_t.max(-1).mean(1).reshape(k, layers)  # us
            choice, before = np.zeros(layers, dtype=np.int64), times[0]
            for o in range(1, k):
                # layers where this option constructs faster (by option_margin: the latency
                # model's set, first, keeps ties and near-ties; benchmarks/replica_sets.py)
                take = times[o] < before * (1.0 - p["option_margin"])
                choice, before = np.where(take, o, choice), np.minimum(times[o], before)
            pick = choice * layers + np.arange(layers)
            item_log, feat, rank_of, rank_t = log[pick], feat[pick], rank_of[pick], rank_t[pick]
        if not (p["local_search"] and p["stepwise"] and group.num_ranks > 1):
            return item_log, rank_of, before, before, None
        fetch = None
        if migrate:
            fetch = fetch_costs(item_log, rank_of, group.num_ranks, experts,
                                problem.num_nodes, p["node_move_cost"])
        rank_of, swaps = self._search(feat, item_log, rank_of, rank_t, group, experts, fetch,
                                      p["migration_weight"] or 0.0, deadline)
        return item_log, rank_of, before, _rank_times(feat, rank_of, group).max(-1).mean(1), swaps

    # ----------------------------------------------------------------- local search
    def _search(self, feat: np.ndarray, item_log: np.ndarray, rank_of: np.ndarray,
                rank_t: np.ndarray, group: GroupModel, experts: int, fetch: np.ndarray | None,
                mw: float, deadline: float) -> tuple[np.ndarray, int]:
        """Swaps from the constructed placement until no layer improves (or the deadline).

        feat: [L, S, P, 3]; item_log, rank_of: [L, P]; rank_t: [L, S, G] each rank's time per
        step at rank_of (_rank_times); fetch: [L, G, E] or None -> (rank_of [L, P], swaps made)
        """
        layers, steps, num_items, _ = feat.shape
        ranks, coef = group.num_ranks, group.slot_coef.astype(np.float32)
        slots = num_items // ranks
        cand = min(slots, self.params["candidates"])
        rank_of = rank_of.copy()
        # float32 halves the traffic; the swap scores read items-last layouts (best_swaps)
        t = rank_t.astype(np.float32).transpose(0, 2, 1).copy()  # [L, G, S]
        by_item = feat.astype(np.float32).transpose(0, 2, 1, 3).copy()  # [L, P, S, 3]
        by_step = np.ascontiguousarray(by_item.transpose(0, 2, 3, 1))  # [L, S, 3, P]
        own = np.ascontiguousarray((by_item * coef[rank_of][:, :, None]).sum(-1).transpose(0, 2, 1))  # [L, S, P]
        hold = np.zeros((layers, ranks, experts), dtype=np.int64)
        np.add.at(hold, (np.arange(layers)[:, None], rank_of, item_log), 1)
        no_fetch = np.zeros((0, 0, 0), dtype=np.float32)
        stale = np.zeros(layers, dtype=np.int64)
        windows = -(-slots // cand)  # candidate windows over the bottleneck rank's items
        rounds = windows * min(ranks, 2)  # x bottleneck choices
        swaps = 0
        for _ in range(self.params["max_iters"]):
            # only the layers still improving are scored: most converge in a few dozen rounds
            lv = np.nonzero(stale < rounds)[0]
            if not len(lv) or time.perf_counter() > deadline:
                break
            tl, rk = t[lv], rank_of[lv]
            tmax = tl.max(1)  # [n, S]
            obj = tmax.mean(-1)
            # bottleneck rank: most often the slowest (then the slowest on average); when
            # stuck, try the runner-up
            mean = tl.mean(2)
            score = (tl >= tmax[:, None] - 1e-9).sum(2) + mean / (mean.max(1, keepdims=True) + 1e-30)
            pick = (stale[lv] // windows) % min(ranks, 2)
            g1 = np.take_along_axis(np.argsort(-score, axis=1), pick[:, None], 1)[:, 0]
            on1 = rk == g1[:, None]
            items1 = np.argsort(~on1, axis=1, kind="stable")[:, :slots]
            off = (stale[lv] % windows) * cand
            sel = np.take_along_axis(items1, (off[:, None] + np.arange(cand)) % slots, 1)
            # each candidate against every item on another rank (swap partners)
            val, ci, partner = best_swaps(t, by_step, own, coef, item_log, rank_of, hold,
                                     no_fetch if fetch is None else fetch, float(mw), lv, g1, sel)
            gain = obj - val
            ok = gain > self.params["min_gain"] * np.maximum(obj, 1e-30)
            stale[lv] = np.where(ok, 0, stale[lv] + 1)
            for x in np.nonzero(ok)[0]:
                layer, i, j = lv[x], sel[x, ci[x]], partner[x]
                ga, gb = g1[x], rank_of[layer, j]
                new_i, new_j = by_item[layer, i] @ coef[gb], by_item[layer, j] @ coef[ga]  # [S] each
                t[layer, ga] += new_j - own[layer, :, i]
                t[layer, gb] += new_i - own[layer, :, j]
                own[layer, :, i], own[layer, :, j] = new_i, new_j
                li, lj = item_log[layer, i], item_log[layer, j]
                hold[layer, ga, li] -= 1
                hold[layer, gb, lj] -= 1
                hold[layer, gb, li] += 1
                hold[layer, ga, lj] += 1
                rank_of[layer, i], rank_of[layer, j] = gb, ga
                swaps += 1
        return rank_of, swaps


def warm_up() -> float:
    """Plan a tiny problem so that the process has GEM's compiled swap kernel loaded (compiled,
    the first time after an install); returns the seconds that took. Benchmarks time it apart."""
    t0 = time.perf_counter()
    GemPolicy().place(PlacementProblem(np.ones((4, 1, 8)), GroupModel.tokens_over_speed(np.ones(2)), 8))
    return time.perf_counter() - t0


def _placement_order(feat_mean: np.ndarray, item_log: np.ndarray, consistent: np.ndarray,
                     group: GroupModel) -> np.ndarray:
    """The order both constructions place items in: consistent experts first, then by mean
    cost on an average rank, heaviest first.

    feat_mean: [L, P, 3] per-item features averaged over steps -> order: [L, P]
    """
    mean_cost = feat_mean @ group.slot_coef.mean(0)  # [L, P]
    is_cons = np.take_along_axis(consistent, item_log, axis=1)
    return np.lexsort((-mean_cost, ~is_cons), axis=1)


def _blocked_ranks(fill: np.ndarray, slots: int, holds_expert: np.ndarray) -> np.ndarray:
    """Ranks an item may not go to: full ones, and ones that already hold its expert unless
    every rank with room does (then a second replica on one rank is allowed).

    fill: [L, G] items per rank; holds_expert: [L, G] -> blocked: [L, G] bool
    """
    full = fill >= slots
    bad = full | holds_expert
    return np.where(bad.all(1, keepdims=True), full, bad)


def fetch_costs(item_log: np.ndarray, rank_of: np.ndarray, ranks: int, experts: int,
                num_nodes: int, node_move_cost: float) -> np.ndarray:
    """What it costs each rank to obtain each expert, relative to a cross-node copy.

    item_log, rank_of: [L, P] the current placement -> [L, ranks, experts] float32: 0 where
    the rank holds the expert, `node_move_cost` where another rank of its node does (a copy
    over NVLink), 1 otherwise. Ranks are grouped into nodes contiguously, as vLLM lays out
    EP ranks. With one node this is 0/1: "does the rank hold it".
    """
    layers = item_log.shape[0]
    hold = np.zeros((layers, ranks, experts), dtype=bool)
    hold[np.arange(layers)[:, None], rank_of, item_log] = True
    node_of = np.arange(ranks) // (ranks // num_nodes)
    in_node = np.zeros((layers, num_nodes, experts), dtype=bool)
    np.logical_or.at(in_node, (slice(None), node_of), hold)
    cost = np.where(in_node[:, node_of], node_move_cost, 1.0)
    return np.where(hold, 0.0, cost).astype(np.float32)


def _construct(feat: np.ndarray, item_log: np.ndarray, consistent: np.ndarray,
               group: GroupModel, slots: int, experts: int, num_cand: int | None) -> np.ndarray:
    """Greedy construction: items in `_placement_order`, each to the rank that scores best.

    num_cand None: the plain speed-aware greedy, each item where its mean time over the steps
    ends lowest (LPT on mean loads). Otherwise step-wise: each item to the rank that least
    raises the expected slowest-rank time over the planning steps, among the `num_cand` ranks
    where it would end soonest on average (among idle ranks the fastest come first). Times
    only grow (a slot's cost is never negative), so the slowest rank after adding the item to
    rank g is max(g's new time, the slowest time before) and the per-step slowest time is
    kept up to date incrementally: one item costs O(layers x (ranks + steps x num_cand)), not
    O(layers x steps x ranks). Step-wise needs at least two ranks.

    feat: [L, S, P, 3]; item_log: [L, P]; consistent: [L, E] -> rank_of: [L, P]
    """
    layers, steps, num_items, _ = feat.shape
    ranks = group.num_ranks
    coef = group.slot_coef  # [G, 3]
    rows = np.arange(layers)
    t_mean = np.broadcast_to(group.fixed, (layers, ranks)).copy()  # [L, G] mean time over steps
    if num_cand is not None:
        t = np.broadcast_to(group.fixed[:, None], (layers, ranks, steps)).copy()  # [L, G, S]
        slowest = t.max(1)  # [L, S]
        by_item = feat.transpose(0, 2, 1, 3).copy()  # [L, P, S, 3]: an item's steps in one row
        step_mean = np.full(steps, 1.0 / steps)  # means over steps as BLAS (numpy's is ~10x slower here)
    fill = np.zeros((layers, ranks), dtype=np.int64)
    hold = np.zeros((layers, ranks, experts), dtype=bool)
    rank_of = np.full((layers, num_items), -1, dtype=np.int64)
    feat_mean = feat.mean(1)  # [L, P, 3]
    order = _placement_order(feat_mean, item_log, consistent, group)
    for k in range(num_items):
        i = order[:, k]
        lg = item_log[rows, i]
        blocked = _blocked_ranks(fill, slots, hold[rows, :, lg])  # [L, G]
        finish = np.where(blocked, np.inf, t_mean + feat_mean[rows, i] @ coef.T)
        if num_cand is None:
            g = finish.argmin(1)
            t_mean[rows, g] = finish[rows, g]
        else:
            cand = np.argpartition(finish, num_cand - 1, axis=1)[:, :num_cand]  # [L, C]
            ok = np.isfinite(finish[rows[:, None], cand])
            cost = coef[cand] @ by_item[rows, i].transpose(0, 2, 1)  # [L, C, S], batched BLAS
            new_t = t[rows[:, None], cand] + cost
            score = (np.maximum(new_t, slowest[:, None]) + 1e-3 * new_t) @ step_mean
            c = np.where(ok, score, np.inf).argmin(1)
            g = cand[rows, c]
            tg = new_t[rows, c]  # [L, S]
            t[rows, g] = tg
            t_mean[rows, g] = tg @ step_mean
            np.maximum(slowest, tg, out=slowest)
        rank_of[rows, i] = g
        fill[rows, g] += 1
        hold[rows, g, lg] = True
    return rank_of


def _map(fn: Callable, items: Iterable, threads: int) -> list:
    """[fn(x) for x in items], on `threads` threads when there are several (numpy releases
    the GIL in its array loops, so independent layers or options plan in parallel)."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items))) as ex:
        return list(ex.map(fn, items))
