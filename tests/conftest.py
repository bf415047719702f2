import importlib.util

import numpy as np
import pytest
from hypothesis import strategies as st

from vllm_gem.latency import GroupModel


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    cuda, vllm = _has_cuda(), _has_vllm()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "vllm" in item.keywords and not vllm:
            item.add_marker(pytest.mark.skip(reason="needs the vllm package"))


def random_group(rng: np.random.Generator, ranks: int, block_m: int = 4) -> GroupModel:
    """Ranks with random, non-proportional latency coefficients (unrelated machines)."""
    coef = np.column_stack([rng.uniform(0, 5, ranks), rng.uniform(0, 3, ranks),
                            rng.uniform(0, 2, ranks), rng.uniform(0.01, 0.5, ranks)])
    return GroupModel(coef, block_m, [f"r{i}" for i in range(ranks)])


@st.composite
def load_cases(draw, max_ranks: int, max_experts: int, max_redundant: int, max_steps: int,
               rate: float, hot: float, kinds: tuple[str, ...] = ("random", "zeros", "hot")):
    """(loads [steps, layers, experts], group, num_physical) for fuzzing planners: any
    shapes, replicas, more ranks than experts, and the kinds asked for: random loads, all
    zeros, one hot expert holding every token, or a single step."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    ranks = draw(st.integers(1, max_ranks))
    experts = draw(st.integers(1, max_experts))
    phys = experts + draw(st.integers(0, max_redundant))
    phys += (-phys) % ranks  # a multiple of the ranks, so at least one slot each
    steps, layers = draw(st.integers(1, max_steps)), draw(st.integers(1, 3))
    kind = draw(st.sampled_from(kinds))
    loads = rng.poisson(rng.uniform(0, rate), (steps, layers, experts)).astype(float)
    if kind == "zeros":
        loads[:] = 0
    elif kind == "hot":
        loads[:] = 0
        loads[..., rng.integers(experts)] = hot
    elif kind == "one-step":
        loads = loads[:1]
    return loads, random_group(rng, ranks), phys


def gpu_moe_layer(hidden: int, inter: int, experts: int, top_k: int, tokens: int):
    """Random bf16 experts and routed inputs on the GPU, seeded by `tokens`: (w13 [experts,
    2*inter, hidden], w2 [experts, hidden, inter], x [tokens, hidden], topk ids and weights
    [tokens, top_k]) for the kernels' GPU tests."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(tokens)
    bf = torch.bfloat16
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=bf, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=bf, generator=g) / inter ** 0.5
    x = torch.randn(tokens, hidden, device="cuda", dtype=bf, generator=g)
    ids = torch.rand(tokens, experts, device="cuda", generator=g).topk(top_k, dim=1).indices
    w = torch.rand(tokens, top_k, device="cuda", generator=g)
    return w13, w2, x, ids, w
