"""Routing recorder: per-step, per-layer logical expert counts kept on the GPU.

vLLM's router already counts tokens per *physical* expert in EPLB's `expert_load_pass`
[layers, num_physical] (a fused Triton kernel, padding excluded, CUDA-graph safe). Once per
engine step, before vLLM zeroes that pass, `record` folds it into logical experts through
the current phys->log map and writes it into one row of a ring buffer: two small GPU ops,
no host sync, nothing inside the captured graphs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..formats import NdArray, RoutingTrace

# The profiler range around each record: a torch trace shows its GPU time as a
# "gpu_user_annotation" of this name (benchmarks/e2e/moe_profile.py sums it).
RECORD_RANGE = "vllm_gem:record"


class RoutingRecorder:
    """ring: [capacity, layers, num_logical] int32 on the GPU; one row per engine step."""

    def __init__(self, num_layers: int, num_logical: int, capacity: int, device: torch.device,
                 model: str = "", layer_ids: list[int] | None = None) -> None:
        self.ring = torch.zeros(capacity, num_layers, num_logical, dtype=torch.int32, device=device)
        self.capacity = capacity
        self.steps = 0  # steps recorded since start (host counter, no sync)
        self.model = model
        self.layer_ids = layer_ids or list(range(num_layers))

    def record(self, load_pass: torch.Tensor, phys_to_log: torch.Tensor) -> None:
        """load_pass: [layers, num_physical] int32; phys_to_log: [layers, num_physical] int64."""
        with torch.profiler.record_function(RECORD_RANGE):
            row = self.ring[self.steps % self.capacity]
            row.zero_()
            row.scatter_add_(1, phys_to_log, load_pass.to(row.dtype))
        self.steps += 1

    def record_idle(self) -> None:
        """A step without tokens of this rank (a DP rank's dummy batch): an empty row, so that
        the rows of every DP rank stay aligned step for step (their counts are summed)."""
        self.ring[self.steps % self.capacity].zero_()
        self.steps += 1

    @property
    def overflowed(self) -> bool:
        """True when older steps were overwritten (the trace keeps the newest `capacity`)."""
        return self.steps > self.capacity

    def history(self, last: int | None = None, keep_idle: bool = False) -> np.ndarray:
        """counts: [steps, layers, num_logical] of the newest `last` steps, oldest first (syncs);
        steps without tokens are dropped unless keep_idle (DP ranks sum theirs row by row)."""
        n = min(self.steps, self.capacity, last or self.capacity)
        if n == 0:
            return np.zeros((0, *self.ring.shape[1:]), dtype=np.int32)
        idx = (torch.arange(self.steps - n, self.steps, device=self.ring.device) % self.capacity)
        counts = self.ring.index_select(0, idx).cpu().numpy()
        return counts if keep_idle else drop_idle(counts)

    def trace(self, source: str, last: int | None = None) -> RoutingTrace:
        counts = self.history(last)
        return RoutingTrace(model=self.model, source=source, counts=NdArray.from_numpy(counts),
                            layer_ids=self.layer_ids,
                            params={"recorded_steps": self.steps, "overflowed": self.overflowed})


def drop_idle(counts: np.ndarray) -> np.ndarray:
    """counts: [steps, layers, experts] -> the steps that routed any token."""
    return counts[counts.reshape(counts.shape[0], -1).any(axis=1)]
