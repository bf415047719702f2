"""Move expert weights to a new placement with vLLM's own EPLB machinery, and prove it.

`apply_placement` calls vLLM's rearrange_expert_weights_inplace (the same transfer its EPLB
uses) one layer at a time, the ranks agreeing after each layer that none failed. Fingerprints
of every slot then prove that each slot holds a copy of the weights its logical expert had
before the move, and only then are the new maps committed with _commit_eplb_maps (in-place
copies, so routers and captured CUDA graphs see them). A move that is interrupted or
delivers wrong weights is undone: each slot's real content is identified by its fingerprint
and vLLM's transfer moves the weights back to the old placement, which is verified again.
Only if an expert has no intact copy left anywhere does the move end in WeightsLostError,
which no fallback may swallow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..calibrate import gather_objects

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


def all_slot_checksums(model, group) -> torch.Tensor:
    """Fingerprints of every slot of every rank: [layers, num_physical, F] (collective)."""
    return gather_slot_checksums(expert_checksums(model.expert_weights), group)


def matching_slots(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """after: [layers, P, F], before: [layers, Q, F] fingerprints -> [layers, P, Q] bool:
    slot p now holds the weights slot q held before the move."""
    return torch.isclose(after[:, :, None, :], before[:, None, :, :], rtol=RTOL, atol=0.0).all(-1)


def misplaced_slots(before: torch.Tensor, old: torch.Tensor, after: torch.Tensor, new: torch.Tensor
                    ) -> torch.Tensor:
    """Slots whose weights after the move are no copy of their logical expert before it.

    before/after: [layers, num_physical, F] slot fingerprints; old/new: [layers, num_physical]
    phys->log maps -> bad: [layers, num_physical] bool. A slot is good when it matches some
    slot that held the same logical expert before the move. Replicas need not be identical
    (vLLM's dummy weights fill every slot differently); with a real checkpoint they are.
    """
    same = matching_slots(after, before) & (new[:, :, None] == old[:, None, :])  # [L, P_new, P_old]
    return ~same.any(-1)


def identify_slots(before: torch.Tensor, old: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The logical expert whose weights each slot really holds, -1 where none matches.

    before/after: [layers, num_physical, F] slot fingerprints; old: [layers, num_physical]
    the phys->log map before the move -> [layers, num_physical] (vLLM's transfer never reads
    a slot marked -1 and fills it when the target map names an expert for it).
    """
    same = matching_slots(after, before)
    src = same.to(torch.int8).argmax(-1)  # any matching pre-move slot: all hold the same expert
    return torch.where(same.any(-1), old.gather(1, src), torch.full_like(old, -1))


def lost_experts(actual: torch.Tensor, needed: torch.Tensor) -> list[tuple[int, int]]:
    """(layer, logical expert) pairs that needed names but no slot of actual holds.

    actual, needed: [layers, num_physical] phys->log (actual may hold -1)
    """
    return [(ly, int(e)) for ly in range(needed.shape[0])
            for e in torch.unique(needed[ly]) if not bool((actual[ly] == e).any())]


class WeightIntegrityError(RuntimeError):
    """A move was interrupted or delivered wrong weights; the old placement was restored."""


class WeightsLostError(RuntimeError):
    """An expert's weights have no intact copy left: the model must not serve."""


@dataclass
class MoveReport:
    seconds: float
    slots_changed: int
    bytes_per_slot: int


def apply_placement(model_state, new_phys_to_log: torch.Tensor, ep_group) -> MoveReport:
    """Rearrange this rank's expert weights and commit the new maps (collective over EP).

    model_state: vLLM's EplbModelState; new_phys_to_log: [layers, num_physical] (CPU, long),
    identical on every rank. ep_group: vLLM's EP GroupCoordinator. Raises
    WeightIntegrityError after restoring and verifying the old placement (maps unchanged),
    WeightsLostError when it cannot be restored.
    """
    from vllm.distributed.eplb.eplb_state import _commit_eplb_maps

    model = model_state.model
    old = model_state.physical_to_logical_map.cpu().clone()
    new = new_phys_to_log.to(dtype=old.dtype).cpu()  # vLLM computes the logical maps on CPU
    group = ep_group.device_group
    before = all_slot_checksums(model, group)
    _synchronize()
    t0 = time.perf_counter()
    failure = transfer(old, new, model_state, group)
    _synchronize()
    seconds = time.perf_counter() - t0
    after = all_slot_checksums(model, group)
    dev = after.device
    bad = misplaced_slots(before, old.to(dev), after, new.to(dev))
    if bad.any() and not failure:
        layer, slot = (int(i) for i in bad.nonzero()[0])
        failure = (f"after the move, layer {layer} slot {slot} (and {int(bad.sum()) - 1} more) "
                   f"did not hold the weights of logical expert {int(new[layer, slot])}")
    if failure:
        restore(before.cpu(), old, after.cpu(), model_state, group, failure)
    _commit_eplb_maps(model_state, new)
    model_state.expert_load_pass.zero_()
    model_state.expert_load_window.zero_()
    return MoveReport(seconds, int((old != new).sum()), slot_bytes(model.expert_weights))


def transfer(old: torch.Tensor, new: torch.Tensor, model_state, group) -> str:
    """vLLM's weight transfer, layer by layer; after each layer every rank learns whether any
    rank failed, so all stop at the same layer. Returns "" or what failed where.

    old, new: [layers, num_physical] phys->log (CPU)
    """
    import torch.distributed as dist
    from vllm.distributed.eplb.rebalance_execute import rearrange_expert_weights_inplace

    weights = model_state.model.expert_weights
    flag = torch.zeros(1, dtype=torch.int32, device=weights[0][0].device)
    for ly in range(old.shape[0]):
        if torch.equal(old[ly], new[ly]):
            continue
        error = ""
        try:
            rearrange_expert_weights_inplace(old[ly:ly + 1], new[ly:ly + 1], weights[ly:ly + 1],
                                             model_state.expert_buffer, group, model_state.communicator)
        except Exception as e:  # reported to every rank, then undone
            error = f"{type(e).__name__}: {e}"
        flag.fill_(1 if error else 0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if int(flag.item()):  # rare: only now exchange the messages, so every rank names the same
            errors = gather_objects(error, group)
            who = next(r for r, e in enumerate(errors) if e)
            return f"the move was interrupted at layer {ly} on EP rank {who}: {errors[who]}"
    return ""


def restore(before: torch.Tensor, old: torch.Tensor, after: torch.Tensor, model_state, group,
            failure: str) -> None:
    """Move every slot back to the old placement after a failed move, verify it, and raise
    WeightIntegrityError (restored) or WeightsLostError (an expert has no copy left).

    before/after: [layers, num_physical, F] fingerprints (CPU); old: [layers, num_physical]
    the map that is still committed.
    """
    actual = identify_slots(before, old, after)
    lost = lost_experts(actual, old)
    if lost:
        raise WeightsLostError(f"{failure}; no intact copy is left of (layer, expert) {lost[:5]}"
                               f"{' and more' if len(lost) > 5 else ''}: restart the server")
    again = transfer(actual, old, model_state, group)
    now = all_slot_checksums(model_state.model, group).cpu()
    bad = misplaced_slots(before, old, now, old)
    if again or bad.any():
        raise WeightsLostError(f"{failure}; restoring the old placement failed too "
                               f"({again or f'{int(bad.sum())} slots still wrong'}): restart the server")
    raise WeightIntegrityError(f"{failure}; restored the old placement (every slot verified)")


def slot_bytes(expert_weights: list[list[torch.Tensor]]) -> int:
    """Bytes one physical expert slot holds: its row of every parameter (one layer)."""
    return sum(w[0].numel() * w.element_size() for w in expert_weights[0])


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
