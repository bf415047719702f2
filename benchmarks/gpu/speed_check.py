"""What a recalibration's GPU speed check costs and sees, against the quick re-profile it
replaces when the GPU has not changed (issue 7: re-profiling took 1.43 s of serving per time in
session 8's soak, 19% of the run at 500 steps).

On cuda:0, in the served model-q3's expert shape (hidden 2048, intermediate 768, 64 local
experts): a start-up profile (30 replays per point), then `--repeats` times a quick re-profile
(10 replays per point, as `GemWorker.local_profile(quick=True)`) and a speed check against the
start-up profile (`calibrate.check_speed`, as `GemWorker.local_speed_ratio`), each timed on the
host. Then speed checks of the same GPU doing extra expert work (the in-process emulation of
a slower GPU, `emulate.slow_down_experts`' way): the ratio a check reads for each.
  usage: python benchmarks/gpu/speed_check.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from vllm_gem.calibrate import CalibrationSpec, calibrate_device, check_speed

EXTRA_WORK = (0.0, 0.05, 0.1, 0.2)  # what a check should read as about 1.0, 1.05, 1.1, 1.2


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    spec = CalibrationSpec(hidden=2048, intermediate=768, num_experts=64)
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
    slower = []
    for extra in EXTRA_WORK:
        check = check_speed(0, dataclasses.replace(quick, extra_work=extra), start)
        slower.append({"extra_work": extra, "ratio": check.ratio, "check_s": check.seconds})
        print(f"extra work {extra:.0%}: ratio {check.ratio:.4f}", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"median: quick re-profile {med['quick_profile_s']:.3f} s, speed check {med['check_s']:.3f} s "
          f"({med['check_s'] / med['quick_profile_s']:.2f}x), ratio {med['check_ratio']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"start_profile_s": start_s, "points": len(start.points), "runs": runs,
                       "median": med, "extra_work": slower}, f, indent=1)


if __name__ == "__main__":
    main()
