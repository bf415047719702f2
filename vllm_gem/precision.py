"""Which expert kernel a GPU profile times: the served model's dtype and fp8 scale layout.

An fp8 model's expert time at a given load is not the bf16 time (half the weight bytes at
decode, other tiles), so a profile is only valid for the precision it was measured in. One
name per precision, used by `vllm-gem calibrate --dtype`, by the profile file
(`expert.dtype`, `expert.scale_layout`) and by the plugin, which reads it off the served layer.
No torch here: the CLI and the file checks run without it.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Precision(NamedTuple):
    dtype: str  # torch dtype name of the expert weights
    scale_layout: str  # "none", or an fp8 scale layout of vllm_gem.kernels.moe_gemm_fp8


# name -> what is served. fp8 = vLLM's `--quantization fp8` (per-tensor weight scales, one
# dynamic activation scale per call); fp8-channel = per-channel weights, per-token
# activations (compressed-tensors W8A8); fp8-block = 128x128 weight blocks, activations per
# token group of 128 (DeepSeek-V3/R1, Qwen3 FP8 checkpoints).
PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bfloat16", "none"),
    "fp8": Precision("float8_e4m3fn", "tensor"),
    "fp8-channel": Precision("float8_e4m3fn", "channel"),
    "fp8-block": Precision("float8_e4m3fn", "block"),
}


def precision_name(dtype: str, scale_layout: str) -> str | None:
    """The PRECISIONS name of (dtype, scale_layout), or None if it is none of them."""
    return next((n for n, p in PRECISIONS.items() if p == (dtype, scale_layout)), None)


def served_scale_layout(scale_shape: tuple[int, ...], num_experts: int, out_features: int,
                        block_scales: bool) -> str:
    """The fp8 scale layout of a served weight, from its scale tensor's shape.

    scale_shape: the shape of vLLM's `w13_weight_scale_inv` (block_scales: [experts, N/128,
    K/128]) or `w13_weight_scale` ([experts] or [experts, 2] per tensor, [experts, N] or
    [experts, N, 1] per channel); out_features: N of that weight.
    """
    if block_scales:
        return "block"
    size = math.prod(scale_shape)
    if size == num_experts * out_features:
        return "channel"
    if size in (num_experts, 2 * num_experts):  # w1 and w3 may keep one scale each
        return "tensor"
    raise ValueError(f"fp8 weight scale of shape {list(scale_shape)} for {num_experts} experts x "
                     f"{out_features} outputs: neither per tensor, per channel nor 128x128 blocks")
