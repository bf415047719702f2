"""Study. Question: Do the predictions a serving run logged recompute offline from what it saved?

Answer: Yes: every placement's predicted time and bound recompute from the saved routing history
and coefficients (docs/results/2026-11-23-e2e-slow20-no-prefix-cache-h200x2/gem-planning).

Measured: 2026-11-23, CPU. Command: `python benchmarks/studies/recheck_plans.py
docs/results/2026-11-23-e2e-slow20-no-prefix-cache-h200x2/gem-planning`.

Recompute a served run's predictions and lower bound offline, from what it brought back.

    python benchmarks/studies/recheck_plans.py RESULTS/e2e-ab-slow20 [--block-m 64]

Reads RESULTS/summary.json (the switch reports, with each rank's fitted latency coefficients
`plan_latency_coef`) and RESULTS/gem-planning/ (the routing history the start-up planned from,
and every placement GEM applied). For each placement it replays that history through the
simulator and prints the predicted slowest-rank MoE layer time next to the one the server
logged, and the bound on any static placement. Numbers that match say the server planned
from what was saved; the saved history and coefficients then let anyone re-plan offline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vllm_gem.bounds import lower_bounds
from vllm_gem.formats import Placement, RoutingTrace, load
from vllm_gem.kernels.moe_gemm import CALIBRATION_TILE
from vllm_gem.latency import GroupModel
from vllm_gem.simulate import simulate


def recheck(results: Path, block_m: int) -> list[dict]:
    """-> one row per applied placement: {file, planner, logged_us, recomputed_us, bound_us}."""
    summary = json.loads((results / "summary.json").read_text())
    coefs = {json.dumps(sw["report"]["plan_latency_coef"]) for sw in summary["switches"]
             if "plan_latency_coef" in sw.get("report", {})}
    if len(coefs) != 1:
        raise ValueError(f"{results}/summary.json: expected one set of plan_latency_coef over the "
                         f"switches (profiles fixed at start-up), found {len(coefs)}")
    group = GroupModel(np.array(json.loads(coefs.pop())), block_m)
    history = load(results / "gem-planning" / "planning-history-start.msgpack", RoutingTrace)
    loads = history.loads.astype(np.float64)  # [steps, layers, experts]
    files = sorted((results / "gem-planning").glob("placement-gen*.json"),
                   key=lambda f: int(f.stem.removeprefix("placement-gen")))
    rows, bounds = [], None
    for f in files:
        p = load(f, Placement)
        phys_to_log = np.array(p.phys_to_log)  # [layers, num_physical]
        if bounds is None:  # one bound for every placement with this many slots
            bounds = lower_bounds(loads, group, phys_to_log.shape[1])
        sim = simulate(loads, phys_to_log, group, bounds)
        rows.append({"file": f.name, "planner": p.planner, "logged_us": p.predicted["layer_us"],
                     "recomputed_us": sim.mean, "bound_us": sim.bound})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--block-m", type=int, default=CALIBRATION_TILE.block_m,
                    help="the calibration kernel's BLOCK_M (the profiles' kernel.block_m)")
    a = ap.parse_args()
    print(f"{'placement':22s} {'planner':14s} {'logged us':>10s} {'recomputed us':>14s} {'bound us':>9s}")
    for r in recheck(a.results, a.block_m):
        print(f"{r['file']:22s} {r['planner']:14s} {r['logged_us']:10.2f} {r['recomputed_us']:14.2f} "
              f"{r['bound_us']:9.2f}")


if __name__ == "__main__":
    main()
