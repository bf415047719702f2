"""Our Triton MoE kernel next to vLLM's fused_moe Triton kernel and a torch bmm reference.

    python benchmarks/kernels.py [--json out.json] [--search]    (on a GPU; vLLM optional)
    python benchmarks/kernels.py --dtype fp8-block|fp8|fp8-channel [--search]

--dtype fp8*: our fp8 kernel (kernels/moe_gemm_fp8.py) against vLLM's fp8 fused_experts
(Triton) with the same quantized weights and scale layout, at the DeepSeek-V3 (all 256
experts) and Qwen3-30B-A3B shapes; activations are quantized inside both calls, as served.

Same inputs for all three (the bmm reference pads every expert to the largest count, untimed),
bf16, CUDA-graph replays timed with CUDA events (median of
triton.testing.do_bench_cudagraph). TFLOP/s counts 2 * rows * 3 * hidden * intermediate.
Ratio = ours / vLLM (goal: within 10% at every size, since calibration must predict serving).
--search also times every tile in SEARCH_TILES at every size and prints the fastest: the
evidence behind the kernel's TILE_TABLE. --stages times each of our five launches alone
(align, gate/up GEMM, SiLU-and-mul, down GEMM, sum over top-k) and vLLM's moe_align_block_size
at the same BLOCK_M: where a fixed-cost gap comes from. It also lists every kernel of one
whole call of ours and of vLLM's in launch order, with its duration *inside* the pipeline
(torch profiler, median over back-to-back calls): a kernel slower there than alone points at
what its neighbours leave behind (L2 contents, a dependency), not at the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import triton

from vllm_gem.kernels.moe_gemm import (
    TILE_TABLE,
    TileConfig,
    align,
    grouped_gemm,
    moe_ffn,
    select_config,
    silu_and_mul,
)
from vllm_gem.kernels.moe_gemm_fp8 import (
    FP8_BLOCK_TILE_TABLE,
    FP8_TILE_TABLE,
    moe_ffn_fp8,
    quantize_weights,
    select_fp8_config,
)

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "deepseek-v3": (7168, 2048, 32, 8),
          "mixtral": (4096, 14336, 8, 2)}
FP8_SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "deepseek-v3": (7168, 2048, 256, 8)}
TOKENS = [1, 16, 64, 256, 1024, 4096]
SEARCH_TILES = list(dict.fromkeys([cfg for _, cfg in TILE_TABLE] + [
    TileConfig(16, 64, 64, 1, 4, 4), TileConfig(16, 64, 256, 1, 4, 2),
    TileConfig(16, 128, 128, 1, 4, 2), TileConfig(32, 256, 128, 16, 4, 2),
    TileConfig(64, 256, 64, 16, 8, 3), TileConfig(128, 128, 64, 16, 8, 3)]))


def vllm_function(module: str, name: str):
    """A function of vLLM's fused_moe package, or None (once, with why) where it cannot run."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            fn = getattr(importlib.import_module(f"vllm.model_executor.layers.fused_moe.{module}"), name)
        return fn
    except Exception as e:  # vLLM absent, or its CUDA ops not built
        print(f"(vLLM {name} unavailable: {e})", file=sys.stderr)
        return None


def bmm_inputs(x, ids, e):
    """Every expert's rows padded to the largest count: xin [experts, cap, hidden] (untimed)."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e)
    cap = int(counts.max())
    slot = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    xin = torch.zeros(e, cap, x.shape[1], device=x.device, dtype=x.dtype)
    xin[flat[order], slot] = x[order // ids.shape[1]]
    return xin


def bmm_experts(xin, w13, w2):
    """The padded experts' FFN as torch batched matmuls (timed)."""
    inter = w2.shape[2]
    h = torch.bmm(xin, w13.transpose(1, 2))
    return torch.bmm(torch.nn.functional.silu(h[..., :inter]) * h[..., inter:], w2.transpose(1, 2))


def routed_inputs(tokens: int, hidden: int, experts: int, top_k: int, g: torch.Generator):
    """One call's inputs, drawn from g: x [tokens, hidden] bf16, topk ids [tokens, top_k]
    int32 (top_k distinct random experts per token), router weights [tokens, top_k]."""
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.rand(tokens, experts, device="cuda", generator=g).topk(top_k, dim=1).indices.to(torch.int32)
    return x, ids, torch.rand(tokens, top_k, device="cuda", generator=g)


