"""GPU profiles: the load patterns calibration times, example profiles, bundled sets.

Calibration (issue "calibration", vllm_gem.calibrate) times the patterns from
:func:`calibration_patterns` on each GPU. Until real profiles are measured, the bundled
example profiles are *synthetic*: generated from the analytic model below and marked so in
their ``source`` field.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from .formats import ExpertShape, GpuIdentity, GpuProfile, KernelSpec, LatencyPoint, load
from .latency import GroupModel, LatencyModel, fit


def calibration_patterns(num_experts: int, block_m: int, seed: int = 0) -> list[list[int]]:
    """Per-expert token counts to time, [points][num_experts].

    - decode (memory-bound): many experts active, a few tokens each;
    - prefill (compute-bound): few experts, token counts on BLOCK_M tile boundaries and one
      past them (the latency steps up there);
    - mixed random loads, to check the fit on patterns it was not built from.
    """
    rng = np.random.default_rng(seed)
    pats: list[list[int]] = []
    # active-expert counts are capped at num_experts (a model with few experts per GPU)
    for active in sorted({min(a, num_experts) for a in
                          (1, 2, 4, 8, num_experts // 4, num_experts // 2, num_experts)} - {0}):
        for tok in (1, 4, 16, 32):  # up to half a BLOCK_M tile: where mixed loads sit
            c = np.zeros(num_experts, dtype=np.int64)
            c[rng.choice(num_experts, active, replace=False)] = tok
            pats.append(c.tolist())
    for active in sorted({min(a, num_experts) for a in (1, 4, max(num_experts // 8, 1))}):
        for tiles in (1, 2, 4, 8, 16, 32):
            for extra in (0, 1):
                c = np.zeros(num_experts, dtype=np.int64)
                c[rng.choice(num_experts, active, replace=False)] = tiles * block_m + extra
                pats.append(c.tolist())
    for _ in range(12):
        c = rng.poisson(rng.choice([2.0, 20.0, 200.0]), size=num_experts) * (rng.random(num_experts) < 0.7)
        pats.append(c.astype(np.int64).tolist())
    return [p for p in pats if sum(p) > 0]


def analytic_model(shape: ExpertShape, block_m: int = 64, mem_gbps: float = 3000.0,
                   tflops: float = 600.0, fixed_us: float = 20.0, slowdown: float = 1.0
                   ) -> np.ndarray:
    """Coefficients [4] (fixed, per_expert, per_tile, per_token) of a roofline-style model.

    An active expert reads its 3*hidden*intermediate bf16 weights once; a BLOCK_M tile does
    2*BLOCK_M*3*hidden*intermediate flops; a token moves its hidden vector in and out.
    `slowdown` scales the load-dependent terms (a GPU at lower clocks).
    """
    weights = 3 * shape.hidden * shape.intermediate * 2
    per_expert = weights / (mem_gbps * 1e3)  # bytes / (bytes per us)
    per_tile = 2 * block_m * 3 * shape.hidden * shape.intermediate / (tflops * 1e6)
    per_token = 4 * shape.hidden * 2 / (mem_gbps * 1e3)
    return np.array([fixed_us, per_expert * slowdown, per_tile * slowdown, per_token * slowdown])


def example_profile(name: str, slowdown: float = 1.0, num_experts: int = 32, block_m: int = 64,
                    noise: float = 0.01, seed: int = 0,
                    shape: ExpertShape | None = None) -> GpuProfile:
    """A *synthetic* profile: the analytic model's times on calibration patterns, with noise
    (shape: Qwen3-30B-A3B's experts, hidden 2048 and intermediate 768, unless given)."""
    shape = shape or ExpertShape(hidden=2048, intermediate=768)
    coef = analytic_model(shape, block_m, slowdown=slowdown)
    rng = np.random.default_rng(seed)
    model = LatencyModel(coef, block_m)
    points = []
    for c in calibration_patterns(num_experts, block_m, seed):
        t = float(model.predict(np.array(c)) * (1 + noise * rng.standard_normal()))
        points.append(LatencyPoint(c, t, t * (1 - noise), t * (1 + noise)))
    return GpuProfile(gpu=GpuIdentity(name=name, index=seed), expert=shape,
                      kernel=KernelSpec("analytic", block_m), points=points,
                      source=f"synthetic example: analytic H100-like model, slowdown {slowdown:g}, "
                             f"noise {noise:g} (not measured)")


BUNDLED_SETS = {
    # two nominally equal GPUs (what nvidia-h200-x2 looks like: they differ by under 1%)
    "equal2": [1.0, 1.004],
    # 4 GPUs, one 20% slower (the reference case of the planner benchmark)
    "one-slow4": [1.0, 1.0, 1.0, 1.2],
    # 8 GPUs with a realistic spread (Sinha et al.: ~8% average, 22% worst)
    "spread8": [1.0, 1.03, 1.05, 1.06, 1.08, 1.10, 1.13, 1.22],
}


# Profiles measured with `vllm-gem calibrate` (benchmarks/gpu/calibration_session.sh, see
# docs/calibration.md): Qwen3-30B-A3B expert shape, 32 local experts, BLOCK_M 64.
MEASURED_SETS = {
    "h200x2": ["h200x2-0", "h200x2-1"],  # nvidia-h200-x2 as it is (GPUs within 0.3%)
    "h200x2-sm92": ["h200x2-0", "h200x2-sm92-1"],  # GPU 1 in a 92-SM green context
    "h200x2-sm66": ["h200x2-0", "h200x2-sm66-1"],  # GPU 1 in a 66-SM green context
    "h100": ["h100-0"],
}


def bundled_set_names() -> list[str]:
    return list(BUNDLED_SETS) + list(MEASURED_SETS)


def bundled_profiles(set_name: str) -> list[GpuProfile]:
    """The bundled profiles of one set (example or measured), in rank order."""
    base = resources.files("vllm_gem.data")
    names = MEASURED_SETS.get(set_name) or [f"{set_name}-{i}" for i in range(len(BUNDLED_SETS[set_name]))]
    out = []
    for name in names:
        with resources.as_file(base / f"profile-{name}.json") as p:
            out.append(load(Path(p), GpuProfile))
    return out


def analytic_group(slowdowns: np.ndarray, shape: ExpertShape, block_m: int = 64) -> GroupModel:
    """slowdowns: [ranks] -> the group of analytic H100-like models (analytic_model), rank r
    slowdowns[r] times slower on every load-dependent term."""
    return GroupModel.of([LatencyModel(analytic_model(shape, block_m, slowdown=float(s)), block_m)
                          for s in slowdowns])


def fleet_group(gpus: int, seed: int, shape: ExpertShape = ExpertShape(2048, 768)) -> GroupModel:
    """`gpus` analytic H100-like models slowed like a measured fleet: one GPU 22% slower, the
    others drawn (seeded) so that the mean slowdown is 8%. The planner benchmark's and
    studies' example fleet."""
    rng = np.random.default_rng(seed)
    others = rng.uniform(0.0, 0.22, gpus - 1)
    others *= (0.08 * gpus - 0.22) / others.sum()
    return analytic_group(1.0 + np.concatenate([[0.22], np.clip(others, 0.0, 0.22)]), shape)


def group_from_profiles(profiles: list[GpuProfile]) -> GroupModel:
    """Fit every profile and stack them into the group's model, in rank order."""
    return GroupModel.of([fit(p) for p in profiles])
