"""Triton fp8 (e4m3) grouped GEMM for MoE experts, with the scale layouts vLLM serves.

The same tiling as the bf16 kernel (`moe_gemm`): rows sorted by expert and padded to BLOCK_M
by ``align``, one BLOCK_M x BLOCK_N program per tile, so an expert with c tokens costs
ceil(c / BLOCK_M) row tiles. What changes is the data: weights and activations are
float8_e4m3fn, each with float32 scales, and the dot products run on fp8 tensor cores.

Scale layouts (``SCALE_LAYOUTS``), as vLLM's fp8 fused_moe takes them:

- ``block``: weight scales per 128 x 128 block, ``w_scale: [experts, N / 128, K / 128]``
  (DeepSeek-V3/R1 and Qwen3 FP8 checkpoints, vLLM's ``weight_scale_inv``); activations
  quantized per token and group of 128 columns, ``a_scale: [rows, K / 128]``. The kernel
  applies both scales once per BLOCK_K (= 128) step.
- ``channel``: one weight scale per expert and output channel, ``w_scale: [experts, N]``;
  activations per token, ``a_scale: [rows, 1]``. Applied once, after the K loop.
- ``tensor``: one weight scale per expert, ``w_scale: [experts]``; one dynamic activation
  scale for the whole call, ``a_scale: [1]`` (what ``--quantization fp8`` serves).

Weights use vLLM's FusedMoE layout: ``w13: [experts, 2 * intermediate, hidden]``,
``w2: [experts, hidden, intermediate]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .moe_gemm import Alignment, TileConfig, align, launch, silu_and_mul, tile_of, tile_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
GROUP = 128  # block layout: weight blocks GROUP x GROUP, activation groups of GROUP columns
SCALE_LAYOUTS = ("block", "channel", "tensor")

# Autotune tables (fp8), keyed like the bf16 one by mean rows per expert (tokens * top_k /
# experts). BLOCK_K is 128 everywhere: one block-scale step per K tile, and fp8 tensor cores
# take K in 32-byte steps. Each tile is the fastest of `benchmarks/kernels.py --dtype ...
# --search` on H100 at the Qwen3-30B-A3B (r = 0.06 ... 256) and DeepSeek-V3 shapes (r = 0.03 ...
# 128; docs/calibration.md): short row tiles (swapped, see use_swap_ab) up to a few rows per
# expert, as vLLM's fp8 defaults; 128-row tiles only without block scales (whose per-K-tile
# rescaling favours 64), and only from about 100 rows per expert: at 64 the 64-row tile was
# fastest, at 128 the 128-row one (15% faster than the 64-row tile).
FP8_TILE_TABLE: list[tuple[float, TileConfig]] = [  # per-tensor and per-channel scales
    (0.5, TileConfig(16, 64, 128, 1, 4, 4)),
    (8, TileConfig(16, 64, 128, 1, 4, 3)),
    (32, TileConfig(32, 128, 128, 16, 4, 3)),
    (96, TileConfig(64, 128, 128, 32, 4, 3)),
    (float("inf"), TileConfig(128, 128, 128, 16, 8, 3)),
]
FP8_BLOCK_TILE_TABLE: list[tuple[float, TileConfig]] = [  # 128x128 block scales
    (0.5, TileConfig(16, 64, 128, 1, 4, 4)),
    (8, TileConfig(16, 64, 128, 1, 4, 3)),
    (32, TileConfig(32, 128, 128, 16, 4, 3)),
    (float("inf"), TileConfig(64, 128, 128, 16, 4, 4)),
]
# Calibration times every load with one fixed tile per scale layout, so the latency model has
# one BLOCK_M. Each is the tile whose times the model (fixed + experts + row tiles + tokens)
# followed best on loads it was not fitted on, in two runs of
# benchmarks/studies/fp8_calibration_tile.py on H100 (held-out RMS error; 8 tiles tried):
# block 2.4-3.0%, channel 3.5-3.8%, tensor 2.8%. The 64x128 tile with 4 stages erred 8-9%
# (block, channel): its gate/up GEMM's memory-bound tiles fill the SMs in rounds, and a load
# just past a round costs a whole tile's time more, a step the model has no term for.
FP8_CALIBRATION_TILES: dict[str, TileConfig] = {
    "block": TileConfig(32, 64, 128, 16, 4, 3),
    "channel": TileConfig(64, 128, 128, 16, 8, 3),
    "tensor": TileConfig(64, 128, 128, 16, 4, 3),
}


def select_fp8_config(tokens: int, top_k: int, num_experts: int, layout: str = "block") -> TileConfig:
    """The fp8 tile for a call routing tokens x top_k rows over num_experts experts."""
    rows_per_expert = tokens * top_k / num_experts
    table = FP8_BLOCK_TILE_TABLE if layout == "block" else FP8_TILE_TABLE
    return next(cfg for limit, cfg in table if rows_per_expert <= limit)


@dataclass(frozen=True)
class Fp8Weights:
    """One weight tensor in fp8 with its scales.

    q: [experts, N, K] float8_e4m3fn; scale: float32, [experts, N / 128, K / 128] (block),
    [experts, N] (channel) or [experts] (tensor)
    """

    q: torch.Tensor
    scale: torch.Tensor
    layout: str

    def dequantize(self) -> torch.Tensor:
        """[experts, N, K] float32: q times its scale (the reference's weights)."""
        return self.q.float() * _broadcast_scale(self.scale.float(), self.layout, self.q.shape[1:])


def _broadcast_scale(scale: torch.Tensor, layout: str, nk: tuple[int, int]) -> torch.Tensor:
    """A weight scale (Fp8Weights.scale) -> a tensor that broadcasts against [experts, N, K]."""
    n, k = nk
    if layout == "block":
        return scale.repeat_interleave(GROUP, 1)[:, :n].repeat_interleave(GROUP, 2)[:, :, :k]
    return scale[:, :, None] if layout == "channel" else scale[:, None, None]


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    # an all-zero block keeps a tiny positive scale: q = 0, no 0/0
    return (amax.float() / FP8_MAX).clamp(min=1e-12)


def quantize_weights(w: torch.Tensor, layout: str) -> Fp8Weights:
    """w: [experts, N, K] (any float dtype) -> Fp8Weights in `layout` (dynamic, from |w|max).

    How fp8 checkpoints are made (offline, once): used for random calibration weights and
    tests. A few experts at a time, so the float32 temporaries stay small (DeepSeek-V3's 256
    experts' w13 would take 30 GB at once).
    """
    if layout not in SCALE_LAYOUTS:
        raise ValueError(f"fp8 scale layout {layout!r}, expected one of {SCALE_LAYOUTS}")
    e, n, k = w.shape
    parts = [_quantize_experts(w[i:i + 8], layout) for i in range(0, e, 8)]
    return Fp8Weights(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]), layout)


