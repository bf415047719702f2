"""Compare planners on one case: plan on the first part of a trace, replay the rest.

Shared by `vllm-gem demo` and benchmarks/planner.py so both report the same quantities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .bounds import lower_bounds
from .certify import certify
from .errors import GemInputError
from .formats import RoutingTrace, load
from .latency import GroupModel
from .planners import PlacementProblem, PlannerUnavailable, make
from .simulate import SimResult, simulate
from .traces import SyntheticParams, synthetic_trace

BUNDLED_TRACES = ("qwen", "switch-exp128", "synthetic")
# The bundled synthetic trace: long, bursty, with a task mix (all parameters in the trace).
SYNTHETIC = SyntheticParams(steps=400, layers=16, experts=64, top_k=8, tokens_per_step=512, seed=7)


def _why_not(e: Exception) -> str:
    """Why a planner did not run, in full: for a GemInputError what it needs, else the message."""
    if isinstance(e, GemInputError) and e.expected:
        return f"{e.problem}; it needs {e.expected}"
    return str(e)


def bundled_trace(name: str) -> RoutingTrace:
    """'qwen' / 'switch-exp128' (HarMoEny, real) or 'synthetic' (generated, deterministic)."""
    if name == "synthetic":
        return synthetic_trace(SYNTHETIC, model="synthetic-64e")
    if name not in BUNDLED_TRACES:
        raise GemInputError(f"bundled:{name}", "trace", "is not a bundled trace",
                            f"one of {', '.join('bundled:' + t for t in BUNDLED_TRACES)}")
    with resources.as_file(resources.files("vllm_gem.data") / f"trace-harmoeny-{name}.msgpack") as p:
        return load(Path(p), RoutingTrace)


def split_steps(loads: np.ndarray, plan_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """loads: [steps, layers, experts] -> (plan part, test part), in time order."""
    cut = max(1, min(loads.shape[0] - 1, int(round(loads.shape[0] * plan_fraction))))
    return loads[:cut], loads[cut:]


@dataclass
class Row:
    planner: str
    result: SimResult | None
    plan_seconds: float
    note: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    phys_to_log: np.ndarray | None = field(default=None, repr=False)  # [layers, num_physical]

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"planner": self.planner, "plan_seconds": self.plan_seconds,
                             "note": self.note, "report": self.report}
        if self.result is not None:
            d.update(self.result.as_dict())
        return d


def compare(loads: np.ndarray, group: GroupModel, num_physical: int, planners: list[str],
            plan_fraction: float = 0.5, planner_params: dict[str, dict] | None = None,
            certify_seconds: float | None = None) -> list[Row]:
    """Plan with each planner on the plan part and replay the test part.

    loads: [steps, layers, experts]. A planner that cannot run (vllm missing, or round_robin
    with redundant slots) gets a row with its reason instead of numbers.
    """
    plan, test = split_steps(loads, plan_fraction)
    bounds = lower_bounds(test, group, num_physical)
    rows = []
    for name in planners:
        policy = make(name, **(planner_params or {}).get(name, {}))
        t0 = time.perf_counter()
        try:
            p2l = policy.place(PlacementProblem(plan, group, num_physical))
        except (PlannerUnavailable, ValueError) as e:
            rows.append(Row(name, None, 0.0, note=_why_not(e)))
            continue
        dt = time.perf_counter() - t0
        report = dict(getattr(policy, "report", {}))
        if certify_seconds and name == "gem":
            report["certificate"] = certify(test, p2l, group, certify_seconds).as_dict()
        rows.append(Row(name, simulate(test, p2l, group, bounds), dt, report=report, phys_to_log=p2l))
    return rows


def format_table(rows: list[Row], baseline: str = "vllm-default") -> str:
    """A plain-text table; `vs base` is each planner's mean layer time over the baseline's."""
    base = next((r.result.mean for r in rows if r.planner == baseline and r.result), None)
    head = f"{'planner':14s} {'mean us':>9s} {'p99 us':>9s} {'straggler':>9s} " \
           f"{'gap':>6s} {'gap fluid':>9s} {'vs ' + baseline:>17s} {'plan s':>7s}"
    out = [head, "-" * len(head)]
    for r in rows:
        if r.result is None:
            out.append(f"{r.planner:14s} {'n/a: ' + r.note}")
            continue
        s = r.result
        rel = f"{s.mean / base:.3f}" if base else "n/a"
        out.append(f"{r.planner:14s} {s.mean:9.1f} {s.p99:9.1f} {s.straggler_ratio:9.3f} "
                   f"{s.gap:6.3f} {s.gap_fluid:9.3f} {rel:>17s} {r.plan_seconds:7.2f}")
    return "\n".join(out)