def bench(fn) -> float:
    """us per call of fn: median of CUDA-graph replays."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def stage_times(x, w13, w2, w, ids, vllm_align=None) -> dict[str, float]:
    """us of each launch of moe_ffn alone, at its table tile, plus vLLM's align at that BLOCK_M."""
    tokens, k = ids.shape
    e, rows = w13.shape[0], ids.numel()
    cfg = select_config(tokens, k, e)
    al = align(ids, e, cfg.block_m)
    h = torch.empty(rows, w13.shape[1], device=x.device, dtype=x.dtype)
    grouped_gemm(x, w13, al, k, rows, cfg, h)
    act = silu_and_mul(h)
    y = torch.empty(rows, w2.shape[1], device=x.device, dtype=x.dtype)
    times = {
        "align": bench(lambda: align(ids, e, cfg.block_m)),
        "gate_up": bench(lambda: grouped_gemm(x, w13, al, k, rows, cfg, h)),
        "silu_mul": bench(lambda: silu_and_mul(h)),
        "down": bench(lambda: grouped_gemm(act, w2, al, 1, rows, cfg, y, weights=w.reshape(-1))),
        "sum": bench(lambda: y.view(tokens, k, -1).sum(1)),
    }
    if vllm_align:
        times["vllm_align"] = bench(lambda: vllm_align(ids, cfg.block_m, e))
    return times


def in_context_us(fn, iters: int = 20) -> list[list]:
    """[[kernel name, us], ...] for one fn() call in launch order: each kernel's median duration
    over `iters` calls run back to back under the torch profiler (no CUDA graph)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    per_call, extra = divmod(len(kernels), iters)
    if extra or not per_call:
        raise RuntimeError(f"{len(kernels)} kernels traced for {iters} calls: not a whole number per call")
    short = lambda n: re.sub(r"^void |[<(].*$", "", n).split("::")[-1][:32]  # noqa: E731
    return [[short(kernels[j]["name"]),
             statistics.median(kernels[i * per_call + j]["dur"] for i in range(iters))]
            for j in range(per_call)]


def measure_case(name: str, x, w13, w2, w, ids, fused, vllm_align, search: bool, stages: bool
                 ) -> tuple[dict, str]:
    """One (shape, tokens) point -> (row for the JSON, line for the table)."""
    t, k = ids.shape
    h, i = w13.shape[2], w2.shape[2]
    # do_bench_cudagraph runs on a side stream that does not wait for the default one:
    # without this, the first calls read ids still being written (after a shape's
    # large weights, garbage expert ids: an illegal access and a device-side assert, seen on H200)
    torch.cuda.synchronize()
    ours = bench(lambda: moe_ffn(x, w13, w2, w, ids))
    ref_v = bench(lambda: fused(x, w13, w2, w, ids)) if fused else float("nan")
    xin = bmm_inputs(x, ids, w13.shape[0])
    bmm = bench(lambda: bmm_experts(xin, w13, w2))
    tflops = 2 * t * k * 3 * h * i / (ours * 1e-6) / 1e12
    row = dict(shape=name, tokens=t, ours_us=ours, vllm_us=ref_v, bmm_us=bmm,
               ours_tflops=tflops, ours_over_vllm=ours / ref_v, tile=str(select_config(t, k, w13.shape[0])))
    line = f"{name:14s} {t:6d} {ours:8.1f} {ref_v:8.1f} {bmm:8.1f} {tflops:9.1f} {ours / ref_v:9.3f}"
    if search:
        times = {str(c): bench(lambda c=c: moe_ffn(x, w13, w2, w, ids, c)) for c in SEARCH_TILES}
        best = min(times, key=times.get)
        row.update(search_us=times, best_tile=best)
        line += f"  best {times[best]:8.1f} us ({best[len('TileConfig'):]})"
    if stages:
        row["stages_us"] = stage_times(x, w13, w2, w, ids, vllm_align)
        line += "  stages " + " ".join(f"{n} {us:.1f}" for n, us in row["stages_us"].items())
        row["in_context_us"] = {"ours": in_context_us(lambda: moe_ffn(x, w13, w2, w, ids))}
        if fused:
            row["in_context_us"]["vllm"] = in_context_us(lambda: fused(x, w13, w2, w, ids))
        for who, ks in row["in_context_us"].items():
            line += f"\n    in pipeline, {who}: " + ", ".join(f"{n} {us:.1f}" for n, us in ks)
    return row, line


FP8_SEARCH_TILES = list(dict.fromkeys([cfg for _, cfg in FP8_TILE_TABLE + FP8_BLOCK_TILE_TABLE] + [
    TileConfig(16, 128, 128, 1, 4, 4), TileConfig(16, 128, 128, 16, 4, 3), TileConfig(64, 128, 128, 32, 4, 3),
    TileConfig(64, 256, 128, 16, 8, 3), TileConfig(128, 128, 128, 16, 4, 3)]))


def vllm_fp8_experts(layout: str):
    """vLLM's fp8 fused_experts (Triton) for weights in `layout`: f(x, w13, w2, w, ids), or None."""
    fused = vllm_function("fused_moe", "fused_experts")
    make = vllm_function("config", "fp8_w8a8_moe_quant_config")
    if fused is None or make is None:
        return None

    def run(x, w13, w2, w, ids):
        channel = layout == "channel"
        cfg = make(w1_scale=w13.scale, w2_scale=w2.scale, per_act_token_quant=channel,
                   per_out_ch_quant=channel, block_shape=[128, 128] if layout == "block" else None)
        return fused(x, w13.q, w2.q, w, ids, quant_config=cfg)
    return run


