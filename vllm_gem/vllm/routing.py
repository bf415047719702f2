"""Replay a RoutingTrace through vLLM's routing simulator (for benchmarks with dummy weights).

Dummy weights route almost uniformly. With
    VLLM_MOE_ROUTING_SIMULATION_STRATEGY=gem_trace VLLM_GEM_ROUTING_TRACE=path/to/trace
every MoE layer draws its tokens' experts from the trace: per forward pass and layer, one
recorded step s is drawn at random (or, with VLLM_GEM_ROUTING_ORDER=recorded, the steps are
taken in their recorded order, one per forward pass, cycling; a counter on the GPU advances
at the first MoE layer, so CUDA-graph replays advance it too), and each token takes top_k
distinct experts with
probability proportional to that step's counts (Gumbel top-k, all on the GPU, so it is
captured in CUDA graphs and redrawn on every replay). Hot experts, bursts and per-layer skew
of the trace carry over. vLLM logs that routing is simulated; model outputs are not valid.

    VLLM_GEM_ROUTING_DRIFT_STEPS=N
makes the traffic drift: every N engine steps the experts are relabelled by one fixed random
permutation, so other experts become hot (what recalibration while serving must follow).
The relabelling rewrites the replayed probabilities in place on the GPU, between steps, so
the captured CUDA graphs see it.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..errors import GemInputError
from ..formats import RoutingTrace, load
from ..validation import EngineSteps, convert

logger = logging.getLogger("vllm.gem")

STRATEGY = "gem_trace"
TRACE_ENV = "VLLM_GEM_ROUTING_TRACE"
DRIFT_ENV = "VLLM_GEM_ROUTING_DRIFT_STEPS"
ORDER_ENV = "VLLM_GEM_ROUTING_ORDER"
ORDERS = ("random", "recorded")
_ACTIVE: TraceReplayRouting | None = None  # this process's strategy, once installed


def step_log_probs(counts: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """counts: [steps, layers, experts] -> log probabilities [layers, steps, experts].

    Every expert keeps a small floor (a fraction of a uniform share) so top_k distinct
    experts can always be drawn, as a real router never gives exactly zero probability.
    """
    c = counts.astype(np.float64).transpose(1, 0, 2)
    tot = c.sum(-1, keepdims=True)
    p = np.where(tot > 0, c / np.maximum(tot, 1), 1.0 / c.shape[-1])
    p = p + floor / c.shape[-1]
    return np.log(p / p.sum(-1, keepdims=True)).astype(np.float32)


def sample_topk(logp: torch.Tensor, num_tokens: int, top_k: int, gen: torch.Generator | None = None,
                step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logp: [steps, experts] -> (topk_weights [T, k] float32, topk_ids [T, k] int64).

    One step for the whole batch (bursts are batch-wide), experts drawn without replacement:
    step [1] (int64, on logp's device) if given, taken modulo the steps; else a random one.
    """
    steps, experts = logp.shape
    s = step % steps if step is not None else torch.randint(steps, (1,), device=logp.device, generator=gen)
    u = torch.rand(num_tokens, experts, device=logp.device, generator=gen).clamp_(1e-20, 1.0)
    scores = logp.index_select(0, s) - torch.log(-torch.log(u))
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.full((num_tokens, top_k), 1.0 / top_k, device=logp.device)
    return weights, ids


