"""What one EP rank is and how far it has served: the two records every part of a GemWorker
is built with (profiles, placer, recalibration), so each part's inputs are in its constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import GemConfig
from .experts import expert_shape, served_precision

DEFAULT_MOVE_BANDWIDTH = 5e9  # bytes/s until a move has been timed (gloo-staged transfers)


@dataclass
class RankContext:
    """One EP rank of the served model, fixed once the model is loaded (cfg aside: the
    `gem_record` request turns cfg.record on and off).

    model_state: vLLM's EplbModelState (physical_to_logical_map: [layers, num_physical], the
    model, expert_load_pass); ep: vLLM's EP GroupCoordinator (rank_in_group, world_size,
    ranks, cpu_group, device_group).
    """

    cfg: GemConfig
    model_state: Any
    ep: Any
    dp_size: int = 1
    model_name: str = ""
    num_nodes: int = 1  # EP ranks are laid out node by node
    rank: int = field(init=False)
    size: int = field(init=False)
    device: Any = field(init=False)  # torch.device of this rank's experts
    hidden: int = field(init=False)
    intermediate: int = field(init=False)
    local_experts: int = field(init=False)  # physical slots on this rank
    precision: str = field(init=False)  # what calibration times: bf16, fp8-block, ...

    def __post_init__(self) -> None:
        self.rank, self.size = self.ep.rank_in_group, self.ep.world_size
        self.device = self.model_state.physical_to_logical_map.device
        self.hidden, self.intermediate, self.local_experts = expert_shape(self.model)
        self.precision = served_precision(self.model)

    @property
    def model(self) -> Any:
        """The served MixtureOfExperts model (num_moe_layers, num_logical_experts, expert_weights)."""
        return self.model_state.model


@dataclass
class ServingProgress:
    """How far this rank has served and moved: written by the step hook (steps), the placer
    (started, generation, placed_at_step, last_move_seconds, move_bandwidth) and the
    recalibration (recalibrations); read by all of them and the metric export."""

    steps: int = 0  # engine steps, dummy steps included: every EP rank steps in lockstep
    started: bool = False  # the start-up placement has run (recalibration waits for it)
    generation: int = 0  # placements applied by GEM so far
    placed_at_step: int = 0  # engine step of the last applied move (hysteresis horizon)
    last_move_seconds: float = 0.0
    move_bandwidth: float = DEFAULT_MOVE_BANDWIDTH  # bytes/s, updated by every move
    recalibrations: int = 0
