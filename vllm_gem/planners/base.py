"""One interface for every placement planner, shaped like vLLM's AbstractEplbPolicy.

vLLM's policy maps (load [layers, experts], num_replicas, num_groups, num_nodes, num_ranks,
old map) to a physical-to-logical map [layers, num_replicas]. GEM needs two more inputs that
signature does not carry: the per-step history (loads [steps, layers, experts], not only
their sum) and each rank's latency model. A PlacementProblem holds all of them; a planner
is a pure function of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import GemInputError
from ..latency import GroupModel


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a planner may use.

    loads: [steps, layers, experts] tokens per logical expert (planning history)
    group: latency models of the EP ranks, in rank order
    num_physical: physical expert slots per layer (experts + redundant), multiple of ranks
    old_phys_to_log: [layers, num_physical] the current placement, if any
    """

    loads: np.ndarray
    group: GroupModel
    num_physical: int
    num_groups: int = 1
    num_nodes: int = 1
    old_phys_to_log: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.loads.ndim != 3:
            raise GemInputError("planner", "loads", f"has shape {self.loads.shape}",
                                "[steps, layers, experts]")
        if not np.all(np.isfinite(self.loads)) or (self.loads < 0).any():
            raise GemInputError("planner", "loads", "holds negative or non-finite values",
                                "token counts >= 0")
        e, g = self.num_experts, self.group.num_ranks
        if self.num_physical < e or self.num_physical % g:
            raise GemInputError("planner", "num_physical", f"is {self.num_physical}",
                                f"a multiple of the {g} ranks and >= the {e} experts")
        if self.num_nodes < 1 or g % self.num_nodes:
            raise GemInputError("planner", "num_nodes", f"is {self.num_nodes}",
                                f"a divisor of the {g} ranks (equal GPUs per node)")
        if self.old_phys_to_log is not None and self.old_phys_to_log.shape != (
                self.num_layers, self.num_physical):
            raise GemInputError("planner", "old_phys_to_log", f"has shape {self.old_phys_to_log.shape}",
                                f"({self.num_layers}, {self.num_physical})")

    @property
    def num_layers(self) -> int:
        return self.loads.shape[1]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[2]

    @property
    def num_ranks(self) -> int:
        return self.group.num_ranks

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.group.num_ranks


class PlannerUnavailable(RuntimeError):
    """The planner cannot run here (e.g. vllm is not installed); the message says why."""


class PlacementPolicy(ABC):
    """A planner: PlacementProblem -> phys_to_log [layers, num_physical] (int64)."""

    name: ClassVar[str]
    params: dict[str, Any]

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def place(self, problem: PlacementProblem) -> np.ndarray:
        """Return phys_to_log: [layers, num_physical]; rank r owns slots [r*S, (r+1)*S)."""


@dataclass
class PlanReport:
    """What a planner says about its own run (for logs and --json)."""

    info: dict[str, Any] = field(default_factory=dict)
