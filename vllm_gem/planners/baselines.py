"""vLLM's own placements, as baselines.

- ``linear``: vLLM's static placement and EPLB's initial map: slot p holds expert p for the
  first E slots, then redundant slot i holds expert i % E (tests check this against
  ``EplbState.build_initial_global_physical_to_logical_map``).
- ``round_robin``: vLLM's ``--expert-placement-strategy round_robin``: rank r holds experts
  r, r + ranks, r + 2*ranks, ... (vLLM allows it only without redundant experts).
- ``vllm-default``: vLLM's EPLB DefaultEplbPolicy, called through the installed vllm
  (``vllm_policy``): it balances summed token counts and assumes equal GPUs.
"""

from __future__ import annotations

import numpy as np

from ..errors import GemInputError
from .base import PlacementPolicy, PlacementProblem, PlannerUnavailable
from .vllm_policy import default_eplb_policy


class LinearPolicy(PlacementPolicy):
    name = "linear"

    def place(self, problem: PlacementProblem) -> np.ndarray:
        e, p = problem.num_experts, problem.num_physical
        row = np.concatenate([np.arange(e), np.arange(p - e) % e])
        return np.tile(row, (problem.num_layers, 1)).astype(np.int64)


class RoundRobinPolicy(PlacementPolicy):
    name = "round_robin"

    def place(self, problem: PlacementProblem) -> np.ndarray:
        e, g, s = problem.num_experts, problem.num_ranks, problem.slots_per_rank
        if problem.num_physical != e:
            raise GemInputError("planner", "num_physical", f"is {problem.num_physical} (redundant experts)",
                                f"{e}: vLLM supports round_robin only without redundant experts")
        slot = np.arange(e)
        row = (slot % s) * g + slot // s  # rank r, local j -> expert r + j*ranks
        return np.tile(row, (problem.num_layers, 1)).astype(np.int64)


class VllmDefaultPolicy(PlacementPolicy):
    """vLLM's DefaultEplbPolicy on the summed loads (needs the vllm package)."""

    name = "vllm-default"

    def place(self, problem: PlacementProblem) -> np.ndarray:
        try:
            import torch
            DefaultEplbPolicy = default_eplb_policy()
        except Exception as e:  # ImportError, or vllm's files failing on this machine
            raise PlannerUnavailable(f"vllm's DefaultEplbPolicy is not importable ({e}); install "
                                     "torch and vllm (README: the demo's set-up)") from None
        weight = torch.from_numpy(problem.loads.sum(0))
        old = (torch.from_numpy(problem.old_phys_to_log)
               if problem.old_phys_to_log is not None else None)
        out = DefaultEplbPolicy.rebalance_experts(
            weight, problem.num_physical, problem.num_groups, problem.num_nodes,
            problem.num_ranks, old)
        return out.numpy().astype(np.int64)
