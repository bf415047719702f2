"""Study. Question: Can a recalibration check a GPU's speed against its own profile with 8 load
patterns instead of re-profiling?

Answer: The check takes 0.13-0.15 s against 1.0-1.2 s for a quick re-profile on an H200, but an
unchanged GPU re-timed 3-11% slower than its profile from idle (its clocks): so the GPUs are
compared with each other (`relative_speed_changes`); two checks of the same GPU were a median
0.6% and at most 3.1% apart.

Measured: 2026-11-23, one H200 and one H100. Command: `python3 benchmarks/studies/speed_check.py
--repeats 3`.

What a recalibration's GPU speed check costs and sees, against the quick re-profile it
replaces when the GPU has not changed (issue 7: re-profiling took 1.43 s of serving per time in
a 12000-request soak, 19% of the run at 500 steps).

On cuda:0, in the served model-q3's expert shape (hidden 2048, intermediate 768, 64 local
experts): a start-up profile (30 replays per point), then `--repeats` times a quick re-profile
(10 replays per point, as `GemWorker.local_profile(quick=True)`) and a speed check against the
start-up profile (`calibrate.check_speed`, as `GemWorker.local_speed_check`), each timed on the
host. Then speed checks of the same GPU doing extra expert work (the in-process emulation of
a slower GPU, `emulate.slow_down_experts`' way): the ratio a check reads for each, and its
change relative to the 0% check (how serving compares GPUs, calibrate.relative_speed_changes).
Then where a check's reading of the unchanged GPU comes from (the first check read 1.03-1.07 on
nvidia-h200, and over 1.05 at 16 experts in the GPU test): the check after the GPU idled or
right after work, with a longer clock lift, with as many replays as the profile, over all
points, and a full re-profile, each `--repeats` times, with per-point ratios and SM clocks;
last, how far every pair of those checks reads apart when compared as two GPUs would be.
  usage: python benchmarks/studies/speed_check.py [--repeats 5] [--experts 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time

import numpy as np
import torch

from vllm_gem.calibrate import (
    LIFT_SECONDS,
    CalibrationSpec,
    calibrate_device,
    check_points,
    check_speed,
    point_ratios,
    relative_speed_changes,
)

EXTRA_WORK = (0.0, 0.05, 0.1, 0.2)  # nominal; the extra launch reads 1.5-1.6x at small loads


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def idle(seconds: float) -> None:
    torch.cuda.synchronize(0)
    time.sleep(seconds)


def busy(seconds: float) -> None:
    """Keep cuda:0 doing matmuls, as serving would before a check."""
    a = torch.randn(4096, 4096, device=0, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        torch.cuda.synchronize(0)


def error_sources(spec: CalibrationSpec, quick: CalibrationSpec, start, repeats: int) -> list[dict]:
    """What each way of re-timing the unchanged GPU reads against its start-up profile."""
    variants = {  # name: (before, spec, check_speed keywords); spec None: a full re-profile
        "check after 2 s idle": (lambda: idle(2), quick, {}),
        "check right after 1 s of work": (lambda: busy(1), quick, {}),
        f"check after 2 s idle, {LIFT_SECONDS} s lift": (lambda: idle(2), quick, {"lift_s": LIFT_SECONDS}),
        f"check after work, {spec.reps} replays": (lambda: busy(1), spec, {}),
        "check after work, all points": (lambda: busy(1), quick, {"k": len(start.points)}),
        f"full re-profile, {spec.reps} replays": (lambda: busy(1), None, {}),
    }
    idx = check_points(len(start.points))
    print("profiled us at the check points: "
          + " ".join(f"{start.points[i].median_us:.1f}" for i in idx), flush=True)
    rows = []
    for name, (before, s, kw) in variants.items():
        for r in range(repeats):
            before()
            if s is None:
                prof = calibrate_device(0, spec)
                every = point_ratios(start.points, prof.points)
                row = {"ratio": float(np.median(every)),
                       "ratio_at_check_points": float(np.median(every[idx])),
                       "point_ratios": every[idx].round(4).tolist(),
                       "sm_mhz": [prof.state_before.sm_clock_mhz if prof.state_before else None,
                                  prof.state_after.sm_clock_mhz if prof.state_after else None]}
            else:
                c = check_speed(0, s, start, **kw)
                row = {"ratio": c.ratio, "point_ratios": list(c.point_ratios),
                       "sm_mhz": [c.before.sm_clock_mhz if c.before else None,
                                  c.after.sm_clock_mhz if c.after else None]}
            rows.append({"variant": name, "repeat": r, **row})
            print(f"{name:40s} #{r} ratio {row['ratio']:.4f} SM MHz {row['sm_mhz']} "
                  f"points {' '.join(f'{x:.3f}' for x in row['point_ratios'])}", flush=True)
    return rows


def pairwise_relative(rows: list[dict]) -> dict:
    """|relative_speed_changes - 1| of every pair of the unchanged GPU's 8-point checks, as if
    two GPUs had been checked (the worst case: different moments and clock states)."""
    checks = [np.array(r["point_ratios"]) for r in rows
              if r["variant"].startswith("check") and "all points" not in r["variant"]]
    dev = np.array([abs(relative_speed_changes([a, b])[1] - 1)
                    for a, b in itertools.combinations(checks, 2)])
    out = {"pairs": len(dev), "max": float(dev.max()), "p90": float(np.percentile(dev, 90)),
           "median": float(np.median(dev))}
    absolute = np.array([abs(float(np.median(c)) - 1) for c in checks])
    print(f"unchanged GPU, {len(checks)} checks: |ratio - 1| median {np.median(absolute):.4f} max "
          f"{absolute.max():.4f}; {len(dev)} pairs compared |relative - 1| median {out['median']:.4f} "
          f"p90 {out['p90']:.4f} max {out['max']:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--experts", type=int, default=64, help="local experts (the GPU test uses 16)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    spec = CalibrationSpec(hidden=2048, intermediate=768, num_experts=a.experts)
    quick = dataclasses.replace(spec, reps=10)
    start, start_s = timed(calibrate_device, 0, spec)
    print(f"start-up profile: {len(start.points)} points in {start_s:.2f} s", flush=True)
    runs = []
    for r in range(a.repeats):
        _, profile_s = timed(calibrate_device, 0, quick)
        check, check_s = timed(check_speed, 0, quick, start)
        runs.append({"quick_profile_s": profile_s, "check_s": check_s, "check_ratio": check.ratio})
        print(f"run {r}: quick re-profile {profile_s:.3f} s, speed check {check_s:.3f} s "
              f"({check.points} points), ratio {check.ratio:.4f}", flush=True)
    slower, plain = [], None
    for extra in EXTRA_WORK:  # relative: against the 0% check just before, as serving compares GPUs
        check = check_speed(0, dataclasses.replace(quick, extra_work=extra), start)
        plain = plain or check.point_ratios
        rel = float(relative_speed_changes([plain, check.point_ratios])[1])
        slower.append({"extra_work": extra, "ratio": check.ratio, "relative": rel, "check_s": check.seconds})
        print(f"extra work {extra:.0%}: ratio {check.ratio:.4f}, relative to 0% {rel:.4f}", flush=True)
    sources = error_sources(spec, quick, start, a.repeats)
    pairs = pairwise_relative(sources)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median: quick re-profile {med['quick_profile_s']:.3f} s, speed check {med['check_s']:.3f} s "
          f"({med['check_s'] / med['quick_profile_s']:.2f}x), ratio {med['check_ratio']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"start_profile_s": start_s, "points": len(start.points), "runs": runs,
                       "median": med, "extra_work": slower, "sources": sources,
                       "pairwise_relative": pairs}, f, indent=1)


if __name__ == "__main__":
    main()
