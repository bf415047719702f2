"""Measured replay: a trace's expert work, rank by rank, through real kernels (`vllm-gem replay`).

The simulator scores a placement with the same fitted latency model GEM optimises, so it
cannot tell whether the model is right. A measured replay runs each EP rank's real work of
every replayed step and MoE layer on a GPU and times it:

- **The batch.** One step's layer routes `tokens` tokens to `top_k` distinct experts each,
  with exactly the trace's per-expert counts (`step_topk_ids`). Logical ids become physical
  ones the way vLLM's router does it (`physical_ids`: the Knuth hash of the token index
  modulo the expert's replica count, replicas in slot order), so copies of an expert split
  its tokens as they would under vLLM, in whole tokens.
- **A rank's call.** vLLM's own `fused_experts` with that rank's `expert_map` (what every
  rank runs under TP x EP with the allgather/reduce-scatter backend: all tokens in, only its
  slots computed), bf16 or fp8; where vLLM is not importable, the project's Triton kernel on
  the rank's own rows (what calibration times). The result says which kernel measured it.
- **Unequal ranks.** Rank r runs on GPU r where there are that many GPUs; else all ranks
  share GPU 0 one after another, each in its own CUDA green context of the SMs given for it
  (`--slow-sms`), so a slower rank is a smaller compute unit, not extra work. Only our own
  process is affected; device settings are never touched.
- **Timing.** calibrate.time_call: warm, CUDA-graph replays timed with events, median. The
  layer time of a step is the slowest rank's; per-rank figures are kept.

The report puts each placement's measured times beside the simulator's prediction for the
same steps (`compare`): per-rank prediction error, and the measured and predicted ratio of
every placement to a baseline (vLLM's policy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibrate import (CalibrationSpec, ExpertKernel, _pattern_call, calibrate_device,
                        calibration_stream, calibration_weights, expert_kernel, time_call)
from .errors import GemInputError
from .latency import GroupModel, fit
from .precision import PRECISIONS
from .simulate import rank_times

KNUTH_MULTIPLIER = 2654435769  # vLLM's router (fused_moe/router/base_router.py): floor(2^32 / phi)


# --------------------------------------------------------------------------- the work (CPU)
def step_topk_ids(counts: np.ndarray, top_k: int) -> np.ndarray:
    """One step's routing with exactly `counts` assignments per expert.

    counts: [experts] integer tokens per expert (one step, one layer)
    returns: [tokens, top_k] logical expert ids, tokens = ceil(sum / top_k), each token's
    ids distinct; positions past sum(counts) (at most top_k - 1) are -1, routed nowhere.
    Assignments are filled column by column in expert order, so one expert's run of c <=
    tokens assignments lands on c different tokens.
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError(f"counts: shape {c.shape}, expected [experts] of non-negative integers")
    total = int(c.sum())
    tokens = max(1, -(-total // top_k), int(c.max(initial=0)))
    flat = np.full(tokens * top_k, -1, dtype=np.int64)
    flat[:total] = np.repeat(np.arange(len(c)), c)
    return flat.reshape(top_k, tokens).T.copy()


def physical_ids(topk_ids: np.ndarray, phys_to_log: np.ndarray, num_logical: int) -> np.ndarray:
    """vLLM's logical -> physical expert choice for one layer.

    topk_ids: [tokens, top_k] logical ids (-1: none); phys_to_log: [num_physical]
    returns: [tokens, top_k] physical slots (-1 stays -1). Token t's copy of expert e is
    replica (t * 2654435769 & 0xFFFFFFFF) % replicas(e), replicas in increasing slot order
    (EplbState's logical_to_physical_map).
    """
    p2l = np.asarray(phys_to_log, dtype=np.int64)
    replicas = np.bincount(p2l, minlength=num_logical)
    order = np.argsort(p2l, kind="stable")  # slots grouped by expert, in slot order
    first = np.concatenate([[0], np.cumsum(replicas)[:-1]])
    tok = np.arange(topk_ids.shape[0], dtype=np.int64)[:, None]
    ok = topk_ids >= 0
    e = np.where(ok, topk_ids, 0)
    pick = ((tok * KNUTH_MULTIPLIER) & 0xFFFFFFFF) % np.maximum(replicas[e], 1)
    return np.where(ok, order[first[e] + pick], -1)


def slot_tokens_split(loads: np.ndarray, phys_to_log: np.ndarray, top_k: int) -> np.ndarray:
    """Whole tokens each slot receives when vLLM splits an expert's tokens over its copies.

    loads: [steps, layers, experts] integer counts; phys_to_log: [layers, num_physical]
    returns: [steps, layers, num_physical] (the simulator's slot_tokens splits evenly, in
    fractions; this is what a real batch gives)
    """
    steps, layers, experts = loads.shape
    num_physical = phys_to_log.shape[1]
    out = np.zeros((steps, layers, num_physical), dtype=np.int64)
    for s in range(steps):
        for layer in range(layers):
            ids = physical_ids(step_topk_ids(loads[s, layer], top_k), phys_to_log[layer], experts)
            out[s, layer] = np.bincount(ids[ids >= 0], minlength=num_physical)
    return out


def replay_steps(num_steps: int, which: str = "held-out", max_steps: int | None = None,
                 plan_fraction: float = 0.5) -> np.ndarray:
    """Indices of the steps to replay: the held-out part (after evaluate.split_steps' cut)
    or all, thinned evenly to at most max_steps."""
    if which not in ("held-out", "all"):
        raise ValueError(f"steps {which!r}, expected held-out or all")
    cut = max(1, min(num_steps - 1, int(round(num_steps * plan_fraction)))) if which == "held-out" else 0
    idx = np.arange(cut, num_steps)
    if max_steps is not None and len(idx) > max_steps:
        idx = idx[np.unique(np.linspace(0, len(idx) - 1, max_steps).round().astype(int))]
    return idx


# --------------------------------------------------------------------------- the report (CPU)
@dataclass
class PlacementReplay:
    """One placement's replay. Times in microseconds."""

    name: str
    measured: np.ndarray  # [steps, layers, ranks]
    predicted: np.ndarray  # [steps, layers, ranks] the simulator's rank_times
    kernel: str = ""

    @property
    def measured_layer_us(self) -> float:
        """Mean over steps and layers of the slowest rank's measured time."""
        return float(self.measured.max(-1).mean())

    @property
    def predicted_layer_us(self) -> float:
        return float(self.predicted.max(-1).mean())

    def rank_errors(self) -> np.ndarray:
        """[steps * layers * ranks] (predicted - measured) / measured, where a rank had work."""
        m, p = self.measured.reshape(-1), self.predicted.reshape(-1)
        ok = m > 0
        return (p[ok] - m[ok]) / m[ok]

    def summary(self) -> dict[str, Any]:
        err = self.rank_errors()
        return {"placement": self.name, "kernel": self.kernel,
                "measured_layer_us": self.measured_layer_us,
                "predicted_layer_us": self.predicted_layer_us,
                "rank_error_rms": float(np.sqrt(np.mean(err ** 2))) if err.size else float("nan"),
                "rank_error_max": float(np.abs(err).max()) if err.size else float("nan"),
                "rank_error_mean": float(err.mean()) if err.size else float("nan"),
                "measured_rank_us": self.measured.mean(axis=(0, 1)).tolist(),
                "predicted_rank_us": self.predicted.mean(axis=(0, 1)).tolist(),
                "measured_straggler": int(np.bincount(self.measured.argmax(-1).ravel(),
                                                      minlength=self.measured.shape[-1]).argmax())}


def compare(replays: Sequence[PlacementReplay], baseline: str) -> dict[str, Any]:
    """Each placement's summary with its measured and predicted ratio to `baseline`'s
    (< 1: faster than the baseline) and how far the two ratios are apart."""
    rows = [r.summary() for r in replays]
    base = next((r for r in rows if r["placement"] == baseline), None)
    for r in rows:
        if base is not None:
            r["measured_vs_baseline"] = r["measured_layer_us"] / base["measured_layer_us"]
            r["predicted_vs_baseline"] = r["predicted_layer_us"] / base["predicted_layer_us"]
            r["ratio_gap_pp"] = 100 * (r["predicted_vs_baseline"] - r["measured_vs_baseline"])
    return {"baseline": baseline if base is not None else None, "placements": rows}


def format_report(report: dict[str, Any]) -> str:
    head = (f"{'placement':14s} {'kernel':>22s} {'measured us':>11s} {'predicted us':>12s} "
            f"{'meas/base':>9s} {'pred/base':>9s} {'rank err rms':>12s} {'max':>6s}")
    out = [head, "-" * len(head)]
    for r in report["placements"]:
        mb = f"{r['measured_vs_baseline']:.3f}" if "measured_vs_baseline" in r else "n/a"
        pb = f"{r['predicted_vs_baseline']:.3f}" if "predicted_vs_baseline" in r else "n/a"
        out.append(f"{r['placement']:14s} {r['kernel']:>22s} {r['measured_layer_us']:11.1f} "
                   f"{r['predicted_layer_us']:12.1f} {mb:>9s} {pb:>9s} "
                   f"{r['rank_error_rms']:12.1%} {r['rank_error_max']:6.1%}")
    return "\n".join(out)


# --------------------------------------------------------------------------- measuring (GPU)
@dataclass(frozen=True)
class ReplaySpec:
    """What one rank's expert layer is: the model's expert shape and precision, and how to time."""

    hidden: int
    intermediate: int
    top_k: int
    precision: str = "bf16"  # a vllm_gem.precision.PRECISIONS name
    kernel: str = "auto"  # vllm (vLLM's fused_experts), triton (ours), auto: vllm where importable
    reps: int = 7  # timed graph replays per rank call
    inner: int = 2  # calls per graph replay
    seed: int = 0


@dataclass
class Fleet:
    """The ranks' compute units: rank r runs on devices[r] in a green context of sms[r] SMs
    (None: the whole GPU)."""

    sms: list[int | None]
    devices: list[int] = field(default_factory=list)

    @classmethod
    def on_local_gpus(cls, num_ranks: int, slow_sms: dict[int, int], visible: int) -> "Fleet":
        """GPU r for rank r where there are enough GPUs, else every rank on GPU 0."""
        bad = [r for r in slow_sms if r >= num_ranks]
        if bad:
            raise GemInputError("command line", "--slow-sms", f"names ranks {bad}",
                                f"ranks below the placement's {num_ranks}")
        devices = list(range(num_ranks)) if visible >= num_ranks else [0] * num_ranks
        return cls([slow_sms.get(r) for r in range(num_ranks)], devices)

    def label(self, r: int) -> str:
        return f"cuda:{self.devices[r]}" + (f" {self.sms[r]} SMs" if self.sms[r] else "")


def vllm_fused_experts() -> Callable[..., Any] | None:
    """vLLM's fused_experts and its fp8 quant config maker, or None where vLLM cannot run."""
    try:  # vLLM is optional: the replay falls back to our kernel and says so
        from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except Exception:
        return None
    return fused_experts, fp8_w8a8_moe_quant_config


def kernel_name(spec: ReplaySpec) -> str:
    """Which kernel measures: 'vllm.fused_experts' or 'vllm_gem.kernels' (+ precision)."""
    want = spec.kernel
    if want not in ("auto", "vllm", "triton"):
        raise ValueError(f"kernel {want!r}, expected auto, vllm or triton")
    use_vllm = want == "vllm" or (want == "auto" and vllm_fused_experts() is not None)
    if want == "vllm" and vllm_fused_experts() is None:
        raise GemInputError("command line", "--kernel", "is vllm but vLLM's fused_experts cannot be "
                            "imported here", "a machine with vllm installed, or --kernel triton")
    return ("vllm.fused_experts" if use_vllm else "vllm_gem.kernels") + f" {spec.precision}"


def measure(loads: np.ndarray, placements: dict[str, np.ndarray], fleet: Fleet, spec: ReplaySpec,
            progress: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], str, dict]:
    """Time every rank's expert work of every step and layer, for every placement.

    loads: [steps, layers, experts] integer counts; placements: name -> phys_to_log
    [layers, num_physical], all with the same slot count and fleet.num_ranks ranks.
    returns ({name: [steps, layers, ranks] us}, the kernel's name, stats). Identical rank
    calls (same compute unit, tokens and local counts) are timed once.
    """
    import torch  # the GPU part: torch only where a GPU is used

    ranks = len(fleet.sms)
    steps, layers, experts = loads.shape
    num_physical = {p.shape[1] for p in placements.values()}
    if len(num_physical) != 1 or next(iter(num_physical)) % ranks:
        raise ValueError(f"placements have {sorted(num_physical)} slots, expected one slot count "
                         f"that is a multiple of {ranks} ranks")
    num_physical = num_physical.pop()
    per_rank = num_physical // ranks
    name = kernel_name(spec)
    use_vllm = name.startswith("vllm.")
    t0 = time.perf_counter()
    # the batch of each (placement, step, layer): physical ids, built once on the CPU
    batches = {pn: [[physical_ids(step_topk_ids(loads[s, layer], spec.top_k), p2l[layer], experts)
                     for layer in range(layers)] for s in range(steps)]
               for pn, p2l in placements.items()}
    out = {pn: np.zeros((steps, layers, ranks)) for pn in placements}
    cache: dict[tuple, float] = {}
    timed = 0
    cal = CalibrationSpec(spec.hidden, spec.intermediate, per_rank, seed=spec.seed, precision=spec.precision)
    weights: dict[int, tuple[Any, Any]] = {}
    for r in range(ranks):
        dev = fleet.devices[r]
        torch.cuda.set_device(dev)
        if dev not in weights:  # every rank holds per_rank slots of one shape: one random set per GPU
            gen = torch.Generator(device=f"cuda:{dev}").manual_seed(spec.seed)
            weights[dev] = calibration_weights(cal, dev, gen)
        w13, w2 = weights[dev]
        green, stream = calibration_stream(dev, fleet.sms[r])
        if green is not None:
            green.set_context()
        try:
            for pn, per_step in batches.items():
                for s in range(steps):
                    for layer in range(layers):
                        ids = per_step[s][layer]
                        local = (ids >= r * per_rank) & (ids < (r + 1) * per_rank)
                        counts = np.bincount(ids[local] - r * per_rank, minlength=per_rank)
                        key = (dev, fleet.sms[r], ids.shape[0], counts.tobytes())
                        if key not in cache:
                            if not counts.any():
                                cache[key] = 0.0  # a rank with no tokens runs no expert kernel
                            else:  # inputs made on the timing stream, in the rank's context
                                with torch.cuda.stream(stream):
                                    once = (_vllm_call(ids, r, per_rank, num_physical, w13, w2, spec, dev)
                                            if use_vllm else
                                            _own_call(counts, w13, w2, spec, cal, dev))
                                    cache[key] = time_call(once, stream, spec.reps, spec.inner)[0]
                                timed += 1
                        out[pn][s, layer, r] = cache[key]
        finally:
            if green is not None:
                green.pop_context()
        if progress:
            progress(f"rank {r} ({fleet.label(r)}): {timed} calls timed so far, "
                     f"{time.perf_counter() - t0:.0f} s")
    return out, name, {"calls_timed": timed, "seconds": time.perf_counter() - t0}


def _vllm_call(ids: np.ndarray, rank: int, per_rank: int, num_physical: int, w13, w2,
               spec: ReplaySpec, dev: int) -> Callable[[], Any]:
    """vLLM's fused_experts as rank `rank` runs it under EP: the step's tokens routed to one of
    its slots in, its own slots computed (expert_map: its slots -> local ids, every other
    slot -> -1)."""
    import torch  # GPU only

    fused_experts, _ = vllm_fused_experts()
    # the tokens dispatched to this rank (an all-to-all EP backend sends a token only to the
    # ranks holding one of its experts); their other experts are -1 through expert_map
    mine = ((ids >= rank * per_rank) & (ids < (rank + 1) * per_rank)).any(1)
    # the step's activations and router weights drawn for every token, then this rank's rows
    # taken: each rank sees the same token as the others do
    gen = torch.Generator(device=f"cuda:{dev}").manual_seed(spec.seed + 1)
    x = torch.randn(ids.shape[0], spec.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    wts = torch.rand(ids.shape[0], ids.shape[1], device=dev, generator=gen)
    rows = torch.as_tensor(np.flatnonzero(mine), device=dev)
    x, wts, ids = x[rows].contiguous(), wts[rows].contiguous(), ids[mine]
    # -1 (no expert) becomes one extra slot that is local to no rank
    phys = torch.tensor(np.where(ids >= 0, ids, num_physical), dtype=torch.int32, device=dev)
    emap = torch.full((num_physical + 1,), -1, dtype=torch.int32, device=dev)
    emap[rank * per_rank:(rank + 1) * per_rank] = torch.arange(per_rank, dtype=torch.int32, device=dev)
    a, b, cfg = vllm_weights(w13, w2, spec.precision)

    def once():  # -> [tokens, hidden]: this rank's share of the layer's output
        return fused_experts(x, a, b, wts, phys, global_num_experts=num_physical + 1, expert_map=emap,
                             quant_config=cfg)
    return once


def vllm_weights(w13, w2, precision: str) -> tuple[Any, Any, Any]:
    """calibration_weights' (w13, w2) as vLLM's fused_experts takes them: (w1, w2, quant_config)
    -- the bf16 tensors and None, or the fp8 tensors and their scales' quant config."""
    layout = PRECISIONS[precision].scale_layout
    if layout == "none":
        return w13, w2, None
    _, fp8_config = vllm_fused_experts()
    channel = layout == "channel"
    return w13.q, w2.q, fp8_config(w1_scale=w13.scale, w2_scale=w2.scale, per_act_token_quant=channel,
                                   per_out_ch_quant=channel,
                                   block_shape=[128, 128] if layout == "block" else None)


def vllm_expert_kernel(precision: str) -> ExpertKernel:
    """vLLM's fused_experts as a calibration kernel (calibrate_device's `kernel`), sampled at
    the tile boundaries of vllm-gem's kernel of the same precision: profiles of the kernel
    the replay measures."""
    fused_experts, _ = vllm_fused_experts()
    prepared: dict[int, tuple[Any, Any, Any]] = {}

    def ffn(x, w13, w2, wts, ids, tile, alignment):  # alignment: vLLM aligns inside
        if id(w13) not in prepared:  # once per weight set, outside the timed graph
            prepared[id(w13)] = vllm_weights(w13, w2, precision)
        a, b, cfg = prepared[id(w13)]
        return fused_experts(x, a, b, wts, ids, quant_config=cfg)
    return ExpertKernel("vllm.fused_experts", expert_kernel(precision).tile, ffn, int32_ids=True)


def _own_call(counts: np.ndarray, w13, w2, spec: ReplaySpec, cal, dev: int) -> Callable[[], None]:
    """Our Triton expert kernel on the rank's own rows (what calibration times)."""
    import torch  # GPU only

    from .kernels.moe_gemm import align  # imports triton
    gen = torch.Generator(device=f"cuda:{dev}").manual_seed(spec.seed + 1)
    x_all = torch.randn(int(counts.sum()), spec.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    return _pattern_call(counts.tolist(), x_all, w13, w2, expert_kernel(spec.precision), align, cal)


# --------------------------------------------------------------------------- the command
def calibration_kernel(spec: ReplaySpec) -> ExpertKernel | None:
    """The kernel the prediction's profiles are calibrated with: the one that measures
    (None: vllm-gem's own, calibrate_device's default)."""
    return vllm_expert_kernel(spec.precision) if kernel_name(spec).startswith("vllm.") else None


def calibrate_partitions(fleet: Fleet, spec: ReplaySpec, local_experts: int,
                         progress: Callable[[str], None] | None = None) -> list[Any]:
    """A LatencyModel per rank, from one calibration per distinct (GPU, SMs) of the fleet:
    what the prediction beside a measurement needs when no profiles are given."""
    models: dict[tuple[int, int | None], Any] = {}
    for dev, sms in zip(fleet.devices, fleet.sms, strict=True):
        if (dev, sms) not in models:
            prof = calibrate_device(dev, CalibrationSpec(spec.hidden, spec.intermediate, local_experts,
                                                         sm_limit=sms, precision=spec.precision),
                                    kernel=calibration_kernel(spec))
            models[dev, sms] = fit(prof, f"calibration of cuda:{dev}" + (f" at {sms} SMs" if sms else ""))
            if progress:
                progress(f"calibrated cuda:{dev}" + (f" at {sms} SMs" if sms else ""))
    return [models[d, s] for d, s in zip(fleet.devices, fleet.sms, strict=True)]
