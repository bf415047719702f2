"""Synthetic routing traces with what real traces are short of: long series.

Per layer: Zipf expert popularity (randomly permuted), a task mix that shifts popularity
(tasks switch as a Markov chain), and bursty "temporal" groups of experts that switch on
together for a few steps. Every parameter is recorded in the trace.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

from ..errors import GemInputError
from ..formats import NdArray, RoutingTrace, decode_json
from ..validation import MAX_COUNT, MAX_EXPERTS


def _in(lo: float, hi: float, what: str = "", *, kind: type = int) -> Any:
    return Annotated[kind, Meta(ge=lo, le=hi, description=what or None)]


class SyntheticParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    steps: _in(1, 1 << 20) = 256
    layers: _in(1, 4096) = 8
    experts: _in(1, MAX_EXPERTS) = 64
    top_k: _in(1, MAX_EXPERTS, "at most experts") = 8
    tokens_per_step: _in(1, 1 << 24) = 512  # mean tokens per step (batch); each routes to top_k experts
    batch_jitter: _in(0, 5, kind=float) = 0.3  # lognormal sigma of the tokens per step
    zipf: _in(0, 10, kind=float) = 1.0  # popularity ~ 1 / rank^zipf
    num_tasks: _in(1, 1024) = 3
    task_strength: _in(0, 5, kind=float) = 0.5  # lognormal sigma of a task's popularity shift
    task_switch: _in(0, 1, kind=float) = 0.05  # per-step probability of switching task
    temporal_groups: _in(0, 1024) = 4  # per layer
    group_size: _in(1, MAX_EXPERTS) = 3
    burst_on: _in(0, 1, kind=float) = 0.08  # per-step probability a group switches on
    burst_len: _in(1, 1e6, kind=float) = 6.0  # mean steps a burst lasts
    burst_boost: _in(1e-3, 1e6, kind=float) = 8.0  # popularity multiplier while on
    seed: _in(0, 2**63 - 1) = 0


MAX_SYNTHETIC = 1 << 24  # steps x layers x experts: the generator holds a few float64 copies


def synthetic_trace(p: SyntheticParams, model: str = "synthetic", source: str = "SyntheticParams"
                    ) -> RoutingTrace:
    """counts: [steps, layers, experts] drawn from the model above.

    source names the parameters in errors (the SyntheticParams file)."""
    if p.top_k > p.experts:
        raise GemInputError(source, "top_k", f"is {p.top_k}", f"at most experts ({p.experts})")
    if p.steps * p.layers * p.experts > MAX_SYNTHETIC:
        raise GemInputError(source, "steps", f"x layers x experts is {p.steps * p.layers * p.experts}",
                            f"at most {MAX_SYNTHETIC} counts")
    rng = np.random.default_rng(p.seed)
    L, E, S = p.layers, p.experts, p.steps
    base = 1.0 / np.arange(1, E + 1) ** p.zipf
    pop = np.stack([base[rng.permutation(E)] for _ in range(L)])  # [L, E]
    task_shift = rng.lognormal(0.0, p.task_strength, size=(p.num_tasks, L, E))
    # temporal groups: drawn from the less popular half, so bursts are what makes them hot
    cold = np.argsort(pop, axis=1)[:, : max(E // 2, 1)]
    n_grp = min(p.temporal_groups, cold.shape[1] // max(p.group_size, 1))
    groups = np.stack([rng.choice(c, size=(n_grp, p.group_size), replace=False) for c in cold]) \
        if n_grp else np.zeros((L, 0, p.group_size), dtype=np.int64)
    task = np.empty(S, dtype=np.int64)
    on = np.zeros((S, L, n_grp), dtype=bool)
    cur_task, cur_on = rng.integers(p.num_tasks), np.zeros((L, n_grp), dtype=bool)
    off_prob = 1.0 / max(p.burst_len, 1.0)
    for s in range(S):
        if rng.random() < p.task_switch:
            cur_task = rng.integers(p.num_tasks)
        flip = rng.random((L, n_grp))
        cur_on = np.where(cur_on, flip >= off_prob, flip < p.burst_on)
        task[s], on[s] = cur_task, cur_on
    weight = pop[None] * task_shift[task]  # [S, L, E]
    boost = np.ones((S, L, E))
    for g in range(n_grp):
        idx = groups[:, g, :]  # [L, group_size]
        mult = np.where(on[:, :, g], p.burst_boost, 1.0)[..., None]  # [S, L, 1]
        boost[:, np.arange(L)[:, None], idx] *= mult
    weight = weight * boost
    prob = weight / weight.sum(-1, keepdims=True)
    tokens = np.clip(rng.lognormal(np.log(p.tokens_per_step), p.batch_jitter, size=S), 1, 2**40).astype(np.int64)
    if int(tokens.max()) * p.top_k > MAX_COUNT:  # int32 counts: refuse instead of wrapping
        raise GemInputError(source, "tokens_per_step", f"is {p.tokens_per_step}: with top_k {p.top_k} and "
                            f"batch_jitter {p.batch_jitter:g} a step routes {int(tokens.max()) * p.top_k} tokens",
                            f"at most {MAX_COUNT} routed tokens per step")
    n = np.broadcast_to((tokens * p.top_k)[:, None], (S, L))
    counts = rng.multinomial(n, prob)
    return RoutingTrace(model=model, source="synthetic (vllm_gem.traces.synthetic)",
                        counts=NdArray.from_numpy(counts.astype(np.int32)), top_k=p.top_k,
                        params=msgspec.to_builtins(p))


def decode_params(path: str) -> SyntheticParams:
    """A SyntheticParams JSON file; a bad value names its field."""
    return decode_json(path, SyntheticParams, "SyntheticParams")
