"""Probe one moe_ffn call per process (an illegal access poisons the CUDA context): the one-row
tile path against the sorted one, int32 against int64 ids, eager against a CUDA graph.
Session 7's `kernels.py` hit an illegal memory access at its first DeepSeek-shaped call.
    usage: python benchmarks/gpu/kernel_probe.py            (all cases, one subprocess each)
           python benchmarks/gpu/kernel_probe.py SHAPE TOKENS IDS MODE PATH   (one case)"""
import os
import subprocess
import sys

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "deepseek-v3": (7168, 2048, 32, 8),
          "mixtral": (4096, 14336, 8, 2)}


def one(shape: str, tokens: int, ids_dtype: str, mode: str, path: str) -> None:
    import torch

    from vllm_gem.kernels.moe_gemm import align, moe_ffn, moe_ffn_reference, select_config
    h, i, e, k = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=bf, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=bf, generator=g) / i ** 0.5
    x = torch.randn(tokens, h, device="cuda", dtype=bf, generator=g)
    ids = torch.rand(tokens, e, device="cuda", generator=g).topk(k, dim=1).indices
    ids = ids.to(getattr(torch, ids_dtype))
    w = torch.rand(tokens, k, device="cuda", generator=g)
    cfg = select_config(tokens, k, e)
    sort = path == "sorted"
    fn = lambda: moe_ffn(x, w13, w2, w, ids, cfg, align(ids, e, cfg.block_m, expert_parallel=sort))  # noqa: E731
    torch.cuda.synchronize()  # the side stream below does not wait for the inputs otherwise
    if mode == "graph":
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
    else:
        out = fn()
    torch.cuda.synchronize()
    ref = moe_ffn_reference(x, w13, w2, w, ids)
    print(f"rel err {((out.float() - ref).norm() / ref.norm()).item():.2e} one_row "
          f"{align(ids, e, cfg.block_m, expert_parallel=sort).sorted_ids is None} cfg {cfg}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1], int(sys.argv[2]), *sys.argv[3:6])
        sys.exit(0)
    variants = (("int32", "graph", "one-row"), ("int64", "graph", "one-row"),
                ("int32", "eager", "one-row"), ("int32", "graph", "sorted"))
    cases = [(s, 1, *c) for s in SHAPES for c in variants]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for c in cases:
        r = subprocess.run([sys.executable, __file__, *map(str, c)], capture_output=True, text=True, env=env,
                           timeout=120)
        last = (r.stdout.strip().splitlines() or [""])[-1] if r.returncode == 0 else \
            " | ".join(line for line in r.stderr.splitlines() if "Error" in line or "error" in line)[-300:]
        print(f"{' '.join(map(str, c)):40s} rc {r.returncode}: {last}", flush=True)
