"""GEM inside one vLLM worker: attach after model load, place before serving, recalibrate.

One `GemWorker` per worker process (one EP rank). Every step that needs the other ranks is
a collective all ranks reach together, and every decision is taken on rank 0 and broadcast,
so the ranks cannot disagree: either all apply the same map or none does.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibrate import (
    LIFT_SECONDS,
    SPEED_CHECK_LIFT_SECONDS,
    CalibrationSpec,
    SpeedCheck,
    calibrate_device,
    check_points,
    check_speed,
    exchange_profiles,
    gather_objects,
    gpu_identity,
    relative_speed_changes,
)
from ..errors import GemInputError
from ..formats import GpuProfile, NdArray, RoutingTrace, load, save
from .apply import WeightsLostError, apply_placement, slot_bytes
from .background import PendingPlan, PlanJob, next_delay
from .config import ON_WORDS, GemConfig, from_additional
from .experts import expert_shape, served_precision, served_weights
from .metrics import RankState, write_state
from .planning import (
    PlanDecision,
    check_profiles_match,
    check_trace_matches,
    decide,
    precision_mismatch,
    saving_horizon,
    worth_moving,
)
from .recorder import RoutingRecorder, drop_idle
from .routing import drift_steps, maybe_drift

logger = logging.getLogger("vllm.gem")
DEFAULT_MOVE_BANDWIDTH = 5e9  # bytes/s until a move has been timed (gloo-staged transfers)
EXPORT_EVERY = 1000  # engine steps between metric file refreshes

_WORKER: "GemWorker | None" = None


def current() -> "GemWorker | None":
    return _WORKER


class GemWorker:
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

    def gather_speed_checks(self, references: list[GpuProfile], lift_s: float = SPEED_CHECK_LIFT_SECONDS
                            ) -> tuple[np.ndarray, list[SpeedCheck | None], list[str]]:
        """Every rank's speed check against its reference, at once -> (each GPU's speed change
        against the others' [ranks], calibrate.relative_speed_changes, nan where a check
        failed; every rank's SpeedCheck [ranks], None where it failed; their errors).
        Collective."""
        check, err = None, ""
        try:
            check = self.local_speed_check(references[self.rank], lift_s)
        except Exception as e:  # the caller decides: re-profile (serving) or trust the files
            err = f"rank {self.rank}: {type(e).__name__}: {e}"
        out = gather_objects((check, err), self.ep.cpu_group)
        rows = [None if c is None else c.point_ratios for c, _ in out]
        patterns = {tuple(tuple(ref.points[i].tokens_per_expert) for i in check_points(len(ref.points)))
                    for ref in references}
        relative = relative_speed_changes(rows, paired=len(patterns) == 1)
        return relative, [c for c, _ in out], [e for _, e in out if e]

    def speed_moved(self, relative: float) -> bool:
        """A GPU's speed change against the others' farther from 1 than speed_tolerance (nan,
        a failed check: no)."""
        return bool(np.isfinite(relative)) and abs(relative - 1.0) > self.cfg.speed_tolerance

    @staticmethod
    def speed_report(relative: np.ndarray, checks: list[SpeedCheck | None], errors: list[str]
                     ) -> dict[str, Any]:
        """Per rank: the change against the other GPUs, the ratio to the own profile, and the SM
        clock before and after the check (whether the GPUs' clocks moved together)."""
        return {"speed_relative": [round(float(r), 4) for r in relative],
                "speed_ratios": [float("nan") if c is None else round(c.ratio, 4) for c in checks],
                "speed_sm_mhz": [None if c is None else [getattr(s, "sm_clock_mhz", None)
                                                         for s in (c.before, c.after)] for c in checks],
                **({"speed_errors": errors} if errors else {})}

    def gather_profiles(self, quick: bool = False) -> tuple[list[GpuProfile], dict[str, Any]]:
        """Calibrate every GPU at once, or read the configured files -> (profiles in rank order,
        what the report says of them). Files are used while they still describe these GPUs
        (checked_profile_files); otherwise every GPU is calibrated."""
        info: dict[str, Any] = {"profiles_from": "calibration"}
        if self.cfg.profiles and not quick:
            profiles, info = self.checked_profile_files()
            if profiles is not None:
                return profiles, info
        prof, err = None, ""
        try:
            prof = self.local_profile(quick)
        except Exception as e:  # reported to every rank by the exchange
            err = f"GPU {self.device.index}: {type(e).__name__}: {e}"
        return exchange_profiles(prof, err, group=self.ep.cpu_group), info

    def checked_profile_files(self) -> tuple[list[GpuProfile] | None, dict[str, Any]]:
        """The configured profile files, or None to calibrate instead -> (profiles, report).
        Files must be of these GPUs (UUIDs) and of the served precision (else one error in
        strict mode, a warning and a calibration by default); each GPU then re-times a few
        of its file's patterns, and if one's speed moved against the others' by more than
        speed_tolerance (a stale file: clocks, a power cap) every GPU is calibrated. A check
        that cannot run leaves the files as they are."""
        profiles = self.load_profile_files(self.cfg.profiles)
        wrong = precision_mismatch(profiles, self.cfg.profiles, self.precision)
        if wrong is not None:  # the same on every rank: every rank read the same files
            if self.cfg.strict:
                raise wrong
            if self.rank == 0:
                logger.warning("vllm-gem: %s; calibrating every GPU in %s instead", wrong, self.precision)
            return None, {"profiles_from": f"calibration (profile files not {self.precision})"}
        if self.cfg.speed_tolerance <= 0:
            return profiles, {"profiles_from": "files"}
        relative, checks, errors = self.gather_speed_checks(profiles, LIFT_SECONDS)  # idle: full lift
        info = self.speed_report(relative, checks, errors)
        off = [f"{self.cfg.profiles[r]} {x - 1:+.1%}" for r, x in enumerate(relative) if self.speed_moved(x)]
        if not off:
            if errors and self.rank == 0:
                logger.warning("vllm-gem: could not check the profile files against the GPUs "
                               "(%s); planning with them as they are", "; ".join(errors))
            return profiles, {"profiles_from": "files", **info}
        if self.rank == 0:
            logger.warning("vllm-gem: these GPUs' speeds moved against the others' since their "
                           "profile files (%s; speed_tolerance %.0f%%): calibrating every GPU instead",
                           ", ".join(off), 100 * self.cfg.speed_tolerance)
        return None, {**info, "profiles_from": "calibration (files off by more than speed_tolerance)"}

    def local_gpu_uuid(self) -> str:
        """This rank's GPU as NVML names it ('' when that cannot be read, or not on a GPU)."""
        if self.device.type != "cuda":
            return ""
        uuid = gpu_identity(self.device.index).uuid
        return "" if uuid.startswith("unknown") else uuid

    def load_profile_files(self, sources: list[str]) -> list[GpuProfile]:
        """Every rank reads the profile files (one per EP rank) and checks them: the model's
        expert shape, and each rank's file of that rank's GPU (by NVML UUID; a profile of
        another GPU would plan for its speed). Collective: every rank raises the same
        GemInputError, so that a file missing on one node leaves no rank waiting.
        A profile or GPU without a readable UUID (the bundled examples) is not UUID-checked."""
        wrong, profiles = None, []  # wrong: (file, field, problem, expected) seen on this rank
        try:
            profiles = [load(p, GpuProfile) for p in sources]
            check_profiles_match(profiles, sources, self.size, self.hidden, self.intermediate)
            mine, here = profiles[self.rank].gpu, self.local_gpu_uuid()
            if here and mine.uuid and not mine.uuid.startswith("unknown") and mine.uuid != here:
                wrong = (sources[self.rank], "gpu.uuid", f"is {mine.uuid} ({mine.name} #{mine.index})",
                         f"the GPU of EP rank {self.rank}, {here}: its own profile (`vllm-gem "
                         "calibrate` on this host), or no gem.profiles, to calibrate at start")
        except GemInputError as e:
            wrong = (e.source, e.field, e.problem, e.expected)
        out = gather_objects(wrong, self.ep.cpu_group)
        ranks = [r for r, w in enumerate(out) if w]
        if ranks:
            source, field, problem, expected = out[ranks[0]]
            if len(ranks) < self.size or len({w for w in out}) > 1:  # say where, unless all alike
                problem += f" (EP rank {ranks[0]}; problems found on rank(s) {', '.join(map(str, ranks))})"
            raise GemInputError(source, field, problem, expected)
        return profiles

    # ------------------------------------------------------------------ routing history
    def history_source(self, horizon_steps: int | None, switch_to: str | None) -> str:
        """Where a placement's routing comes from, the same on every rank: 'start' (the
        start-up's history, kept on rank 0, for A/B switches), 'trace' (the configured file,
        at start) or 'recorder' (live traffic)."""
        if switch_to is not None and self.has_start_history:
            return "start"
        return "trace" if self.cfg.trace and not horizon_steps else "recorder"

    def routing_history(self, source: str, last: int | None = None) -> np.ndarray:
        """loads: [steps, layers, experts] from `source` (history_source); from the recorder,
        its newest `last` steps. Collective for the recorder with DP > 1 (every rank sums the
        group's counts), so every rank calls it then; otherwise rank 0 only."""
        if source == "start":
            return self.start_history
        if source == "trace":
            trace = load(self.cfg.trace, RoutingTrace)
            check_trace_matches(trace, self.cfg.trace, self.model.num_moe_layers,
                                self.model.num_logical_experts)
            return trace.loads
        if self.dp_size == 1:
            return self.recorder.history(last).astype(np.float64)
        # each DP rank routed its own tokens, one row per engine step (dummy steps included):
        # sum the newest steps every rank holds, row by row, then drop the idle ones
        dist, group = torch.distributed, self.ep.device_group
        counts = torch.from_numpy(self.recorder.history(last, keep_idle=True)).to(self.device)
        n = torch.tensor([counts.shape[0]], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=group)
        counts = counts[counts.shape[0] - int(n):].contiguous()
        dist.all_reduce(counts, group=group)
        return drop_idle(counts.cpu().numpy()).astype(np.float64)

    # ------------------------------------------------------------------ placement
    def place(self, reason: str, quick_profile: bool = False, horizon_steps: int | None = None,
              switch_to: str | None = None, reprofile: bool = True,
              delay_steps: int = 0) -> dict[str, Any] | None:
        """Profile, plan on rank 0, broadcast, move. Collective: every EP rank calls it.

        horizon_steps (recalibration): plan from that many recent steps, and require the
        predicted saving over planning.saving_horizon to beat the move's cost (worth_moving).
        switch_to (an A/B switch on request): plan with this planner ('initial': vLLM's start
        map) from the start-up's profiles and routing history, and apply it whatever its gain.
        reprofile=False: plan with the profiles already exchanged (recalibration between re-profiles).
        A recalibration's re-profile is skipped when no GPU's speed moved against the others'
        by more than cfg.speed_tolerance since the profiles (speed checks).
        delay_steps > 0: rank 0 plans in a background thread while serving goes on, and every
        rank agrees and moves `delay_steps` engine steps later (after_step); returns None then.
        Otherwise returns the report at once.
        """
        t0 = time.perf_counter()
        profiled = self.profiles is None or (switch_to is None and reprofile)
        speed: dict[str, Any] = {}
        if profiled and self.profiles is not None and horizon_steps and self.cfg.speed_tolerance > 0:
            # recalibration: re-profile only if some GPU's speed moved against the others' past
            # the tolerance; a failed check (nan) re-profiles too
            relative, checks, errors = self.gather_speed_checks(self.profiles)
            profiled = any(not np.isfinite(r) or self.speed_moved(r) for r in relative)
            speed = self.speed_report(relative, checks, errors)
        if profiled:
            self.profiles, gathered = self.gather_profiles(quick_profile)
            if not horizon_steps:  # start-up: where the profiles came from, and how they were checked
                speed = gathered
        t_prof = time.perf_counter() - t0
        planner = switch_to or (self.cfg.recalibrate_planner if horizon_steps else self.cfg.planner)
        job = self.plan_job(planner, horizon_steps, switch_to)
        head = {"reason": reason, "profiled": profiled, **speed, "profile_seconds": round(t_prof, 3)}
        if delay_steps:
            self.pending = PendingPlan(job, head, planner, self.steps, self.steps + delay_steps,
                                       time.perf_counter() - t0)
            return None
        return self.agree_and_apply(job.run() if job else (None, ""), head, planner, t0)

    def plan_job(self, planner: str, horizon_steps: int | None, switch_to: str | None
                 ) -> PlanJob | None:
        """Read the routing history now (collective with DP > 1) and, on rank 0, return the
        planning to run. None on the other ranks."""
        source = self.history_source(horizon_steps, switch_to)
        history, error = None, ""
        if source == "recorder" and self.dp_size > 1:
            history = self.routing_history(source, last=horizon_steps)  # every rank: a collective
        if self.rank != 0:
            return None
        try:
            if history is None:
                history = self.routing_history(source, last=horizon_steps)
            if not horizon_steps and self.start_history is None:
                self.start_history = history
                if self.cfg.trace_dir:  # what the start-up (and every switch) planned from
                    self.save_history(history, "planning-history-start.msgpack")
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        old = self.ms.physical_to_logical_map.cpu().numpy().copy()  # on CPU (tests) .numpy() is a view
        horizon = saving_horizon(horizon_steps, self.steps - self.placed_at_step) if horizon_steps else 0
        bytes_per_slot = slot_bytes(self.model.expert_weights)
        bandwidth, profiles = self.move_bandwidth, self.profiles

        def job() -> tuple[PlanDecision | None, str]:
            if error:
                return None, error
            try:  # pure numpy from here on: safe off the serving thread
                decision = decide(history, profiles, old, num_nodes=self.num_nodes,
                                  num_groups=self.model.num_expert_groups, planner=planner,
                                  planner_params=self.cfg.planner_params,
                                  min_gain=-1.0 if switch_to else self.cfg.min_gain,
                                  target=self.initial_map if switch_to == "initial" else None,
                                  lp_bound=not horizon_steps)
                if horizon_steps:
                    decision.apply, decision.info["move_check"] = worth_moving(
                        decision, old, bytes_per_slot, bandwidth, horizon)
                return decision, ""
            except Exception as e:
                return None, f"{type(e).__name__}: {e}"
        return PlanJob(job, old)

    def finish_pending(self) -> dict[str, Any] | None:
        """Agree on and apply the plan a background planning produced (every rank, same step)."""
        pending, self.pending = self.pending, None
        t0 = time.perf_counter()
        decision, error = result = pending.wait()
        if decision is not None and not np.array_equal(
                pending.job.planned_from, self.ms.physical_to_logical_map.cpu().numpy()):
            decision.apply = False  # a switch moved experts while this plan was made
            decision.info["move_check"] = "the map changed while planning; the plan is dropped"
        report = self.agree_and_apply(result, pending.head, pending.planner, t0,
                                      stall_before=pending.stall_seconds)
        report.update(planning_wall_seconds=round(pending.wall_seconds, 3),
                      waited_seconds=round(pending.waited_seconds, 3),
                      plan_delay_steps=pending.due_step - pending.started_step)
        self.plan_delay = next_delay(self.plan_delay, pending.waited_seconds)
        return report

    def agree_and_apply(self, result: tuple[PlanDecision | None, str], head: dict[str, Any],
                        planner: str, t0: float, stall_before: float = 0.0) -> dict[str, Any]:
        """Broadcast rank 0's (decision, error), move if it says so, and report. Collective.
        total_seconds: how long serving was held (stall_before: by the start of a background
        recalibration)."""
        box = [result]
        torch.distributed.broadcast_object_list(box, src=self.ep.ranks[0], group=self.ep.cpu_group)
        decision, error = box[0]
        if error:
            raise PlacementError(f"planning on EP rank 0 failed: {error}")
        if head["reason"] != "recalibration":
            self.has_start_history = True  # rank 0 keeps what it planned from: switches re-use it
        report: dict[str, Any] = {
            **head,
            "planning_seconds": round(decision.planning_seconds, 3),
            "predicted_layer_us_before": round(decision.predicted_before_us, 2),
            "predicted_layer_us_after": round(decision.predicted_after_us, 2),
            "predicted_gain": round(decision.gain, 4),
            "predicted_bound_us": round(decision.predicted_bound_us, 2),
            "rank_us_before": [round(x, 2) for x in decision.rank_us_before],
            "rank_us_after": [round(x, 2) for x in decision.rank_us_after],
            "gpus": [f"{p.gpu.name} #{p.gpu.index}" + (f" ({p.emulation})" if p.emulation else "")
                     for p in self.profiles],
            "planner": planner,
            **{f"plan_{k}": v for k, v in decision.info.items()},
        }
        if decision.apply:
            new = torch.from_numpy(decision.phys_to_log)
            move = apply_placement(self.ms, new, self.ep)
            self.generation += 1
            self.placed_at_step = self.steps
            self.last_move_seconds = move.seconds
            if move.slots_changed and move.seconds > 0:
                self.move_bandwidth = move.slots_changed * move.bytes_per_slot / move.seconds
            report.update(applied=True, move_seconds=round(move.seconds, 3),
                          slots_changed=move.slots_changed,
                          moved_mib=round(move.slots_changed * move.bytes_per_slot / 2**20, 1),
                          move_gib_per_s=round(self.move_bandwidth / 2**30, 2))
            if self.rank == 0 and self.cfg.trace_dir:
                self.save_placement(decision, planner)
        else:
            report.update(applied=False, why=decision.info["move_check"])  # decide/worth_moving say why
        after = decision.apply
        self.export(decision.rank_us_after if after else decision.rank_us_before,
                    decision.rank_us_before,
                    decision.straggler_after if after else decision.straggler_before)
        report["total_seconds"] = round(stall_before + time.perf_counter() - t0, 3)
        return report

    def save_placement(self, d: PlanDecision, planner: str) -> None:
        from ..formats import Placement, rank_of_slots
        p = Placement(model=self.recorder.model, num_logical_experts=self.model.num_logical_experts,
                      num_ranks=self.size, phys_to_log=d.phys_to_log.tolist(),
                      rank_of_slot=rank_of_slots(d.phys_to_log.shape[1], self.size),
                      planner=planner, predicted={"layer_us": d.predicted_after_us,
                                                          "layer_us_before": d.predicted_before_us})
        save(p, Path(self.cfg.trace_dir) / f"placement-gen{self.generation}.json")

    def save_history(self, history: np.ndarray, name: str) -> None:
        """history: [steps, layers, experts] routing counts -> a RoutingTrace in trace_dir, so
        that predictions and bounds can be recomputed offline (with the reports' coefficients)."""
        trace = RoutingTrace(model=self.recorder.model, source="vllm-gem planning history",
                             counts=NdArray.from_numpy(np.asarray(history, dtype=np.int32)),
                             layer_ids=self.recorder.layer_ids)
        save(trace, Path(self.cfg.trace_dir) / name)

    def export(self, rank_us: list[float], rank_us_before: list[float], straggler: float) -> None:
        self.exported = (rank_us, rank_us_before, straggler)
        if not self.cfg.state_dir:
            return
        write_state(self.cfg.state_dir, RankState(
            rank=self.rank, generation=self.generation, predicted_layer_us=rank_us[self.rank],
            predicted_layer_us_before=rank_us_before[self.rank], straggler_ratio=straggler,
            move_seconds=self.last_move_seconds, recorded_steps=self.recorder.steps))

    def recalibrate(self, horizon_steps: int) -> dict[str, Any] | None:
        """Quick re-profile and re-plan while serving (from the last `horizon_steps` steps of
        routing); moves only if the predicted gain beats min_gain and its saving over
        saving_horizon (until the next recalibration, or as long as the placement in use has
        served, whichever is longer) beats the move's cost. The GPUs are re-profiled on every
        cfg.reprofile_every-th recalibration if a speed check finds one GPU's speed moved
        against the other GPUs' by more than cfg.speed_tolerance; the others re-plan with the last
        profiles. With cfg.plan_delay_steps the planning runs in the background and the plan
        is applied that many steps later (at most horizon_steps // 2; after_step). Returns the
        report (None when planning in the background, or when it failed: logged, serving goes
        on)."""
        reprofile = self.recalibrations % self.cfg.reprofile_every == 0
        self.recalibrations += 1
        # applied within half an interval, so the next recalibration never finds one pending
        delay = min(self.plan_delay, horizon_steps // 2)
        return self.serving_safely(lambda: self.place(
            "recalibration", quick_profile=True, horizon_steps=horizon_steps, reprofile=reprofile,
            delay_steps=delay))

    def serving_safely(self, recalibration: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Run a recalibration's part and log its report; a failure keeps the placement in use
        (one warning) unless strict. Lost weights always stop the worker."""
        try:
            report = recalibration()
            if report is not None and self.rank == 0:
                logger.info("vllm-gem recalibration: %s", report)
            return report
        except WeightsLostError:  # serving on would give wrong outputs: stop the worker
            raise
        except Exception as e:  # keep serving on the last good placement
            if self.cfg.strict:
                raise
            logger.warning("vllm-gem: recalibration failed, keeping the current placement: %s", e)
            return None

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


class PlacementError(RuntimeError):
    """GEM could not produce a placement that every rank agrees on."""


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


def _inactive_ranks() -> str:
    """'' when GEM is active on every EP rank, else which ranks it is not active on.

    Collective: a rank whose GemWorker could not be built must not leave the others waiting
    in a collective it never joins, so all ranks first agree.
    """
    w = _WORKER
    if w is not None:
        group = w.ep.cpu_group
    else:
        from vllm.distributed.parallel_state import get_ep_group
        group = get_ep_group().cpu_group
    why = "" if w is not None else "GEM is not active on this worker"
    states = gather_objects(why, group)
    return "; ".join(f"rank {r}: {s}" for r, s in enumerate(states) if s)


def place_at_start(worker: Any) -> dict[str, Any]:
    """collective_rpc target: the one placement before the first request."""
    missing = _inactive_ranks()
    if missing:
        return {"applied": False, "why": missing}
    w = _WORKER
    if not w.cfg.place:
        w.started = True
        return {"applied": False, "why": "place=false: recording only"}
    try:
        report = w.place("start")
    except WeightsLostError as e:  # the engine core refuses to serve on it (engine.py)
        report = {"applied": False, "weights_lost": str(e)}
    except Exception as e:
        if w.cfg.strict:
            raise
        report = {"applied": False, "why": f"{type(e).__name__}: {e}"}
    w.started = True
    return report


def switch_placement(worker: Any, planner: str) -> dict[str, Any]:
    """collective_rpc target `gem_place` (HTTP: POST /collective_rpc with VLLM_SERVER_DEV_MODE=1):
    re-place now with `planner`, from the start-up's GPU profiles and routing history;
    'initial' restores vLLM's start map. For A/B benchmarks inside one server: every placement
    runs on the same compiled model, CUDA graphs and GPUs. Not a serving feature."""
    missing = _inactive_ranks()
    if missing:
        return {"applied": False, "why": missing}
    w = _WORKER
    try:
        report = w.place("switch", switch_to=planner)
    except WeightsLostError:  # serving on would give wrong outputs: stop the worker
        raise
    except Exception as e:  # the placement in use stays (apply_placement undoes a failed move)
        return {"applied": False, "planner": planner, "why": f"{type(e).__name__}: {e}"}
    if w.rank == 0:
        logger.info("vllm-gem switch to %s: %s", planner, report)
    return report


def set_recording(worker: Any, on: str | bool) -> dict[str, Any]:
    """collective_rpc target `gem_record`: turn the routing recorder on or off (its overhead,
    measured inside one server). `on` is a string when it comes over HTTP."""
    if _WORKER is None:
        return {"recording": False, "why": "GEM is not active on this worker"}
    _WORKER.cfg.record = on if isinstance(on, bool) else on.strip().lower() in ON_WORDS
    return {"recording": _WORKER.cfg.record}


def detach(worker: Any) -> None:
    """Worker shutdown: write the recorder's trace if a trace_dir is set."""
    if _WORKER is not None:
        try:
            _WORKER.dump_trace("shutdown")
        except Exception as e:
            logger.warning("vllm-gem: could not write the routing trace at shutdown: %s", e)
