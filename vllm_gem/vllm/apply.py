"""Move expert weights to a new placement with vLLM's own EPLB machinery, and prove it.

`apply_placement` calls vLLM's rearrange_expert_weights_inplace (the same transfer its EPLB
uses) and _commit_eplb_maps (in-place copies, so routers and captured CUDA graphs see the
new maps), then checks per logical expert that the weights after the move are the weights
before it: every replica of expert e must carry expert e's checksum.
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


def gather_logical_checksums(local: torch.Tensor, phys_to_log: torch.Tensor, num_logical: int,
                             group) -> torch.Tensor:
    """Every rank's slot fingerprints -> one fingerprint per logical expert.

    local: [layers, local_slots, F] this rank's slots; phys_to_log: [layers, num_physical]
    -> [layers, num_logical, F]; raises if two replicas of one expert differ.
    """
    import torch.distributed as dist
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    slots = torch.cat(parts, dim=1)  # [L, P, F] in physical order
    layers, _, f = slots.shape
    out = torch.full((layers, num_logical, f), float("nan"), dtype=slots.dtype, device=slots.device)
    idx = phys_to_log.to(slots.device).long()  # [L, P]
    out.scatter_(1, idx[..., None].expand(-1, -1, f), slots)
    back = out.gather(1, idx[..., None].expand(-1, -1, f))
    bad = ~torch.isclose(back, slots, rtol=RTOL, atol=0.0).all(-1)  # [L, P]
    if bad.any():
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise WeightIntegrityError(
            f"layer {layer}: slot {slot} and another replica of logical expert "
            f"{int(idx[layer, slot])} hold different weights; expected identical replicas")
    return out


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
    num_logical = model.num_logical_experts
    group = ep_group.device_group
    if verify:
        before = gather_logical_checksums(expert_checksums(model.expert_weights), old,
                                          num_logical, group)
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
        after = gather_logical_checksums(expert_checksums(model.expert_weights), new,
                                         num_logical, ep_group.device_group)
        bad = ~torch.isclose(before, after, rtol=RTOL, atol=0.0).all(-1)
        if bad.any():
            layer, expert = (int(i) for i in bad.nonzero()[0])
            raise WeightIntegrityError(
                f"after the move, layer {layer} expert {expert} (and {int(bad.sum()) - 1} more) "
                "does not carry its weights; expected identical checksums before and after")
    bytes_per_slot = sum(w[0].numel() * w.element_size() for w in model.expert_weights[0])
    return MoveReport(seconds, int((old != new).sum()), bytes_per_slot)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
