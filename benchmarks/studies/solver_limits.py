"""Study. Question: Up to which size does the exact MILP (vllm_gem.certify) prove a layer's
optimal placement within 60 s, and how far from its best plan is GEM's?

Answer: on 2 GPUs up to 64 experts (0.3-3.5 s), on 4 GPUs only at 8 experts; beyond, 60 s
leave a certified gap of about 1% on 4 GPUs and 2-6% on 8, where the solver found plans up
to 5.9% better than GEM's (docs/design.md).

Measured: 2026-12-06, 2-core CPU. Command: `python benchmarks/studies/solver_limits.py --json
docs/results/2026-12-06-certified-gap/solver-limits.json`.

One layer, 16 synthetic steps of 512 tokens, top-8 (top-4 at 8 experts), one redundant slot
per GPU, GPUs slowed like a fleet (vllm_gem.profiles.fleet_group, as benchmarks/planner.py's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_gem.certify import certify
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.profiles import fleet_group
from vllm_gem.traces import SyntheticParams, synthetic_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for gpus in (2, 4, 8):
        for experts in (8, 16, 32, 64):
            if experts < gpus:
                continue
            params = SyntheticParams(steps=16, layers=1, experts=experts, top_k=min(8, experts // 2),
                                     tokens_per_step=512, seed=7)
            tr = synthetic_trace(params)
            g = fleet_group(gpus, 7)
            phys = experts + gpus
            p2l = make("gem", min_steps=0).place(PlacementProblem(tr.loads, g, phys))
            c = certify(tr.loads, p2l, g, a.seconds)
            rows.append({"gpus": gpus, "experts": experts, "slots": phys, **c.as_dict()})
            print(f"{gpus} GPUs x {experts} experts ({phys} slots): proven {c.proven_layers}/1 in "
                  f"{c.seconds:.1f} s, gem {c.plan_us:.1f} best {c.best_us:.1f} bound {c.bound_us:.1f} "
                  f"(milp {c.milp_bound_us:.1f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
