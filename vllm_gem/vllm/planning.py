"""The decision GEM takes inside vLLM, as a pure function of numpy inputs (testable on CPU).

Inputs are what the worker has gathered (the routing history, every rank's GPU profile, the
current map); output is the new map plus the predictions that are logged and exported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bounds import LP_MAX_VARIABLES, lower_bounds
from ..errors import GemInputError
from ..formats import GpuProfile, RoutingTrace
from ..planners import PlacementProblem, make
from ..precision import PRECISIONS, precision_name
from ..profiles import group_from_profiles
from ..simulate import simulate


@dataclass
class PlanDecision:
    """phys_to_log: [layers, num_physical]; predictions in microseconds per MoE layer."""

    phys_to_log: np.ndarray
    apply: bool  # False: the predicted gain does not beat the threshold (keep the old map)
    predicted_before_us: float
    predicted_after_us: float
    rank_us_before: list[float]
    rank_us_after: list[float]
    straggler_before: float
    straggler_after: float
    planning_seconds: float
    # no placement with these slots, held over these steps, beats this on the same model
    # (bounds.placement_bound: the per-step tight bound or the static one, per layer)
    predicted_bound_us: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> float:
        """Predicted fractional cut of the mean MoE layer time (0.1 = 10% faster)."""
        return 1.0 - self.predicted_after_us / self.predicted_before_us


def check_trace_matches(trace: RoutingTrace, source: str, num_layers: int, num_logical: int) -> None:
    """A trace recorded for another model is an error, not a silently wrong plan."""
    _, layers, experts = trace.shape
    if (layers, experts) != (num_layers, num_logical):
        raise GemInputError(source, "counts.shape", f"is {layers} layers x {experts} experts",
                            f"the model's {num_layers} MoE layers x {num_logical} experts")


def check_profiles_match(profiles: list[GpuProfile], sources: list[str], num_ranks: int,
                         hidden: int, intermediate: int) -> None:
    if len(profiles) != num_ranks:
        raise GemInputError(", ".join(sources) or "profiles", "profiles",
                            f"gives {len(profiles)} GPU profiles", f"one per EP rank ({num_ranks})")
    for p, src in zip(profiles, sources, strict=False):
        if (p.expert.hidden, p.expert.intermediate) != (hidden, intermediate):
            raise GemInputError(src, "expert", f"is hidden {p.expert.hidden} x intermediate "
                                f"{p.expert.intermediate}",
                                f"the model's expert shape {hidden} x {intermediate}")


def precision_mismatch(profiles: list[GpuProfile], sources: list[str], precision: str
                       ) -> GemInputError | None:
    """The first profile not timed in the served precision (a bf16 profile for an fp8 model
    plans with the wrong latency curve), as the error to raise or warn with; None if all match."""
    want = PRECISIONS[precision]
    for p, src in zip(profiles, sources, strict=False):
        if (p.expert.dtype, p.expert.scale_layout) != want:
            got = precision_name(p.expert.dtype, p.expert.scale_layout) or p.expert.dtype
            return GemInputError(src, "expert.dtype", f"is {got} ({p.expert.dtype}, scales "
                                 f"{p.expert.scale_layout})",
                                 f"the served experts' {precision} ({want.dtype}, scales {want.scale_layout}): "
                                 f"`vllm-gem calibrate --dtype {precision}`")
    return None


def keep_slots(new: np.ndarray, old: np.ndarray, num_ranks: int) -> np.ndarray:
    """Experts that stay on a rank keep their old slot, so the move copies only what changes
    rank (vLLM's own DefaultEplbPolicy.preserve_intragpu_slots; each rank's set is unchanged).

    new, old: [layers, num_physical] -> [layers, num_physical]
    """
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    return DefaultEplbPolicy.preserve_intragpu_slots(new, num_ranks, old)


def decide(loads: np.ndarray, profiles: list[GpuProfile], old_phys_to_log: np.ndarray, *,
           num_groups: int = 1, num_nodes: int = 1, planner: str = "gem",
           planner_params: dict[str, Any] | None = None, min_gain: float = 0.0,
           target: np.ndarray | None = None, lp_bound: bool = True) -> PlanDecision:
    """Plan a placement for `loads` [steps, layers, experts] on GPUs with these profiles.

    old_phys_to_log: [layers, num_physical] the map in use; the result keeps its shape.
    target: [layers, num_physical] a given map to assess instead of a planner's (vLLM's start
    map, for A/B switching); it is kept slot for slot.
    apply is False when the predicted gain is below min_gain (hysteresis) or the plan is the
    map in use (nothing to move, whatever min_gain says). lp_bound=False leaves the static LP
    out of the reported bound (recalibration: its solve would lengthen the serving stall).
    """
    if loads.shape[0] == 0 or loads.sum() == 0:
        raise GemInputError("routing history", "counts", "holds no routed tokens",
                            "at least one recorded step with tokens")
    group = group_from_profiles(profiles)
    num_physical = old_phys_to_log.shape[1]
    problem = PlacementProblem(loads=loads.astype(np.float64), group=group,
                               num_physical=num_physical, num_groups=num_groups,
                               num_nodes=num_nodes, old_phys_to_log=old_phys_to_log)
    t0 = time.perf_counter()
    if target is None:
        policy = make(planner, **(planner_params or {}))
        new = keep_slots(policy.place(problem), old_phys_to_log, group.num_ranks)
        info = getattr(policy, "report", {})
    else:
        if target.shape != old_phys_to_log.shape:
            raise GemInputError("target map", "phys_to_log", f"has shape {target.shape}",
                                f"the map in use's shape {old_phys_to_log.shape}")
        new, info = target, {}
    seconds = time.perf_counter() - t0
    bounds = lower_bounds(problem.loads, group, num_physical,  # same slots: one bound for both
                          lp_max_variables=LP_MAX_VARIABLES if lp_bound else 0)
    before = simulate(problem.loads, old_phys_to_log, group, bounds)
    after = simulate(problem.loads, new, group, bounds)
    gain = 1.0 - after.mean / before.mean
    info = dict(info or {})
    # each rank's fitted coefficients (fixed, per expert, per tile, per token; us): the bounds'
    # and predictions' inputs, kept with every report for offline checks
    info["latency_coef"] = np.round(group.coef, 5).tolist()
    in_use = np.array_equal(new, old_phys_to_log)
    if in_use:
        info["move_check"] = "the plan is the map in use"
    elif gain <= min_gain:
        info["move_check"] = f"predicted gain {gain:.1%} is not above min_gain {min_gain:.1%}"
    return PlanDecision(
        phys_to_log=new.astype(np.int64), apply=bool(gain > min_gain) and not in_use,
        predicted_before_us=before.mean, predicted_after_us=after.mean,
        rank_us_before=before.rank_mean, rank_us_after=after.rank_mean,
        straggler_before=before.straggler_ratio, straggler_after=after.straggler_ratio,
        planning_seconds=seconds, predicted_bound_us=after.bound, info=info)


def saving_horizon(interval: int, steps_since_move: int) -> int:
    """Engine steps a new placement is expected to serve: at least until the next
    recalibration, and as long as the placement in use has served so far (routing that held
    for N steps tends to hold about as long again; the first move after a change of routing
    is then judged against the change's real lifetime, not one recalibration interval)."""
    return max(interval, steps_since_move)


def worth_moving(d: PlanDecision, old_phys_to_log: np.ndarray, bytes_per_slot: int,
                 bandwidth_bytes_per_s: float, horizon_steps: int) -> tuple[bool, str]:
    """Hysteresis for re-placement while serving: move only if the time saved over the next
    `horizon_steps` engine steps beats the time the move stalls serving.

    Saving: (predicted layer time before - after) x layers x steps. Cost: changed slots x
    bytes per slot / the bandwidth the last move achieved (the move blocks every rank).
    """
    changed = int((d.phys_to_log != old_phys_to_log).sum())
    layers = old_phys_to_log.shape[0]
    saving_s = (d.predicted_before_us - d.predicted_after_us) * 1e-6 * layers * horizon_steps
    cost_s = changed * bytes_per_slot / bandwidth_bytes_per_s
    why = (f"saves {saving_s:.2f} s over {horizon_steps} steps, moving {changed} slots costs "
           f"{cost_s:.2f} s")
    if not d.apply:  # the threshold (or nothing to move) decided, not the cost: say so first
        return False, f"{d.info['move_check']}; {why}"  # decide says why it is not applied
    return saving_s > cost_s, why
