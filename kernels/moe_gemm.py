"""Triton grouped GEMM for MoE experts (bf16), tiled the way vLLM's fused_moe kernel is.

Tokens are sorted by expert and each expert's rows are padded to BLOCK_M (``align``), so
every BLOCK_M x BLOCK_N program multiplies rows of one expert; an expert with c tokens costs
ceil(c / BLOCK_M) row tiles, which is where the latency steps that calibration samples come
from. ``moe_ffn`` runs a whole expert FFN: gate/up GEMM, SiLU-and-mul, down GEMM weighted by
the router, sum over top-k.

Weights use vLLM's FusedMoE layout: ``w13: [experts, 2 * intermediate, hidden]``,
``w2: [experts, hidden, intermediate]``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# inside compile_ahead(): launch() compiles the kernel for its arguments and runs nothing
_COMPILE_ONLY: ContextVar[bool] = ContextVar("vllm_gem_compile_only", default=False)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); inside compile_ahead(), only its compile for these arguments."""
    if _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def compile_ahead(threads: int) -> Iterator[bool]:
    """Yields True where it works: then every launch() within compiles its kernel on `threads`
    threads (Triton's AsyncCompileMode) and runs nothing, and on exit every compile has
    finished, so the same calls afterwards run without compiling. Why: Triton compiles a
    kernel at its first launch, one at a time; a first calibration on a machine spent most of
    its 6-12 s there (docs/calibration.md). Yields False (nothing to do within) with fewer than
    2 threads, under Triton's interpreter, or on a Triton without AsyncCompileMode."""
    mode = getattr(triton, "AsyncCompileMode", None)
    if threads < 2 or mode is None or os.environ.get("TRITON_INTERPRET") == "1":
        yield False
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="gem-compile") as pool, mode(pool):
        token = _COMPILE_ONLY.set(True)
        try:
            yield True
        finally:
            _COMPILE_ONLY.reset(token)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    GROUP_M=self.group_m, num_warps=self.num_warps, num_stages=self.num_stages)


# Autotune table for H100/H200 (bf16), keyed by the mean rows per expert of the call
# (tokens * top_k / experts): that, not the token count, decides how full a BLOCK_M tile gets
# for any expert count. Each tile is the fastest of `benchmarks/kernels.py --search` on H200
# (docs/results/2026-11-23-kernels-h200x2/kernels-search.json) at every measured point of its range, for
# Qwen3-30B-A3B, DeepSeek-V3 and Mixtral shapes alike (r = 0.06-1, 4-16, 64-1024). No point
# was measured between 16 and 64 rows: that entry is vLLM's tuned H200 tile for Qwen3-30B-A3B
# at 512 tokens (fused_moe/configs/E=128,N=768,device_name=NVIDIA_H200.json).
TILE_TABLE: list[tuple[float, TileConfig]] = [
    (1, TileConfig(16, 64, 128, 1, 4, 3)),       # a row or less per expert: stream the weights
    (16, TileConfig(32, 128, 128, 1, 4, 3)),
    (32, TileConfig(64, 128, 64, 1, 4, 3)),
    (float("inf"), TileConfig(128, 256, 64, 16, 8, 4)),  # compute-bound
]
# Calibration times every load with one fixed tile, so the latency model has one BLOCK_M.
CALIBRATION_TILE = TileConfig(64, 128, 64, 1, 4, 3)


def select_config(tokens: int, top_k: int, num_experts: int) -> TileConfig:
    """The tile for a call routing tokens x top_k rows over num_experts experts."""
    rows_per_expert = tokens * top_k / num_experts
    return next(cfg for limit, cfg in TILE_TABLE if rows_per_expert <= limit)


@triton.jit
def tile_of(pid, max_padded, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), in grouped order: GROUP_M row tiles share the
    weight tiles they read, through L2."""
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % size_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // size_m
    return pid_m, pid_n


@triton.jit
def tile_rows(pid_m, sorted_ids_ptr, block_expert_ptr, num_valid, ONE_ROW_TILES: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Row tile pid_m -> (rows [BLOCK_M] (token, k) ids as int64, which are real, its expert)."""
    if ONE_ROW_TILES:
        rows = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_valid).to(tl.int64)
    else:
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return rows, rows < num_valid, tl.load(block_expert_ptr + pid_m).to(tl.int64)


