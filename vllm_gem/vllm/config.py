"""GEM's settings inside vLLM: `--additional-config '{"gem": {...}}'`, parsed with msgspec.

`--plugin gem` and the `--gem-*` flags are sugar for that dict, so the settings travel to the
engine core and every worker inside VllmConfig, with no side channel.
"""

from __future__ import annotations

import os
import re
import typing
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ..errors import GemInputError
from ..formats import field_error
from ..planners import NAMES, check_params
from ..validation import EngineSteps, convert, describe

SOURCE = "--additional-config gem"
RECALIBRATE_ENV = "VLLM_GEM_RECALIBRATE"
# "on": every 10000 engine steps. Each recalibration stalls serving (all ranks, about 0.17 s,
# and 1.4 s when it re-profiles): at 500 steps that was 19% of a soak's time, at 10000 about 1%
DEFAULT_RECALIBRATE_STEPS = 10000
ON_WORDS = ("1", "on", "true", "yes")  # how a switch reads "on" in text (environment, HTTP)
OFF_WORDS = ("0", "off", "false", "no")


def _range(lo: float | None = None, hi: float | None = None, *, kind: type = int, lt: float | None = None,
           gt: float | None = None, what: str | None = None) -> Any:
    return Annotated[kind, Meta(ge=lo, le=hi, lt=lt, gt=gt, description=what)]


Fraction = _range(0.0, lt=1.0, kind=float, what="a fraction")


class GemConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every GEM option, each with its range (msgspec Meta: a bad value fails the parse,
    naming the key). Paths are read on the workers (same host for single-node serving)."""

    enabled: bool = True
    strict: bool = False  # fail the start instead of serving on vLLM's own placement
    # inputs: a saved routing trace (else warm-up prompts are run) and saved GPU profiles
    # (one per EP rank, else each GPU is calibrated at start)
    trace: str | None = None
    profiles: list[str] = []
    place: bool = True  # False: record, emulate and export only; keep vLLM's placement
    planner: str = "gem"
    planner_params: dict[str, Any] = {}
    warmup_prompts: _range(0, 4096) = 32
    warmup_max_tokens: _range(1, 65536) = 32
    # per GPU; past it GEM keeps vLLM's placement
    calibration_time_limit_s: _range(hi=86400.0, gt=0.0, kind=float, what="seconds") = 120.0
    # recorder: per-step, per-layer expert counts kept on the GPU
    record: bool = True
    record_capacity: _range(1, 1 << 20, what="steps") = 4096  # steps kept in the ring buffer
    trace_dir: str | None = None  # recorded traces (on SIGUSR1 and at shutdown), placements
    # recalibration while serving (0 = off); VLLM_GEM_RECALIBRATE overrides it
    recalibrate_steps: EngineSteps = 0
    recalibrate_planner: str = "gem-migrate"  # prefers plans that move few experts
    # re-place only if the predicted layer-time gain beats this (< 0: always)
    min_gain: _range(-1.0, lt=1.0, kind=float, what="a fraction; negative: apply every plan") = 0.02
    # check the GPUs on every Nth recalibration only (1: every time): routing drifts faster
    # than a GPU's speed. A quick re-profile stalls serving ~1.3-1.4 s (2xH200), re-planning
    # from live routing ~0.1-0.2 s
    reprofile_every: _range(1, 10**6) = 4
    # that check first re-times a few of each GPU's profiled load patterns (calibrate.check_speed)
    # and re-profiles every GPU only when one's speed moved against the other GPUs' by more
    # than this fraction (calibrate.relative_speed_changes); 0: always re-profile
    speed_tolerance: Fraction = 0.05
    # a recalibration plans in a background thread on EP rank 0 while serving goes on, and
    # every rank applies the plan this many engine steps later (all at the same step); if the
    # plan is not ready by then, serving waits for it. At most half the recalibration
    # interval. 0: plan inside the step
    plan_delay_steps: EngineSteps = 200
    # metrics: one small JSON per rank, read by the API server's /metrics collector
    state_dir: str | None = None
    # experiments only: EP rank -> extra fraction of MoE expert work it does (a slower GPU)
    emulate_slowdown: dict[_range(0, 4095), _range(0.0, 4.0, kind=float, what="extra work")] = {}

    def __post_init__(self) -> None:
        for key in ("trace", "trace_dir", "state_dir"):  # "" would silently mean unset
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise GemInputError(SOURCE, key, "is empty", "a path, or the key left out")
        for i, path in enumerate(self.profiles):
            if not path.strip():
                raise GemInputError(SOURCE, f"profiles[{i}]", "is empty", "a profile file path")
        for key in ("planner", "recalibrate_planner"):
            if getattr(self, key) not in NAMES:
                raise GemInputError(SOURCE, key, f"is {getattr(self, key)!r}", f"one of {NAMES}")
        for key in ("planner", "recalibrate_planner"):  # both plan with planner_params
            check_params(getattr(self, key), self.planner_params, SOURCE)

    @property
    def recalibrate_interval(self) -> int:
        """Engine steps between re-profiling and re-planning; 0 when off."""
        raw = os.environ.get(RECALIBRATE_ENV, "").strip()
        if not raw:
            return self.recalibrate_steps
        if raw.lower() in OFF_WORDS:
            return 0
        if raw.lower() in ON_WORDS:
            return DEFAULT_RECALIBRATE_STEPS
        try:
            return convert(raw, EngineSteps, RECALIBRATE_ENV, "value")
        except GemInputError as e:
            raise GemInputError(RECALIBRATE_ENV, "value", e.problem,
                                f"0/off, 1/on, or {e.expected}") from None


def parse(raw: Any, source: str = SOURCE) -> GemConfig:
    """additional_config["gem"] (a dict; `true` means all defaults) -> GemConfig.

    The environment is checked here too, so a bad VLLM_GEM_RECALIBRATE fails at start."""
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        raise GemInputError(source, "gem", f"is {'null' if raw is None else shown}", "a JSON object")
    if "profiles" in raw and not isinstance(raw["profiles"], (list, tuple)):  # a set has no rank order
        value = raw["profiles"]
        kind = {type(None): "null", str: "text", dict: "an object", set: "a set"}.get(type(value))
        raise GemInputError(source, "profiles", f"is {kind or repr(value)}",
                            "a list of profile paths in EP-rank order")
    try:
        cfg = msgspec.convert(raw, GemConfig, strict=False)
    except msgspec.ValidationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, GemInputError):  # raised by __post_init__; msgspec wraps it
            raise cause from None
        raise _named(e, raw, source) from None
    if cfg.enabled:
        _ = cfg.recalibrate_interval
    return cfg


def _named(e: msgspec.ValidationError, raw: dict, source: str) -> GemInputError:
    """A parse failure as 'KEY: is VALUE; expected RANGE', from the field's own declaration."""
    fields = {f.name: f.type for f in msgspec.structs.fields(GemConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        return GemInputError(source, "gem", f"has {str(unknown[0])!r}, which is not a GEM option",
                             f"options from {sorted(fields)}")
    err = field_error(e, source)
    key = re.split(r"[\[. ]", err.field, maxsplit=1)[0]
    if key in fields and (key == err.field or typing.get_origin(fields[key]) is dict):
        return GemInputError(source, key, f"is {raw[key]!r}", describe(fields[key]))
    return field_error(e, source, "see docs/plugin.md")


def wants_strict(raw: Any) -> bool:
    """Whether settings that failed to parse asked for strict mode (read leniently)."""
    return isinstance(raw, dict) and raw.get("strict") in (True, "true", 1)


def from_additional(additional_config: dict[str, Any] | None) -> GemConfig | None:
    """The GEM config of a VllmConfig.additional_config, or None when GEM is not asked for."""
    if not additional_config or "gem" not in additional_config:
        return None
    cfg = parse(additional_config["gem"])
    return cfg if cfg.enabled else None