def main_fp8(a: argparse.Namespace) -> None:
    """Our fp8 kernel against vLLM's, one layout: a table, and the JSON rows."""
    from vllm_gem.precision import PRECISIONS
    layout = PRECISIONS[a.dtype].scale_layout
    theirs = vllm_fp8_experts(layout)
    rows = []
    print(f"{a.dtype}: {'shape':14s} {'tokens':>6s} {'ours us':>8s} {'vllm us':>8s} "
          f"{'ours/vllm':>9s}  tile")
    for name in a.shapes.split(","):
        h, i, e, k = FP8_SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        bf = torch.bfloat16
        rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=bf, generator=g)  # noqa: E731
        w13 = quantize_weights(rand(e, 2 * i, h) / h ** 0.5, layout)
        torch.cuda.empty_cache()  # the bf16 weights: 15 GB for DeepSeek-V3's w13
        w2 = quantize_weights(rand(e, h, i) / i ** 0.5, layout)
        torch.cuda.empty_cache()
        for t in TOKENS:
            x, ids, w = routed_inputs(t, h, e, k, g)
            torch.cuda.synchronize()  # do_bench_cudagraph's side stream: inputs written first
            ours = bench(lambda: moe_ffn_fp8(x, w13, w2, w, ids))
            ref_v = bench(lambda: theirs(x, w13, w2, w, ids)) if theirs else float("nan")
            tile = select_fp8_config(t, k, e, layout)
            row = dict(dtype=a.dtype, shape=name, tokens=t, ours_us=ours, vllm_us=ref_v,
                       ours_over_vllm=ours / ref_v, tile=str(tile),
                       ours_tflops=2 * t * k * 3 * h * i / (ours * 1e-6) / 1e12)
            line = (f"{a.dtype}: {name:14s} {t:6d} {ours:8.1f} {ref_v:8.1f} {ours / ref_v:9.3f}  "
                    f"{str(tile)[10:]}")
            if a.search:
                times = {str(c): bench(lambda c=c: moe_ffn_fp8(x, w13, w2, w, ids, c))
                         for c in FP8_SEARCH_TILES}
                best = min(times, key=times.get)
                row.update(search_us=times, best_tile=best)
                line += f"  best {times[best]:8.1f} us ({best[len('TileConfig'):]})"
            rows.append(row)
            print(line, flush=True)
        w13 = w2 = None  # free this shape's weights before the next one's
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": a.dtype, "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--search", action="store_true", help="also time every tile in SEARCH_TILES")
    ap.add_argument("--stages", action="store_true", help="also time each launch alone")
    ap.add_argument("--dtype", choices=["bf16", "fp8-block", "fp8", "fp8-channel"], default="bf16")
    a = ap.parse_args()
    if a.dtype != "bf16":
        if a.shapes == ",".join(SHAPES):
            a.shapes = ",".join(FP8_SHAPES)
        return main_fp8(a)
    fused = vllm_function("fused_moe", "fused_experts")
    vllm_align = vllm_function("moe_align_block_size", "moe_align_block_size") if a.stages else None
    rows = []
    print(f"{'shape':14s} {'tokens':>6s} {'ours us':>8s} {'vllm us':>8s} {'bmm us':>8s} "
          f"{'ours TF/s':>9s} {'ours/vllm':>9s}")
    for name in a.shapes.split(","):
        h, i, e, k = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        bf = torch.bfloat16
        w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=bf, generator=g) / h ** 0.5
        w2 = torch.randn(e, h, i, device="cuda", dtype=bf, generator=g) / i ** 0.5
        for t in TOKENS:
            x, ids, w = routed_inputs(t, h, e, k, g)
            row, line = measure_case(name, x, w13, w2, w, ids, fused, vllm_align, a.search, a.stages)
            rows.append(row)
            print(line, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