@triton.jit
def moe_grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weight_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    N, K, num_valid, max_padded,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, ONE_ROW_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[row] = A[row // TOP_K] @ B[expert(row)]^T for the rows in one BLOCK_M x BLOCK_N tile.

    sorted_ids: [max_padded] flattened (token, k) row ids grouped by expert, padded per
    expert to BLOCK_M with num_valid; block_expert: [max_padded / BLOCK_M] expert of each
    row tile. Row tiles past num_padded (the real padded length) exit at once.
    ONE_ROW_TILES: no sorted_ids; row tile t holds row t alone and block_expert is topk_ids
    itself (vLLM's naive block assignment for very sparse batches).
    """
    pid_m, pid_n = tile_of(tl.program_id(0), max_padded, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows, row_ok, expert = tile_rows(pid_m, sorted_ids_ptr, block_expert_ptr, num_valid, ONE_ROW_TILES,
                                     BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows[:, None] // TOP_K) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@dataclass(frozen=True)
class Alignment:
    """Rows grouped by expert and padded to block_m (what vLLM's moe_align_block_size makes).

    sorted_ids: [max_padded], or None for one row per tile (row t in tile t);
    block_expert: [max_padded // block_m]; num_padded: [1]
    """

    sorted_ids: torch.Tensor | None
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    block_m: int

    @property
    def max_padded(self) -> int:
        """Rows the GEMM grids cover (tiles past num_padded exit at once)."""
        return self.block_expert.numel() * self.block_m


# vLLM's rule (fused_moe's naive_block_assignment, only without an expert_map, i.e. not under
# expert parallelism): when rows * 4 <= experts, nearly every row has its own expert, so
# sorting buys nothing: tile t is row t and the align kernels are skipped
ONE_ROW_TILE_SPARSITY = 4


# Up to this many (token, k) rows, align is one program (one launch: decode batches); above
# it, three kernels spread the counting and the scatter over the GPU.
ONE_PROGRAM_ALIGN_ROWS = 1024


@triton.jit
def _pad_and_map_tiles(counts, e, e_ok, cursor_ptr, block_expert_ptr, num_padded_ptr, num_experts,
                       num_tiles, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """counts: [BLOCK_E] rows per expert -> each expert's first padded row (cursor_ptr, the
    scatter's cursor), the expert of every row tile, and the padded length."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + e, end - padded, mask=e_ok)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        # tile t belongs to the first expert whose padded rows end after t * BLOCK_M
        before = tl.sum(((end[None, :] <= t[:, None] * BLOCK_M) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(block_expert_ptr + t, tl.minimum(before, num_experts - 1), mask=t < num_tiles)


@triton.jit
def align_one_program_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                             num_valid, num_experts, max_padded, num_tiles, BLOCK_M: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_P: tl.constexpr):
    """All of align in one program, for at most BLOCK_R rows: count, pad, map tiles, scatter."""
    r = tl.arange(0, BLOCK_R)
    ok = r < num_valid
    expert = tl.load(ids_ptr + r, mask=ok, other=0).to(tl.int32)
    e = tl.arange(0, BLOCK_E)
    _pad_and_map_tiles(tl.histogram(expert, BLOCK_E, mask=ok), e, e < num_experts, cursor_ptr,
                       block_expert_ptr, num_padded_ptr, num_experts, num_tiles, BLOCK_M, BLOCK_T)
    for p0 in range(0, max_padded, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tl.store(sorted_ids_ptr + p, num_valid, mask=p < max_padded)
    tl.debug_barrier()  # cursors and padding markers are written before any row is placed
    pos = tl.atomic_add(cursor_ptr + expert, 1, mask=ok)
    tl.store(sorted_ids_ptr + pos, r, mask=ok)


@triton.jit
def count_rows_kernel(ids_ptr, counts_ptr, sorted_ids_ptr, num_valid, max_padded, BLOCK: tl.constexpr):
    """counts[e] += rows routed to e; sorted_ids[:] = num_valid (the padding marker)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sorted_ids_ptr + offs, num_valid, mask=offs < max_padded)
    ok = offs < num_valid
    expert = tl.load(ids_ptr + offs, mask=ok, other=0)
    tl.atomic_add(counts_ptr + expert, 1, mask=ok)


@triton.jit
def expert_tiles_kernel(counts_ptr, block_expert_ptr, num_padded_ptr, num_experts, num_tiles,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: pad the counts, map the tiles (the counts become the scatter's cursors)."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    _pad_and_map_tiles(tl.load(counts_ptr + e, mask=e_ok, other=0), e, e_ok, counts_ptr,
                       block_expert_ptr, num_padded_ptr, num_experts, num_tiles, BLOCK_M, BLOCK_T)


@triton.jit
def scatter_rows_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, num_valid, BLOCK: tl.constexpr):
    """sorted_ids[next free row of expert(r)] = r. Row order inside an expert does not matter:
    each output row is its own dot products."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_valid
    expert = tl.load(ids_ptr + offs, mask=ok, other=0)
    pos = tl.atomic_add(cursor_ptr + expert, 1, mask=ok)
    tl.store(sorted_ids_ptr + pos, offs, mask=ok)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_parallel: bool = False
          ) -> Alignment:
    """topk_ids: [tokens, top_k] expert of each (token, k), int32 or int64 -> Alignment.

    No host sync (CUDA-graph safe), like vLLM's moe_align_block_size: one row per tile and no
    kernel when rows * ONE_ROW_TILE_SPARSITY <= experts, one kernel for up to
    ONE_PROGRAM_ALIGN_ROWS rows, else three. expert_parallel: always sort, as vLLM does under
    expert parallelism (its one-row tiles need expert_map None); calibration times that path.
    """
    flat = topk_ids.reshape(-1)  # the kernels read int32 or int64 ids: no conversion launch
    num_valid = flat.numel()
    if not expert_parallel and num_valid * ONE_ROW_TILE_SPARSITY <= num_experts:
        num_padded = torch.full((1,), num_valid * block_m, dtype=torch.int32, device=flat.device)
        return Alignment(None, flat, num_padded, block_m)
    # at most min(experts, rows) experts get rows, each padded by < block_m: with few tokens
    # this shrinks both GEMMs' grids from every expert's worst case (vLLM's align does the same)
    max_padded = triton.cdiv(num_valid + min(num_experts, num_valid) * (block_m - 1), block_m) * block_m
    num_tiles = max_padded // block_m
    dev = flat.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_tiles, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(num_experts)
    if num_valid <= ONE_PROGRAM_ALIGN_ROWS:
        cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)  # written before use
        launch(align_one_program_kernel, (1,), flat, cursor, sorted_ids, block_expert, num_padded,
               num_valid, num_experts, max_padded, num_tiles, BLOCK_M=block_m,
               BLOCK_R=triton.next_power_of_2(max(num_valid, 16)),
               BLOCK_E=block_e, BLOCK_T=64, BLOCK_P=1024)
        return Alignment(sorted_ids, block_expert, num_padded, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)  # then each expert's cursor
    block = 1024
    launch(count_rows_kernel, (triton.cdiv(max_padded, block),), flat, counts, sorted_ids, num_valid,
           max_padded, BLOCK=block)
    launch(expert_tiles_kernel, (1,), counts, block_expert, num_padded, num_experts, num_tiles,
           BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_T=64)
    launch(scatter_rows_kernel, (triton.cdiv(num_valid, block),), flat, counts, sorted_ids, num_valid,
           BLOCK=block)
    return Alignment(sorted_ids, block_expert, num_padded, block_m)


@triton.jit
def silu_and_mul_kernel(h_ptr, out_ptr, inter, stride_h, stride_out, BLOCK: tl.constexpr):
    """out[r] = silu(h[r, :inter]) * h[r, inter:] in float32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < inter
    gate = tl.load(h_ptr + row * stride_h + col, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + inter + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + col, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
             mask=ok)


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """h: [rows, 2 * inter] -> silu(h[:, :inter]) * h[:, inter:]: [rows, inter]."""
    rows, inter = h.shape[0], h.shape[1] // 2
    act = torch.empty((rows, inter), dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(inter))
    launch(silu_and_mul_kernel, (rows, triton.cdiv(inter, block)), h, act, inter, h.stride(0),
           act.stride(0), BLOCK=block)
    return act


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, al: Alignment, top_k: int, num_valid: int,
                 cfg: TileConfig, out: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[row] = a[row // top_k] @ w[expert(row)].T (x weights[row]).

    a: [rows_a, K]; w: [experts, N, K]; out: [num_valid, N]; weights: [num_valid] or None
    """
    assert cfg.block_m == al.block_m
    n, k = w.shape[1], w.shape[2]
    max_padded = al.max_padded
    one_row_tiles = al.sorted_ids is None
    grid = (triton.cdiv(max_padded, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    launch(
        moe_grouped_gemm_kernel, grid, a, w, out, weights if weights is not None else out,
        al.block_expert if one_row_tiles else al.sorted_ids, al.block_expert, al.num_padded,
        n, k, num_valid, max_padded,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        TOP_K=top_k, MUL_WEIGHT=weights is not None, ONE_ROW_TILES=one_row_tiles, **cfg.kwargs())
    return out


def moe_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, cfg: TileConfig | None = None, al: Alignment | None = None
            ) -> torch.Tensor:
    """A MoE layer's expert part: sum_k w_k * down(silu(gate(x)) * up(x)) over the top-k experts.

    x: [tokens, hidden]; w13: [experts, 2*inter, hidden]; w2: [experts, hidden, inter];
    topk_weights, topk_ids: [tokens, top_k] -> [tokens, hidden]
    """
    tokens, top_k = topk_ids.shape
    num_valid = tokens * top_k
    cfg = cfg or select_config(tokens, top_k, w13.shape[0])
    al = al or align(topk_ids, w13.shape[0], cfg.block_m)
    inter = w2.shape[2]
    h = torch.empty((num_valid, 2 * inter), dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, al, top_k, num_valid, cfg, h)
    act = silu_and_mul(h)
    y = torch.empty((num_valid, w2.shape[1]), dtype=x.dtype, device=x.device)
    # router weights stay float32: the kernel scales its float32 accumulator, as vLLM's does
    grouped_gemm(act, w2, al, 1, num_valid, cfg, y, weights=topk_weights.reshape(-1))
    return y.view(tokens, top_k, -1).sum(1)


def moe_ffn_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The same computation in plain torch, float32, one expert at a time (the reference)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, kk = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w13[e].float().T
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, topk_weights[tok, kk].float()[:, None] * (a @ w2[e].float().T))
    return out
