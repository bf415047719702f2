"""Study. Question: Does GEM plan better from more history steps (`max_steps`)?

Answer: On the held-out skewed trace, 32 -> 64 -> 128 steps moved the mean layer time by -2.6%
at the trace's own load and within noise at 256 and 64 rows a step, for 2.5-3.7x the planning
time: `max_steps` stays 32.

Measured: 2026-11-23, CPU. Command: `cd benchmarks/studies && python planning_steps.py`.

Does GEM plan better from more history steps? Held-out test on the skewed trace.

    python benchmarks/studies/planning_steps.py   (CPU; writes nothing)

Each case (benchmarks/studies/static_bound.py's: the trace at its own load and at 256 and 64 rows a
step, 2 GPUs with the bundled H200 and 66-SM profiles) is split in half by steps: GEM plans
on the first half with `max_steps` of 32, 64 and 128, and every plan is replayed on the
second half, next to the linear map and the simulator's bound there.
"""

from __future__ import annotations

import time

from static_bound import PHYSICAL, linear_map, skewed_cases

from vllm_gem.bounds import lower_bounds
from vllm_gem.simulate import simulate
from vllm_gem.vllm.planning import decide, group_from_profiles


def main() -> None:
    profiles, cases = skewed_cases()
    group = group_from_profiles(profiles)
    print(f"{'load':28s} {'max_steps':>9s} {'held-out us':>12s} {'plan s':>7s} {'linear':>7s} {'bound':>7s}")
    for name, case in cases.items():
        half = case.shape[0] // 2
        train, test = case[:half], case[half:]
        linear = linear_map(*case.shape[1:])
        bounds = lower_bounds(test, group, PHYSICAL)
        base = simulate(test, linear, group, bounds)
        for max_steps in (32, 64, 128):
            t0 = time.perf_counter()
            d = decide(train, profiles, linear, planner_params={"max_steps": max_steps})
            seconds = time.perf_counter() - t0
            held_out = simulate(test, d.phys_to_log, group, bounds).mean
            print(f"{name:28s} {max_steps:9d} {held_out:12.2f} {seconds:7.1f} "
                  f"{base.mean:7.2f} {base.bound:7.2f}")


if __name__ == "__main__":
    main()
