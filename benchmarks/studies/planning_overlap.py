"""Study. Question: Does planning a recalibration in a background thread stall serving less than
planning inside the engine step?

Answer: On 2 CPU cores it cost a stand-in serving loop 0.012-0.035 s against 0.30 s held inside
the step: recalibration plans in a background thread on EP rank 0 and applies `plan_delay_steps`
(200) steps later.

Measured: 2026-11-23, CPU. Command: `python benchmarks/studies/planning_overlap.py --repeats 3`.

What a recalibration's planning costs serving inside the step, and in a background thread.

Inside the step (plan_delay_steps 0) serving waits for the whole `planning.decide`. In a
thread (`background.PendingPlan`) it competes with the serving thread for the GIL only. This
replays a saved start-up routing history (2xH200, 2026-11-23) (model-q3: 12 MoE layers, 128 experts)
tiled to 500 steps, as a recalibration every 500 steps plans from, on two ranks (the second
1.2x slower), and runs the planning next to a stand-in serving loop: per step `--python-ms`
of Python (holding the GIL: scheduling, launches) then `--wait-ms` waiting on the GPU
(GIL released, as in a CUDA synchronize). It prints what serving lost in each case.
CPU only; the numbers depend on this machine's cores and clock.

    python benchmarks/studies/planning_overlap.py [--repeats 3] [--python-ms 0.4] [--wait-ms 3.6]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from vllm_gem.formats import RoutingTrace, load
from vllm_gem.profiles import example_profile
from vllm_gem.vllm.planning import decide

HISTORY = (Path(__file__).parents[2] / "docs/results/2026-11-23-e2e-slow20-no-prefix-cache-h200x2/gem-planning"
           / "planning-history-start.msgpack")


def step(python_s: float, wait_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < python_s:  # Python work: holds the GIL
        pass
    time.sleep(wait_s)  # waiting on the GPU: releases it
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python-ms", type=float, default=0.4)
    ap.add_argument("--wait-ms", type=float, default=3.6)
    a = ap.parse_args()
    py_s, wait_s = a.python_ms / 1e3, a.wait_ms / 1e3
    loads = load(HISTORY, RoutingTrace).loads.astype(np.float64)  # [steps, layers, experts]
    history = loads[np.random.default_rng(0).integers(0, loads.shape[0], 500)]
    layers, experts = history.shape[1:]
    old = np.tile(np.arange(experts), (layers, 1))
    profiles = [example_profile("gpu0", 1.0, num_experts=experts // 2),
                example_profile("gpu1", 1.2, num_experts=experts // 2)]

    def plan() -> None:
        decide(history, profiles, old, planner="gem-migrate", min_gain=0.02, lp_bound=False)

    plan()  # imports and first-call costs, as a served worker has paid them
    inside = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        plan()
        inside.append(time.perf_counter() - t0)
    base = statistics.mean(step(py_s, wait_s) for _ in range(200))
    lost, p99, wall = [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        th = threading.Thread(target=plan)
        th.start()
        steps = []
        while th.is_alive():
            steps.append(step(py_s, wait_s))
        th.join()
        wall.append(time.perf_counter() - t0)
        lost.append(sum(steps) - len(steps) * base)
        p99.append(float(np.percentile(steps, 99)) * 1e3)
    t_in, t_lost = statistics.median(inside), statistics.median(lost)
    print(f"stand-in step: {a.python_ms} ms Python + {a.wait_ms} ms waiting; measured {base * 1e3:.2f} ms")
    print(f"planning inside the step: serving held {t_in:.3f} s (median of {a.repeats})")
    print(f"planning in a thread: {statistics.median(wall):.3f} s wall, serving lost {t_lost:.3f} s "
          f"({t_lost / t_in:.2f}x the stall), step p99 {statistics.median(p99):.2f} ms while it ran")


if __name__ == "__main__":
    main()
