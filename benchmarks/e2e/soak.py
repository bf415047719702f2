#!/usr/bin/env python3
"""Soak: thousands of requests against `vllm serve --plugin gem` with recalibration on (GPU).

Starts one server (the serving matrix's start-up: TP = EP over all GPUs, compiled mode),
runs `vllm bench serve` with many prompts while sampling every GPU's used memory and the
server processes' resident memory, then checks: every request completed, none failed,
memory did not grow after the first minute, and how often GEM recalibrated and re-placed.

    VLLM_GEM_RECALIBRATE=500 python3 benchmarks/e2e/soak.py MODEL OUT [--num-prompts 4000]
        [--rate 40] [--gem '{"emulate_slowdown": {"1": 0.2}}'] [--trace /tmp/gem/trace.msgpack]
        [--no-gem]   (the control: plain vLLM, same load)
        [--data-parallel-size 2]   (DP ranks of TP 1; GEM's --gem then needs "trace")
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_matrix import (  # noqa: E402
    bench,
    scrape_gem_metrics,
    start_server,
    stop_server,
    with_eplb_communicator,
)


def gpu_used_mib() -> list[float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [float(x) for x in out.split()]


def group_rss_mib(pgid: int) -> dict[str, float]:
    """RSS (MiB) of the server's processes by name: the API server (the group leader), vLLM's
    titled processes (VLLM::EngineCore, VLLM::Worker_TP0_EP0, when setproctitle is
    installed), else pid<N>."""
    out = subprocess.run(["ps", "-e", "-o", "pgid=,pid=,rss=,args="], capture_output=True, text=True,
                         check=True).stdout
    by_name: dict[str, float] = {}
    for ln in out.splitlines():
        parts = ln.split(maxsplit=3)
        if len(parts) < 3 or not parts[0].isdigit() or int(parts[0]) != pgid:
            continue
        pid, args = int(parts[1]), parts[3] if len(parts) > 3 else ""
        name = ("api-server" if pid == pgid else
                args.split()[0] if args.startswith("VLLM::") else f"pid{pid}")
        by_name[name] = by_name.get(name, 0.0) + int(parts[2]) / 1024
    return by_name


def memory_growth(samples: list[dict], settle_s: float = 60) -> dict:
    """Growth after the first minute. GPU memory swings by a GB as recalibration allocates and
    frees its buffers, so a GPU grows only if its floor rises: the minimum of the second half
    of the samples against the first half's, and the floor of each quarter (a plateau or a
    climb). Host memory: the fitted slope of the server processes' summed RSS, and of each
    process over all and over the second half (a leak keeps its slope there; memory that
    settles into a plateau flattens)."""
    late = [s for s in samples if s["t"] >= settle_s] or samples
    half = max(1, len(late) // 2)
    gpu = np.array([s["gpu_mib"] for s in late])  # [samples, gpus]
    t = np.array([s["t"] for s in late])
    def rss(s: dict) -> dict[str, float]:  # older samples hold one summed number
        return s["rss_mib"] if isinstance(s["rss_mib"], dict) else {"all": s["rss_mib"]}

    def per_min(values: np.ndarray, t: np.ndarray = t) -> float:
        return round(float(np.polyfit(t, values, 1)[0] * 60), 2) if len(t) > 1 else 0.0

    names = sorted(set().union(*(rss(s) for s in late)))
    by_name = {n: np.array([rss(s).get(n, 0.0) for s in late]) for n in names}
    total = sum(by_name.values())
    quarters = np.array_split(gpu, min(4, len(gpu)))  # floors over time: a plateau or a climb
    return {"gpu_mib_floor_growth": (gpu[half:].min(0) - gpu[:half].min(0)).tolist(),
            "gpu_mib_floor_by_quarter": np.array([q.min(0) for q in quarters]).T.tolist(),  # [gpus][4]
            "gpu_mib_swing": (gpu.max(0) - gpu.min(0)).tolist(),
            "rss_mib_per_min": per_min(total), "rss_mib_growth": float(total[-1] - total[0]),
            "rss_mib_per_min_by_process": {n: per_min(v) for n, v in by_name.items()},
            "rss_mib_per_min_by_process_second_half": {n: per_min(v[half:], t[half:])
                                                       for n, v in by_name.items()}}


def soak_config(gem: str, trace: str, no_gem: bool = False, eplb_communicator: str | None = None,
                data_parallel_size: int = 1) -> dict:
    """The serving matrix's configuration of the soak's one server (serve_matrix.serve_command)."""
    args = ["--plugin", "gem", "--additional-config", json.dumps({"gem": json.loads(gem)})]
    if eplb_communicator:
        args = with_eplb_communicator(args, eplb_communicator)
    cfg = {"name": "soak", "args": [] if no_gem else args,
           "env": {"VLLM_MOE_ROUTING_SIMULATION_STRATEGY": "gem_trace", "VLLM_GEM_ROUTING_TRACE": trace}}
    if data_parallel_size > 1:  # each DP rank one GPU: TP 1, EP across the DP ranks
        cfg["tensor_parallel_size"] = 1
        cfg["args"] = ["--data-parallel-size", str(data_parallel_size), *cfg["args"]]
    return cfg


def recalibration_stalls(log_text: str) -> dict:
    """How long recalibrations held serving, from rank 0's report lines in a server log
    (`vllm-gem recalibration: {...}`, each with its total_seconds), by kind: re-profiled,
    speed-checked only (no GPU's speed moved against the others' past speed_tolerance),
    planned only."""
    kinds: dict[str, list[float]] = {"profiled": [], "speed_checked": [], "planned_only": []}
    for line in re.findall(r"vllm-gem recalibration: (\{.*)", log_text):
        total = re.search(r"'total_seconds': ([0-9.]+)", line)
        if total is None:
            continue
        kind = ("profiled" if "'profiled': True" in line else
                "speed_checked" if "'speed_ratios'" in line else "planned_only")
        kinds[kind].append(float(total.group(1)))
    out = {"recalibration_seconds": round(sum(sum(v) for v in kinds.values()), 2)}
    for kind, secs in kinds.items():
        out[f"{kind}_count"] = len(secs)
        out[f"{kind}_median_s"] = round(float(np.median(secs)), 3) if secs else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--num-prompts", type=int, default=4000)
    p.add_argument("--rate", default="40")
    p.add_argument("--shape", default="256x128")
    p.add_argument("--gem", default="{}", help="GEM settings (JSON) besides --plugin gem")
    p.add_argument("--no-gem", action="store_true",
                   help="the control: the same server and load without --plugin gem")
    p.add_argument("--trace", default="/tmp/gem/trace-skewed.msgpack", help="routing to replay")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--eplb-communicator", default=None, help="vLLM's EPLB weight-transfer backend")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="> 1: that many DP ranks of TP 1, EP over them (GEM then needs a trace in --gem)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = soak_config(a.gem, a.trace, a.no_gem, a.eplb_communicator, a.data_parallel_size)
    log = a.out / "serve-soak.log"
    proc, ready = start_server(a.model, cfg, a.port, log, 400)
    samples, stop = [], threading.Event()

    def sample() -> None:
        t0 = time.time()
        while not stop.is_set():
            samples.append({"t": time.time() - t0, "gpu_mib": gpu_used_mib(),
                            "rss_mib": group_rss_mib(proc.pid)})
            stop.wait(5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        shape = tuple(int(x) for x in a.shape.split("x"))
        t0 = time.time()
        res = bench(a.model, a.port, shape, a.rate, a.num_prompts, a.out / "bench-soak.json", 0)
        wall = time.time() - t0
        metrics = scrape_gem_metrics(a.port)
    finally:
        stop.set()
        th.join()
        stop_server(proc)
    text = log.read_text(errors="replace")
    report = {
        "num_prompts": a.num_prompts, "completed": res["completed"], "failed": res.get("failed", 0),
        "bench_seconds": wall, "ready_seconds": ready,
        "recalibrations": len(re.findall(r"vllm-gem recalibration:", text)),
        "recalibration_failures": len(re.findall(r"recalibration failed", text)),
        "recalibration_moves": len(re.findall(r"recalibration: .*'applied': True", text)),
        "routing_drifts": len(re.findall(r"routing drift \(benchmark\)", text)),
        **recalibration_stalls(text),
        **memory_growth(samples),
        "median_tpot_ms": res["median_tpot_ms"], "metrics": metrics, "samples": samples,
    }
    (a.out / "soak.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "metrics")}, indent=1))
    ok = report["completed"] == a.num_prompts and not report["failed"]
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
