"""What GEM's routing recorder costs per engine step, GPU time and host time, alone.

    python benchmarks/recorder_overhead.py [--step-ms 4.2] [--json out.json]   (GPU; CPU runs too)

Serving TPOT cannot resolve the recorder's "< 1%" goal (A/B pairs scatter by several percent,
docs/benchmarks.md), so this times the one thing the recorder adds to a step:
RoutingRecorder.record, once per engine step, outside the CUDA graphs. Per shape
(MoE layers x physical slots x logical experts, as vLLM's expert_load_pass):
- gpu_us: CUDA-event time of back-to-back records / count (the GPU work it queues);
- host_us: wall time per call without synchronising (what the engine's Python thread pays).
The overhead bound per step is max(gpu_us, host_us): the step's GPU stream or its host
thread, whichever the record sits on, grows by at most that much. With --step-ms (a measured
TPOT) it is also given as a share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vllm_gem.vllm.recorder import RoutingRecorder

# name: (MoE layers, physical slots, logical experts)
SHAPES = {"qwen3-moe-128x12 (our served model)": (12, 144, 128),
          "qwen3-30b-a3b": (48, 144, 128),
          "deepseek-v3": (58, 288, 256)}


def time_record(layers: int, physical: int, logical: int, device: torch.device, calls: int = 2000,
                rounds: int = 5) -> dict[str, float]:
    """Median over rounds of (gpu_us, host_us) per record() call."""
    rec = RoutingRecorder(layers, logical, capacity=4096, device=device)
    load = torch.randint(0, 64, (layers, physical), dtype=torch.int32, device=device)
    p2l = (torch.arange(physical, device=device) % logical).repeat(layers, 1)
    for _ in range(50):  # warm-up: allocator, kernels' first launches
        rec.record(load, p2l)
    gpu, host = [], []
    cuda = device.type == "cuda"
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            rec.record(load, p2l)
        host.append((time.perf_counter() - t0) / calls * 1e6)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3 / calls)
    return {"gpu_us": statistics.median(gpu) if gpu else float("nan"), "host_us": statistics.median(host)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, default=None, help="a measured TPOT, for the share per step")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"recorder.record per engine step on {name}")
    print(f"{'shape':38s} {'gpu us':>8s} {'host us':>8s}" + ("  share of step" if a.step_ms else ""))
    rows = []
    for shape, (layers, physical, logical) in SHAPES.items():
        t = time_record(layers, physical, logical, device, a.calls)
        bound = max(v for v in t.values() if v == v)  # no GPU: the host time alone
        row = {"shape": shape, "layers": layers, "physical": physical, "logical": logical, **t,
               "bound_us": bound, "share_of_step": bound / (a.step_ms * 1e3) if a.step_ms else None}
        rows.append(row)
        share = f"  {100 * row['share_of_step']:.2f}%" if a.step_ms else ""
        print(f"{shape:38s} {t['gpu_us']:8.1f} {t['host_us']:8.1f}{share}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "step_ms": a.step_ms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
