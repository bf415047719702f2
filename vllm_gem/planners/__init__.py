"""Placement planners behind one interface (see base.PlacementPolicy)."""

from __future__ import annotations

from typing import Any

from .base import PlacementPolicy, PlacementProblem, PlannerUnavailable
from .baselines import LinearPolicy, RoundRobinPolicy, VllmDefaultPolicy
from .exact import ExactPolicy
from .gem import GemPolicy


def make(name: str, **params: Any) -> PlacementPolicy:
    """A planner by name: linear, round_robin, vllm-default, greedy-speed, gem, gem-migrate, exact."""
    if name == "greedy-speed":
        p = GemPolicy(stepwise=False, local_search=False, **params)
        p.params["variant"] = name
        return p
    if name == "gem-migrate":
        params.setdefault("migration_weight", 1.0)
        return GemPolicy(**params)
    try:
        cls = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; expected one of {NAMES}") from None
    return cls(**params)


PLANNERS: dict[str, type[PlacementPolicy]] = {
    c.name: c for c in (LinearPolicy, RoundRobinPolicy, VllmDefaultPolicy, GemPolicy, ExactPolicy)
}
NAMES = ["linear", "round_robin", "vllm-default", "greedy-speed", "gem", "gem-migrate", "exact"]
GEM_NAMES = ("greedy-speed", "gem", "gem-migrate")  # the names make() builds as a GemPolicy

__all__ = ["PlacementPolicy", "PlacementProblem", "PlannerUnavailable", "make", "NAMES", "GEM_NAMES",
           "PLANNERS"]
