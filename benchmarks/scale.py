"""GEM from 8 to 1024 GPUs, simulated: gain over vLLM's policy, gap to the lower bound, and
planning time (issue 6, CPU part).

    python benchmarks/scale.py [--sizes 8,16,...,1024] [--models deepseek-v3,qwen3-235b]
                               [--out out/scale]

- Models: DeepSeek-V3-like (58 MoE layers x 256 experts, top-8) and Qwen3-235B-like
  (94 x 128, top-8); synthetic routing (Zipf 0.5, bursty groups), 128 decode tokens per GPU
  per step; planned on the first half of 64 steps, replayed on the second half.
- Slots: experts + 1/8 redundant, rounded up to a multiple of the GPUs (at least one per GPU).
- GPUs: the measured H200 profile (bundled:h200x2, GPU 0) slowed by a per-GPU factor drawn
  like the variability Sinha et al. report: half-normal with an 8% mean, capped at 22%, and
  1.5x outliers with probability 1%. Seeded: the same GPUs for every planner at a size.
- vLLM's DefaultEplbPolicy (through vllm) and GEM (time_budget 8 s) on the same
  inputs; the bound is the tighter of the fluid, preemptive and equal-slots bounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from vllm_gem.evaluate import split_steps
from vllm_gem.latency import GroupModel, fit
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.planners.gem import warm_up
from vllm_gem.profiles import bundled_profiles
from vllm_gem.simulate import simulate
from vllm_gem.traces import SyntheticParams, synthetic_trace

MODELS = {"deepseek-v3": (58, 256, 8), "qwen3-235b": (94, 128, 8)}
TOKENS_PER_GPU = 128
GEM_BUDGET_S = 8.0  # GEM's whole plan; its local search stops at this deadline


def gpu_slowdowns(n: int, seed: int = 0) -> np.ndarray:
    """[n] slowdown factors >= 1: half-normal (mean 8%, cap 22%) plus 1% outliers at 1.5x."""
    rng = np.random.default_rng(seed)
    s = 1.0 + np.minimum(np.abs(rng.normal(0.0, 0.08 / np.sqrt(2 / np.pi), n)), 0.22)
    return np.where(rng.random(n) < 0.01, 1.5, s)


def num_slots(experts: int, gpus: int) -> int:
    want = max(experts + experts // 8, gpus)
    return -(-want // gpus) * gpus


def run_case(model: str, gpus: int, seed: int, gem_params: dict | None = None) -> dict:
    """One scale case: vLLM's policy and GEM (with `gem_params` over the defaults) planned on
    the first half of the steps, replayed on the second."""
    layers, experts, top_k = MODELS[model]
    base = fit(bundled_profiles("h200x2")[0])
    slow = gpu_slowdowns(gpus, seed)
    group = GroupModel.of([base.scaled(float(x)) for x in slow])
    tr = synthetic_trace(SyntheticParams(steps=64, layers=layers, experts=experts, top_k=top_k,
                                         tokens_per_step=TOKENS_PER_GPU * gpus, zipf=0.5, seed=seed))
    plan, test = split_steps(tr.loads)
    phys = num_slots(experts, gpus)
    row = {"model": model, "gpus": gpus, "slots": phys, "slowdown_mean": float(slow.mean()),
           "slowdown_max": float(slow.max())}
    results = {}
    for name, params in (("vllm-default", {}), ("gem", {"time_budget": GEM_BUDGET_S, **(gem_params or {})})):
        t0 = time.perf_counter()
        p2l = make(name, **params).place(PlacementProblem(plan, group, phys))
        row[f"{name}_plan_s"] = time.perf_counter() - t0
        results[name] = simulate(test, p2l, group)
    v, g = results["vllm-default"], results["gem"]
    row.update(vllm_us=v.mean, gem_us=g.mean, bound_us=g.bound, gem_gain=1 - g.mean / v.mean,
               gem_gap=g.gap, vllm_gap=v.gap, vllm_straggler=v.straggler_ratio,
               gem_straggler=g.straggler_ratio)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        x = [r["gpus"] for r in rs]
        ax[0].plot(x, [100 * r["gem_gain"] for r in rs], "o-", label=model)
        ax[1].plot(x, [r["gem_gap"] for r in rs], "o-", label=f"{model} GEM")
        ax[1].plot(x, [r["vllm_gap"] for r in rs], "x--", label=f"{model} vLLM policy")
        ax[2].plot(x, [r["gem_plan_s"] for r in rs], "o-", label=f"{model} GEM")
        ax[2].plot(x, [r["vllm-default_plan_s"] for r in rs], "x--", label=f"{model} vLLM policy")
    titles = ["GEM: mean MoE layer time cut vs vLLM's policy (%)",
              "mean layer time / lower bound", "planning time (s), this CPU"]
    for a, t in zip(ax, titles, strict=True):
        a.set_xscale("log", base=2)
        a.set_xlabel("GPUs (expert parallel)")
        a.set_title(t, fontsize=9)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,16,32,64,128,256,512,1024")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/scale"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    # the first plan of a process loads GEM's compiled swap kernel: timed apart
    print(f"first plan of this process (loads the compiled swap kernel): {warm_up():.2f} s")
    rows = []
    head = (f"{'model':12s} {'GPUs':>5s} {'slots':>5s} {'vLLM us':>8s} {'GEM us':>8s} {'gain':>6s} "
            f"{'GEM/bnd':>7s} {'vLLM/bnd':>8s} {'GEM s':>6s} {'vLLM s':>6s}")
    print(head)
    for model in a.models.split(","):
        for gpus in (int(x) for x in a.sizes.split(",")):
            r = run_case(model, gpus, a.seed)
            rows.append(r)
            print(f"{model:12s} {gpus:5d} {r['slots']:5d} {r['vllm_us']:8.1f} {r['gem_us']:8.1f} "
                  f"{100 * r['gem_gain']:5.1f}% {r['gem_gap']:7.3f} {r['vllm_gap']:8.3f} "
                  f"{r['gem_plan_s']:6.2f} {r['vllm-default_plan_s']:6.2f}", flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
            "argv": vars(a) | {"out": str(a.out)}}
    (a.out / "scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, a.out / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
