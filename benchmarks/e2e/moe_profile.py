"""Per-rank MoE time measured inside a serving vLLM, through vLLM's torch profiler.

The server gets `server_args(dir)` (vLLM's --profiler-config: torch profiler, no stacks, no
front-end trace). `profile_window` brackets some load with POST /start_profile and
/stop_profile, waits for every worker's trace (one gzip'd Chrome trace per worker), and sums
the GPU kernels of each device:

    moe_us     MoE expert kernels (fused_moe, moe align/sum, act-and-mul, GEM's emulated work)
    comm_us    collectives (NCCL, vLLM's custom all-reduce): where a fast rank waits
    kernel_us  every kernel
    record_us  GEM's routing recorder (its profiler range on the GPU timeline)
    span_us    first kernel start to last kernel end

A straggler shows as a rank with more MoE time and the others with more collective time.
The traces are deleted once summed: they run to hundreds of MB.
"""

from __future__ import annotations

import gzip
import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from vllm_gem.vllm.recorder import RECORD_RANGE

MOE_KERNEL = re.compile(r"moe|act_and_mul|silu_and_mul", re.IGNORECASE)
SUMS = ("moe_us", "comm_us", "kernel_us", "record_us", "span_us")
COMM_KERNEL = re.compile(r"nccl|all_?reduce|cross_device_reduce|allgather|reduce_scatter", re.IGNORECASE)


def server_args(trace_dir: Path) -> list[str]:
    cfg = {"profiler": "torch", "torch_profiler_dir": str(trace_dir.resolve()),
           "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True,
           "torch_profiler_dump_cuda_time_total": False, "ignore_frontend": True}
    return ["--profiler-config", json.dumps(cfg)]


def kernel_times(trace: dict) -> dict[int, dict[str, float]]:
    """A Chrome trace (torch profiler) -> {device: {moe_us, comm_us, kernel_us, record_us, span_us}}."""
    out: dict[int, dict[str, float]] = {}
    ends: dict[int, tuple[float, float]] = {}
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") not in ("kernel", "gpu_user_annotation") or "dur" not in ev:
            continue
        # kernels name their device in args; GPU-side ranges only through pid (the device's
        # timeline): reading args alone put every record_us on device -1 (it read 0.00 ms)
        dev = int(ev.get("args", {}).get("device", ev.get("pid", -1)))
        d = out.setdefault(dev, dict.fromkeys(SUMS, 0.0))
        dur, name = float(ev["dur"]), ev.get("name", "")
        if ev["cat"] == "gpu_user_annotation":  # a range over kernels counted below: not added twice
            d["record_us"] += dur if name == RECORD_RANGE else 0.0
            continue
        d["kernel_us"] += dur
        if MOE_KERNEL.search(name):
            d["moe_us"] += dur
        elif COMM_KERNEL.search(name):
            d["comm_us"] += dur
        lo, hi = ends.get(dev, (float("inf"), 0.0))
        ends[dev] = (min(lo, float(ev["ts"])), max(hi, float(ev["ts"]) + dur))
    for dev, (lo, hi) in ends.items():
        out[dev]["span_us"] = hi - lo
    return out


def _post(port: int, path: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=300).read()


def profile_window(port: int, trace_dir: Path, run: Callable[[], object], num_gpus: int,
                   wait_s: float = 120) -> dict[int, dict[str, float]]:
    """Profile while run() loads the server -> kernel_times summed over the new traces."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_dir.rglob("*.json*"))
    _post(port, "/start_profile")
    try:
        run()
    finally:
        _post(port, "/stop_profile")
    deadline, sizes = time.time() + wait_s, {}
    while time.time() < deadline:  # workers write their traces after stop returns
        new = [p for p in trace_dir.rglob("*.json*") if p not in before]
        now = {p: p.stat().st_size for p in new}
        if len(new) >= num_gpus and now == sizes:
            break
        sizes = now
        time.sleep(3)
    totals: dict[int, dict[str, float]] = {}
    for path in sizes:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            for dev, t in kernel_times(json.load(f)).items():
                acc = totals.setdefault(dev, dict.fromkeys(t, 0.0))
                for k, v in t.items():
                    acc[k] += v
        path.unlink()
    if len([d for d in totals if d >= 0]) < num_gpus:
        raise RuntimeError(f"profiler traces in {trace_dir} cover GPUs {sorted(totals)}, "
                           f"expected {num_gpus}")
    return totals
