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
# relative error (1 sigma) of a profile that records none (files written before profiles
# carried one): calibration's held-out error on H100 and H200 is 2-4% RMS (docs/calibration.md)
DEFAULT_PROFILE_ERROR = 0.03


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
    error: float = 0.0  # how far the GPU's real times may be from the model's (1 sigma, relative)

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
                        fit_rel_max=float(np.max(np.abs(rel))),
                        error=DEFAULT_PROFILE_ERROR if profile.error is None else float(profile.error))


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
    # [ranks] each rank's relative speed error (1 sigma; None: exact): how far its real time
    # may be from its model's. Robust planning (planners.robust) plans against it
    errors: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not np.all(np.asarray(self.coef) >= 0):
            raise GemInputError("latency model", "coef", "has negative (or NaN) coefficients",
                                "every coefficient >= 0 (a non-negative least-squares fit)")
        if self.errors is not None:
            e = np.asarray(self.errors, dtype=np.float64)
            if e.shape != (self.coef.shape[0],) or not np.all((e >= 0) & (e <= 1)):
                raise GemInputError("latency model", "errors", f"is {e.tolist()}",
                                    "one relative error in [0, 1] per rank")

    @classmethod
    def of(cls, models: list[LatencyModel]) -> "GroupModel":
        bms = {m.block_m for m in models}
        if len(bms) != 1:
            raise GemInputError("profiles", "kernel.block_m", f"differs between GPUs ({sorted(bms)})",
                                "one BLOCK_M for the whole group (the same kernel on every rank)")
        return cls(np.stack([m.coef for m in models]), bms.pop(), [m.name for m in models],
                   np.array([m.error for m in models]))

    @classmethod
    def tokens_over_speed(cls, speeds: np.ndarray, error: float = 0.0) -> "GroupModel":
        """The plain model time = tokens / speed (no fixed, expert or tile cost); `error`: each
        speed's relative error (1 sigma; 0: the speeds are exact)."""
        s = np.asarray(speeds, dtype=np.float64)
        coef = np.zeros((len(s), 4))
        coef[:, 3] = 1.0 / s
        return cls(coef, 1, [f"speed {v:g}" for v in s], np.full(len(s), float(error)))

    def with_errors(self, errors: float | np.ndarray | None) -> "GroupModel":
        """The same models with these speed errors ([ranks] or one for all; None: exact)."""
        e = None if errors is None else np.broadcast_to(np.asarray(errors, dtype=np.float64),
                                                        (self.num_ranks,)).copy()
        return GroupModel(self.coef, self.block_m, self.names, e)

    @property
    def max_error(self) -> float:
        return 0.0 if self.errors is None else float(np.max(self.errors))

    def scaled(self, slowdown: np.ndarray) -> "GroupModel":
        """Rank r running slowdown[r] times slower on every load-dependent term (fixed kept),
        as LatencyModel.scaled; exact (no errors). slowdown: [ranks] > 0."""
        c = self.coef.copy()
        c[:, 1:] *= np.asarray(slowdown, dtype=np.float64)[:, None]
        return GroupModel(c, self.block_m, self.names)

    def shrunk(self, alpha: float) -> "GroupModel":
        """Each rank's coefficients moved toward the group's mean: alpha 1 = as fitted, 0 = every
        rank the average GPU (what a plan that trusts no speed difference assumes)."""
        mean = self.coef.mean(axis=0, keepdims=True)
        return GroupModel(mean + alpha * (self.coef - mean), self.block_m, self.names, self.errors)

    def perturbed(self, draws: int, seed: int, errors: float | np.ndarray | None = None
                  ) -> list["GroupModel"]:
        """`draws` groups whose true speeds are this one's times (1 + N(0, sigma_r)) per rank
        (sigma: `errors`, else the group's own), each an exact model: what a profile off by
        its own error may really be. Slowdowns are clipped to [0.5, 2] (no negative speeds)."""
        sigma = self.errors if errors is None else np.broadcast_to(np.asarray(errors, float), (self.num_ranks,))
        sigma = np.zeros(self.num_ranks) if sigma is None else np.asarray(sigma, dtype=np.float64)
        rng = np.random.default_rng(seed)
        speed = 1.0 + rng.standard_normal((draws, self.num_ranks)) * sigma[None]  # [D, G]
        return [self.scaled(1.0 / np.clip(s, 0.5, 2.0)) for s in speed]

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
