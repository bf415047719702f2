"""Study. Question: What share of the TPOT gain that a perfect placement could bring did GEM's plan
reach?

Answer: 99-103% of the ceiling (measured MoE share of TPOT x the predicted bound) on 2xH200 with
GPU 1 emulated 20% slower: the serving benchmark reports this ceiling in summary.md.

Measured: 2026-11-23, 2xH200. Command: `python benchmarks/studies/fitted_ceiling.py
docs/results/2026-11-23-e2e-slow20-no-prefix-cache-h200x2/summary.json`.

A ceiling reading from a switched A/B run's summary.json.

    python benchmarks/studies/fitted_ceiling.py SUMMARY.json [--rate inf] [--shape 512x128]

Fit TPOT p50 (the medians over rounds) against each placement's predicted slowest-rank MoE
layer time. The slope gives the MoE share of a step. Take as the floor the start map's
per-rank work split in proportion to the ranks' speeds, with fixed costs ignored: this is an
optimistic *estimate*, not a bound. Then report each placement's share of the ceiling
against vLLM's EPLB policy. When a plan's own prediction sits at that split, its share is
near 100% by construction (docs/benchmarks.md, sixth run).

Where the switch reports carry GEM's lower bound on any static placement's slowest-rank time
(`predicted_bound_us`: the LP relaxation with each rank's own coefficients),
the same reading is also given against it (`*_bound`): a true floor for the model's
prediction, so a share against it is not 100% by construction.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def fitted_ceiling(rows: list[dict], switches: list[dict], rate: str, shape: str,
                   start: str = "initial", reference: str = "vllm-default") -> dict:
    """rows: summary table rows; switches: switch records with GEM's reports.
    -> {slope_ms_per_us, moe_share_start, floor_us, ceiling_ms, shares: {placement: share}}"""
    pred = {sw["config"].rsplit("/", 1)[-1]: sw["report"] for sw in switches
            if "predicted_layer_us_after" in sw.get("report", {})}
    tpot = {r["config"].rsplit("/", 1)[-1]: r["tpot_p50"] for r in rows
            if str(r["rate"]) == rate and r["shape"] == shape}
    names = [n for n in pred if n in tpot]
    if len(names) < 2 or start not in names or reference not in names:
        raise ValueError(f"need {start}, {reference} and predictions for them; have {names}")
    x = np.array([pred[n]["predicted_layer_us_after"] for n in names])
    y = np.array([tpot[n] for n in names])
    slope, _ = np.polyfit(x, y, 1)
    ranks = np.array(pred[start]["rank_us_after"], dtype=np.float64)
    floor = len(ranks) / (1.0 / ranks).sum()  # equal work, split in proportion to 1 / time
    ceiling = slope * (pred[reference]["predicted_layer_us_after"] - floor)
    out = {"slope_ms_per_us": float(slope),
           "moe_share_start": float(slope * pred[start]["predicted_layer_us_after"] / tpot[start]),
           "floor_us": float(floor), "ceiling_ms": float(ceiling),
           "shares": {n: float((tpot[reference] - tpot[n]) / ceiling) for n in names}}
    bound = pred[reference].get("predicted_bound_us")
    if bound:
        ceiling_b = slope * (pred[reference]["predicted_layer_us_after"] - bound)
        out.update(bound_us=float(bound), ceiling_ms_bound=float(ceiling_b),
                   shares_bound={n: float((tpot[reference] - tpot[n]) / ceiling_b) for n in names})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summary")
    p.add_argument("--rate", default="inf")
    p.add_argument("--shape", default="512x128")
    a = p.parse_args()
    s = json.load(open(a.summary))
    print(json.dumps(fitted_ceiling(s["rows"], s["switches"], a.rate, a.shape), indent=1))


if __name__ == "__main__":
    main()
