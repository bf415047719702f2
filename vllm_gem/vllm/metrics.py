"""GEM's Prometheus metrics on vLLM's /metrics.

The numbers live in the workers, /metrics in the API server. Each worker writes one small
msgspec JSON file per EP rank (RankState) into the run's state_dir when its placement
changes; a collector registered in the API server reads them at scrape time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from ..files import write_atomic

logger = logging.getLogger("vllm.gem")


class RankState(msgspec.Struct, kw_only=True):
    rank: int
    generation: int  # placements applied by GEM (0 = vLLM's own)
    predicted_layer_us: float  # this rank's predicted mean MoE layer time, current placement
    predicted_layer_us_before: float  # the same under the previous placement
    straggler_ratio: float  # predicted slowest rank / mean rank, current placement
    move_seconds: float = 0.0
    recorded_steps: int = 0
    recalibrations: int = 0  # recalibrations run while serving (moved or not)


# (RankState field, metric name, kind, help): every vllm_gem:* series on /metrics, one per EP
# rank (label `rank`); docs/grafana-vllm-gem.json queries these names. Counters only grow
# (a restart starts them at 0 again, which rate() and increase() expect) and are exposed with
# Prometheus' `_total` suffix; gauges are current values.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("predicted_layer_us", "vllm_gem:predicted_moe_layer_time_seconds", "gauge",
     "Predicted mean MoE layer time of this EP rank under the current placement"),
    ("predicted_layer_us_before", "vllm_gem:predicted_moe_layer_time_before_seconds", "gauge",
     "Predicted mean MoE layer time of this EP rank under the previous placement"),
    ("straggler_ratio", "vllm_gem:straggler_ratio", "gauge", "Predicted slowest-rank / mean-rank MoE layer time"),
    ("generation", "vllm_gem:placements", "counter", "Placements applied by GEM since start (0 = vLLM's own)"),
    ("move_seconds", "vllm_gem:last_move_seconds", "gauge", "Wall time of the last expert-weight move"),
    ("recorded_steps", "vllm_gem:recorded_steps", "counter", "Engine steps recorded by the routing recorder"),
    ("recalibrations", "vllm_gem:recalibrations", "counter", "Recalibrations run while serving, moved or not"),
)


US_FIELDS = {"predicted_layer_us", "predicted_layer_us_before"}  # kept in us, exposed in seconds


def exposed_name(name: str, kind: str) -> str:
    """The series name a scrape shows: counters carry `_total`."""
    return f"{name}_total" if kind == "counter" else name


def write_state(state_dir: str, state: RankState) -> None:
    # readers (a /metrics scrape) never see half a file
    write_atomic(Path(state_dir) / f"rank{state.rank}.json", msgspec.json.encode(state))


def read_states(state_dir: str) -> list[RankState]:
    out = []
    for f in sorted(Path(state_dir).glob("rank*.json")):
        try:
            out.append(msgspec.json.decode(f.read_bytes(), type=RankState))
        except (OSError, msgspec.DecodeError) as e:  # a scrape must not fail because of us
            logger.warning("vllm-gem: skipping metrics file %s: %s", f, e)
    return out


class GemCollector:
    """prometheus_client custom collector over the rank state files."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    def describe(self):
        return []  # collect lazily: the files appear only after the first placement

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        states = read_states(self.state_dir)
        for attr, name, kind, doc in METRICS:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            g = family(name, doc, labels=["rank"])
            for s in states:
                value = float(getattr(s, attr))
                g.add_metric([str(s.rank)], value * 1e-6 if attr in US_FIELDS else value)  # base units
            yield g


_registered: set[str] = set()


def register_collector(state_dir: str) -> None:
    """Register the collector once per state_dir with the registry vLLM's /metrics serves."""
    if state_dir in _registered:
        return
    from vllm.v1.metrics.prometheus import get_prometheus_registry
    get_prometheus_registry().register(GemCollector(state_dir))
    _registered.add(state_dir)
