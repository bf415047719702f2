"""Summarise calibration profiles: error, and speed against the same GPU unslowed and GPU 0.

    python benchmarks/gpu/summarize_calibration.py RESULTS_DIR

For every profile-*.json under RESULTS_DIR: held-out model error, and the median over the
calibration points of (time / time of the reference profile on the same points), where the
reference is the first whole-GPU run of the same device, and of device 0.
"""

import sys
from pathlib import Path

import numpy as np

from vllm_gem.calibrate import held_out_report
from vllm_gem.formats import GpuProfile, load


def times(p: GpuProfile) -> np.ndarray:
    return np.array([q.median_us for q in p.points])


def main() -> None:
    root = Path(sys.argv[1])
    profs = {f: load(f, GpuProfile) for f in sorted(root.rglob("profile-*.json"))}
    whole = {p.gpu.index: p for f, p in profs.items() if not p.emulation and "run1" in str(f)}
    print(f"{'file':60s} {'SMs':>5s} {'held-out':>8s} {'max':>6s} {'vs same GPU':>11s} {'vs GPU0':>8s} "
          f"{'prefill':>8s} {'decode':>7s}")
    for f, p in profs.items():
        rep = held_out_report(p)
        ref = whole.get(p.gpu.index)
        r_same = np.median(times(p) / times(ref)) if ref else float("nan")
        r0 = np.median(times(p) / times(whole[0])) if 0 in whole else float("nan")
        # split by regime: points with >= 4 tiles on some expert (prefill) vs the rest
        tok = np.array([max(q.tokens_per_expert) for q in p.points])
        pre, dec = tok >= 4 * p.kernel.block_m, tok <= 16
        rp = np.median((times(p) / times(ref))[pre]) if ref else float("nan")
        rd = np.median((times(p) / times(ref))[dec]) if ref else float("nan")
        sms = p.emulation.split()[3] if p.emulation else str(p.gpu.sm_count)
        print(f"{str(f.relative_to(root)):60s} {sms:>5s} {rep['held_out_rel_rms']:8.3f} "
              f"{rep['held_out_rel_max']:6.3f} {r_same:11.3f} {r0:8.3f} {rp:8.3f} {rd:7.3f}")


if __name__ == "__main__":
    main()
