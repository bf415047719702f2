"""Per-GPU latency model of one MoE layer, fitted from a GpuProfile.

For the per-expert token counts ``c_e`` a GPU receives in one layer, its time is

    t = fixed + per_expert * #{e: c_e > 0} + per_tile * sum_e ceil(c_e / block_m)
        + per_token * sum_e c_e

- ``fixed``: launch and routing overhead paid whatever the load.
- ``per_expert``: an active expert's weights are read from memory once (decode is
  memory-bound, so this term dominates with few tokens per expert).
- ``per_tile``: the grouped GEMM pads every expert to BLOCK_M-row tiles, so compute grows in
  steps at tile boundaries; this is why calibration samples token counts there.
- ``per_token``: gather/scatter of activations, linear in tokens.

The four coefficients are fitted by non-negative least squares (scipy.optimize.nnls), so a
fit never predicts negative work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from .errors import GemInputError
from .formats import GpuProfile

TERMS = ("fixed", "per_expert", "per_tile", "per_token")


def features(counts: np.ndarray, block_m: int) -> np.ndarray:
    """Latency-model features of per-expert token counts.

    counts: [..., experts] tokens per expert (float or int; fractions allowed for replicas)
    returns: [..., 4] = (1, active experts, BLOCK_M tiles, tokens)
    """
    c = np.asarray(counts, dtype=np.float64)
    out = np.empty(c.shape[:-1] + (4,), dtype=np.float64)
    out[..., 0] = 1.0
    out[..., 1] = (c > 0).sum(-1)
    out[..., 2] = np.ceil(c / block_m).sum(-1)
    out[..., 3] = c.sum(-1)
    return out


@dataclass(frozen=True)
class LatencyModel:
    """One GPU's MoE-layer latency model, microseconds. coef: [4] in TERMS order."""

    coef: np.ndarray
    block_m: int
    name: str = ""
    fit_rel_rms: float = float("nan")  # relative RMS error on the points it was fitted on
    fit_rel_max: float = float("nan")

    def predict(self, counts: np.ndarray) -> np.ndarray:
        """counts: [..., experts] -> time_us: [...]"""
        return features(counts, self.block_m) @ self.coef

    @property
    def speed(self) -> float:
        """A scalar speed for display only: 1 / time of a reference mixed load."""
        ref = np.array([1.0, 8.0, 64.0, 4096.0])
        return float(1.0 / (ref @ self.coef))

    def scaled(self, slowdown: float, name: str | None = None) -> "LatencyModel":
        """The same GPU running `slowdown` times slower (every term but `fixed`)."""
        c = self.coef.copy()
        c[1:] *= slowdown
        return LatencyModel(c, self.block_m, name or f"{self.name} x{slowdown:g}")


def fit(profile: GpuProfile, source: str = "profile") -> LatencyModel:
    """Fit the latency model to a profile's points by non-negative least squares.

    Points are weighted by 1/time so the fit minimises *relative* error: small decode
    points matter as much as large prefill ones.
    """
    coef, x, times = _fit_points(profile.points, profile.kernel.block_m)
    if not np.any(coef[1:] > 0):
        raise GemInputError(source, "points", "do not depend on the token load at all",
                            "layer times that grow with the tokens routed to the GPU")
    pred = x @ coef
    rel = (pred - times) / times
    return LatencyModel(coef, profile.kernel.block_m, name=profile.gpu.name,
                        fit_rel_rms=float(np.sqrt(np.mean(rel**2))),
                        fit_rel_max=float(np.max(np.abs(rel))))


