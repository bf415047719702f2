"""Where a worker's GPU profiles come from: a calibration of every GPU at once, or the
configured profile files, checked against these GPUs (UUID), the served precision and their
speed now (speed checks, compared GPU with GPU). One part of a GemWorker (runtime.py)."""

from __future__ import annotations

import logging
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
from ..formats import GpuProfile, load
from .context import RankContext
from .experts import served_weights
from .planning import (
    check_profiles_match,
    precision_mismatch,
)

logger = logging.getLogger("vllm.gem")


class GpuProfiles:
    """Every EP rank's GPU profile as this rank last gathered them (`profiles`, rank order;
    None until the first placement), and this rank's own GPU's calibration and speed check.
    Collective where it says so: every EP rank calls those together."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.profiles: list[GpuProfile] | None = None

    def calibration_spec(self, quick: bool = False) -> CalibrationSpec:
        ctx = self.ctx
        return CalibrationSpec(hidden=ctx.hidden, intermediate=ctx.intermediate, num_experts=ctx.local_experts,
                               extra_work=ctx.cfg.emulate_slowdown.get(ctx.rank, 0.0), precision=ctx.precision,
                               reps=10 if quick else CalibrationSpec.reps,
                               time_limit_s=ctx.cfg.calibration_time_limit_s)

    def own_weights(self) -> tuple[Any, Any] | None:
        """The first MoE layer's experts to time in place, or None (experts.served_weights)."""
        return served_weights(self.ctx.model, self.ctx.precision, self.ctx.device)

    def local_profile(self, quick: bool = False) -> GpuProfile:
        prof = calibrate_device(self.ctx.device.index, self.calibration_spec(quick), self.own_weights())
        torch.cuda.empty_cache()
        return prof

    def local_speed_check(self, reference: GpuProfile, lift_s: float) -> SpeedCheck:
        """This GPU's time now against `reference`'s, over a few of the reference's load patterns."""
        check = check_speed(self.ctx.device.index, self.calibration_spec(quick=True), reference,
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
            check = self.local_speed_check(references[self.ctx.rank], lift_s)
        except Exception as e:  # the caller decides: re-profile (serving) or trust the files
            err = f"rank {self.ctx.rank}: {type(e).__name__}: {e}"
        out = gather_objects((check, err), self.ctx.ep.cpu_group)
        rows = [None if c is None else c.point_ratios for c, _ in out]
        patterns = {tuple(tuple(ref.points[i].tokens_per_expert) for i in check_points(len(ref.points)))
                    for ref in references}
        relative = relative_speed_changes(rows, paired=len(patterns) == 1)
        return relative, [c for c, _ in out], [e for _, e in out if e]

    def speed_moved(self, relative: float) -> bool:
        """A GPU's speed change against the others' farther from 1 than speed_tolerance (nan,
        a failed check: no)."""
        return bool(np.isfinite(relative)) and abs(relative - 1.0) > self.ctx.cfg.speed_tolerance

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
        if self.ctx.cfg.profiles and not quick:
            profiles, info = self.checked_profile_files()
            if profiles is not None:
                return profiles, info
        prof, err = None, ""
        try:
            prof = self.local_profile(quick)
        except Exception as e:  # reported to every rank by the exchange
            err = f"GPU {self.ctx.device.index}: {type(e).__name__}: {e}"
        return exchange_profiles(prof, err, group=self.ctx.ep.cpu_group), info

    def checked_profile_files(self) -> tuple[list[GpuProfile] | None, dict[str, Any]]:
        """The configured profile files, or None to calibrate instead -> (profiles, report).
        Files must be of these GPUs (UUIDs) and of the served precision (else one error in
        strict mode, a warning and a calibration by default); each GPU then re-times a few
        of its file's patterns, and if one's speed moved against the others' by more than
        speed_tolerance (a stale file: clocks, a power cap) every GPU is calibrated. A check
        that cannot run leaves the files as they are."""
        profiles = self.load_profile_files(self.ctx.cfg.profiles)
        wrong = precision_mismatch(profiles, self.ctx.cfg.profiles, self.ctx.precision)
        if wrong is not None:  # the same on every rank: every rank read the same files
            if self.ctx.cfg.strict:
                raise wrong
            if self.ctx.rank == 0:
                logger.warning("vllm-gem: %s; calibrating every GPU in %s instead", wrong, self.ctx.precision)
            return None, {"profiles_from": f"calibration (profile files not {self.ctx.precision})"}
        if self.ctx.cfg.speed_tolerance <= 0:
            return profiles, {"profiles_from": "files"}
        relative, checks, errors = self.gather_speed_checks(profiles, LIFT_SECONDS)  # idle: full lift
        info = self.speed_report(relative, checks, errors)
        off = [f"{self.ctx.cfg.profiles[r]} {x - 1:+.1%}" for r, x in enumerate(relative) if self.speed_moved(x)]
        if not off:
            if errors and self.ctx.rank == 0:
                logger.warning("vllm-gem: could not check the profile files against the GPUs "
                               "(%s); planning with them as they are", "; ".join(errors))
            return profiles, {"profiles_from": "files", **info}
        if self.ctx.rank == 0:
            logger.warning("vllm-gem: these GPUs' speeds moved against the others' since their "
                           "profile files (%s; speed_tolerance %.0f%%): calibrating every GPU instead",
                           ", ".join(off), 100 * self.ctx.cfg.speed_tolerance)
        return None, {**info, "profiles_from": "calibration (files off by more than speed_tolerance)"}

    def local_gpu_uuid(self) -> str:
        """This rank's GPU as NVML names it ('' when that cannot be read, or not on a GPU)."""
        if self.ctx.device.type != "cuda":
            return ""
        uuid = gpu_identity(self.ctx.device.index).uuid
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
            check_profiles_match(profiles, sources, self.ctx.size, self.ctx.hidden, self.ctx.intermediate)
            mine, here = profiles[self.ctx.rank].gpu, self.local_gpu_uuid()
            if here and mine.uuid and not mine.uuid.startswith("unknown") and mine.uuid != here:
                wrong = (sources[self.ctx.rank], "gpu.uuid", f"is {mine.uuid} ({mine.name} #{mine.index})",
                         f"the GPU of EP rank {self.ctx.rank}, {here}: its own profile (`vllm-gem "
                         "calibrate` on this host), or no gem.profiles, to calibrate at start")
        except GemInputError as e:
            wrong = (e.source, e.field, e.problem, e.expected)
        out = gather_objects(wrong, self.ctx.ep.cpu_group)
        ranks = [r for r, w in enumerate(out) if w]
        if ranks:
            source, field, problem, expected = out[ranks[0]]
            if len(ranks) < self.ctx.size or len({w for w in out}) > 1:  # say where, unless all alike
                problem += f" (EP rank {ranks[0]}; problems found on rank(s) {', '.join(map(str, ranks))})"
            raise GemInputError(source, field, problem, expected)
        return profiles
