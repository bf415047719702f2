"""Rules some engines put on a placement, applied to any planner's plan.

vllm-ascend's expert map holds one entry per (device, expert), so it cannot put two copies of
one expert on one device; vLLM and SGLang can. `spread_copies` moves such duplicate copies to
other ranks by swapping slots, keeping every expert's copy count, so the plan's balance
changes as little as the swaps allow.
"""

from __future__ import annotations

import numpy as np

from ..errors import GemInputError


def duplicate_copies(p2l: np.ndarray, num_ranks: int) -> list[tuple[int, int, int]]:
    """(layer, rank, expert) for every rank holding two or more copies of one expert.
    p2l: [layers, num_physical], rank-major with equal slots per rank."""
    layers, num_physical = p2l.shape
    per_rank = p2l.reshape(layers, num_ranks, num_physical // num_ranks)
    out = []
    for layer in range(layers):
        for r in range(num_ranks):
            values, counts = np.unique(per_rank[layer, r], return_counts=True)
            out += [(layer, r, int(e)) for e in values[counts > 1]]
    return out


def spread_copies(p2l: np.ndarray, num_ranks: int, loads: np.ndarray, source: str = "planner"
                  ) -> np.ndarray:
    """p2l with at most one copy of each expert per rank.

    p2l: [layers, num_physical]; loads: [steps, layers, experts] (what decides which swap
    disturbs the balance least: the other expert's tokens per copy closest to the moved one's).
    An expert with more copies than ranks first gives its extra slots to the experts with
    the most tokens per copy that have fewer copies than ranks (cap_copies); then each
    duplicate copy swaps places with a slot on another rank that holds neither expert.
    """
    out = p2l.copy()
    layers, num_physical = out.shape
    slots = num_physical // num_ranks
    copies = np.stack([np.bincount(row, minlength=loads.shape[2]) for row in out])  # [layers, experts]
    mean = loads.mean(0)  # [layers, experts] tokens per step
    for layer in range(layers):
        row = out[layer]  # a view: swaps write through
        cap_copies(row, copies[layer], mean[layer], num_ranks, slots)
        per_copy = mean[layer] / np.maximum(copies[layer], 1)  # [experts] tokens per copy
        for r in range(num_ranks):
            while True:
                mine = row[r * slots:(r + 1) * slots]
                values, counts = np.unique(mine, return_counts=True)
                if counts.max() < 2:
                    break
                e = int(values[counts.argmax()])
                best = None
                for q in range(num_ranks):
                    theirs = row[q * slots:(q + 1) * slots]
                    if q == r or (theirs == e).any():
                        continue
                    for j, f in enumerate(theirs.tolist()):
                        if (mine == f).any():
                            continue
                        cost = abs(per_copy[f] - per_copy[e])
                        if best is None or cost < best[0]:
                            best = (cost, q * slots + j)
                if best is None:  # no single swap helps (a tight layer): deal the copies out anew
                    row[:] = dealt_copies(copies[layer], per_copy, num_ranks)
                    break
                i = r * slots + int(np.flatnonzero(mine == e)[1])
                row[i], row[best[1]] = row[best[1]], row[i]
    return out


def cap_copies(row: np.ndarray, copies: np.ndarray, tokens: np.ndarray, num_ranks: int, slots: int) -> None:
    """In place: no expert of one layer keeps more copies than ranks.

    row: [num_physical] slot -> expert; copies: [experts] (updated); tokens: [experts] mean
    tokens per step. A surplus copy goes to the expert with the most tokens per copy among
    those with fewer copies than ranks that its rank does not hold yet (vLLM's own rule for
    adding a replica: the heaviest load per copy)."""
    while copies.max() > num_ranks:
        e = int(copies.argmax())
        ranks_of_e = np.flatnonzero(row == e) // slots
        # the copy on a rank that holds e twice goes first: that rank must lose one anyway
        r = int(np.bincount(ranks_of_e, minlength=num_ranks).argmax())
        i = r * slots + int(np.flatnonzero(row[r * slots:(r + 1) * slots] == e)[0])
        mine = row[r * slots:(r + 1) * slots]
        if len(row) > num_ranks * len(copies):
            raise GemInputError("planner", "num_physical", f"is {len(row)}",
                                f"at most {num_ranks * len(copies)} slots with one copy per rank")
        per_copy = np.where(copies < num_ranks, tokens / np.maximum(copies, 1), -np.inf)
        # an expert this rank lacks where there is one; else any (the swaps then move it)
        gain = np.where(~np.isin(np.arange(len(copies)), mine), per_copy, -np.inf)
        if not np.isfinite(gain.max()):
            gain = per_copy
        f = int(gain.argmax())
        row[i] = f
        copies[e] -= 1
        copies[f] += 1


def dealt_copies(copies: np.ndarray, per_copy: np.ndarray, num_ranks: int) -> np.ndarray:
    """A layer's slots with `copies` [experts] copies each (each <= num_ranks), one copy per
    rank: the copies, heaviest tokens per copy first, dealt to ranks in turn (copy k to rank
    k mod ranks), so one expert's copies land on distinct ranks and the heavy ones spread.
    -> [num_ranks * slots] slot -> expert."""
    order = np.argsort(-per_copy, kind="stable")
    flat = np.repeat(order, copies[order])  # [num_physical] copies, grouped by expert
    slots = len(flat) // num_ranks
    out = np.empty_like(flat)
    k = np.arange(len(flat))
    out[(k % num_ranks) * slots + k // num_ranks] = flat
    return out
