import importlib.util

import numpy as np
import pytest

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
