"""GEM inside one vLLM worker: attach after model load, place before serving, recalibrate.

One `GemWorker` per worker process (one EP rank). Every step that needs the other ranks is
a collective all ranks reach together, and every decision is taken on rank 0 and broadcast,
so the ranks cannot disagree: either all apply the same map or none does.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibrate import (
    CalibrationSpec,
    SpeedCheck,
    calibrate_device,
    check_speed,
)
from ..errors import GemInputError
from ..formats import GpuProfile, save
from .background import PendingPlan
from .config import GemConfig, from_additional
from .experts import expert_shape, served_precision, served_weights
from .gpu_profiles import GpuProfiles
from .placing import PlacementError, Placing  # noqa: F401 - PlacementError: part of this module's interface
from .recalibration import Recalibration
from .recorder import RoutingRecorder
from .routing import drift_steps, maybe_drift

logger = logging.getLogger("vllm.gem")
DEFAULT_MOVE_BANDWIDTH = 5e9  # bytes/s until a move has been timed (gloo-staged transfers)
EXPORT_EVERY = 1000  # engine steps between metric file refreshes

_WORKER: "GemWorker | None" = None


def current() -> "GemWorker | None":
    return _WORKER


class GemWorker(GpuProfiles, Placing, Recalibration):
    """One EP rank's GEM state: its config, EPLB model state and group, recorder, profiles,
    placement generation and pending plan; the engine-step hook; this GPU's own profiling."""

    def __init__(self, worker: Any, cfg: GemConfig) -> None:
        from vllm.distributed.parallel_state import get_ep_group
        runner = worker.model_runner
        self.eplb = getattr(runner, "eplb_state", None)
        if self.eplb is None or not self.eplb.model_states:
            raise GemInputError("--plugin gem", "enable_eplb", "left no EPLB state in the model runner",
                                "a MixtureOfExperts model served with --enable-expert-parallel "
                                "(Qwen3-MoE, Mixtral, DeepSeek-V2/V3; not Qwen2-MoE or OLMoE)")
        ms = next(iter(self.eplb.model_states.values()))
        self._init_parts(cfg, ms, get_ep_group(), worker.vllm_config.parallel_config.data_parallel_size,
                         worker.vllm_config.model_config.model, num_nodes=_node_count())
        self._hook_eplb()

    @classmethod
    def from_parts(cls, cfg: GemConfig, model_state: Any, ep_group: Any, dp_size: int = 1,
                   model_name: str = "", num_nodes: int = 1) -> "GemWorker":
        """A GemWorker over an EPLB model state and EP group, without a vLLM worker (tests)."""
        self = cls.__new__(cls)
        self.eplb = None
        self._init_parts(cfg, model_state, ep_group, dp_size, model_name, num_nodes)
        return self

    def _init_parts(self, cfg: GemConfig, ms: Any, ep: Any, dp_size: int, model_name: str,
                    num_nodes: int = 1) -> None:
        self.cfg = cfg
        self.num_nodes = num_nodes  # EP ranks are laid out node by node
        self.ms = ms
        self.model = ms.model
        self.ep = ep
        self.rank, self.size = ep.rank_in_group, ep.world_size
        self.device = ms.physical_to_logical_map.device
        self.hidden, self.intermediate, self.local_experts = expert_shape(self.model)
        self.precision = served_precision(self.model)  # what calibration times (bf16, fp8-block...)
        self.dp_size = dp_size
        self.recorder = RoutingRecorder(self.model.num_moe_layers, self.model.num_logical_experts,
                                        cfg.record_capacity, self.device, model=model_name)
        self.profiles: list[GpuProfile] | None = None
        # vLLM's start map and the start-up's routing history (rank 0): what an A/B switch
        # re-plans from, so every placement compared is planned from the same inputs
        self.initial_map = ms.physical_to_logical_map.cpu().numpy().copy()  # [layers, physical]
        self.start_history: np.ndarray | None = None  # [steps, layers, experts]
        self.generation = 0
        self.steps = 0
        self.last_move_seconds = 0.0
        self.move_bandwidth = DEFAULT_MOVE_BANDWIDTH  # bytes/s, updated by every move
        self.exported: tuple[list[float], list[float], float] | None = None
        self.started = False  # the start-up placement has run (recalibration waits for it)
        self.placed_at_step = 0  # engine step of the last applied move (hysteresis horizon)
        self.recalibrations = 0
        self.pending: PendingPlan | None = None  # a recalibration planning in the background
        self.plan_delay = cfg.plan_delay_steps  # grows while plans are not ready in time
        self.has_start_history = False  # rank 0 keeps the start-up's routing history
        self.dump_requested = False
        self.drift_every = drift_steps()  # benchmarks only: replayed routing drifts

    # ------------------------------------------------------------------ hooks
    def _hook_eplb(self) -> None:
        """Record every real step, before vLLM zeroes the pass (instance-level, this state only)."""
        eplb, original_step = self.eplb, self.eplb.step
        eplb._should_record_current_step = lambda log_stats=False: True

        def step(is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
            if self.cfg.record and not is_profile:
                if is_dummy:  # vLLM zeroes the pass: an empty row keeps DP ranks step-aligned
                    self.recorder.record_idle()
                else:
                    self.recorder.record(self.ms.expert_load_pass, self.ms.physical_to_logical_map)
            original_step(is_dummy=is_dummy, is_profile=is_profile, log_stats=log_stats)
            if not is_profile:
                self.after_step()

        eplb.step = step

    def after_step(self) -> None:
        self.steps += 1  # dummy steps count too: every EP rank steps in lockstep
        if self.dump_requested:
            self.dump_requested = False
            self.dump_trace("request")
        if self.exported and self.steps % EXPORT_EVERY == 0:
            self.export(*self.exported)
        if self.drift_every:
            maybe_drift(self.steps, self.drift_every)
        if self.pending is not None and self.steps >= self.pending.due_step:
            self.serving_safely(self.finish_pending)
        interval = self.cfg.recalibrate_interval
        if self.started and interval and self.steps % interval == 0 and self.pending is None:
            self.recalibrate(interval)

    # ------------------------------------------------------------------ profiles
    def calibration_spec(self, quick: bool = False) -> CalibrationSpec:
        extra = self.cfg.emulate_slowdown.get(self.rank, 0.0)
        return CalibrationSpec(hidden=self.hidden, intermediate=self.intermediate,
                               num_experts=self.local_experts, extra_work=extra, precision=self.precision,
                               reps=10 if quick else CalibrationSpec.reps,
                               time_limit_s=self.cfg.calibration_time_limit_s)

    def own_weights(self) -> tuple[Any, Any] | None:
        """The first MoE layer's experts to time in place, or None (experts.served_weights)."""
        return served_weights(self.model, self.precision, self.device)

    def local_profile(self, quick: bool = False) -> GpuProfile:
        prof = calibrate_device(self.device.index, self.calibration_spec(quick), self.own_weights())
        torch.cuda.empty_cache()
        return prof

    def local_speed_check(self, reference: GpuProfile, lift_s: float) -> SpeedCheck:
        """This GPU's time now against `reference`'s, over a few of the reference's load patterns."""
        check = check_speed(self.device.index, self.calibration_spec(quick=True), reference,
                            self.own_weights(), lift_s=lift_s)
        torch.cuda.empty_cache()
        return check

    # ------------------------------------------------------------------ traces
    def dump_trace(self, why: str) -> Path | None:
        if not self.cfg.trace_dir or self.recorder.steps == 0:
            return None
        if self.dp_size == 1 and self.rank != 0:
            return None  # without DP every rank routed the same tokens: one file is enough
        path = Path(self.cfg.trace_dir) / f"trace-rank{self.rank}-{self.recorder.steps}steps.msgpack"
        tr = self.recorder.trace(f"vllm-gem recorder, EP rank {self.rank} ({why})")
        if tr.counts.shape[0] == 0:
            return None
        save(tr, path)
        logger.info("vllm-gem: wrote %d recorded steps to %s", tr.counts.shape[0], path)
        return path


def _node_count() -> int:
    try:
        from vllm.distributed.parallel_state import get_node_count
        return int(get_node_count())
    except Exception:  # an older or stripped vLLM: plan as one node
        return 1



# ---------------------------------------------------------------------- entry points
def attach(worker: Any) -> None:
    """After Worker.load_model: build this rank's GemWorker if GEM is asked for."""
    global _WORKER
    cfg = from_additional(worker.vllm_config.additional_config)
    if cfg is None:
        return
    try:
        _WORKER = GemWorker(worker, cfg)
        if cfg.emulate_slowdown.get(_WORKER.rank):
            from .emulate import slow_down_experts
            slow_down_experts(cfg.emulate_slowdown[_WORKER.rank])
        try:
            signal.signal(signal.SIGUSR1, _request_dump)
        except ValueError:  # not the main thread: dumps then happen at shutdown only
            pass
    except Exception as e:
        if cfg.strict:
            raise
        logger.warning("vllm-gem: not active on this worker (%s); serving on vLLM's placement", e)
        _WORKER = None


def _request_dump(signum, frame) -> None:
    if _WORKER is not None:
        _WORKER.dump_requested = True  # written after the current step, not inside a handler










def detach(worker: Any) -> None:
    """Worker shutdown: write the recorder's trace if a trace_dir is set."""
    if _WORKER is not None:
        try:
            _WORKER.dump_trace("shutdown")
        except Exception as e:
            logger.warning("vllm-gem: could not write the routing trace at shutdown: %s", e)


# what runs at start and on request (collective_rpc targets), kept importable from here
from .startup import place_at_start, set_recording, switch_placement  # noqa: E402, F401
