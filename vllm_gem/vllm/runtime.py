"""GEM inside one vLLM worker: a GemWorker composed of its parts, and its engine-step hook.

One `GemWorker` per worker process (one EP rank), built from what that rank is (context.py)
and its parts, each given its inputs: the routing recorder, the GPU profiles
(gpu_profiles.py), the placer (placing.py) and the recalibration (recalibration.py). Every
step that needs the other ranks is a collective all ranks reach together, and every decision
is taken on rank 0 and broadcast, so the ranks cannot disagree: either all apply the same map
or none does. The process's handle and vLLM's entry points are in entry.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import GemInputError
from ..formats import save
from .config import GemConfig
from .context import RankContext, ServingProgress
from .gpu_profiles import GpuProfiles
from .placing import Placer
from .recalibration import Recalibration
from .recorder import RoutingRecorder
from .routing import drift_steps, maybe_drift

logger = logging.getLogger("vllm.gem")
EXPORT_EVERY = 1000  # engine steps between metric file refreshes


class GemWorker:
    """One EP rank's GEM: its context and progress, and the parts that record, profile,
    place and recalibrate; `after_step` is what every engine step runs."""

    def __init__(self, ctx: RankContext, progress: ServingProgress, recorder: RoutingRecorder,
                 gpus: GpuProfiles, placer: Placer, recalibration: Recalibration) -> None:
        self.ctx, self.progress, self.recorder = ctx, progress, recorder
        self.gpus, self.placer, self.recalibration = gpus, placer, recalibration
        self.dump_requested = False  # SIGUSR1: write the trace after the current step
        self.drift_every = drift_steps()  # benchmarks only: replayed routing drifts

    @classmethod
    def build(cls, cfg: GemConfig, model_state: Any, ep_group: Any, dp_size: int = 1,
              model_name: str = "", num_nodes: int = 1) -> GemWorker:
        """A GemWorker over an EPLB model state and EP group, its parts wired together."""
        ctx = RankContext(cfg, model_state, ep_group, dp_size, model_name, num_nodes)
        progress = ServingProgress()
        recorder = RoutingRecorder(ctx.model.num_moe_layers, ctx.model.num_logical_experts,
                                   cfg.record_capacity, ctx.device, model=model_name)
        gpus = GpuProfiles(ctx)
        placer = Placer(ctx, progress, recorder, gpus)
        return cls(ctx, progress, recorder, gpus, placer, Recalibration(ctx, progress, placer))

    @classmethod
    def of_vllm_worker(cls, worker: Any, cfg: GemConfig) -> GemWorker:
        """The GemWorker of a loaded vLLM worker, hooked into its EPLB step."""
        from vllm.distributed.parallel_state import get_ep_group  # vLLM only where GEM runs in it
        eplb = getattr(worker.model_runner, "eplb_state", None)
        if eplb is None or not eplb.model_states:
            raise GemInputError("--plugin gem", "enable_eplb", "left no EPLB state in the model runner",
                                "a MixtureOfExperts model served with --enable-expert-parallel "
                                "(Qwen3-MoE, Mixtral, DeepSeek-V2/V3; not Qwen2-MoE or OLMoE)")
        ms = next(iter(eplb.model_states.values()))
        self = cls.build(cfg, ms, get_ep_group(), worker.vllm_config.parallel_config.data_parallel_size,
                         worker.vllm_config.model_config.model, num_nodes=_node_count())
        self.hook_eplb(eplb)
        return self

    def hook_eplb(self, eplb: Any) -> None:
        """Record every real step, before vLLM zeroes the pass (instance-level, this state only)."""
        original_step, ms = eplb.step, self.ctx.model_state
        eplb._should_record_current_step = lambda log_stats=False: True

        def step(is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
            if self.ctx.cfg.record and not is_profile:
                if is_dummy:  # vLLM zeroes the pass: an empty row keeps DP ranks step-aligned
                    self.recorder.record_idle()
                else:
                    self.recorder.record(ms.expert_load_pass, ms.physical_to_logical_map)
            original_step(is_dummy=is_dummy, is_profile=is_profile, log_stats=log_stats)
            if not is_profile:
                self.after_step()

        eplb.step = step

    def after_step(self) -> None:
        progress, placer, recal = self.progress, self.placer, self.recalibration
        progress.steps += 1
        if self.dump_requested:
            self.dump_requested = False
            self.dump_trace("request")
        if placer.exported and progress.steps % EXPORT_EVERY == 0:
            placer.export(*placer.exported)
        if self.drift_every:
            maybe_drift(progress.steps, self.drift_every)
        if placer.pending is not None and progress.steps >= placer.pending.due_step:
            recal.serving_safely(recal.finish_pending)
        interval = self.ctx.cfg.recalibrate_interval
        if progress.started and interval and progress.steps % interval == 0 and placer.pending is None:
            recal.recalibrate(interval)

    def dump_trace(self, why: str) -> Path | None:
        ctx = self.ctx
        if not ctx.cfg.trace_dir or self.recorder.steps == 0:
            return None
        if ctx.dp_size == 1 and ctx.rank != 0:
            return None  # without DP every rank routed the same tokens: one file is enough
        path = Path(ctx.cfg.trace_dir) / f"trace-rank{ctx.rank}-{self.recorder.steps}steps.msgpack"
        tr = self.recorder.trace(f"vllm-gem recorder, EP rank {ctx.rank} ({why})")
        if tr.counts.shape[0] == 0:
            return None
        save(tr, path)
        logger.info("vllm-gem: wrote %d recorded steps to %s", tr.counts.shape[0], path)
        return path


def _node_count() -> int:
    try:
        from vllm.distributed.parallel_state import get_node_count  # vLLM only where GEM runs in it
        return int(get_node_count())
    except Exception:  # an older or stripped vLLM: plan as one node
        return 1
