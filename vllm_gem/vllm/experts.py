"""What the served model's routed experts are: their shape, their precision, their weights.

Calibration times the kernel the model is served with, in the served precision, on the
layer's own expert weights where they are in the layout our kernels read.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..errors import GemInputError
from ..precision import PRECISIONS, precision_name, served_scale_layout

logger = logging.getLogger("vllm.gem")


def expert_module(model: Any) -> Any:
    """The first MoE layer's module holding the routed experts' w13_weight and w2_weight."""
    for m in model.modules():
        w13, w2 = getattr(m, "w13_weight", None), getattr(m, "w2_weight", None)
        if isinstance(w13, torch.Tensor) and w13.dim() == 3 and isinstance(w2, torch.Tensor):
            return m
    raise GemInputError("model", "w13_weight", "was not found in any MoE layer",
                        "FusedMoE experts (w13_weight: [experts, 2*inter, hidden])")


def expert_tensors(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The first MoE layer's routed experts: w13 [local experts, 2*inter, hidden] and
    w2 [local experts, hidden, inter]."""
    m = expert_module(model)
    return m.w13_weight, m.w2_weight


def expert_shape(model: Any) -> tuple[int, int, int]:
    """(hidden, intermediate, local experts) of the model's routed experts."""
    e, two_i, h = expert_tensors(model)[0].shape
    return int(h), int(two_i // 2), int(e)


def served_precision(model: Any) -> str:
    """The PRECISIONS name of the served experts: bf16, or fp8 with the layer's scale layout
    (vLLM's `w13_weight_scale_inv` for 128x128 blocks, `w13_weight_scale` per tensor or
    channel). Another dtype (int4, fp16, ...) has no kernel of ours: calibrated in bf16,
    with a warning that the profile is of bf16 work."""
    m = expert_module(model)
    w13 = m.w13_weight
    if w13.dtype == torch.bfloat16:
        return "bf16"
    if w13.dtype == torch.float8_e4m3fn:
        block = isinstance(getattr(m, "w13_weight_scale_inv", None), torch.Tensor)
        scale = m.w13_weight_scale_inv if block else getattr(m, "w13_weight_scale", None)
        if isinstance(scale, torch.Tensor):
            try:
                layout = served_scale_layout(tuple(scale.shape), w13.shape[0], w13.shape[1], block)
                return precision_name("float8_e4m3fn", layout) or "bf16"
            except ValueError as e:
                logger.warning("vllm-gem: %s; calibrating in bf16 instead", e)
                return "bf16"
    logger.warning("vllm-gem: the experts are %s, which GEM has no calibration kernel for; "
                   "calibrating in bf16 (the profiles time bf16 work)", w13.dtype)
    return "bf16"


def served_weights(model: Any, precision: str, device: torch.device) -> tuple[Any, Any] | None:
    """The first MoE layer's experts to time in place, as calibrate_device takes them, or None
    where they are not in the layout our kernels read (not on this GPU, shuffled or padded
    by a backend, or of another precision): then calibration times random weights of the
    same shape and precision."""
    m = expert_module(model)
    w13, w2 = m.w13_weight, m.w2_weight
    if w13.device != device or w2.device != device:
        return None
    layout = PRECISIONS[precision].scale_layout
    if layout == "none":
        return (w13, w2) if w13.dtype == w2.dtype == torch.bfloat16 else None
    from ..kernels.moe_gemm_fp8 import GROUP, Fp8Weights  # imports triton: fp8 experts only
    name = "weight_scale_inv" if layout == "block" else "weight_scale"
    out = []
    for w, s in ((w13, getattr(m, f"w13_{name}", None)), (w2, getattr(m, f"w2_{name}", None))):
        if w.dtype != torch.float8_e4m3fn or not isinstance(s, torch.Tensor) or s.device != device:
            return None
        e, n, k = w.shape
        want = {"block": (e, -(-n // GROUP), -(-k // GROUP)), "channel": (e, n), "tensor": (e,)}[layout]
        s = s.reshape(want) if s.numel() == math.prod(want) else None
        if s is None or s.dtype != torch.float32:
            return None
        out.append(Fp8Weights(w, s, layout))
    return out[0], out[1]
