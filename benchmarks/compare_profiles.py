"""Median time ratio of GPU profiles against a first one, over the load points they share.

    python benchmarks/compare_profiles.py BASE.json OTHER.json...

Compares GPUs across machines and sessions (run-to-run, GPU-to-GPU, host-to-host), where
`vllm-gem calibrate` compares only the GPUs of one run. Profiles must come from the same
kernel and expert shape for the ratio to mean a speed difference.
"""

from __future__ import annotations

import sys

import numpy as np

from vllm_gem.formats import GpuProfile, load


def point_times(path: str) -> dict[tuple[int, ...], float]:
    """{tokens_per_expert: median_us} of one profile file."""
    return {tuple(q.tokens_per_expert): q.median_us for q in load(path, GpuProfile).points}


def main(paths: list[str]) -> None:
    base = point_times(paths[0])
    print(f"against {paths[0]} ({len(base)} points)")
    for path in paths[1:]:
        other = point_times(path)
        shared = [k for k in base if k in other]
        if not shared:
            print(f"{path}: no load point in common")
            continue
        ratio = np.array([other[k] / base[k] for k in shared])
        p10, p90 = np.percentile(ratio, [10, 90])
        print(f"{path}: {len(shared)} points, median ratio {np.median(ratio):.4f} "
              f"(p10 {p10:.4f}, p90 {p90:.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
