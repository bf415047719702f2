"""Study. Question: How much of a first calibration on a machine is Triton compiling, and how
much of it does compiling every load pattern's kernels at once, before timing, take away?

Answer: most of it. A cold fp8 calibration took 10.6-11.9 s compiling each kernel at its
first launch, against 2.1-2.3 s with a filled cache; compiled ahead on 8 threads it took
5.8-7.1 s (fp8-block 10.6 -> 7.1 s, per-tensor fp8 11.9 -> 7.1 s, bf16 9.2 -> 5.8 s), with the
same held-out error. So compile_threads defaults to 8.

Measured: 2026-12-06, one H100, Triton 3.6.0. Command: `python3
benchmarks/studies/calibration_compile.py --precisions fp8-block,fp8,bf16`.

Each run is a fresh process with an empty Triton cache (TRITON_CACHE_DIR in a new temporary
folder), calibrating cuda:0 (`calibrate.calibrate_device`, the default spec but for the
precision and `compile_threads`): 0 compiles each kernel at its first launch, one at a time;
N compiles them all on N threads first (`kernels.moe_gemm.compile_ahead`). The runs of one
precision alternate which setting goes first. Printed: the calibration's seconds (inside the
process, as a serving worker pays them), its held-out error, and a run with the Triton cache
already filled (the same folder again) for the floor.
  usage: python benchmarks/studies/calibration_compile.py [--precisions fp8-block,fp8,bf16]
         [--threads 8] [--json FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
from vllm_gem.calibrate import CalibrationSpec, calibrate_device, held_out_report
import torch
torch.cuda.init()
t0 = time.perf_counter()
prof = calibrate_device(0, CalibrationSpec(precision=sys.argv[1], compile_threads=int(sys.argv[2])))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, **held_out_report(prof)}))
"""


def run(precision: str, threads: int, cache: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", CHILD, precision, str(threads)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{precision}, {threads} threads failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="fp8-block,fp8,bf16")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    print(f"{'precision':10s} {'compile threads':>15s} {'cache':>6s} {'seconds':>8s} {'held-out':>8s}")
    for i, precision in enumerate(args.precisions.split(",")):
        settings = [0, args.threads] if i % 2 else [args.threads, 0]
        for threads in settings:
            with tempfile.TemporaryDirectory() as cache:
                for state in ("empty", "filled"):
                    if state == "filled" and threads:
                        continue  # the floor once per precision is enough
                    r = run(precision, threads, cache)
                    rows.append({"precision": precision, "compile_threads": threads, "cache": state, **r})
                    print(f"{precision:10s} {threads:15d} {state:>6s} {r['seconds']:8.2f} "
                          f"{r['held_out_rel_rms']:8.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