class TraceReplayRouting:
    """A vLLM RoutingStrategy replaying one trace; layers are told apart by router instance."""

    def __init__(self, path: str, order: str = "random") -> None:
        if order not in ORDERS:
            raise GemInputError(ORDER_ENV, "value", f"is {order!r}", " or ".join(ORDERS))
        self.path, self.order = path, order
        trace = load(path, RoutingTrace)
        self.logp_host = step_log_probs(trace.counts.to_numpy())  # [L, S, E]
        self.num_layers, self.steps, self.num_experts = self.logp_host.shape
        self._device_logp: dict[torch.device, torch.Tensor] = {}
        self._device_step: dict[torch.device, torch.Tensor] = {}  # recorded order: forward passes
        self._layer_of: dict[int, int] = {}

    def layer_of(self, router: object) -> int:
        # routers are first called in layer order (the profile run), so that order is the layer
        return self._layer_of.setdefault(id(router), len(self._layer_of))

    def route_layer(self, layer: int, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                    top_k: int, indices_type: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        if router_logits.shape[-1] != self.num_experts:
            raise GemInputError(self.path, "counts.shape",
                                f"has {self.num_experts} experts per layer",
                                f"the model's {router_logits.shape[-1]} experts")
        dev = hidden_states.device
        if dev not in self._device_logp:
            self._device_logp[dev] = torch.from_numpy(self.logp_host).to(dev)
        logp = self._device_logp[dev][layer % self.num_layers]
        step = None
        if self.order == "recorded":
            step = self._device_step.setdefault(dev, torch.full((1,), -1, dtype=torch.long, device=dev))
            if layer % self.num_layers == 0:  # a new forward pass: the next recorded step
                step.add_(1)
        w, ids = sample_topk(logp, hidden_states.shape[0], top_k, step=step)
        return w, ids.to(indices_type or torch.long)

    def relabel(self, perm: np.ndarray) -> None:
        """perm: [experts]: expert e now routes like expert perm[e] did (host and GPU copies;
        the GPU copies in place, where the captured graphs read them)."""
        self.logp_host = np.ascontiguousarray(self.logp_host[..., perm])
        index = torch.from_numpy(perm)
        for t in self._device_logp.values():
            t.copy_(t.index_select(-1, index.to(t.device)))

    # RoutingStrategy's own entry point, used if a caller does not pass the layer
    def route_tokens(self, hidden_states, router_logits, top_k, indices_type=None):
        return self.route_layer(0, hidden_states, router_logits, top_k, indices_type)


def drift_steps() -> int:
    """VLLM_GEM_ROUTING_DRIFT_STEPS as a step count; 0: no drift."""
    raw = os.environ.get(DRIFT_ENV, "").strip()
    if not raw:
        return 0
    # isdigit() takes '²' and 5000-digit numbers; the declared range takes neither
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
        raise GemInputError(DRIFT_ENV, "value", f"is {raw[:40]!r}" + ("..." if len(raw) > 40 else ""),
                            "a whole number of engine steps in [0, 1000000000] (0: off)")
    return convert(raw, EngineSteps, DRIFT_ENV, "value")


def maybe_drift(step: int, every: int, seed: int = 0) -> bool:
    """Called after every engine step: relabel the replayed experts when `step` is a multiple
    of `every` (same permutation on every rank and at every drift)."""
    if _ACTIVE is None or every <= 0 or step % every:
        return False
    perm = np.random.default_rng(seed).permutation(_ACTIVE.num_experts)
    _ACTIVE.relabel(perm)
    logger.warning("vllm-gem: routing drift (benchmark): experts relabelled at step %d", step)
    return True


def install() -> None:
    """Register the strategy when the environment asks for it (every process, idempotent)."""
    if os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", "").lower() != STRATEGY:
        return
    path = os.environ.get(TRACE_ENV)
    if not path:
        raise GemInputError(TRACE_ENV, "value", "is not set",
                            f"the routing trace to replay when the strategy is {STRATEGY}")
    from vllm.model_executor.layers.fused_moe.router.routing_simulator_router import (
        RoutingSimulator,
        RoutingSimulatorRouter,
    )
    if STRATEGY in RoutingSimulator.get_available_strategies():
        return
    global _ACTIVE
    strategy = _ACTIVE = TraceReplayRouting(path, os.environ.get(ORDER_ENV, "random").strip().lower() or "random")
    RoutingSimulator.register_strategy(STRATEGY, strategy)
    compute = RoutingSimulatorRouter._compute_routing

    def compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        import vllm.envs as envs
        if envs.VLLM_MOE_ROUTING_SIMULATION_STRATEGY != STRATEGY:
            return compute(self, hidden_states, router_logits, indices_type, input_ids=input_ids)
        return strategy.route_layer(strategy.layer_of(self), hidden_states, router_logits,
                                    self.top_k, indices_type)

    RoutingSimulatorRouter._compute_routing = compute_routing
    logger.warning("vllm-gem: MoE routing replays %s (%d layers, %d steps, %d experts, %s order); "
                   "outputs are not valid, for benchmarks only", path, strategy.num_layers,
                   strategy.steps, strategy.num_experts, strategy.order)
