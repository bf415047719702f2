"""Calibrate each GPU's MoE expert throughput against token load (GEM step 1).

On one GPU (`calibrate_device`): time our Triton grouped-GEMM expert FFN
(vllm_gem.kernels.moe_gemm, one fixed tile so the latency model has one BLOCK_M) on the
load patterns of `profiles.calibration_patterns`: decode-like (many experts, few tokens),
prefill-like (token counts on and just past BLOCK_M tile boundaries) and random mixed loads.
Each point is the median of CUDA-event timings of CUDA-graph replays (as vLLM serves decode),
after a warm-up that lifts the clocks; GPU identity, clocks, power and temperature come from
nvidia-ml-py before and after. The latency model is fitted on the structured points and
its error reported on the random mixed ones (held out).

A slower GPU can be emulated inside this process only: `sm_limit` runs the work in a CUDA
green context holding that many SMs. Device settings are never touched.

All GPUs calibrate at the same time, one process each (`calibrate_group`); profiles are
exchanged with torch.distributed so every rank holds the same set. A rank that fails says
which rank and why; no failure is silent.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .errors import GemInputError
from .formats import (
    ExpertShape,
    GpuIdentity,
    GpuProfile,
    GpuState,
    KernelSpec,
    LatencyPoint,
    decode,
    encode,
    save,
)
from .latency import fit
from .precision import PRECISIONS
from .profiles import calibration_patterns

N_HELD_OUT = 12  # calibration_patterns ends with this many random mixed loads
LIFT_SECONDS = 0.4  # a profile's warm-up: lifts an idle GPU's clocks to where serving runs them
SPEED_CHECK_POINTS = 8  # load patterns a speed check re-times (a profile has up to 69)
SPEED_CHECK_LIFT_SECONDS = 0.05  # a speed check runs between serving steps: the clocks are up


class CalibrationError(RuntimeError):
    """Calibration failed on a rank; the message names the rank, the GPU and the cause."""


@dataclass(frozen=True)
class CalibrationSpec:
    hidden: int = 2048
    intermediate: int = 768
    num_experts: int = 32  # local experts per GPU
    reps: int = 30  # timed graph replays per point
    inner: int = 5  # calls per graph replay
    sm_limit: int | None = None  # emulate a slower GPU: SMs of a green context
    extra_work: float = 0.0  # emulate a slower GPU: also run this fraction of the tokens again
    seed: int = 0
    time_limit_s: float | None = None  # give up (CalibrationTimeout) once measuring takes longer
    precision: str = "bf16"  # a vllm_gem.precision.PRECISIONS name: the served kernel and dtype
    compile_threads: int = 8  # compile every pattern's kernels at once before timing (0: at first launch)


# --------------------------------------------------------------------------- GPU facts
def gpu_identity(device: int) -> GpuIdentity:
    import torch
    props = torch.cuda.get_device_properties(device)
    ident = GpuIdentity(name=props.name, index=device, sm_count=props.multi_processor_count)
    try:
        import pynvml
        pynvml.nvmlInit()
        h = _nvml_handle(pynvml, device)
        ident.uuid = _s(pynvml.nvmlDeviceGetUUID(h))
        ident.driver = _s(pynvml.nvmlSystemGetDriverVersion())
        try:
            ident.serial = _s(pynvml.nvmlDeviceGetSerial(h))
        except pynvml.NVMLError:
            ident.serial = ""
    except Exception as e:  # nvidia-ml-py missing or NVML unavailable: say so in the name
        ident.uuid = f"unknown (nvml: {e})"
    return ident


def gpu_state(device: int) -> GpuState | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        h = _nvml_handle(pynvml, device)
        return GpuState(
            sm_clock_mhz=float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
            mem_clock_mhz=float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM)),
            power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            temperature_c=float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)))
    except Exception:
        return None


def _nvml_handle(pynvml, device: int):
    # CUDA and NVML may order devices differently: match by PCI bus id
    import torch
    bus = getattr(torch.cuda.get_device_properties(device), "pci_bus_id", None)
    if bus:
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode() if isinstance(bus, str) else bus)
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device)


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# --------------------------------------------------------------------------- one GPU
class CalibrationTimeout(RuntimeError):
    """Calibration ran past its time limit (a GPU far slower than expected, or contended)."""


def measure_within(patterns: list, measure, limit_s: float | None, t0: float,
                   clock=time.perf_counter) -> list:
    """[measure(p) for p in patterns], raising CalibrationTimeout once `limit_s` seconds have
    passed since t0: checked between patterns, so a slow GPU ends its calibration with a
    clear error instead of holding every other rank at the exchange."""
    points = []
    for n, p in enumerate(patterns):
        if limit_s is not None and clock() - t0 > limit_s:
            raise CalibrationTimeout(f"calibration passed its {limit_s:g} s limit after {n} of "
                                     f"{len(patterns)} load patterns")
        points.append(measure(p))
    return points


def calibrate_device(device: int, spec: CalibrationSpec = CalibrationSpec(),
                     weights: tuple[Any, Any] | None = None, kernel: ExpertKernel | None = None
                     ) -> GpuProfile:
    """Time the calibration patterns on CUDA device `device` and return its GpuProfile.

    weights: a served MoE layer's own experts on that device, only read, timed in place of
    random ones, so a re-profile while serving allocates no weight copies (0.6 GB for
    model-q3's 64 local experts, 2.8 GB for 32 of DeepSeek-V3's) in the memory vLLM left for
    the KV cache: (w13 [experts, 2*inter, hidden], w2 [experts, hidden, inter]) in bf16, or
    two kernels.moe_gemm_fp8.Fp8Weights for an fp8 spec.precision.
    kernel: what is timed; vllm-gem's kernel of spec.precision unless given (the measured
    replay calibrates with vLLM's fused_experts when that is what it measures)."""
    kernel = kernel or expert_kernel(spec.precision)
    patterns = calibration_patterns(spec.num_experts, kernel.tile.block_m, spec.seed)
    points, before, after = _measure(device, spec, weights, patterns, LIFT_SECONDS, kernel)
    ident = gpu_identity(device)
    dtype, layout = PRECISIONS[spec.precision]
    prof = GpuProfile(
        gpu=ident, expert=ExpertShape(spec.hidden, spec.intermediate, dtype, layout),
        kernel=KernelSpec(kernel.name, kernel.tile.block_m, kernel.tile.block_n, kernel.tile.block_k),
        points=points, state_before=before, state_after=after,
        emulation=_emulation_text(spec, ident.sm_count),
        source="measured", created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:  # the profile's own error: what robust planning plans against
        prof.error = min(1.0, float(np.sqrt(np.mean(held_out_errors(prof) ** 2))))
    except GemInputError:  # too few points to hold some out: the reader's default applies
        pass
    return prof


@dataclass(frozen=True)
class ExpertKernel:
    """The expert FFN calibration times for one precision, at its one fixed tile."""

    name: str  # the module, recorded in the profile's kernel.name
    tile: Any  # kernels.moe_gemm.TileConfig: calibration samples its block_m boundaries
    ffn: Callable[..., Any]  # (x, w13, w2, topk_weights, topk_ids, tile, alignment) -> [tokens, hidden]
    int32_ids: bool = False  # vLLM's fused_experts takes int32 expert ids


def expert_kernel(precision: str) -> ExpertKernel:
    """bf16: kernels.moe_gemm; fp8: kernels.moe_gemm_fp8 at its scale layout's calibration tile."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}, expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        from .kernels.moe_gemm import CALIBRATION_TILE, moe_ffn  # imports triton: GPU work only
        return ExpertKernel("vllm_gem.kernels.moe_gemm", CALIBRATION_TILE, moe_ffn)
    from .kernels.moe_gemm_fp8 import FP8_CALIBRATION_TILES, moe_ffn_fp8  # imports triton
    tile = FP8_CALIBRATION_TILES[PRECISIONS[precision].scale_layout]
    return ExpertKernel("vllm_gem.kernels.moe_gemm_fp8", tile, moe_ffn_fp8)


def calibration_weights(spec: CalibrationSpec, device: int, gen: Any) -> tuple[Any, Any]:
    """Random experts of spec's shape and precision on `device`: (w13, w2) as calibrate_device
    takes them (bf16 tensors, or Fp8Weights quantized from bf16 ones)."""
    import torch
    e, h, i = spec.num_experts, spec.hidden, spec.intermediate
    w13 = torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16, generator=gen) / h ** 0.5
    w2 = torch.randn(e, h, i, device=device, dtype=torch.bfloat16, generator=gen) / i ** 0.5
    layout = PRECISIONS[spec.precision].scale_layout
    if layout == "none":
        return w13, w2
    from .kernels.moe_gemm_fp8 import quantize_weights  # imports triton: GPU work only
    return quantize_weights(w13, layout), quantize_weights(w2, layout)


def check_weights(spec: CalibrationSpec, device: int, weights: tuple[Any, Any]) -> None:
    """Served weights must be of spec's shape, precision and device (ValueError naming which)."""
    import torch
    e, h, i = spec.num_experts, spec.hidden, spec.intermediate
    dtype, layout = PRECISIONS[spec.precision]
    for name, w, shape in zip(("w13", "w2"), weights, ((e, 2 * i, h), (e, h, i)), strict=True):
        q = w if layout == "none" else getattr(w, "q", None)
        w_layout = "none" if layout == "none" else getattr(w, "layout", None)
        if (not isinstance(q, torch.Tensor) or tuple(q.shape) != shape or str(q.dtype) != f"torch.{dtype}"
                or w_layout != layout or q.device != torch.device("cuda", device)):
            got = (f"{tuple(q.shape)} {q.dtype} ({w_layout} scales) on {q.device}"
                   if isinstance(q, torch.Tensor) else type(w).__name__)
            raise ValueError(f"calibration weights {name}: {got}, expected {shape} torch.{dtype} "
                             f"({layout} scales) on cuda:{device} (the spec's shape and precision)")


@dataclass(frozen=True)
class SpeedCheck:
    """A GPU's speed now against a profile of it (`check_speed`)."""

    ratio: float  # median over the checked points of (time now / the profile's time): > 1 slower
    points: int  # how many of the profile's load patterns were timed again
    seconds: float  # what the check took (serving stalls for it)
    point_ratios: tuple[float, ...] = ()  # [points] time now / profiled time, per checked pattern
    before: GpuState | None = None  # NVML clocks, power, temperature around the check
    after: GpuState | None = None


def check_points(num_points: int, k: int = SPEED_CHECK_POINTS) -> np.ndarray:
    """Indices [min(k, num_points)] of a profile's points to re-time, spread evenly over them
    (calibration_patterns runs decode-like, then prefill-like, then random mixed loads)."""
    return np.unique(np.linspace(0, num_points - 1, min(k, num_points)).round().astype(int))


def point_ratios(reference: list[LatencyPoint], measured: list[LatencyPoint]) -> np.ndarray:
    """[points] measured / reference median time of paired points (> 1: slower now)."""
    if len(reference) != len(measured) or not reference:
        raise ValueError(f"point_ratios: {len(measured)} measured points for {len(reference)} "
                         "reference points, expected the same number (> 0)")
    return np.array([p.median_us for p in measured]) / np.array([p.median_us for p in reference])


def relative_speed_changes(ratios: list[Any], paired: bool = True) -> np.ndarray:
    """[ranks] how much each GPU's speed moved against the other GPUs' since their profiles
    (> 1: this GPU slowed more than the others; nan where its check, or all others', failed).

    ratios: per rank, [points] time now / profiled time (SpeedCheck.point_ratios), or None
    where the check failed; the ranks timed at the same moment. paired: every rank timed
    the same load patterns (profiles made by calibration_patterns with one expert count and
    seed), so rank g's change is the median over points p of ratio[g, p] / the median over the
    other ranks of ratio[h, p]; otherwise over each rank's median ratio. One rank: its own.
    Why relative: a GPU's clocks follow its recent load, so the same unchanged GPU re-times
    2-25% slower at small loads after heavy work than in a profile taken from idle (nvidia-h200,
    docs/calibration.md), and every GPU of an EP group runs the same steps; a
    placement depends only on how the GPUs' speeds compare."""
    lengths = {len(r) for r in ratios if r is not None}
    if paired and len(lengths) <= 1:
        n = lengths.pop() if lengths else 1
        rows = np.array([[np.nan] * n if r is None else r for r in ratios], dtype=float)
    else:  # no pairing by pattern: each rank's median only
        rows = np.array([[np.nan if r is None else float(np.median(r))] for r in ratios])
    if len(rows) == 1:
        return np.array([np.median(rows[0])])
    out = np.full(len(rows), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan slices: failed checks
        for g in range(len(rows)):
            others = np.nanmedian(np.delete(rows, g, axis=0), axis=0)  # [points]
            out[g] = np.median(rows[g] / others)
    return out


def check_speed(device: int, spec: CalibrationSpec, reference: GpuProfile,
                weights: tuple[Any, Any] | None = None, k: int = SPEED_CHECK_POINTS,
                lift_s: float = SPEED_CHECK_LIFT_SECONDS) -> SpeedCheck:
    """Re-time k of `reference`'s load patterns on `device` and compare: a speed check that
    times 8 patterns after a 0.05 s clock lift, where a quick re-profile times up to 69 after
    0.4 s (its GPU time: benchmarks/studies/speed_check.py).

    The short lift is for a check between serving steps, on a GPU that is already busy; an
    idle GPU (before serving) needs LIFT_SECONDS, as a profile does.
    weights: as calibrate_device's. reference: a profile of this GPU with spec's expert count."""
    t0 = time.perf_counter()
    idx = check_points(len(reference.points), k)
    chosen = [reference.points[i] for i in idx]
    for p in chosen:
        if len(p.tokens_per_expert) != spec.num_experts:
            raise ValueError(f"reference profile of {reference.gpu.name} #{reference.gpu.index}: "
                             f"points.tokens_per_expert has {len(p.tokens_per_expert)} experts, "
                             f"expected {spec.num_experts} (this GPU's local experts)")
    # a check runs between serving steps on kernels its profile compiled: no compile pass
    points, before, after = _measure(device, replace(spec, compile_threads=0), weights,
                                     [p.tokens_per_expert for p in chosen], lift_s)
    ratios = point_ratios(chosen, points)
    return SpeedCheck(float(np.median(ratios)), len(points), time.perf_counter() - t0,
                      tuple(ratios.round(4).tolist()), before, after)


def _measure(device: int, spec: CalibrationSpec, weights: tuple[Any, Any] | None,
             patterns: list[list[int]], lift_s: float, kernel: ExpertKernel | None = None
             ) -> tuple[list[LatencyPoint], Any, Any]:
    """Time `patterns` [points][experts] on `device` -> (points, GPU state before, after)."""
    import torch

    from .kernels.moe_gemm import align, compile_ahead  # imports triton: GPU work only

    torch.cuda.set_device(device)
    kernel = kernel or expert_kernel(spec.precision)
    ours = kernel.name.startswith("vllm_gem.")
    gen = torch.Generator(device=f"cuda:{device}").manual_seed(spec.seed)
    if weights is None:
        weights = calibration_weights(spec, device, gen)
    else:
        check_weights(spec, device, weights)
    w13, w2 = weights
    h, bf = spec.hidden, torch.bfloat16
    max_tokens = max(sum(p) for p in patterns)
    x_all = torch.randn(max_tokens, h, device=device, dtype=bf, generator=gen)

    with compile_ahead(spec.compile_threads) as ahead:
        # compiles only: nothing runs, so these calls' alignments stay unfilled and the timed
        # calls below are built again
        for p in patterns if ahead and ours else []:  # another kernel would run, not compile
            _pattern_call(p, x_all, w13, w2, kernel, align, spec)()
    green, stream = calibration_stream(device, spec.sm_limit)
    if green is not None:
        green.set_context()
    try:
        before = gpu_state(device)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            big = torch.randn(4096, 4096, device=device, dtype=bf, generator=gen)
            while time.perf_counter() - t0 < lift_s:  # lift the clocks out of idle
                big @ big
                torch.cuda.synchronize(device)
            points = measure_within(
                patterns, lambda p: _time_pattern(p, x_all, w13, w2, kernel, align, spec, stream),
                spec.time_limit_s, t0)
        after = gpu_state(device)
    finally:
        if green is not None:
            green.pop_context()
    return points, before, after


@functools.cache
def calibration_stream(device: int, sm_limit: int | None = None):
    """(green context or None, torch.cuda.Stream) that calibration runs on, made once per
    device and SM limit. Why once: the clock lift's matmul makes cuBLAS cache a workspace
    (32 MiB on Hopper) for every stream it meets, for the life of the process; a new stream
    per re-profile left 32 MiB behind each time, up to the 32 streams of torch's pool (about
    1 GiB per GPU in the 12000-prompt soak, benchmarks/studies/calibration_memory.py), and every
    green context's new stream without bound."""
    import torch
    if not sm_limit:
        return None, torch.cuda.Stream(device)
    from torch.cuda.green_contexts import GreenContext
    green = GreenContext.create(sm_limit, device)
    green.set_context()
    try:
        gs = green.Stream()  # a generic torch.Stream: wrap it for torch.cuda APIs
    finally:
        green.pop_context()
    stream = gs if isinstance(gs, torch.cuda.Stream) else torch.cuda.Stream(
        stream_id=gs.stream_id, device_index=gs.device_index, device_type=gs.device_type)
    return green, stream


def _emulation_text(spec: CalibrationSpec, sm_count: int) -> str:
    parts = []
    if spec.sm_limit:
        parts.append(f"green context with {spec.sm_limit} of {sm_count} SMs")
    if spec.extra_work:
        parts.append(f"{spec.extra_work:.0%} extra expert work")
    return ", ".join(parts)


def _pattern_call(counts, x_all, w13, w2, kernel: ExpertKernel, align, spec) -> Callable[[], None]:
    """The expert layer for one load pattern (counts: [experts] tokens each), as a call."""
    import torch
    cfg, moe_ffn = kernel.tile, kernel.ffn
    dev = x_all.device
    ids = torch.repeat_interleave(torch.arange(len(counts), device=dev),
                                  torch.tensor(counts, device=dev)).reshape(-1, 1)
    if kernel.int32_ids:
        ids = ids.to(torch.int32)
    x = x_all[: ids.shape[0]]
    wts = torch.ones(ids.shape, device=dev, dtype=torch.float32)
    al = align(ids, len(counts), cfg.block_m, expert_parallel=True)  # what EP serving runs
    # extra_work: a random subset of the assignments again, as emulate.slow_down_experts
    # reruns a prefix of a batch whose tokens come in no particular expert order
    n_extra = int(np.ceil(spec.extra_work * ids.shape[0]))
    pick = torch.randperm(ids.shape[0], device=dev)[:n_extra]
    ids_x, x_x, wts_x = ids[pick], x[pick], wts[pick]
    al_x = align(ids_x, len(counts), cfg.block_m, expert_parallel=True) if n_extra else None

    def once() -> None:
        moe_ffn(x, w13, w2, wts, ids, cfg, al)
        if n_extra:
            moe_ffn(x_x, w13, w2, wts_x, ids_x, cfg, al_x)
    return once


def _time_pattern(counts, x_all, w13, w2, kernel: ExpertKernel, align, spec, stream) -> LatencyPoint:
    once = _pattern_call(counts, x_all, w13, w2, kernel, align, spec)
    median, p10, p90 = time_call(once, stream, spec.reps, spec.inner)
    return LatencyPoint(list(counts), median, p10, p90)


def time_call(once: Callable[[], None], stream, reps: int, inner: int) -> tuple[float, float, float]:
    """(median, p10, p90) us of one call of `once` on `stream`: CUDA-event timings of `reps`
    CUDA-graph replays of `inner` calls each (eager launches where capture is refused), after
    two warm calls (compiles, caches). Shared by calibration and the measured replay so both
    time expert work the same way."""
    import torch
    dev = stream.device
    for _ in range(2):  # compile (if not yet) and warm before capture
        once()
    torch.cuda.synchronize(dev)

    def calls() -> None:
        for _ in range(inner):
            once()

    run = calls
    try:  # graph replays, as vLLM serves decode; eager launches if capture is refused
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            calls()
        graph.replay()
        run = graph.replay
    except RuntimeError as e:
        print(f"calibration: CUDA graph capture failed on {dev} ({e}); timing eager "
              "launches", file=sys.stderr)
        torch.cuda.synchronize(dev)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for s, e in ev:
        s.record(stream)
        run()
        e.record(stream)
    torch.cuda.synchronize(dev)
    us = sorted(s.elapsed_time(e) * 1e3 / inner for s, e in ev)
    q = np.percentile(us, [10, 90])
    return statistics.median(us), float(q[0]), float(q[1])


def held_out_errors(prof: GpuProfile, test: list[LatencyPoint] | None = None) -> np.ndarray:
    """[points] relative errors (predicted - measured) / measured on `test` (default: the
    profile's own random mixed loads) of the model fitted on the profile's structured points."""
    train = msgspec.structs.replace(prof, points=prof.points[:-N_HELD_OUT])
    m = fit(train, prof.gpu.name)
    test = prof.points[-N_HELD_OUT:] if test is None else test
    return np.array([(m.predict(np.array(p.tokens_per_expert)) - p.median_us) / p.median_us
                     for p in test])


def held_out_report(prof: GpuProfile) -> dict[str, float]:
    """Fit on the structured points, report relative errors on the random mixed ones."""
    rel = held_out_errors(prof)
    full = fit(prof, prof.gpu.name)
    return {"fit_rel_rms": full.fit_rel_rms, "held_out_rel_rms": float(np.sqrt(np.mean(rel ** 2))),
            "held_out_rel_max": float(np.abs(rel).max())}


# --------------------------------------------------------------------------- a group of GPUs
def gather_objects(obj: Any, group=None) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank of `group`. Collective."""
    import torch.distributed as dist
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def exchange_profiles(profile: GpuProfile | None, error: str, group=None) -> list[GpuProfile]:
    """All-gather every rank's profile (msgpack bytes) over torch.distributed.

    A rank that failed passes profile=None and its error; then every rank raises one
    CalibrationError naming the failed ranks, so no rank goes on with a partial set.
    """
    blob = encode(profile, json=False) if profile is not None else b""
    out = gather_objects((blob, error), group)
    failed = [f"rank {r}: {err}" for r, (b, err) in enumerate(out) if not b]
    if failed:
        raise CalibrationError("calibration failed on " + "; ".join(failed))
    return [decode(b, GpuProfile, f"profile from rank {r}", json=False) for r, (b, _) in enumerate(out)]


def _worker(rank: int, devices: list[int], specs: list[CalibrationSpec], init: str, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(devices))
    prof, err = None, ""
    t0 = time.perf_counter()
    try:
        prof = calibrate_device(devices[rank], specs[rank])
    except Exception as e:  # reported to every rank through the exchange
        err = f"GPU {devices[rank]}: {type(e).__name__}: {e}"
        traceback.print_exc()
    seconds = time.perf_counter() - t0  # what a serving worker pays: no process start or imports
    try:
        profiles = exchange_profiles(prof, err)
        all_seconds = gather_objects(seconds)
        if rank == 0:
            Path(out).write_bytes(msgspec.msgpack.encode(
                {"profiles": [encode(p, json=False) for p in profiles], "seconds": all_seconds}))
    finally:
        dist.destroy_process_group()


def calibrate_group(devices: list[int], specs: list[CalibrationSpec]) -> tuple[list[GpuProfile], list[float]]:
    """Calibrate all `devices` at the same time, one process each -> (profiles, seconds each
    GPU's calibrate_device took), both in device order."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        out = f"{tmp}/profiles.msgpack"
        try:
            mp.spawn(_worker, args=(devices, specs, init, out), nprocs=len(devices), join=True)
        except Exception as e:
            raise CalibrationError(f"calibration group failed: {e}") from None
        got = msgspec.msgpack.decode(Path(out).read_bytes())
    return ([decode(b, GpuProfile, f"profile {i}", json=False) for i, b in enumerate(got["profiles"])],
            got["seconds"])


def main(args) -> int:
    """`vllm-gem calibrate`: calibrate the local GPUs, write one GpuProfile file each."""
    try:
        import torch
        gpus = torch.cuda.is_available()
    except ImportError:
        gpus = False
    if not gpus:
        raise GemInputError("command line", "calibrate", "sees no CUDA GPU",
                            "a machine with CUDA GPUs and torch (pip install vllm-gem[vllm])")
    visible = torch.cuda.device_count()
    devices = args.devices or list(range(visible))  # parsed and range-checked by the CLI
    slow = args.slow_sms or {}
    for option, named in (("--devices", devices), ("--slow-sms", list(slow))):
        if len(set(named)) != len(named) or max(named, default=0) >= visible:
            raise GemInputError("command line", option, f"names devices {named}",
                                f"distinct CUDA device indices below {visible} (the visible GPUs)")
    specs = [CalibrationSpec(args.hidden, args.intermediate, args.experts, sm_limit=slow.get(d),
                             time_limit_s=args.time_limit, precision=args.dtype)
             for d in devices]
    t0 = time.perf_counter()
    profiles, device_seconds = calibrate_group(devices, specs)
    seconds = time.perf_counter() - t0
    out_dir = Path(args.out_dir)
    rows = []
    base = np.array([p.median_us for p in profiles[0].points])
    for d, p, spec, dev_s in zip(devices, profiles, specs, device_seconds, strict=True):
        tag = f"-sm{spec.sm_limit}" if spec.sm_limit else ""
        path = save(p, out_dir / f"profile-gpu{d}{tag}.json")
        rep = held_out_report(p)
        ratio = float(np.median(np.array([q.median_us for q in p.points]) / base))
        rows.append({"device": d, "file": str(path), "gpu": p.gpu.name, "uuid": p.gpu.uuid,
                     "emulation": p.emulation, "median_time_vs_first": ratio,
                     "device_seconds": dev_s, **rep})
    if getattr(args, "json", False):
        import json
        print(json.dumps({"seconds": seconds, "profiles": rows}, indent=1))
    else:
        print(f"calibrated {len(devices)} GPU(s) in {seconds:.1f} s (all at once, with each "
              "worker's start)")
        for r in rows:
            print(f"  cuda:{r['device']} {r['gpu']} {r['emulation'] or '(whole GPU)'}: "
                  f"{r['device_seconds']:.1f} s in the worker, "
                  f"time vs first {r['median_time_vs_first']:.3f}, fit error {r['fit_rel_rms']:.3f}, "
                  f"held-out error {r['held_out_rel_rms']:.3f} -> {r['file']}")
    return 0
