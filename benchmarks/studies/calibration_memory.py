"""Study. Question: Does a re-profile while serving leave GPU memory behind?

Answer: It left one 32 MiB cuBLAS workspace per new stream (about 1 GiB per GPU over a
12000-request soak); with one calibration stream per device (`calibrate.calibration_stream`)
every variant measured +0.0 MiB per re-profile on one H200.

Measured: 2026-11-23, one H200. Command: `python3 benchmarks/studies/calibration_memory.py
--repeats 12`.

Does a quick re-profile leave GPU memory behind? (issue 7: the 12000-prompt GEM soak's GPU
memory floor rose about 3 MiB/s while plain vLLM's stayed flat.)

Runs the serving recalibration's quick profile (`GemRuntime.local_profile(quick=True)`: the
served model-q3's expert shape, 64 local experts, 20% extra work as on the emulated-slow GPU)
`--repeats` times per variant, and prints after each run this process's GPU memory as the
driver sees it (NVML, what nvidia-smi adds up) next to torch's allocated and reserved bytes,
and the run's peak allocation above what was allocated before it (the swing serving must have
room for):
  graph   random weights (as re-profiles were served before the layer's own weights), CUDA-graph replays
  own     as served since: the layer's own experts timed in place (here made once, outside)
  gc      graph with gc.collect() after each run (reference cycles holding graphs?)
  eager   graph, capture refused, so calibration times eager launches (graphs the cause?)
  green   graph in a green context of 100 SMs (`sm_limit`, the SM-limit emulation)
  history no profile: what every recalibration does on the GPU besides (the recorder's newest
          500 steps copied out and back, as GemRuntime.routing_history), 25 times per run
  speed   a recalibration's speed check (calibrate.check_speed, own weights) against one
          profile made before the first run
  usage: python benchmarks/studies/calibration_memory.py [--repeats 12]
         [--variants graph,own,gc,eager,green,history,speed]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import os

import numpy as np
import pynvml
import torch

from vllm_gem.calibrate import CalibrationSpec, calibrate_device, check_speed
from vllm_gem.vllm.recorder import RoutingRecorder

MIB = 2**20


def process_mib(handle) -> float:
    """This process's GPU memory as the driver accounts it (contexts, graphs, caches)."""
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid():
            return (p.usedGpuMemory or 0) / MIB
    return float("nan")


class RefusedGraph:
    """Stands in for torch.cuda.CUDAGraph: capture fails, as on a device that refuses it."""

    def __init__(self, *a, **k) -> None:
        raise RuntimeError("graph capture refused (calibration_memory.py, eager variant)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--variants", default="graph,own,gc,eager,green,history,speed")
    a = ap.parse_args()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    spec = CalibrationSpec(hidden=2048, intermediate=768, num_experts=64, extra_work=0.2, reps=10)
    green_spec = dataclasses.replace(spec, sm_limit=100, extra_work=0.0)
    real_graph = torch.cuda.CUDAGraph
    recorder = RoutingRecorder(12, 128, 4096, torch.device("cuda:0"))
    load = torch.randint(0, 64, (12, 128), dtype=torch.int32, device="cuda:0")
    phys_to_log = torch.arange(128, device="cuda:0").repeat(12, 1)
    e, h, i = spec.num_experts, spec.hidden, spec.intermediate
    own = (torch.randn(e, 2 * i, h, device="cuda:0", dtype=torch.bfloat16) / h ** 0.5,
           torch.randn(e, h, i, device="cuda:0", dtype=torch.bfloat16) / i ** 0.5)
    reference = calibrate_device(0, spec, own) if "speed" in a.variants else None
    print(f"{'variant':8s} {'run':>3s} {'nvml MiB':>9s} {'reserved MiB':>12s} {'allocated MiB':>13s} "
          f"{'peak MiB':>8s}")
    for variant in a.variants.split(","):
        torch.cuda.CUDAGraph = RefusedGraph if variant == "eager" else real_graph
        used = []
        for r in range(a.repeats):
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            if variant == "speed":
                check_speed(0, spec, reference, own)
            elif variant == "history":
                for _ in range(25):
                    for _ in range(500):
                        recorder.record(load, phys_to_log)
                    torch.from_numpy(recorder.history(500)).to("cuda:0").cpu()
            else:
                with contextlib.redirect_stderr(io.StringIO()):  # the eager variant's notices
                    calibrate_device(0, spec if variant != "green" else green_spec,
                                     own if variant == "own" else None)
            torch.cuda.empty_cache()  # as GemRuntime.local_profile does
            if variant == "gc":
                gc.collect()
                torch.cuda.empty_cache()
            torch.cuda.synchronize()
            used.append(process_mib(handle))
            print(f"{variant:8s} {r:3d} {used[-1]:9.0f} {torch.cuda.memory_reserved() / MIB:12.1f} "
                  f"{torch.cuda.memory_allocated() / MIB:13.1f} "
                  f"{(torch.cuda.max_memory_allocated() - base) / MIB:8.0f}", flush=True)
        slope = np.polyfit(np.arange(1, len(used)), used[1:], 1)[0] if len(used) > 2 else float("nan")
        print(f"{variant}: {slope:+.1f} MiB per re-profile after the first (NVML)", flush=True)
    torch.cuda.CUDAGraph = real_graph


if __name__ == "__main__":
    main()
