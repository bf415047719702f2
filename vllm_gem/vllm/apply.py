"""Move expert weights to a new placement with vLLM's own EPLB machinery, and prove it.

`apply_placement` calls vLLM's rearrange_expert_weights_inplace (the same transfer its EPLB
uses) and _commit_eplb_maps (in-place copies, so routers and captured CUDA graphs see the
new maps), then checks with fingerprints of every slot that each slot now holds a copy of
the weights its logical expert had before the move.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

CHUNK_SLOTS = 4
RTOL = 1e-9  # float64 sums of the same bf16 rows; another expert differs by far more


def expert_checksums(expert_weights: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per physical slot fingerprints, computed on the GPU.

    expert_weights: [layers][params] each [local_slots, -1] (vLLM's model.expert_weights)
    -> [layers, local_slots, 2 * params] float64: sum and position-weighted sum of each row,
    so a slot holding another expert, or a shuffled row, changes the fingerprint.
    """
    out = []
    for params in expert_weights:
        cols = []
        for w in params:
            w = w.reshape(w.shape[0], -1)
            pos = torch.linspace(1.0, 2.0, w.shape[1], dtype=torch.float64, device=w.device)
            sums, weighted = [], []
            for chunk in w.split(CHUNK_SLOTS):  # float64 copies of a few slots at a time
                c64 = chunk.to(torch.float64)
                sums.append(c64.sum(1))
                weighted.append(c64 @ pos)
            cols += [torch.cat(sums), torch.cat(weighted)]
        out.append(torch.stack(cols, dim=1))
    return torch.stack(out)


def gather_slot_checksums(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's slot fingerprints, in physical order.

    local: [layers, local_slots, F] this rank's slots -> [layers, num_physical, F]
    """
    import torch.distributed as dist
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def misplaced_slots(before: torch.Tensor, old: torch.Tensor, after: torch.Tensor, new: torch.Tensor
                    ) -> torch.Tensor:
    """Slots whose weights after the move are no copy of their logical expert before it.

    before/after: [layers, num_physical, F] slot fingerprints; old/new: [layers, num_physical]
    phys->log maps -> bad: [layers, num_physical] bool. A slot is good when it matches some
    slot that held the same logical expert before the move. Replicas need not be identical
    (vLLM's dummy weights fill every slot differently); with a real checkpoint they are.
    """
    same = torch.isclose(after[:, :, None, :], before[:, None, :, :], rtol=RTOL, atol=0.0).all(-1)
    same &= new[:, :, None] == old[:, None, :]  # [L, P_new, P_old]
    return ~same.any(-1)


class WeightIntegrityError(RuntimeError):
    """Expert weights after a move do not match the weights before it."""


@dataclass
class MoveReport:
    seconds: float
    slots_changed: int
    bytes_per_slot: int


def apply_placement(model_state, new_phys_to_log: torch.Tensor, ep_group, verify: bool = True
                    ) -> MoveReport:
    """Rearrange this rank's expert weights and commit the new maps (collective over EP).

    model_state: vLLM's EplbModelState; new_phys_to_log: [layers, num_physical] (CPU, long),
    identical on every rank. ep_group: vLLM's EP GroupCoordinator.
    """
    from vllm.distributed.eplb.eplb_state import _commit_eplb_maps
    from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace

    model = model_state.model
    old = model_state.physical_to_logical_map.cpu().clone()  # committed in place below
    new = new_phys_to_log.to(dtype=old.dtype).cpu()  # vLLM computes the logical maps on CPU
    group = ep_group.device_group
    if verify:
        before = gather_slot_checksums(expert_checksums(model.expert_weights), group)
    _synchronize()
    t0 = time.perf_counter()
    rearrange_expert_weights_inplace(old, new, model.expert_weights, model_state.expert_buffer,
                                     group, model_state.communicator)
    _commit_eplb_maps(model_state, new)
    model_state.expert_load_pass.zero_()
    model_state.expert_load_window.zero_()
    _synchronize()
    seconds = time.perf_counter() - t0
    if verify:
        after = gather_slot_checksums(expert_checksums(model.expert_weights), group)
        dev = after.device
        bad = misplaced_slots(before, old.to(dev), after, new.to(dev))
        if bad.any():
            layer, slot = (int(i) for i in bad.nonzero()[0])
            raise WeightIntegrityError(
                f"after the move, layer {layer} slot {slot} (and {int(bad.sum()) - 1} more) does "
                f"not hold the weights of logical expert {int(new[layer, slot])}; expected a copy "
                "of that expert's weights from before the move")
    return MoveReport(seconds, int((old != new).sum()), slot_bytes(model.expert_weights))


def slot_bytes(expert_weights: list[list[torch.Tensor]]) -> int:
    """Bytes one physical expert slot holds: its row of every parameter (one layer)."""
    return sum(w[0].numel() * w.element_size() for w in expert_weights[0])


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
