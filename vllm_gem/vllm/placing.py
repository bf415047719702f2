"""How a worker makes and applies a placement, at start, on an A/B switch or on a
recalibration: read the routing history, plan on EP rank 0, broadcast, move with vLLM's
EPLB transfer, report and export. One part of a GemWorker (runtime.py)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats import (
    NdArray,
    Placement,
    PlacementEvent,
    RoutingTrace,
    append_event,
    load,
    rank_of_slots,
    save,
)
from ..planners import GEM_NAMES
from .apply import apply_placement, slot_bytes
from .background import PendingPlan, PlanJob
from .context import RankContext, ServingProgress
from .gpu_profiles import GpuProfiles
from .metrics import RankState, write_state
from .planning import (
    PlanDecision,
    check_trace_matches,
    decide,
    saving_horizon,
    worth_moving,
)
from .recorder import RoutingRecorder, drop_idle

logger = logging.getLogger("vllm.gem")


class PlacementError(RuntimeError):
    """GEM could not produce a placement that every rank agrees on."""


class Placer:
    """Plans and applies placements for one EP rank (collective: every EP rank calls it
    together), from the recorder's routing and the profiles' GPU models, writing what it
    did into `progress`. It keeps vLLM's start map and the start-up's routing history
    (what an A/B switch re-plans from, so every placement compared is planned from the same
    inputs), the recalibration planning in the background, and the last exported metrics."""

    def __init__(self, ctx: RankContext, progress: ServingProgress, recorder: RoutingRecorder,
                 gpus: GpuProfiles) -> None:
        self.ctx, self.progress, self.recorder, self.gpus = ctx, progress, recorder, gpus
        self.initial_map = ctx.model_state.physical_to_logical_map.cpu().numpy().copy()  # [layers, physical]
        self.start_history: np.ndarray | None = None  # [steps, layers, experts], rank 0
        self.has_start_history = False  # every rank: rank 0 keeps the start-up's routing history
        self.pending: PendingPlan | None = None  # a recalibration planning in the background
        self.exported: tuple[list[float], list[float], float] | None = None  # export()'s last inputs

    def history_source(self, horizon_steps: int | None, switch_to: str | None) -> str:
        """Where a placement's routing comes from, the same on every rank: 'start' (the
        start-up's history, kept on rank 0, for A/B switches), 'trace' (the configured file,
        at start) or 'recorder' (live traffic)."""
        if switch_to is not None and self.has_start_history:
            return "start"
        return "trace" if self.ctx.cfg.trace and not horizon_steps else "recorder"

    def routing_history(self, source: str, last: int | None = None) -> np.ndarray:
        """loads: [steps, layers, experts] from `source` (history_source); from the recorder,
        its newest `last` steps. Collective for the recorder with DP > 1 (every rank sums the
        group's counts), so every rank calls it then; otherwise rank 0 only."""
        if source == "start":
            return self.start_history
        if source == "trace":
            trace = load(self.ctx.cfg.trace, RoutingTrace)
            check_trace_matches(trace, self.ctx.cfg.trace, self.ctx.model.num_moe_layers,
                                self.ctx.model.num_logical_experts)
            return trace.loads
        if self.ctx.dp_size == 1:
            return self.recorder.history(last).astype(np.float64)
        # each DP rank routed its own tokens, one row per engine step (dummy steps included):
        # sum the newest steps every rank holds, row by row, then drop the idle ones
        dist, group = torch.distributed, self.ctx.ep.device_group
        counts = torch.from_numpy(self.recorder.history(last, keep_idle=True)).to(self.ctx.device)
        n = torch.tensor([counts.shape[0]], device=self.ctx.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=group)
        counts = counts[counts.shape[0] - int(n):].contiguous()
        dist.all_reduce(counts, group=group)
        return drop_idle(counts.cpu().numpy()).astype(np.float64)

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
        profiled = self.gpus.profiles is None or (switch_to is None and reprofile)
        speed: dict[str, Any] = {}
        if profiled and self.gpus.profiles is not None and horizon_steps and self.ctx.cfg.speed_tolerance > 0:
            # recalibration: re-profile only if some GPU's speed moved against the others' past
            # the tolerance; a failed check (nan) re-profiles too
            relative, checks, errors = self.gpus.gather_speed_checks(self.gpus.profiles)
            profiled = any(not np.isfinite(r) or self.gpus.speed_moved(r) for r in relative)
            speed = self.gpus.speed_report(relative, checks, errors)
        if profiled:
            self.gpus.profiles, gathered = self.gpus.gather_profiles(quick_profile)
            if self.ctx.rank == 0 and self.ctx.cfg.trace_dir:  # the curves GEM plans with, for reports
                for r, prof in enumerate(self.gpus.profiles):
                    save(prof, Path(self.ctx.cfg.trace_dir) / f"profile-rank{r}.json")
            if not horizon_steps:  # start-up: where the profiles came from, and how they were checked
                speed = gathered
        t_prof = time.perf_counter() - t0
        planner = switch_to or (self.ctx.cfg.recalibrate_planner if horizon_steps else self.ctx.cfg.planner)
        job = self.plan_job(planner, horizon_steps, switch_to)
        head = {"reason": reason, "profiled": profiled, **speed, "profile_seconds": round(t_prof, 3)}
        if delay_steps:
            self.pending = PendingPlan(job, head, planner, self.progress.steps, self.progress.steps + delay_steps,
                                       time.perf_counter() - t0)
            return None
        return self.agree_and_apply(job.run() if job else (None, ""), head, planner, t0)

    def plan_job(self, planner: str, horizon_steps: int | None, switch_to: str | None
                 ) -> PlanJob | None:
        """Read the routing history now (collective with DP > 1) and, on rank 0, return the
        planning to run. None on the other ranks."""
        source = self.history_source(horizon_steps, switch_to)
        history, error = None, ""
        if source == "recorder" and self.ctx.dp_size > 1:
            history = self.routing_history(source, last=horizon_steps)  # every rank: a collective
        if self.ctx.rank != 0:
            return None
        try:
            if history is None:
                history = self.routing_history(source, last=horizon_steps)
            if not horizon_steps and self.start_history is None:
                self.start_history = history
                if self.ctx.cfg.trace_dir:  # what the start-up (and every switch) planned from
                    self.save_history(history, "planning-history-start.msgpack")
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        old = self.ctx.model_state.physical_to_logical_map.cpu().numpy().copy()  # on CPU (tests) .numpy() is a view
        horizon = saving_horizon(horizon_steps, self.progress.steps - self.progress.placed_at_step) if horizon_steps else 0
        bytes_per_slot = slot_bytes(self.ctx.model.expert_weights)
        bandwidth, profiles = self.progress.move_bandwidth, self.gpus.profiles
        params = dict(self.ctx.cfg.planner_params)
        if horizon_steps and planner in GEM_NAMES:  # a GemPolicy: it takes `threads`
            # a recalibration plans beside serving: one thread, unless planner_params say more
            params.setdefault("threads", 1)

        def job() -> tuple[PlanDecision | None, str]:
            if error:
                return None, error
            try:  # pure numpy from here on: safe off the serving thread
                decision = decide(history, profiles, old, num_nodes=self.ctx.num_nodes,
                                  num_groups=self.ctx.model.num_expert_groups, planner=planner,
                                  planner_params=params,
                                  min_gain=-1.0 if switch_to else self.ctx.cfg.min_gain,
                                  target=self.initial_map if switch_to == "initial" else None,
                                  lp_bound=not horizon_steps)
                if horizon_steps:
                    decision.apply, decision.info["move_check"] = worth_moving(
                        decision, old, bytes_per_slot, bandwidth, horizon)
                return decision, ""
            except Exception as e:
                return None, f"{type(e).__name__}: {e}"
        return PlanJob(job, old)

    def agree_and_apply(self, result: tuple[PlanDecision | None, str], head: dict[str, Any],
                        planner: str, t0: float, stall_before: float = 0.0) -> dict[str, Any]:
        """Broadcast rank 0's (decision, error), move if it says so, and report. Collective.
        total_seconds: how long serving was held (stall_before: by the start of a background
        recalibration)."""
        box = [result]
        torch.distributed.broadcast_object_list(box, src=self.ctx.ep.ranks[0], group=self.ctx.ep.cpu_group)
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
                     for p in self.gpus.profiles],
            "planner": planner,
            **{f"plan_{k}": v for k, v in decision.info.items()},
        }
        if decision.apply:
            new = torch.from_numpy(decision.phys_to_log)
            move = apply_placement(self.ctx.model_state, new, self.ctx.ep)
            self.progress.generation += 1
            self.progress.placed_at_step = self.progress.steps
            self.progress.last_move_seconds = move.seconds
            if move.slots_changed and move.seconds > 0:
                self.progress.move_bandwidth = move.slots_changed * move.bytes_per_slot / move.seconds
            report.update(applied=True, move_seconds=round(move.seconds, 3),
                          slots_changed=move.slots_changed,
                          moved_mib=round(move.slots_changed * move.bytes_per_slot / 2**20, 1),
                          move_gib_per_s=round(self.progress.move_bandwidth / 2**30, 2))
            if self.ctx.rank == 0 and self.ctx.cfg.trace_dir:
                self.save_placement(decision, planner)
        else:
            report.update(applied=False, why=decision.info["move_check"])  # decide/worth_moving say why
        after = decision.apply
        self.export(decision.rank_us_after if after else decision.rank_us_before,
                    decision.rank_us_before,
                    decision.straggler_after if after else decision.straggler_before)
        report["total_seconds"] = round(stall_before + time.perf_counter() - t0, 3)
        if self.ctx.rank == 0 and self.ctx.cfg.trace_dir:
            self.log_event(report, decision)
        return report

    def log_event(self, report: dict[str, Any], d: PlanDecision) -> None:
        """Append this decision to trace_dir/gem-events.jsonl (what `vllm-gem report` reads)."""
        ev = PlacementEvent(
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"), step=self.progress.steps,
            reason=report["reason"], planner=report["planner"], applied=report["applied"],
            why=str(report.get("why", "")), predicted_layer_us_before=d.predicted_before_us,
            predicted_layer_us_after=d.predicted_after_us,
            predicted_bound_us=d.predicted_bound_us if np.isfinite(d.predicted_bound_us) else None,
            predicted_gain=d.gain, rank_us_before=list(map(float, d.rank_us_before)),
            rank_us_after=list(map(float, d.rank_us_after)), gpus=report["gpus"],
            planning_seconds=d.planning_seconds, move_seconds=report.get("move_seconds", 0.0),
            slots_changed=report.get("slots_changed", 0), generation=self.progress.generation)
        append_event(ev, self.ctx.cfg.trace_dir)

    def save_placement(self, d: PlanDecision, planner: str) -> None:
        p = Placement(model=self.recorder.model, num_logical_experts=self.ctx.model.num_logical_experts,
                      num_ranks=self.ctx.size, phys_to_log=d.phys_to_log.tolist(),
                      rank_of_slot=rank_of_slots(d.phys_to_log.shape[1], self.ctx.size),
                      planner=planner, predicted={"layer_us": d.predicted_after_us,
                                                          "layer_us_before": d.predicted_before_us})
        save(p, Path(self.ctx.cfg.trace_dir) / f"placement-gen{self.progress.generation}.json")

    def save_history(self, history: np.ndarray, name: str) -> None:
        """history: [steps, layers, experts] routing counts -> a RoutingTrace in trace_dir, so
        that predictions and bounds can be recomputed offline (with the reports' coefficients)."""
        trace = RoutingTrace(model=self.recorder.model, source="vllm-gem planning history",
                             counts=NdArray.from_numpy(np.asarray(history, dtype=np.int32)),
                             layer_ids=self.recorder.layer_ids)
        save(trace, Path(self.ctx.cfg.trace_dir) / name)

    def export(self, rank_us: list[float], rank_us_before: list[float], straggler: float) -> None:
        self.exported = (rank_us, rank_us_before, straggler)
        if not self.ctx.cfg.state_dir:
            return
        write_state(self.ctx.cfg.state_dir, RankState(
            rank=self.ctx.rank, generation=self.progress.generation, predicted_layer_us=rank_us[self.ctx.rank],
            predicted_layer_us_before=rank_us_before[self.ctx.rank], straggler_ratio=straggler,
            move_seconds=self.progress.last_move_seconds, recorded_steps=self.recorder.steps,
            recalibrations=self.progress.recalibrations))
