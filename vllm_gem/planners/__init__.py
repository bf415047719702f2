"""Placement planners behind one interface (see base.PlacementPolicy)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ..errors import GemInputError
from ..validation import MigrationWeight, Seconds, describe
from .base import PlacementPolicy, PlacementProblem, PlannerUnavailable
from .baselines import LinearPolicy, RoundRobinPolicy, VllmDefaultPolicy
from .exact import ExactPolicy
from .gem import GemPolicy
from .robust import RobustPolicy


def make(name: str, **params: Any) -> PlacementPolicy:
    """A planner by name: linear, round_robin, vllm-default, greedy-speed, gem, gem-migrate, exact."""
    if name == "greedy-speed":
        p = GemPolicy(stepwise=False, local_search=False, **params)
        p.params["variant"] = name
        return p
    if name in ("gem", "gem-migrate"):  # robust to the profiles' errors (planners.robust)
        robust = {k: params.pop(k) for k in ROBUST_PARAMS if k in params}
        if name == "gem-migrate":
            params.setdefault("migration_weight", 1.0)
        return RobustPolicy(lambda: GemPolicy(**params), VllmDefaultPolicy(),
                            scenarios=robust.get("scenarios", 64),
                            tolerance=robust.get("robust_tolerance", 0.005),
                            speed_error=robust.get("speed_error"), seed=params.get("seed", 0))
    try:
        cls = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r}; expected one of {NAMES}") from None
    return cls(**params)


PLANNERS: dict[str, type[PlacementPolicy]] = {
    c.name: c for c in (LinearPolicy, RoundRobinPolicy, VllmDefaultPolicy, GemPolicy, ExactPolicy)
}
NAMES = ["linear", "round_robin", "vllm-default", "greedy-speed", "gem", "gem-migrate", "exact"]
GEM_NAMES = ("greedy-speed", "gem", "gem-migrate")
ROBUST_PARAMS = ("scenarios", "robust_tolerance", "speed_error")  # RobustPolicy's own (gem, gem-migrate)  # the names make() builds as a GemPolicy



def _n(lo: float, hi: float, what: str, kind: type = int) -> Any:
    return Annotated[kind, Meta(ge=lo, le=hi, description=what)]


class GemParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a GemPolicy takes (greedy-speed, gem, gem-migrate), each with its range."""

    max_steps: _n(1, 1 << 20, "trace steps planned on") = 32
    min_steps: _n(0, 1 << 20, "trace steps") = 32
    stepwise: bool = True
    local_search: bool = True
    max_iters: _n(0, 10**6, "local-search rounds") = 200
    candidates: _n(1, 4096, "candidates per round") = 16
    min_gain: _n(0.0, 1.0, "a fraction", float) = 1e-4
    time_budget: Seconds | None = None
    migration_weight: MigrationWeight | None = None
    seed: _n(0, 2**63 - 1, "a seed") = 0
    construct_ranks: _n(1, 1 << 16, "ranks") = 16
    option_margin: _n(0.0, 1.0, "a fraction", float) = 0.0
    node_move_cost: _n(0.0, 1e6, "a cost factor", float) = 0.25
    threads: _n(1, 1024, "planning threads") = 8
    # robust planning (gem, gem-migrate): speed scenarios drawn from the profiles' errors
    scenarios: _n(1, 4096, "speed scenarios") = 64
    robust_tolerance: _n(0.0, 1.0, "a fraction", float) = 0.005
    speed_error: _n(0.0, 1.0, "a relative speed error", float) | None = None


class ExactParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    max_steps: _n(1, 1 << 20, "trace steps planned on") = 32
    time_limit: Seconds = 20.0
    seed: _n(0, 2**63 - 1, "a seed") = 0


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    """linear, round_robin and vllm-default take no parameters."""


def check_params(planner: str, params: Any, source: str, field: str = "planner_params") -> dict[str, Any]:
    """`params` as `planner` takes them, or one GemInputError naming the key and its range."""
    cls = GemParams if planner in GEM_NAMES else ExactParams if planner == "exact" else NoParams
    if not isinstance(params, dict):
        raise GemInputError(source, field, f"is a {type(params).__name__}", "an object of planner parameters")
    fields = {f.name: f.type for f in msgspec.structs.fields(cls)}
    for key, value in params.items():
        if key not in fields:
            raise GemInputError(source, f"{field}.{key}", f"is not a parameter of planner {planner}",
                                f"one of {sorted(fields)}" if fields else "no parameters (it takes none)")
        try:
            msgspec.convert({key: value}, cls)
        except msgspec.ValidationError:
            raise GemInputError(source, f"{field}.{key}", f"is {value!r}", describe(fields[key])) from None
    return dict(params)


__all__ = ["PlacementPolicy", "PlacementProblem", "PlannerUnavailable", "make", "NAMES", "GEM_NAMES",
           "PLANNERS", "check_params"]