def _fit_points(points: list, block_m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NNLS coefficients [4], features [points, 4] and times [points] of timed points."""
    counts = np.array([p.tokens_per_expert for p in points], dtype=np.float64)
    times = np.array([p.median_us for p in points], dtype=np.float64)
    x = features(counts, block_m)
    w = 1.0 / times
    coef, _ = nnls(x * w[:, None], times * w)
    return coef, x, times


def held_out_error(profile: GpuProfile, k: int = 5, seed: int = 0) -> float:
    """k-fold cross-validated relative RMS error of the fit (what the model errs on new loads).

    A fold's fit is not checked the way `fit` checks the whole profile: whether a profile is
    usable is decided once, by `fit`, so `plan` and `inspect` accept the same files."""
    n = len(profile.points)
    order = np.random.default_rng(seed).permutation(n)
    x = features(np.array([p.tokens_per_expert for p in profile.points], dtype=np.float64),
                 profile.kernel.block_m)  # [points, 4], built once: each fold is linear in n
    times = np.array([p.median_us for p in profile.points], dtype=np.float64)
    w = 1.0 / times
    errs = []
    for fold in range(min(k, n)):
        test = np.zeros(n, dtype=bool)
        test[order[fold::k]] = True
        if (~test).sum() < 4:
            continue
        coef, _ = nnls(x[~test] * w[~test, None], times[~test] * w[~test])
        errs.append((x[test] @ coef - times[test]) / times[test])
    return float(np.sqrt(np.mean(np.square(np.concatenate(errs))))) if errs else float("nan")


@dataclass(frozen=True)
class GroupModel:
    """Latency models of the GPUs of one expert-parallel group, in rank order.

    coef: [ranks, 4]; all ranks share block_m (they run the same kernel). Coefficients are
    non-negative (fits are NNLS): the planners rely on a rank's time never falling as slots
    are added to it.
    """

    coef: np.ndarray
    block_m: int
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not np.all(np.asarray(self.coef) >= 0):
            raise GemInputError("latency model", "coef", "has negative (or NaN) coefficients",
                                "every coefficient >= 0 (a non-negative least-squares fit)")

    @classmethod
    def of(cls, models: list[LatencyModel]) -> "GroupModel":
        bms = {m.block_m for m in models}
        if len(bms) != 1:
            raise GemInputError("profiles", "kernel.block_m", f"differs between GPUs ({sorted(bms)})",
                                "one BLOCK_M for the whole group (the same kernel on every rank)")
        return cls(np.stack([m.coef for m in models]), bms.pop(), [m.name for m in models])

    @classmethod
    def tokens_over_speed(cls, speeds: np.ndarray) -> "GroupModel":
        """The plain model time = tokens / speed (no fixed, expert or tile cost)."""
        s = np.asarray(speeds, dtype=np.float64)
        coef = np.zeros((len(s), 4))
        coef[:, 3] = 1.0 / s
        return cls(coef, 1, [f"speed {v:g}" for v in s])

    @property
    def num_ranks(self) -> int:
        return self.coef.shape[0]

    def item_features(self, tokens: np.ndarray) -> np.ndarray:
        """Per-slot features without the fixed term.

        tokens: [...] tokens one physical slot receives -> [..., 3] (active, tiles, tokens)
        """
        t = np.asarray(tokens, dtype=np.float64)
        return np.stack([(t > 0).astype(np.float64), np.ceil(t / self.block_m), t], axis=-1)

    @property
    def slot_coef(self) -> np.ndarray:
        """[ranks, 3]: the per_expert, per_tile, per_token coefficients."""
        return self.coef[:, 1:]

    @property
    def fixed(self) -> np.ndarray:
        """[ranks] fixed cost per layer."""
        return self.coef[:, 0]

    def reference_speeds(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference coefficients and each rank's speed against them, for the bounds.

        Returns (ref_coef [3], speed [ranks]) such that for every rank r and every load,
        slot_cost_r >= slot_cost_ref / speed[r]: speed[r] = max_k ref_k / coef_rk. That makes
        bounds computed in reference work valid even when GPUs are not exact multiples.
        """
        c = self.slot_coef
        ref = c.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(c > 0, ref[None, :] / c, np.where(ref[None, :] > 0, np.inf, 0.0))
        speed = ratio.max(axis=1)
        return ref, speed
