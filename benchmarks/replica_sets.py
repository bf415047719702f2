"""Study. Question: GEM constructs three replica sets per layer (the latency model's, the
hottest experts', the coldest experts') and keeps the one whose *construction* is fastest.
Does that choice cost anything after the local search, and would a margin (take another set
only if it constructs `option_margin` faster) do better?

Answer: no margin wins everywhere. The latency model's set alone (margin 1) is 2-3% better
on benchmarks/scale.py's 32- to 128-GPU cases, and 4-18% worse on 8 GPUs there, on `spread8`
with 72 slots, and on planner.py's fleet cases (the 6-GPU one has an expert 3.7x hotter
than the rest); margins of 2-5% fall in between. The default stays 0 (the fastest
construction). Choosing after the local search would need three searches.

Measured: 2026-12-06, 2-core CPU. Command: `python benchmarks/replica_sets.py`
(output: docs/results/2026-12-06-replica-sets/replica-sets.txt).
Columns: GEM / vLLM's policy (simulated, held-out half) for the scale and demo cases, and
GEM's mean layer time (us) on its planning steps for benchmarks/planner.py's fleet cases.
"""

from __future__ import annotations

import argparse

from scale import run_case  # benchmarks/scale.py, beside this script

from vllm_gem.evaluate import bundled_trace, compare, split_steps
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.profiles import bundled_profiles, fleet_group, group_from_profiles
from vllm_gem.simulate import simulate
from vllm_gem.traces import SyntheticParams, synthetic_trace


def row(margin: float) -> list[str]:
    out = []
    for model, gpus in (("deepseek-v3", 64), ("qwen3-235b", 32), ("deepseek-v3", 128), ("deepseek-v3", 8)):
        r = run_case(model, gpus, 0, gem_params={"option_margin": margin})
        out.append(f"{model[:4]} x{gpus} {r['gem_us'] / r['vllm_us']:.3f}")
    for seed, gpus, experts in ((101, 8, 64), (103, 6, 60)):
        tr = synthetic_trace(SyntheticParams(steps=64, layers=1, experts=experts, top_k=8,
                                             tokens_per_step=1024, seed=seed))
        group = fleet_group(gpus, seed)
        plan = split_steps(tr.loads)[0][:32]
        phys = experts + gpus
        p2l = make("gem", min_steps=0, option_margin=margin).place(PlacementProblem(plan, group, phys))
        out.append(f"fleet{seed}/{phys} {simulate(plan, p2l, group).mean:.1f}us")
    for trace, prof, phys in (("qwen", "one-slow4", 64), ("synthetic", "spread8", 72)):
        group = group_from_profiles(bundled_profiles(prof))
        v, g = compare(bundled_trace(trace).loads, group, phys, ["vllm-default", "gem"],
                       planner_params={"gem": {"option_margin": margin}})
        out.append(f"{trace[:4]}/{prof}/{phys} {g.result.mean / v.result.mean:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--margins", default="0,0.02,0.05,1")
    for m in map(float, ap.parse_args().margins.split(",")):
        print(f"option_margin {m:<5g}", "  ".join(row(m)), flush=True)


if __name__ == "__main__":
    main()
