"""Study. Question: which fixed tile should fp8 calibration time, so that the latency model
(fixed + active experts + BLOCK_M tiles + tokens) errs under 5% on loads it was not fitted on?

Answer: not the 64x128 tile with 4 stages (8.5-11.4% held out): per scale layout the best of 8
tiles erred block 2.4-3.0% (32x64), channel 3.5-3.8% (64x128, 8 warps), tensor 2.8% (64x128, 3
stages; once the per-tensor |x|max is our own kernel: torch's stepped from 3.5 to 9.8 us
between 1 and 32 rows). Those are kernels.moe_gemm_fp8.FP8_CALIBRATION_TILES.

Measured: 2026-12-06, one H100, two runs (docs/results/2026-12-06-fp8-calibration-tiles-h100/).
Command: `python benchmarks/studies/fp8_calibration_tile.py --out-dir DIR`.

With the 64x128 tile the misses were steps the model has no term for: at 21 -> 23 active
experts with about 30 tokens each, fp8-block time jumped 63 -> 74 us (the gate/up GEMM's 12
column tiles per row tile pass two tiles per SM on 132 SMs: a third round whose memory-bound
tiles each take ~10 us); per-tensor fp8 paid a load-dependent activation |x|max before each GEMM.

For each precision (fp8-block, fp8, fp8-channel) and candidate tile: one calibration
(`calibrate_device`, 32 local experts of the Qwen3-30B-A3B shape, as `vllm-gem calibrate`), then
`--extra` more random mixed loads (other seeds of calibration_patterns' mixed loads), each with
the held-out RMS of the model fitted on the structured points. Also the per-tensor activation
quantization alone (`quantize_activations`) at growing row counts, to see whether its cost steps.
Every profile is written to `--out-dir` so other model terms can be fitted offline.
  usage: python benchmarks/studies/fp8_calibration_tile.py --out-dir DIR [--precisions fp8-block,fp8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import msgspec
import numpy as np
import torch

from vllm_gem import calibrate
from vllm_gem.calibrate import (
    N_HELD_OUT,
    CalibrationSpec,
    calibrate_device,
    held_out_errors,
    held_out_report,
)
from vllm_gem.formats import save
from vllm_gem.kernels import moe_gemm_fp8
from vllm_gem.kernels.moe_gemm import TileConfig
from vllm_gem.precision import PRECISIONS
from vllm_gem.profiles import calibration_patterns

CANDIDATES = {  # name -> tile (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    "64x128s4": TileConfig(64, 128, 128, 16, 4, 4),  # the calibration tile so far
    "64x128s3": TileConfig(64, 128, 128, 16, 4, 3),
    "64x64s3": TileConfig(64, 64, 128, 16, 4, 3),
    "64x64s4": TileConfig(64, 64, 128, 16, 4, 4),
    "32x64s3": TileConfig(32, 64, 128, 16, 4, 3),
    "16x64s3": TileConfig(16, 64, 128, 1, 4, 3),  # the decode tile (swapped on Hopper)
    "128x128s3": TileConfig(128, 128, 128, 16, 8, 3),
    "64x128w8": TileConfig(64, 128, 128, 16, 8, 3),
}


def extra_points(spec: CalibrationSpec, block_m: int, seeds: list[int]) -> list[list[int]]:
    """The mixed random loads of calibration_patterns for other seeds: [points][experts]."""
    return [p for s in seeds for p in calibration_patterns(spec.num_experts, block_m, s)[-N_HELD_OUT:]]


def rms_on(profile, points) -> float:
    """Relative RMS error on `points` of the model fitted on the profile's structured points."""
    return float(np.sqrt(np.mean(held_out_errors(profile, points) ** 2)))


def quant_cost(rows_list: list[int], k: int = 2048) -> list[dict]:
    """Per-tensor and per-token-group activation quantization alone, CUDA-graph timed, us."""
    out = []
    for layout in ("tensor", "block"):
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(2):
                moe_gemm_fp8.quantize_activations(x, layout)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(10):
                    moe_gemm_fp8.quantize_activations(x, layout)
            ts = []
            for _ in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                g.replay()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) * 100)  # ms / 10 calls -> us per call
            out.append({"layout": layout, "rows": rows, "us": statistics.median(ts)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--precisions", default="fp8-block,fp8,fp8-channel")
    ap.add_argument("--tiles", default=",".join(CANDIDATES))
    ap.add_argument("--extra", type=int, default=3, help="seeds of extra mixed loads (12 each)")
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = (args.out_dir / "study.jsonl").open("a")
    q = quant_cost([1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    for r in q:
        print(f"quantize {r['layout']:6s} rows {r['rows']:5d}: {r['us']:7.2f} us")
    log.write(json.dumps({"quantize": q}) + "\n")
    log.flush()
    tiles = moe_gemm_fp8.FP8_CALIBRATION_TILES
    for prec in args.precisions.split(","):
        for name in args.tiles.split(","):
            tile = CANDIDATES[name]
            if prec == "fp8-block" and tile.block_k != 128:
                continue
            spec = CalibrationSpec(precision=prec)
            layout = PRECISIONS[prec].scale_layout
            default_tile, tiles[layout] = tiles[layout], tile  # calibrate.expert_kernel reads it per call
            try:
                t0 = time.perf_counter()
                prof = calibrate_device(0, spec)
                secs = time.perf_counter() - t0
                extra = extra_points(spec, tile.block_m, list(range(1, 1 + args.extra)))
                pts, _, _ = calibrate._measure(0, spec, None, extra, calibrate.SPEED_CHECK_LIFT_SECONDS)
            except Exception as e:  # noqa: BLE001 -- a tile that does not compile or launch: say so, go on
                print(f"{prec:10s} {name:10s} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            finally:
                tiles[layout] = default_tile
            save(prof, args.out_dir / f"profile-{prec}-{name}.json")
            save(msgspec.structs.replace(prof, points=pts), args.out_dir / f"extra-{prec}-{name}.json")
            rep = held_out_report(prof)
            row = {"precision": prec, "tile": name, "seconds": secs, **rep,
                   "extra_rel_rms": rms_on(prof, pts), "extra_points": len(pts)}
            print(f"{prec:10s} {name:10s} {secs:5.1f} s  fit {rep['fit_rel_rms']:.3f}  held-out "
                  f"{rep['held_out_rel_rms']:.3f} (max {rep['held_out_rel_max']:.3f})  "
                  f"extra {row['extra_rel_rms']:.3f} on {len(pts)}", flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
