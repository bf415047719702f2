"""GEM's settings inside vLLM: `--additional-config '{"gem": {...}}'`, parsed with msgspec.

`--plugin gem` and the `--gem-*` flags are sugar for that dict, so the settings travel to the
engine core and every worker inside VllmConfig, with no side channel.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from ..errors import GemInputError

SOURCE = "--additional-config gem"
RECALIBRATE_ENV = "VLLM_GEM_RECALIBRATE"
# "on": every 10000 engine steps. Each recalibration stalls serving (all ranks, about 0.17 s,
# and 1.4 s when it re-profiles): at 500 steps that was 19% of a soak's time, at 10000 about 1%
DEFAULT_RECALIBRATE_STEPS = 10000
ON_WORDS = ("1", "on", "true", "yes")  # how a switch reads "on" in text (environment, HTTP)
OFF_WORDS = ("0", "off", "false", "no")


class GemConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every GEM option. Paths are read on the workers (same host for single-node serving)."""

    enabled: bool = True
    strict: bool = False  # fail the start instead of serving on vLLM's own placement
    # inputs: a saved routing trace (else warm-up prompts are run) and saved GPU profiles
    # (one per EP rank, else each GPU is calibrated at start)
    trace: str | None = None
    profiles: list[str] = []
    place: bool = True  # False: record, emulate and export only; keep vLLM's placement
    planner: str = "gem"
    planner_params: dict[str, Any] = {}
    warmup_prompts: int = 32
    warmup_max_tokens: int = 32
    calibration_time_limit_s: float = 120.0  # per GPU; past it GEM keeps vLLM's placement
    # recorder: per-step, per-layer expert counts kept on the GPU
    record: bool = True
    record_capacity: int = 4096  # steps kept in the ring buffer
    trace_dir: str | None = None  # recorded traces (on SIGUSR1 and at shutdown), placements
    # recalibration while serving (0 = off); VLLM_GEM_RECALIBRATE overrides it
    recalibrate_steps: int = 0
    recalibrate_planner: str = "gem-migrate"  # prefers plans that move few experts
    min_gain: float = 0.02  # re-place only if the predicted layer-time gain beats this (< 0: always)
    # check the GPUs on every Nth recalibration only (1: every time): routing drifts faster
    # than a GPU's speed. A quick re-profile stalls serving ~1.3-1.4 s (2xH200, sessions 6
    # and 8), re-planning from live routing ~0.1-0.2 s
    reprofile_every: int = 4
    # that check first re-times a few of each GPU's profiled load patterns (calibrate.check_speed)
    # and re-profiles every GPU only when one's speed moved against the other GPUs' by more
    # than this fraction (calibrate.relative_speed_changes); 0: always re-profile
    speed_tolerance: float = 0.05
    # a recalibration plans in a background thread on EP rank 0 while serving goes on, and
    # every rank applies the plan this many engine steps later (all at the same step); if the
    # plan is not ready by then, serving waits for it. At most half the recalibration
    # interval. 0: plan inside the step
    plan_delay_steps: int = 200
    # metrics: one small JSON per rank, read by the API server's /metrics collector
    state_dir: str | None = None
    # experiments only: EP rank -> extra fraction of MoE expert work it does (a slower GPU)
    emulate_slowdown: dict[int, float] = {}

    def __post_init__(self) -> None:
        if self.record_capacity < 1:
            raise GemInputError(SOURCE, "record_capacity", f"is {self.record_capacity}", "an integer >= 1")
        if not self.calibration_time_limit_s > 0:
            raise GemInputError(SOURCE, "calibration_time_limit_s", f"is {self.calibration_time_limit_s}",
                                "a number of seconds > 0")
        if self.recalibrate_steps < 0:
            raise GemInputError(SOURCE, "recalibrate_steps", f"is {self.recalibrate_steps}",
                                "0 (off) or a number of engine steps")
        if self.reprofile_every < 1:
            raise GemInputError(SOURCE, "reprofile_every", f"is {self.reprofile_every}",
                                "an integer >= 1 (1: re-profile at every recalibration)")
        if self.plan_delay_steps < 0:
            raise GemInputError(SOURCE, "plan_delay_steps", f"is {self.plan_delay_steps}",
                                "0 (plan inside the step) or a number of engine steps")
        if not 0.0 <= self.speed_tolerance < 1.0:
            raise GemInputError(SOURCE, "speed_tolerance", f"is {self.speed_tolerance}",
                                "a fraction in [0, 1) (0: re-profile at every check)")
        if not -1.0 <= self.min_gain < 1.0:
            raise GemInputError(SOURCE, "min_gain", f"is {self.min_gain}",
                                "a fraction in [-1, 1) (negative: apply every plan)")
        for rank, f in self.emulate_slowdown.items():
            if not 0.0 <= f <= 4.0:
                raise GemInputError(SOURCE, f"emulate_slowdown.{rank}", f"is {f}",
                                    "an extra work fraction in [0, 4]")

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
            steps = int(raw)
        except ValueError:
            raise GemInputError(RECALIBRATE_ENV, "value", f"is {raw!r}",
                                "0/off, 1/on, or a number of engine steps") from None
        return steps


def parse(raw: Any, source: str = SOURCE) -> GemConfig:
    """additional_config["gem"] (a dict; `true` means all defaults) -> GemConfig."""
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise GemInputError(source, "gem", f"is {type(raw).__name__}", "a JSON object")
    try:
        return msgspec.convert(raw, GemConfig, strict=False)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.record_capacity`"
        text = str(e)
        field = text.rsplit("at `$.", 1)[-1].rstrip("`") if "at `$." in text else "gem"
        raise GemInputError(source, field, text.split(" - at ")[0], "see docs/plugin.md") from None


def from_additional(additional_config: dict[str, Any] | None) -> GemConfig | None:
    """The GEM config of a VllmConfig.additional_config, or None when GEM is not asked for."""
    if not additional_config or "gem" not in additional_config:
        return None
    cfg = parse(additional_config["gem"])
    return cfg if cfg.enabled else None
