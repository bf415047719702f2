"""Scoring one round of GEM's local search, compiled with Numba.

A round asks, for every layer still improving: which swap of a candidate item on the layer's
bottleneck rank g1 with an item on another rank h lowers the expected slowest-rank time
mean_s max(T_g1, T_h, T_rest) the most? As numpy array operations that was half a dozen passes
over [layers, candidates, steps, partners] temporaries (about 12 MB each at 64 GPUs),
memory-bound; here one layer's [steps, items] rows stay in cache and each candidate is scored
against every item in one pass, vectorised over the items. The arithmetic is the array
version's (float32, steps summed first to last): the plans came out equal slot for slot
(benchmarks/studies/same_plans.py).
Numba is a dependency of vLLM itself; the compiled kernel is cached on disk, so only the first
plan of an installation compiles it.
"""

from __future__ import annotations

import numba
import numpy as np


def _compiled(fn):
    """numba.njit with the compiled code cached on disk; where no cache location is writable
    (a read-only install and home), compiled in each process rather than failing the import."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return numba.njit(nogil=True)(fn)


@_compiled
def best_swaps(t: np.ndarray, feat: np.ndarray, own: np.ndarray, coef: np.ndarray,
               item_log: np.ndarray, rank_of: np.ndarray, hold: np.ndarray, fetch: np.ndarray,
               mw: float, layers: np.ndarray, g1: np.ndarray,
               sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best swap of each layer's round: a candidate sel[x, c] on rank g1[x] with a partner,
    any item on another rank, scored on the mean over steps of the slowest rank after it.

    t: [L, G, S] f32 each rank's time per step; feat: [L, S, 3, P] f32 item features (items
    last: a step's row of partners is contiguous); own: [L, S, P] f32 each item's cost on its
    rank; coef: [G, 3] f32 per-rank slot coefficients; item_log, rank_of: [L, P] each item's
    expert and rank; hold: [L, G, E] copies of each expert per rank (a swap may not put a second
    copy on a rank); fetch: [L, G, E] f32 what each rank pays to get each expert, weighted by mw
    (a [0, 0, 0] array: no migration cost); layers: [n] the layers to score; g1: [n] their
    bottleneck rank; sel: [n, C] the candidates
    -> val: [n] f32 (inf where no swap is allowed), c: [n], item: [n] the partner (first best
    in candidate, then item order)
    """
    n, num_cand = sel.shape
    ranks, steps = t.shape[1], t.shape[2]
    num_items = rank_of.shape[1]
    use_fetch = fetch.shape[0] > 0
    best_val = np.full(n, np.inf, dtype=np.float32)
    best_c = np.zeros(n, dtype=np.int64)
    best_p = np.zeros(n, dtype=np.int64)
    m1 = np.empty(steps, dtype=np.float32)
    m2 = np.empty(steps, dtype=np.float32)
    a1 = np.empty(steps, dtype=np.int64)
    t_by_step = np.empty((steps, ranks), dtype=np.float32)
    on_a = np.empty((steps, num_items), dtype=np.float32)  # each item's cost on g1
    rest = np.empty((steps, num_items), dtype=np.float32)  # slowest rank other than g1 and h
    keep = np.empty((steps, num_items), dtype=np.float32)  # T_h less the item's own cost
    ch = np.empty((3, num_items), dtype=np.float32)  # coefficients of each item's rank
    acc = np.empty(num_items, dtype=np.float32)
    free = np.empty(num_items, dtype=np.bool_)
    inf32 = np.float32(np.inf)
    for x in range(n):
        lay, a = layers[x], g1[x]
        rk = rank_of[lay]
        # slowest and second slowest rank other than g1, per step (first index on ties)
        m1[:] = -inf32
        m2[:] = -inf32
        a1[:] = -1
        for g in range(ranks):
            for s in range(steps):
                v = t[lay, g, s]
                t_by_step[s, g] = v
                if g == a:
                    continue
                if v > m1[s]:
                    m2[s] = m1[s]
                    m1[s] = v
                    a1[s] = g
                elif v > m2[s]:
                    m2[s] = v
        ca0, ca1, ca2 = coef[a, 0], coef[a, 1], coef[a, 2]
        for k in range(3):
            for p in range(num_items):
                ch[k, p] = coef[rk[p], k]
        for p in range(num_items):  # partners: items on other ranks; their experts not on g1
            free[p] = rk[p] != a and hold[lay, a, item_log[lay, p]] == 0
        # one loop per row (few arrays each): simple enough for the compiler to vectorise
        for s in range(steps):
            _cost_row(on_a[s], feat[lay, s, 0], feat[lay, s, 1], feat[lay, s, 2], ca0, ca1, ca2)
            _keep_row(keep[s], t_by_step[s], own[lay, s], rk)
            _rest_row(rest[s], rk, a1[s], m1[s], m2[s])
        for c in range(num_cand):
            i = sel[x, c]
            acc[:] = 0.0
            for s in range(steps):
                f0, f1, f2 = feat[lay, s, 0, i], feat[lay, s, 1, i], feat[lay, s, 2, i]
                base = t[lay, a, s] - (f0 * ca0 + f1 * ca1 + f2 * ca2)
                _add_step(acc, base, on_a[s], rest[s], keep[s], ch[0], ch[1], ch[2], f0, f1, f2)
            li = item_log[lay, i]
            held = hold[lay, :, li]
            for p in range(num_items):
                if not free[p] or held[rk[p]] > 0 or item_log[lay, p] == li:
                    continue  # a rank would hold two copies of one expert
                val = acc[p] / np.float32(steps)
                if use_fetch:
                    hp, lp = rk[p], item_log[lay, p]
                    val += np.float32(mw) * (fetch[lay, hp, li] + fetch[lay, a, lp]
                                             - fetch[lay, a, li] - fetch[lay, hp, lp])
                if val < best_val[x]:
                    best_val[x], best_c[x], best_p[x] = val, c, p
    return best_val, best_c, best_p


@numba.njit(nogil=True, inline="always")
def _add_step(acc, base, on_a, rest, keep, ch0, ch1, ch2, f0, f1, f2):
    """acc[p] += the slowest rank's time at one step after swapping the candidate (features
    f0..f2, g1's time less its cost: base) with item p: max(g1, the rest, p's rank)."""
    for p in range(acc.shape[0]):
        on_g1 = max(base + on_a[p], rest[p])
        on_h = (f0 * ch0[p] + f1 * ch1[p] + f2 * ch2[p]) + keep[p]
        acc[p] += max(on_g1, on_h)


@numba.njit(nogil=True, inline="always")
def _cost_row(out, f0, f1, f2, c0, c1, c2):
    """out[p] = item p's cost on a rank of coefficients c0..c2 (features f0..f2: [P] each)."""
    for p in range(out.shape[0]):
        out[p] = f0[p] * c0 + f1[p] * c1 + f2[p] * c2


@numba.njit(nogil=True, inline="always")
def _keep_row(out, t_step, own_step, rk):
    """out[p] = the time of item p's rank without item p, at one step."""
    for p in range(out.shape[0]):
        out[p] = t_step[rk[p]] - own_step[p]


@numba.njit(nogil=True, inline="always")
def _rest_row(out, rk, top, first, second):
    """out[p] = the slowest time at one step among ranks other than g1 and item p's rank
    (first: the slowest but g1, on rank top; second: the runner-up)."""
    for p in range(out.shape[0]):
        out[p] = second if rk[p] == top else first
