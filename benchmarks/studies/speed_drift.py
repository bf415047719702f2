"""Study. Question: How much does a placement lose when one GPU's speed drifts and GEM does not re-
profile?

Answer: Missing a 5% slowdown costs at most 1.6% of MoE layer time, a 10% one up to 4.3%: so a
re-profile waits until a GPU's speed moved more than 5% against the others' (`speed_tolerance`
0.05).

Measured: 2026-11-23, CPU. Command: `python benchmarks/studies/speed_drift.py --ranks 2,4,8
--slowdowns 0.03,0.05,0.1,0.2`.

What a GPU that slows down while serving costs a placement planned for its old speed, and
what re-planning for its new speed wins back: how large a drift recalibration's speed check
must catch (`speed_tolerance`, default 5%).

Each case: a bundled trace (qwen and switch-exp128: real HarMoEny routing; synthetic: bursty,
generated), planned on its first half and replayed on the second; N GPUs with one measured
H200 profile (nvidia-h200-x2 GPU 0, Qwen3-30B-A3B expert shape), all equal; then the last GPU
slows by s. Slowing multiplies every latency coefficient of that GPU by 1 + s (a lower clock
slows the fixed, per-expert, per-tile and per-token costs alike; an approximation, no GPU
measured this). Placements, all replayed under the slowed GPU:
  eplb       vLLM's default policy (token counts only; the same whatever the speeds)
  stale      GEM planned for the equal GPUs: what serves while the drift goes unnoticed
  replanned  gem-migrate from `stale` for the new speeds: what a recalibration that re-profiled
             would apply (bounded by the move cost in serving; not here)
CPU only. Prints each case's mean slowest-GPU layer time, stale / replanned - 1 (the cost of
missing the drift) and replanned / eplb.

    python benchmarks/studies/speed_drift.py [--ranks 2,4,8] [--slowdowns 0.03,0.05,0.1,0.2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from vllm_gem.bounds import lower_bounds
from vllm_gem.evaluate import bundled_trace, split_steps
from vllm_gem.latency import GroupModel
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.profiles import bundled_profiles, group_from_profiles
from vllm_gem.simulate import simulate

TRACES = ("qwen", "switch-exp128", "synthetic")


def slowed(group: GroupModel, rank: int, s: float) -> GroupModel:
    """group with `rank`'s coefficients [4] times 1 + s."""
    coef = group.coef.copy()
    coef[rank] *= 1.0 + s
    return GroupModel(coef, group.block_m, list(group.names))


def case(loads: np.ndarray, ranks: int, slowdowns: list[float]) -> list[dict]:
    """loads: [steps, layers, experts] -> one row per slowdown of the last of `ranks` GPUs."""
    plan, test = split_steps(loads)
    experts = loads.shape[2]
    num_physical = ranks * math.ceil(experts / ranks)  # spare slots hold replicas
    equal = group_from_profiles(bundled_profiles("h200x2")[:1] * ranks)
    eplb = make("vllm-default").place(PlacementProblem(plan, equal, num_physical))
    stale = make("gem").place(PlacementProblem(plan, equal, num_physical))
    rows = []
    for s in slowdowns:
        truth = slowed(equal, ranks - 1, s)
        replanned = make("gem-migrate").place(
            PlacementProblem(plan, truth, num_physical, old_phys_to_log=stale))
        bounds = lower_bounds(test, truth, num_physical)
        res = {name: simulate(test, p2l, truth, bounds)
               for name, p2l in (("eplb", eplb), ("stale", stale), ("replanned", replanned))}
        t = {name: r.mean for name, r in res.items()}
        rows.append({"ranks": ranks, "slowdown": s, **{f"{k}_us": v for k, v in t.items()},
                     "bound_us": res["replanned"].bound,  # no static placement beats it
                     "moved_slots": int((replanned != stale).sum()),
                     "missed_cost": t["stale"] / t["replanned"] - 1,
                     "replanned_vs_eplb": t["replanned"] / t["eplb"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--slowdowns", default="0.03,0.05,0.1,0.2")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--json", help="also write every row here")
    a = ap.parse_args()
    slowdowns = [float(x) for x in a.slowdowns.split(",")]
    out = []
    print(f"{'trace':14s} {'GPUs':>4s} {'slower':>6s} {'eplb us':>8s} {'stale us':>8s} {'replan us':>9s} "
          f"{'bound us':>8s} {'missed':>7s} {'replan/eplb':>11s} {'moved':>5s}")
    for name in a.traces.split(","):
        loads = bundled_trace(name).loads.astype(np.float64)
        for ranks in (int(r) for r in a.ranks.split(",")):
            for r in case(loads, ranks, slowdowns):
                r["trace"] = name
                out.append(r)
                print(f"{name:14s} {ranks:4d} {r['slowdown']:6.0%} {r['eplb_us']:8.1f} {r['stale_us']:8.1f} "
                      f"{r['replanned_us']:9.1f} {r['bound_us']:8.1f} {r['missed_cost']:+7.1%} "
                      f"{r['replanned_vs_eplb']:11.3f} "
                      f"{r['moved_slots']:5d}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
