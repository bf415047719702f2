"""How a worker makes and applies a placement, at start, on an A/B switch or on a
recalibration: read the routing history, plan on EP rank 0, broadcast, move with vLLM's
EPLB transfer, report and export. A mixin of runtime.GemWorker."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..formats import NdArray, PlacementEvent, RoutingTrace, append_event, load, save
from ..planners import GEM_NAMES
from .apply import apply_placement, slot_bytes
from .background import PendingPlan, PlanJob
from .metrics import RankState, write_state
from .planning import (
    PlanDecision,
    check_trace_matches,
    decide,
    saving_horizon,
    worth_moving,
)
from .recorder import drop_idle

logger = logging.getLogger("vllm.gem")


class PlacementError(RuntimeError):
    """GEM could not produce a placement that every rank agrees on."""


class Placing:
    """The placement part of a GemWorker (collective: every EP rank calls it together)."""

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
            if self.rank == 0 and self.cfg.trace_dir:  # the curves GEM plans with, for reports
                for r, prof in enumerate(self.profiles):
                    save(prof, Path(self.cfg.trace_dir) / f"profile-rank{r}.json")
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
        params = dict(self.cfg.planner_params)
        if horizon_steps and planner in GEM_NAMES:  # a GemPolicy: it takes `threads`
            # a recalibration plans beside serving: one thread, unless planner_params say more
            params.setdefault("threads", 1)

        def job() -> tuple[PlanDecision | None, str]:
            if error:
                return None, error
            try:  # pure numpy from here on: safe off the serving thread
                decision = decide(history, profiles, old, num_nodes=self.num_nodes,
                                  num_groups=self.model.num_expert_groups, planner=planner,
                                  planner_params=params,
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
        if self.rank == 0 and self.cfg.trace_dir:
            self.log_event(report, decision)
        return report

    def log_event(self, report: dict[str, Any], d: PlanDecision) -> None:
        """Append this decision to trace_dir/gem-events.jsonl (what `vllm-gem report` reads)."""
        ev = PlacementEvent(
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"), step=self.steps,
            reason=report["reason"], planner=report["planner"], applied=report["applied"],
            why=str(report.get("why", "")), predicted_layer_us_before=d.predicted_before_us,
            predicted_layer_us_after=d.predicted_after_us,
            predicted_bound_us=d.predicted_bound_us if np.isfinite(d.predicted_bound_us) else None,
            predicted_gain=d.gain, rank_us_before=list(map(float, d.rank_us_before)),
            rank_us_after=list(map(float, d.rank_us_after)), gpus=report["gpus"],
            planning_seconds=d.planning_seconds, move_seconds=report.get("move_seconds", 0.0),
            slots_changed=report.get("slots_changed", 0), generation=self.generation)
        append_event(ev, self.cfg.trace_dir)

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
            move_seconds=self.last_move_seconds, recorded_steps=self.recorder.steps,
            recalibrations=self.recalibrations))