def _quantize_experts(w: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [e, N, K] -> (q [e, N, K] fp8, scale as Fp8Weights.scale)."""
    e, n, k = w.shape
    wf = w.float()
    if layout == "block":
        nb, kb = triton.cdiv(n, GROUP), triton.cdiv(k, GROUP)
        padded = torch.zeros(e, nb * GROUP, kb * GROUP, device=w.device)
        padded[:, :n, :k] = wf
        scale = _scale_of(padded.view(e, nb, GROUP, kb, GROUP).abs().amax(dim=(2, 4)))  # [e, nb, kb]
    elif layout == "channel":
        scale = _scale_of(wf.abs().amax(dim=2))  # [e, n]
    else:
        scale = _scale_of(wf.abs().amax(dim=(1, 2)))  # [e]
    full = _broadcast_scale(scale, layout, (n, k))
    return (wf / full).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale.contiguous()


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, amax_ptr, rows, K, stride_x, stride_q, stride_sm, stride_sk,
                         STATIC: tl.constexpr, GROUP_K: tl.constexpr, ROWS: tl.constexpr):
    """q[r, g] = x[r, g] / scale for ROWS rows and one GROUP_K-column group g.

    STATIC: one scale for the whole call, |x|max / 448 from amax_ptr (per tensor); the first
    program writes it to scale_ptr. Otherwise each row's group gets its own |x|max / 448,
    written to scale[r, g] (per token group, or per token when GROUP_K >= K).
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    col = g * GROUP_K + tl.arange(0, GROUP_K)
    ok = (r < rows)[:, None] & (col < K)[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.maximum(tl.load(amax_ptr) / 448.0, 1e-12)
        if tl.program_id(0) + g == 0:
            tl.store(scale_ptr, scale)
        q = tl.clamp(x / scale, -448.0, 448.0)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), 1) / 448.0, 1e-12)  # [ROWS]
        tl.store(scale_ptr + r * stride_sm + g * stride_sk, scale, mask=r < rows)
        q = tl.clamp(x / scale[:, None], -448.0, 448.0)
    tl.store(q_ptr + r[:, None].to(tl.int64) * stride_q + col[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)


@triton.jit
def abs_max_kernel(x_ptr, amax_ptr, rows, K, stride_x, GROUP_K: tl.constexpr, ROWS: tl.constexpr):
    """amax[0] = max(amax[0], |x|max of ROWS rows and one GROUP_K-column group): one atomic
    per program, as vLLM's dynamic per-tensor quantization (segmented max, then atomicMax)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.program_id(1) * GROUP_K + tl.arange(0, GROUP_K)
    ok = (r < rows)[:, None] & (col < K)[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), 1), 0))


def quantize_activations(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, K] -> (q [rows, K] fp8, scale): dynamic scales as vLLM quantizes MoE inputs.

    scale: [rows, K / 128] (block), [rows, 1] (channel: per token) or [1] (tensor)
    """
    rows, k = x.shape
    q = torch.empty((rows, k), dtype=FP8, device=x.device)
    if layout == "tensor":
        # one |x|max over the whole call, then one quantizing pass. The max is our own kernel:
        # torch's reduction changes strategy with the size (3.5 us at 1 row, 9.8 at 32, 9 at
        # 64 on H100), a step the latency model could not follow (11% held-out error)
        group, static, s_m, s_k = min(triton.next_power_of_2(k), 1024), True, 0, 0
        amax = torch.zeros(1, dtype=torch.float32, device=x.device)
        scale = torch.empty(1, dtype=torch.float32, device=x.device)
        if rows:
            max_rows = max(1, 16384 // group)  # big tiles: few atomics on the one address
            launch(abs_max_kernel, (triton.cdiv(rows, max_rows), triton.cdiv(k, group)),
                   x, amax, rows, k, x.stride(0), GROUP_K=group, ROWS=max_rows)
    else:
        group = GROUP if layout == "block" else triton.next_power_of_2(k)
        scale = torch.empty((rows, triton.cdiv(k, group)), dtype=torch.float32, device=x.device)
        amax, static, s_m, s_k = scale, False, scale.stride(0), scale.stride(1)
    block_rows = max(1, 4096 // group)  # tiles of about 4096 values
    if rows:
        launch(quantize_rows_kernel, (triton.cdiv(rows, block_rows), triton.cdiv(k, group)),
               x, q, scale, amax, rows, k, x.stride(0), q.stride(0), s_m, s_k,
               STATIC=static, GROUP_K=group, ROWS=block_rows)
    return q, scale


@triton.jit
def moe_fp8_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, weight_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    N, K, num_valid, max_padded,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, ONE_ROW_TILES: tl.constexpr,
    BLOCK_SCALES: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[row] = (A[row // TOP_K] @ B[expert(row)]^T) x scales, fp8 in, float32 accumulation.

    sorted_ids, block_expert, num_padded: as moe_grouped_gemm_kernel's (an Alignment).
    BLOCK_SCALES: a_scale [rows_a, K / GROUP_K], b_scale [experts, N / GROUP_N, K / GROUP_K],
    applied every K tile (BLOCK_K == GROUP_K). Otherwise a_scale per row of A (stride_asm 0:
    one per tensor) and b_scale per expert and column (stride_bsn 0: one per expert),
    applied once after the K loop.
    SWAP_AB: compute the transposed tile, B @ A^T: [BLOCK_N, BLOCK_M]. Hopper's tensor-core
    instruction takes 64 rows, so a short row tile (BLOCK_M 16) wastes most of it unless the
    weights' BLOCK_N side takes that place (vLLM's fp8 kernel does the same).
    """
    pid_m, pid_n = tile_of(tl.program_id(0), max_padded, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows, row_ok, expert = tile_rows(pid_m, sorted_ids_ptr, block_expert_ptr, num_valid, ONE_ROW_TILES,
                                     BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = rows // TOP_K
    b_base = b_ptr + expert * stride_be
    if SWAP_AB:  # A^T tile [BLOCK_K, BLOCK_M], B tile [BLOCK_N, BLOCK_K]
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + a_rows[None, :] * stride_am
        b_ptrs = b_base + offs_n[:, None] * stride_bn + offs_k[None, :] * stride_bk
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # A tile [BLOCK_M, BLOCK_K], B^T tile [BLOCK_K, BLOCK_N]
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_scale_ptrs = a_scale_ptr + a_rows * stride_asm
    b_scale_ptrs = b_scale_ptr + expert * stride_bse
    if BLOCK_SCALES:
        b_scale_ptrs += (offs_n // GROUP_N) * stride_bsn

    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        if SWAP_AB:
            a = tl.load(a_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_SCALES:  # this K tile is one scale group: scale its partial product
            kg = (k * BLOCK_K) // GROUP_K
            a_s = tl.load(a_scale_ptrs + kg * stride_ask, mask=row_ok, other=0.0)
            b_s = tl.load(b_scale_ptrs + kg * stride_bsk, mask=n_ok, other=0.0)
            if SWAP_AB:
                acc += tl.dot(b, a) * b_s[:, None] * a_s[None, :]
            else:
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        elif SWAP_AB:
            acc = tl.dot(b, a, acc)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if not BLOCK_SCALES:  # one scale per row and per column: applied once
        a_s = tl.load(a_scale_ptrs, mask=row_ok, other=0.0)
        b_s = tl.load(b_scale_ptrs + offs_n * stride_bsn, mask=n_ok, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def use_swap_ab(cfg: TileConfig, device: torch.device) -> bool:
    """vLLM's rule (fused_moe.utils.enable_swap_ab): on Hopper, for row tiles under 64 and
    weight tiles of 64 or more."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and cfg.block_m < 64 and cfg.block_n >= 64)


def grouped_gemm_fp8(a: torch.Tensor, a_scale: torch.Tensor, w: Fp8Weights, al: Alignment, top_k: int,
                     num_valid: int, cfg: TileConfig, out: torch.Tensor,
                     weights: torch.Tensor | None = None, swap_ab: bool | None = None) -> torch.Tensor:
    """out[row] = dequant(a[row // top_k]) @ dequant(w[expert(row)]).T (x weights[row]).

    a: [rows_a, K] fp8 with a_scale from quantize_activations(layout=w.layout);
    out: [num_valid, N]; weights: [num_valid] float32 or None; swap_ab: None = use_swap_ab
    """
    assert cfg.block_m == al.block_m
    n, k = w.q.shape[1], w.q.shape[2]
    block = w.layout == "block"
    if block and cfg.block_k != GROUP:
        raise ValueError(f"block-scaled fp8 needs BLOCK_K == {GROUP} (one scale group per K tile), "
                         f"got {cfg.block_k}")
    s = w.scale
    if block:
        bs = (s.stride(0), s.stride(1), s.stride(2))
        as_ = (a_scale.stride(0), a_scale.stride(1))
    elif w.layout == "channel":
        bs = (s.stride(0), s.stride(1), 0)
        as_ = (a_scale.stride(0), 0)
    else:  # tensor: one scale per expert, one for all activation rows
        bs = (s.stride(0), 0, 0)
        as_ = (0, 0)
    swap = use_swap_ab(cfg, a.device) if swap_ab is None else swap_ab
    grid = (triton.cdiv(al.max_padded, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    one_row_tiles = al.sorted_ids is None
    launch(
        moe_fp8_gemm_kernel, grid, a, a_scale, w.q, s, out, weights if weights is not None else out,
        al.block_expert if one_row_tiles else al.sorted_ids, al.block_expert, al.num_padded,
        n, k, num_valid, al.max_padded,
        a.stride(0), a.stride(1), w.q.stride(0), w.q.stride(1), w.q.stride(2), out.stride(0), out.stride(1),
        *as_, *bs,
        TOP_K=top_k, MUL_WEIGHT=weights is not None, ONE_ROW_TILES=one_row_tiles,
        BLOCK_SCALES=block, GROUP_N=GROUP, GROUP_K=GROUP, SWAP_AB=swap, **cfg.kwargs())
    return out


def moe_ffn_fp8(x: torch.Tensor, w13: Fp8Weights, w2: Fp8Weights, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, cfg: TileConfig | None = None, al: Alignment | None = None,
                swap_ab: bool | None = None) -> torch.Tensor:
    """An fp8 MoE layer's expert part, as vLLM's fp8 fused_experts runs it: quantize x,
    gate/up GEMM, SiLU-and-mul, quantize again, down GEMM weighted by the router, sum over top-k.

    x: [tokens, hidden] bf16; w13: [experts, 2*inter, hidden] and w2: [experts, hidden, inter]
    in fp8 (same layout); topk_weights, topk_ids: [tokens, top_k] -> [tokens, hidden] in x.dtype
    """
    tokens, top_k = topk_ids.shape
    num_valid = tokens * top_k
    num_experts = w13.q.shape[0]
    cfg = cfg or select_fp8_config(tokens, top_k, num_experts, w13.layout)
    al = al or align(topk_ids, num_experts, cfg.block_m)
    inter = w2.q.shape[2]
    xq, xs = quantize_activations(x, w13.layout)
    h = torch.empty((num_valid, 2 * inter), dtype=x.dtype, device=x.device)
    grouped_gemm_fp8(xq, xs, w13, al, top_k, num_valid, cfg, h, swap_ab=swap_ab)
    aq, as_ = quantize_activations(silu_and_mul(h), w2.layout)
    y = torch.empty((num_valid, w2.q.shape[1]), dtype=x.dtype, device=x.device)
    grouped_gemm_fp8(aq, as_, w2, al, 1, num_valid, cfg, y, weights=topk_weights.reshape(-1), swap_ab=swap_ab)
    return y.view(tokens, top_k, -1).sum(1)


def moe_ffn_fp8_reference(x, w13: Fp8Weights, w2: Fp8Weights, topk_weights, topk_ids) -> torch.Tensor:
    """The fp8 layer in float32 torch, one expert at a time: dequantized weights, activations
    quantized the same way as the kernel's (so accumulation order is the one difference).
    -> [tokens, hidden] float32"""

    def fake_quant(a: torch.Tensor, layout: str) -> torch.Tensor:
        q, s = quantize_activations(a, layout)
        if layout == "block":
            s = s.repeat_interleave(GROUP, 1)[:, : a.shape[1]]
        return q.float() * s

    tokens, top_k = topk_ids.shape
    inter = w2.q.shape[2]
    w13f, w2f = w13.dequantize(), w2.dequantize()
    xf = fake_quant(x, w13.layout)
    flat = topk_ids.reshape(-1)
    h = torch.zeros((flat.numel(), 2 * inter), dtype=torch.float32, device=x.device)
    for e in flat.unique().tolist():
        r = (flat == e).nonzero(as_tuple=True)[0]
        h[r] = xf[r // top_k] @ w13f[e].T
    h = h.to(x.dtype)  # the kernel writes h in x.dtype
    a = (torch.nn.functional.silu(h[:, :inter].float()) * h[:, inter:].float()).to(x.dtype)
    af = fake_quant(a, w2.layout)  # over all rows at once: the tensor layout's scale is the call's
    y = torch.zeros((flat.numel(), w2.q.shape[1]), dtype=torch.float32, device=x.device)
    for e in flat.unique().tolist():
        r = (flat == e).nonzero(as_tuple=True)[0]
        y[r] = af[r] @ w2f[e].T
    return (y * topk_weights.reshape(-1, 1).float()).view(tokens, top_k, -1).sum(1)
