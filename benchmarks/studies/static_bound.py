"""Study. Question: How far are GEM's plans from a bound that knows each rank's own latency
coefficients (the static LP)?

Answer: 8-11% above it on the skewed trace, where the fluid bound said more: the simulator's
bound includes the static LP (`lower_bounds(..., lp=True)`).

Measured: 2026-11-23, CPU. Command: `python benchmarks/studies/static_bound.py`.

Do the static bounds bind on our skewed trace? Per-step tight bound against the static
equal-slots and the static LP bound (bounds.py), and the simulated linear map and GEM's plan
against them: mean over steps and layers, at the trace's own load and at decode-like loads
drawn from it (multinomial, seeded).

    python benchmarks/studies/static_bound.py   (CPU; writes nothing)

GPUs: the bundled H200 profile and the bundled 66-SM green-context H200 profile (measured).
"""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vllm_gem.bounds import lower_bounds, static_lp_bound
from vllm_gem.formats import GpuProfile, RoutingTrace, load
from vllm_gem.vllm.planning import decide, group_from_profiles

TRACE_SPEC = Path(__file__).parents[1] / "e2e" / "skewed-128x12.json"
PHYSICAL = 144  # 128 experts + 16 redundant slots, as served in benchmarks/e2e


def skewed_cases() -> tuple[list[GpuProfile], dict[str, np.ndarray]]:
    """The bundled H200 and 66-SM H200 profiles, and the skewed trace's loads
    [steps, layers, experts] at its own load and at 256 and 64 rows a step (seeded)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.msgpack"
        subprocess.run([sys.executable, "-m", "vllm_gem.cli", "import-trace", "--format", "synthetic",
                        str(TRACE_SPEC), "-o", str(path), "--model", "q"], check=True, capture_output=True)
        loads = load(path, RoutingTrace).loads
    data = importlib.resources.files("vllm_gem.data")
    profiles = [load(data / "profile-h200x2-0.json", GpuProfile),
                load(data / "profile-h200x2-sm66-1.json", GpuProfile)]
    rng = np.random.default_rng(0)
    freq = loads / loads.sum(-1, keepdims=True)
    cases = {f"trace ({loads.sum(-1).mean():.0f} rows a step)": loads.astype(np.float64)}
    for rows in (256, 64):
        cases[f"{rows} rows a step"] = np.stack([[rng.multinomial(rows, p) for p in step] for step in freq]
                                                ).astype(np.float64)
    return profiles, cases


def linear_map(layers: int, experts: int) -> np.ndarray:
    """vLLM's start map with PHYSICAL slots: [layers, PHYSICAL]."""
    return np.tile(np.arange(PHYSICAL) % experts, (layers, 1))


def main() -> None:
    profiles, cases = skewed_cases()
    group = group_from_profiles(profiles)
    print(f"{'load':28s} {'per-step tight':>15s} {'static slots':>13s} {'static LP':>10s} "
          f"{'simulator bound':>16s} {'linear':>7s} {'GEM':>7s}   (us per MoE layer)")
    for name, case in cases.items():
        # without the LP, lower_bounds' static bound is the equal-slots one alone (the LP's
        # fallback, the largest fixed cost, never exceeds it): one LP solve, not two
        _, tight, slots = lower_bounds(case, group, PHYSICAL, lp_max_variables=0)
        lp = static_lp_bound(case, group, PHYSICAL)
        d = decide(case, profiles, linear_map(*case.shape[1:]))
        print(f"{name:28s} {tight.mean():15.1f} {slots.mean():13.1f} {lp.mean():10.1f} "
              f"{d.predicted_bound_us:16.1f} {d.predicted_before_us:7.1f} {d.predicted_after_us:7.1f}")


if __name__ == "__main__":
    main()
