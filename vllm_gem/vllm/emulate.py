"""Emulate a slower GPU inside one vLLM worker, for experiments only.

`slow_down_experts(f)` makes this process's Triton MoE expert kernel also run on the first
ceil(f * tokens) tokens of every call, into scratch buffers: the rank does (1 + f) times the
expert work, in prefill and in decode, under CUDA graphs too (the extra launch is captured
with the rest). Calibration emulates the same fraction (CalibrationSpec.extra_work), so the
profiles GEM plans with measure the slowed rank. Nothing on the device is changed, and
results that depend on it must say so.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger("vllm.gem")
_patched: float | None = None


def slow_down_experts(fraction: float) -> None:
    global _patched
    if _patched is not None or fraction <= 0:
        return
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    original = TritonExperts.apply

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
              global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input):
        original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                 global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
                 expert_tokens_meta, apply_router_weight_on_input)
        n = math.ceil(fraction * hidden_states.shape[0])
        if n and expert_tokens_meta is None:
            # fresh scratch: the output may be a view of workspace13
            original(self, torch.empty_like(output[:n]), hidden_states[:n], w1, w2,
                     topk_weights[:n], topk_ids[:n], activation, global_num_experts, expert_map,
                     None if a1q_scale is None else a1q_scale[:n], a2_scale,
                     torch.empty_like(workspace13), torch.empty_like(workspace2), None,
                     apply_router_weight_on_input)

    TritonExperts.apply = apply
    _patched = fraction
    logger.warning("vllm-gem: EMULATED slower GPU in this worker: %.0f%% extra MoE expert work "
                   "(experiments only)", 100 * fraction)
