"""Study. Question: Does a change meant only to make GEM faster leave its plans as they were?

Answer: Yes for the compiled swap scoring, the per-thread layer shares and the construction's
single slowest-time track: the plans of 3f51919 (before them) and of 47ce567 are equal slot for
slot in all 19 cases below (raw: docs/results/2026-12-06-same-plans/).

Measured: 2026-12-06, 2-core CPU. Command: `python benchmarks/studies/same_plans.py --out
after.npz` in this checkout and `PYTHONPATH=/path/to/checkout-of-3f51919 python
benchmarks/studies/same_plans.py --out before.npz`, then `python
benchmarks/studies/same_plans.py --compare before.npz after.npz`.

Plans GEM makes on a fixed set of cases, saved to one .npz, and the comparison of two such
files: the planner.py scale cases (58 layers x 256 experts on 2, 8 and 64 GPUs, with and
without redundant slots), the reference Qwen trace on 4 GPUs at 60-120 slots, three synthetic
8-GPU cases, and migration-aware plans (gem with migration_weight 0.5 and 5, from vLLM's
placement, on one and two nodes).

    python benchmarks/studies/same_plans.py --out plans.npz
    python benchmarks/studies/same_plans.py --compare before.npz after.npz
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from vllm_gem.evaluate import bundled_trace, split_steps
from vllm_gem.formats import ExpertShape
from vllm_gem.latency import GroupModel, LatencyModel
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.profiles import analytic_model
from vllm_gem.traces import SyntheticParams, synthetic_trace


def analytic_group(shape: ExpertShape, slowdowns: np.ndarray) -> GroupModel:
    return GroupModel.of([LatencyModel(analytic_model(shape, slowdown=s), 64) for s in slowdowns])


def cases():
    """-> (name, problem, planner params) for every case."""
    big = synthetic_trace(SyntheticParams(steps=256, layers=58, experts=256, top_k=8,
                                          tokens_per_step=4096, seed=3)).loads
    for gpus, redundant in [(2, 0), (2, 32), (8, 0), (8, 8), (64, 0), (64, 64)]:
        g = analytic_group(ExpertShape(7168, 2048), np.linspace(1.0, 1.2, gpus))
        yield f"scale {gpus} GPUs x {256 + redundant}", PlacementProblem(split_steps(big)[0], g, 256 + redundant), {}
    qwen = split_steps(bundled_trace("qwen").loads)[0]
    g = GroupModel.tokens_over_speed(np.array([1.0, 1.0, 1.0, 1 / 1.2]))
    for phys in (60, 64, 80, 120):
        yield f"qwen 4 GPUs x {phys}", PlacementProblem(qwen, g, phys), {}
    fleet = analytic_group(ExpertShape(2048, 768), np.linspace(1.0, 1.22, 8))
    for seed in range(3):
        tr = synthetic_trace(SyntheticParams(steps=64, layers=4, experts=64, top_k=4,
                                             tokens_per_step=2048, seed=seed)).loads
        yield f"synthetic seed {seed} 8 GPUs x 72", PlacementProblem(split_steps(tr)[0], fleet, 72), {}
    for gpus, nodes in [(8, 1), (8, 2), (16, 2)]:
        g = analytic_group(ExpertShape(2048, 768), np.linspace(1.0, 1.2, gpus))
        tr = split_steps(synthetic_trace(SyntheticParams(steps=64, layers=12, experts=64, top_k=4,
                                                         tokens_per_step=2048, seed=5)).loads)[0]
        old = make("vllm-default").place(PlacementProblem(tr, g, 64 + gpus))
        for mw in (0.5, 5.0):
            yield (f"migrate {gpus} GPUs {nodes} node(s) weight {mw}",
                   PlacementProblem(tr, g, 64 + gpus, num_nodes=nodes, old_phys_to_log=old),
                   {"migration_weight": mw})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write every case's plan [layers, slots] here (.npz)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two such files")
    a = ap.parse_args()
    if a.compare:
        x, y = (np.load(f) for f in a.compare)
        differ = 0
        for name in x.files:
            same = (x[name] == y[name]).all(-1) if name in y.files else np.zeros(len(x[name]), bool)
            differ += not same.all()
            print(f"{name:40s} {int(same.sum()):3d}/{len(same)} layers equal")
        print("same plans" if not differ else f"{differ} case(s) differ")
        return 1 if differ else 0
    if not a.out:
        ap.error("--out or --compare")
    plans = {}
    for name, problem, params in cases():
        plans[name] = make("gem", **params).place(problem)
        print(name, file=sys.stderr)
    np.savez(a.out, **plans)
    return 0


if __name__ == "__main__":
    sys.exit(main())
