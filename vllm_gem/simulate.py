"""Replay a routing trace through a placement and per-GPU latency models.

Every MoE layer is a barrier under expert parallelism: its time is the slowest rank's.
Replicas of a logical expert share its tokens equally, as vLLM's router does (it hashes the
token index modulo the replica count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bounds import lower_bounds, placement_bound
from .errors import GemInputError
from .latency import GroupModel


def replica_counts(phys_to_log: np.ndarray, num_logical: int) -> np.ndarray:
    """phys_to_log: [layers, num_physical] -> counts: [layers, num_logical] replicas per expert."""
    layers = phys_to_log.shape[0]
    counts = np.zeros((layers, num_logical), dtype=np.int64)
    np.add.at(counts, (np.arange(layers)[:, None], phys_to_log), 1)
    return counts


def slot_tokens(loads: np.ndarray, phys_to_log: np.ndarray) -> np.ndarray:
    """Tokens each physical slot receives.

    loads: [steps, layers, experts]; phys_to_log: [layers, num_physical]
    returns: [steps, layers, num_physical]
    """
    counts = replica_counts(phys_to_log, loads.shape[2])
    share = np.take_along_axis(counts, phys_to_log, axis=1)  # [layers, P]
    return np.take_along_axis(loads, phys_to_log[None], axis=2) / share[None]


def rank_times(loads: np.ndarray, phys_to_log: np.ndarray, group: GroupModel) -> np.ndarray:
    """Each rank's MoE layer time.

    loads: [steps, layers, experts]; phys_to_log: [layers, num_physical] with rank r owning
    the contiguous slots [r*S, (r+1)*S)
    returns: [steps, layers, ranks] microseconds
    """
    steps, layers, _ = loads.shape
    ranks = group.num_ranks
    if phys_to_log.shape[0] != layers:
        raise GemInputError("placement", "phys_to_log", f"has {phys_to_log.shape[0]} layers",
                            f"{layers} (the trace's layers)")
    if phys_to_log.shape[1] % ranks:
        raise GemInputError("placement", "phys_to_log", f"has {phys_to_log.shape[1]} slots",
                            f"a multiple of {ranks} ranks")
    if phys_to_log.max() >= loads.shape[2]:
        raise GemInputError("placement", "phys_to_log", f"names expert {phys_to_log.max()}",
                            f"ids below the trace's {loads.shape[2]} experts")
    active, tiles, tokens = rank_features(loads, phys_to_log, ranks, group.block_m)
    c = group.coef
    return c[:, 0] + active * c[:, 1] + tiles * c[:, 2] + tokens * c[:, 3]


def rank_features(loads: np.ndarray, phys_to_log: np.ndarray, ranks: int, block_m: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each rank's layer time is linear in: (active slots, BLOCK_M tiles, tokens), each
    [steps, layers, ranks]; a rank's time is coef . (1, active, tiles, tokens)."""
    steps, layers, _ = loads.shape
    tok = slot_tokens(loads, phys_to_log).reshape(steps, layers, ranks, -1)
    return (tok > 0).sum(-1), np.ceil(tok / block_m).sum(-1), tok.sum(-1)


@dataclass(frozen=True)
class SimResult:
    """Summary of one replay. Times in microseconds, per MoE layer (slowest rank)."""

    mean: float
    p50: float
    p90: float
    p99: float
    straggler_ratio: float  # mean over steps and layers of (slowest rank / mean rank)
    bound_fluid: float  # mean over steps and layers of the fluid bound
    bound: float  # bound on this placement's mean: per-step tight bounds and the static one
    rank_mean: list[float]  # [ranks] mean time of each rank

    @property
    def gap(self) -> float:
        """Mean layer time over the tighter lower bound (1.0 = provably optimal; also for a
        trace that routes no tokens, where every placement takes only the fixed cost)."""
        return _ratio(self.mean, self.bound)

    @property
    def gap_fluid(self) -> float:
        return _ratio(self.mean, self.bound_fluid)

    def as_dict(self) -> dict[str, float | list[float]]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(gap=self.gap, gap_fluid=self.gap_fluid)
        return d


def simulate(loads: np.ndarray, phys_to_log: np.ndarray, group: GroupModel,
             bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> SimResult:
    """Replay `loads` [steps, layers, experts] through `phys_to_log` [layers, num_physical].

    `bounds` = bounds.lower_bounds (fluid, tight [steps, layers], static [layers]) may be
    passed in to share them between placements with the same number of physical slots.
    """
    t = rank_times(loads, phys_to_log, group)  # [S, L, G]
    layer = t.max(-1)
    if bounds is None:
        bounds = lower_bounds(loads, group, phys_to_log.shape[1])
    fluid, tight, static = bounds
    p50, p90, p99 = np.percentile(layer, [50, 90, 99])
    return SimResult(
        mean=float(layer.mean()), p50=float(p50), p90=float(p90), p99=float(p99),
        straggler_ratio=float(np.divide(layer, t.mean(-1), out=np.ones_like(layer),
                                        where=t.mean(-1) > 0).mean()),  # no time on any rank: even
        bound_fluid=float(fluid.mean()), bound=placement_bound(tight, static),
        rank_mean=t.mean(axis=(0, 1)).tolist(),
    )


def _ratio(time: float, bound: float) -> float:
    """time / bound, and 1.0 where both are 0 (no load: nothing any placement could improve)."""
    if bound > 0:
        return time / bound
    return 1.0 if time <= 0 else float("inf")


def scenario_times(loads: np.ndarray, phys_to_log: np.ndarray, truths: list[GroupModel]) -> np.ndarray:
    """Mean slowest-rank layer time of one placement under each of several true groups (the
    GPUs as they really are, not as profiled: GroupModel.perturbed, or measured profiles).

    loads: [steps, layers, experts]; phys_to_log: [layers, num_physical]
    returns: [draws] us, each the mean over steps and layers of the slowest rank's time
    """
    if not truths:
        return np.zeros(0)
    if len({(g.block_m, g.num_ranks) for g in truths}) > 1:  # measured truths of other kernels
        return np.array([rank_times(loads, phys_to_log, g).max(-1).mean() for g in truths])
    for g in truths[:1]:
        rank_times(loads, phys_to_log, g)  # its checks of the placement against the loads
    feats = rank_features(loads, phys_to_log, truths[0].num_ranks, truths[0].block_m)  # once
    out = np.empty(len(truths))
    for d, g in enumerate(truths):
        c = g.coef
        out[d] = (c[:, 0] + feats[0] * c[:, 1] + feats[1] * c[:, 2] + feats[2] * c[:, 3]).max(-1).mean()
    return out


def misspecified(loads: np.ndarray, phys_to_log: np.ndarray, truths: list[GroupModel],
                 baseline: np.ndarray | None = None) -> dict[str, float]:
    """A placement scored where the true speeds differ from the believed ones: mean and
    worst-draw layer time over the truths, and against `baseline` [layers, num_physical]
    (vLLM's policy's plan) under the same truths: mean and worst per-draw ratio."""
    t = scenario_times(loads, phys_to_log, truths)
    out = {"draws": len(truths), "mean_us": float(t.mean()), "worst_draw_us": float(t.max())}
    if baseline is not None:
        b = scenario_times(loads, baseline, truths)
        out.update(baseline_mean_us=float(b.mean()), ratio_mean=float((t / b).mean()),
                   ratio_worst=float((t / b).max()))
    return out
