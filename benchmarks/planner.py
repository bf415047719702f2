"""Planner quality and speed, side by side with vLLM's DefaultEplbPolicy, in one run.

    python benchmarks/planner.py [--json out.json] [--quick]

1. Reference case (issue 2): Qwen1.5-MoE HarMoEny trace, 4 GPUs with one 20% slower,
   time = tokens / speed; plan on the first half of the steps, replay the second. Reports
   each planner's mean layer time over the fluid bound, and the "oracle": the best static
   placement found for each test step on that step alone (what no static plan can beat).
2. Synthetic heterogeneous cases with the bundled example profiles (full latency model):
   gap to the tighter lower bound, ratio to vLLM's default policy.
3. Scale: 2, 8 and 64 GPUs up to 58 layers x 256 experts (DeepSeek-V3-like), with and
   without redundant slots: planning time of GEM and of vLLM's policy, and quality ratio.

5. Misspecified speeds (`--only-misspecified`): the bundled traces on fleets of 4, 8 and 16
   GPUs (speeds drawn 1 - |N(0, 0.06)|) and 8 GPUs with two 25% slower, with none, one and
   four redundant slots per GPU; plans made with believed speeds, replayed on the held-out
   steps with true speeds = believed x (1 + N(0, sigma)), sigma 3% and 6%, 50 draws: GEM
   robust to sigma and GEM with exact speeds, each against vLLM's policy under the same draws.

4. Certified gap (`--certify SECONDS`, per case): GEM's plan against the exact MILP
   (vllm_gem.certify: replicas, the latency model as it is, GEM's plan as the incumbent) on
   the steps GEM planned on (the first half, at most 32 steps, no padding): GEM's time, the
   solver's best time, its certified lower bound beside the earlier bounds, how many layers
   it proved optimal, and the planning time of each. Cases: the bundled ones, and held-out
   synthetic ones drawn with new seeds (one layer, 8 GPUs with speeds spread like measured
   fleets: mean 8%, max 22% slower; and 6 GPUs).

Every ratio compares planners in the same run on the same held-out steps. Planning times are
of a warm process: its first plan, which loads GEM's compiled swap kernel (compiles it, the
first time after an install), is timed apart and printed first.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import scale as scale_bench  # benchmarks/scale.py, beside this script

from vllm_gem.bounds import lower_bounds
from vllm_gem.evaluate import bundled_trace, compare, split_steps
from vllm_gem.formats import ExpertShape
from vllm_gem.latency import GroupModel, fit
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.planners.gem import warm_up
from vllm_gem.profiles import (
    analytic_group,
    bundled_profiles,
    fleet_group,
    group_from_profiles,
)
from vllm_gem.simulate import rank_times
from vllm_gem.traces import SyntheticParams, synthetic_trace

PLANNERS = ["vllm-default", "greedy-speed", "gem"]


def oracle(test: np.ndarray, group: GroupModel, num_physical: int) -> float:
    """Mean over test steps of GEM planned on that single step and replayed on it."""
    times = []
    for s in range(test.shape[0]):
        one = test[s:s + 1]
        p2l = make("gem", min_steps=0).place(PlacementProblem(one, group, num_physical))
        times.append(rank_times(one, p2l, group).max(-1).mean())
    return float(np.mean(times))


def reference_case(out: dict) -> None:
    tr = bundled_trace("qwen")
    g = GroupModel.tokens_over_speed(np.array([1.0, 1.0, 1.0, 1 / 1.2]))
    _, test = split_steps(tr.loads)
    print("\n## 1. Qwen1.5-MoE (HarMoEny), 4 GPUs one 20% slower, time = tokens/speed")
    print(f"{'slots':>5s} {'planner':14s} {'/ fluid':>8s} {'/ tight':>8s} {'vs vllm':>8s}")
    res = []
    for phys in (60, 64, 80, 120):
        rows = compare(tr.loads, g, phys, PLANNERS)
        base = rows[0].result.mean
        fluid = rows[0].result.bound_fluid
        for r in rows:
            s = r.result
            print(f"{phys:5d} {r.planner:14s} {s.gap_fluid:8.3f} {s.gap:8.3f} {s.mean / base:8.3f}")
            res.append({"slots": phys, "planner": r.planner, "gap_fluid": s.gap_fluid,
                        "gap": s.gap, "vs_vllm": s.mean / base})
        o = oracle(test, g, phys)
        print(f"{phys:5d} {'oracle/step':14s} {o / fluid:8.3f}")
        res.append({"slots": phys, "planner": "oracle-per-step", "gap_fluid": o / fluid})
    out["reference"] = res


def synthetic_cases(out: dict) -> None:
    print("\n## 2. Synthetic heterogeneous cases (bundled example profiles, full latency model)")
    print(f"{'profiles':10s} {'tokens':>6s} {'slots':>5s} {'planner':14s} {'gap':>6s} {'vs vllm':>8s} "
          f"{'oracle':>7s}")
    res = []
    for prof in ("one-slow4", "spread8"):
        g = group_from_profiles(bundled_profiles(prof))
        for tokens in (256, 4096):  # decode-like and prefill-like steps
            tr = synthetic_trace(SyntheticParams(steps=240, layers=8, experts=64, top_k=8,
                                                 tokens_per_step=tokens, seed=11))
            _, test = split_steps(tr.loads)
            for phys in (64, 64 + g.num_ranks):
                rows = compare(tr.loads, g, phys, PLANNERS)
                base = rows[0].result.mean
                bound = rows[0].result.bound
                o = oracle(test[:24], g, phys) / lower_bounds(test[:24], g, phys)[1].mean()
                for r in rows:
                    s = r.result
                    print(f"{prof:10s} {tokens:6d} {phys:5d} {r.planner:14s} {s.gap:6.3f} "
                          f"{s.mean / base:8.3f} {o:7.3f}")
                    res.append({"profiles": prof, "tokens_per_step": tokens, "slots": phys,
                                "planner": r.planner, "gap": s.gap, "vs_vllm": s.mean / base,
                                "oracle_gap_24_steps": o, "bound_us": bound})
    out["synthetic"] = res


def scale(out: dict, quick: bool) -> None:
    print("\n## 3. Scale: planning time and held-out quality (synthetic trace, spread of 0-20%)")
    print(f"{'gpus':>4s} {'layers':>6s} {'experts':>7s} {'slots':>5s} {'gem s':>7s} {'vllm s':>7s} "
          f"{'gem/vllm time':>14s}")
    res = []
    shape = ExpertShape(7168, 2048)
    sizes = [(2, 58, 256), (8, 58, 256), (64, 58, 256)] if not quick else [(8, 16, 64)]
    for gpus, layers, experts in sizes:
        g = analytic_group(np.linspace(1.0, 1.2, gpus), shape)
        tr = synthetic_trace(SyntheticParams(steps=256, layers=layers, experts=experts, top_k=8,
                                             tokens_per_step=4096, seed=3))
        for redundant in (0, gpus if gpus > 2 else 32):
            phys = experts + redundant
            rows = compare(tr.loads, g, phys, ["vllm-default", "gem"])
            v, m = rows[0], rows[1]
            print(f"{gpus:4d} {layers:6d} {experts:7d} {phys:5d} {m.plan_seconds:7.2f} "
                  f"{v.plan_seconds:7.2f} {m.result.mean / v.result.mean:14.3f}")
            res.append({"gpus": gpus, "layers": layers, "experts": experts, "slots": phys,
                        "gem_seconds": m.plan_seconds, "vllm_seconds": v.plan_seconds,
                        "gem_over_vllm_layer_time": m.result.mean / v.result.mean})
    out["scale"] = res


def certify_cases() -> list[tuple[str, str, np.ndarray, GroupModel, list[int]]]:
    """(trace, fleet, planning loads, group, slot counts) of every certified case: the bundled
    profiles' cases; held-out synthetic layers on 8 and 6 GPUs; the four cases that opened
    issue 37; each bundled trace on 8 and 16 GPUs spread like a fleet (fleet_group, seeds 208
    and 216) with the fewest slots the fleet allows and one and four redundant slots per GPU
    more. Planning loads: the first half of the trace, at most 32 steps."""
    def first_half(tr) -> np.ndarray:
        return split_steps(tr.loads)[0][:32]

    cases = []
    for trace, prof in (("qwen", "h200x2-sm66"), ("qwen", "one-slow4"), ("synthetic", "one-slow4")):
        tr = bundled_trace(trace)
        g = group_from_profiles(bundled_profiles(prof))
        cases.append((trace, f"bundled:{prof}", first_half(tr), g, [tr.shape[2], tr.shape[2] + g.num_ranks]))
    for seed, gpus, experts in ((101, 8, 64), (102, 8, 64), (103, 6, 60)):
        # one layer each: the whole time limit goes to it
        tr = synthetic_trace(SyntheticParams(steps=64, layers=1, experts=experts, top_k=8,
                                             tokens_per_step=1024, seed=seed))
        cases.append((f"synthetic seed {seed}", f"fleet {gpus} GPUs", first_half(tr), fleet_group(gpus, seed),
                      [experts, experts + gpus]))
    qwen, switch = bundled_trace("qwen"), bundled_trace("switch-exp128")
    two_slow = analytic_group(np.array([1.0] * 6 + [1 / 0.75] * 2), ExpertShape(2048, 1408))
    cases += [("qwen", "fleet 4 GPUs (seed 104)", first_half(qwen), fleet_group(4, 104), [60]),
              ("switch-exp128", "fleet 4 GPUs (seed 104)", first_half(switch), fleet_group(4, 104), [132]),
              ("switch-exp128", "fleet 8 GPUs (seed 108)", first_half(switch), fleet_group(8, 108), [136]),
              ("qwen", "8 GPUs, two at 0.75 speed", first_half(qwen), two_slow, [72])]
    for name in ("qwen", "switch-exp128", "synthetic"):
        tr = bundled_trace(name)
        experts = tr.shape[2]
        for gpus in (8, 16):
            least = -(-experts // gpus) * gpus
            cases.append((name, f"fleet {gpus} GPUs (seed {200 + gpus})", first_half(tr),
                          fleet_group(gpus, 200 + gpus), [least, least + gpus, least + 4 * gpus]))
    return cases


def certified_cases(out: dict, seconds: float) -> None:
    from vllm_gem.certify import certify
    print(f"\n## 4. Certified gap ({seconds:g} s per plan, on the steps GEM planned on)")
    print(f"{'case':46s} {'slots':>5s} {'gem us':>8s} {'best us':>8s} {'bound':>8s} {'relax':>8s} "
          f"{'earlier':>8s} {'gem gap':>7s} {'best gap':>8s} {'vllm gap':>8s} {'proven':>7s} {'gem s':>6s} "
          f"{'cert s':>6s}")
    res = []
    for name, fleet, plan, g, slot_counts in certify_cases():
        experts = plan.shape[2]
        for phys in slot_counts:
            if phys % g.num_ranks:
                continue
            t0 = time.perf_counter()
            p2l = make("gem", min_steps=0).place(PlacementProblem(plan, g, phys))
            gem_s = time.perf_counter() - t0
            v = make("vllm-default").place(PlacementProblem(plan, g, phys))
            vllm_us = float(rank_times(plan, v, g).max(-1).mean())
            c = certify(plan, p2l, g, seconds)
            vllm_gap = vllm_us / c.bound_us - 1  # the bound holds for every placement, vLLM's too
            label = f"{name} / {fleet}"
            print(f"{label:46s} {phys:5d} {c.plan_us:8.2f} {c.best_us:8.2f} {c.bound_us:8.2f} "
                  f"{c.milp_bound_us:8.2f} {c.existing_bound_us:8.2f} {c.gap:7.2%} {c.best_gap:8.2%} "
                  f"{vllm_gap:8.2%} {c.proven_layers:3d}/{c.layers:<3d} {gem_s:6.2f} {c.seconds:6.1f}", flush=True)
            res.append({"case": name, "profiles": fleet, "gpus": g.num_ranks, "experts": experts,
                        "layers": plan.shape[1], "steps": plan.shape[0], "slots": phys, "gem_seconds": gem_s,
                        "vllm_us": vllm_us, "vllm_certified_gap": vllm_gap, **c.as_dict()})
    met = [r for r in res if r["certified_gap"] <= 0.03]
    best = [r for r in res if r["best_certified_gap"] <= 0.03]
    # the bound is a proof only if no plan beats it: GEM's, vLLM's policy's, the best found
    below = [r for r in res if min(r["plan_us"], r["vllm_us"], r["exact_best_us"]) >= r["certified_bound_us"]]
    print(f"certified gap <= 3%: GEM's plan in {len(met)} of {len(res)} cases, the best plan found in "
          f"{len(best)} of {len(res)}; the bound below GEM's, vLLM's policy's and the best plan in "
          f"{len(below)} of {len(res)}")
    out["certified"] = res


def certified_scale(out: dict, seconds: float) -> None:
    """The scale case (benchmarks/scale.py: DeepSeek-V3-like, 58 layers x 256 experts on 64
    GPUs, 320 slots, seed 0), certified in `seconds`."""
    from vllm_gem.certify import certify
    layers, experts, top_k = scale_bench.MODELS["deepseek-v3"]
    gpus = 64
    base = fit(bundled_profiles("h200x2")[0])
    g = GroupModel.of([base.scaled(float(x)) for x in scale_bench.gpu_slowdowns(gpus, 0)])
    tr = synthetic_trace(SyntheticParams(steps=64, layers=layers, experts=experts, top_k=top_k,
                                         tokens_per_step=scale_bench.TOKENS_PER_GPU * gpus, zipf=0.5, seed=0))
    plan = split_steps(tr.loads)[0]
    phys = scale_bench.num_slots(experts, gpus)
    p2l = make("gem", time_budget=scale_bench.GEM_BUDGET_S).place(PlacementProblem(plan, g, phys))
    v = make("vllm-default").place(PlacementProblem(plan, g, phys))
    vllm_us = float(rank_times(plan, v, g).max(-1).mean())
    c = certify(plan, p2l, g, seconds)
    print(f"\n## 4b. Scale case, 64 GPUs x 256 experts x 58 layers, {phys} slots, {seconds:g} s: GEM "
          f"{c.plan_us:.2f} us, bound {c.bound_us:.2f} (earlier {c.existing_bound_us:.2f}), GEM gap {c.gap:.2%}, "
          f"best gap {c.best_gap:.2%}, vLLM gap {vllm_us / c.bound_us - 1:.2%}, {c.seconds:.0f} s", flush=True)
    out["certified_scale"] = {"gpus": gpus, "experts": experts, "layers": layers, "slots": phys,
                              "vllm_us": vllm_us, "vllm_certified_gap": vllm_us / c.bound_us - 1, **c.as_dict()}


def misspecified_fleets() -> dict[str, np.ndarray]:
    """Fleets of 4, 8 and 16 GPUs with speeds drawn 1 - |N(0, 0.06)| (seeds 104, 108, 116),
    and 8 GPUs with two 25% slower."""
    fleets = {f"{n} drawn": 1.0 - np.abs(np.random.default_rng(100 + n).normal(0, 0.06, n)) for n in (4, 8, 16)}
    fleets["8 two slow"] = np.array([1.0] * 6 + [0.75] * 2)
    return fleets


def misspecified(out: dict, draws: int = 50, tolerance: float | None = None) -> None:
    """Section 5: plans made with believed speeds, replayed with true speeds = believed x
    (1 + N(0, sigma)) per GPU; GEM as it plans now (robust to sigma) and as it planned with
    exact speeds (speed_error 0), both against vLLM's policy under the same draws. `tolerance`:
    the robust planner's robust_tolerance (its default unless given)."""
    from vllm_gem.simulate import scenario_times
    print(f"\n## 5. Misspecified speeds: true = believed x (1 + N(0, sigma)), {draws} draws on the held-out steps")
    print(f"{'trace':14s} {'fleet':11s} {'slots':>5s} {'sigma':>5s} {'exact gem':>9s} {'exact rob':>9s} "
          f"{'gem mean':>8s} {'gem worst':>9s} {'rob mean':>8s} {'rob worst':>9s} {'choice':>11s} {'rob s':>6s}")
    res = []
    for name in ("qwen", "switch-exp128", "synthetic"):
        tr = bundled_trace(name)
        plan, test = split_steps(tr.loads)
        experts = tr.shape[2]
        for fleet, speeds in misspecified_fleets().items():
            n = len(speeds)
            least = -(-experts // n) * n
            exact = GroupModel.tokens_over_speed(speeds)
            for slots in (least, least + n, least + 4 * n):
                if slots > experts * n:
                    continue
                v = make("vllm-default").place(PlacementProblem(plan, exact, slots))
                today = make("gem", speed_error=0.0).place(PlacementProblem(plan, exact, slots))
                t_exact = scenario_times(test, v, [exact])[0]
                for sigma in (0.03, 0.06):
                    pol = make("gem", speed_error=sigma,
                               **({} if tolerance is None else {"robust_tolerance": tolerance}))
                    t0 = time.perf_counter()
                    rob = pol.place(PlacementProblem(plan, exact, slots))
                    rob_s = time.perf_counter() - t0
                    truths = exact.perturbed(draws, seed=1000 + n, errors=sigma)  # not the planner's draws
                    base = scenario_times(test, v, truths)
                    r_today = scenario_times(test, today, truths) / base
                    r_rob = scenario_times(test, rob, truths) / base
                    row = {"trace": name, "fleet": fleet, "speeds": speeds.round(4).tolist(), "slots": slots,
                           "sigma": sigma, "draws": draws,
                           "exact_gem_vs_vllm": scenario_times(test, today, [exact])[0] / t_exact,
                           "exact_robust_vs_vllm": scenario_times(test, rob, [exact])[0] / t_exact,
                           "gem_mean": float(r_today.mean()), "gem_worst": float(r_today.max()),
                           "robust_mean": float(r_rob.mean()), "robust_worst": float(r_rob.max()),
                           "choice": pol.report["robust"]["choice"], "robust_seconds": rob_s}
                    res.append(row)
                    print(f"{name:14s} {fleet:11s} {slots:5d} {sigma:5.2f} {row['exact_gem_vs_vllm']:9.3f} "
                          f"{row['exact_robust_vs_vllm']:9.3f} {row['gem_mean']:8.3f} {row['gem_worst']:9.3f} "
                          f"{row['robust_mean']:8.3f} {row['robust_worst']:9.3f} {row['choice']:>11s} {rob_s:6.2f}",
                          flush=True)
    met = [r for r in res if r["robust_mean"] <= 1.0 and r["robust_worst"] <= 1.02]
    near = [r for r in res if r["exact_robust_vs_vllm"] - r["exact_gem_vs_vllm"] <= 0.01]
    print(f"robust GEM: mean <= 1.00x and worst draw <= 1.02x vLLM's policy in {len(met)} of {len(res)} "
          f"cases; exact-speed ratio within 1 pp of GEM with exact speeds in {len(near)} of {len(res)}")
    out["misspecified"] = res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--quick", action="store_true", help="small scale section only")
    ap.add_argument("--certify", type=float, metavar="SECONDS",
                    help="also section 4: the exact MILP for that long per case")
    ap.add_argument("--only-certify", action="store_true", help="section 4 alone")
    ap.add_argument("--certify-scale", type=float, metavar="SECONDS",
                    help="also the scale case (64 GPUs x 256 experts x 58 layers) certified for that long")
    ap.add_argument("--only-scale", action="store_true", help="section 3 alone (planning time)")
    ap.add_argument("--only-misspecified", action="store_true", help="section 5 alone (speed errors)")
    ap.add_argument("--robust-tolerance", type=float, metavar="FRACTION",
                    help="section 5: the robust planner's robust_tolerance (default: the planner's own)")
    a = ap.parse_args()
    make("vllm-default")  # fail early if vllm is missing
    out: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
                 "date": time.strftime("%Y-%m-%d %H:%M")}
    # the first plan of a process loads GEM's compiled swap kernel (compiles it, the first
    # time after an install): timed apart, so that every plan timed below is a warm one
    out["first_plan_seconds"] = warm_up()
    print(f"first plan of this process (loads the compiled swap kernel): {out['first_plan_seconds']:.2f} s")
    if a.only_scale:
        scale(out, a.quick)
    elif a.only_misspecified:
        misspecified(out, tolerance=a.robust_tolerance)
    elif not a.only_certify:
        reference_case(out)
        synthetic_cases(out)
        scale(out, a.quick)
        misspecified(out, tolerance=a.robust_tolerance)
    if a.certify or a.only_certify:
        certified_cases(out, a.certify or 60.0)
    if a.certify_scale:
        certified_scale(out, a.certify_scale)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
