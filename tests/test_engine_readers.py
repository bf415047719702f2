"""Our exported files through the engines' own reader code (SGLang 0.5.23, vllm-ascend 0.23),
from their published packages. The README's test set-up installs both without their
dependencies into .engine-readers/ (neither runs here: vllm-ascend's package needs torch_npu,
SGLang's server a GPU); the readers' own modules import with torch and vLLM alone."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_gem.cli import main

READERS = Path(os.environ.get("GEM_ENGINE_READERS", Path(__file__).resolve().parent.parent / ".engine-readers"))


def _plan_and_export(tmp_path, fmt, *plan_args):
    placement = tmp_path / "p.json"
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", *plan_args, "-o", str(placement)]) == 0
    out = tmp_path / f"{fmt}.json"
    assert main(["export", str(placement), "--to", fmt, "-o", str(out)]) == 0
    return np.array(json.loads(placement.read_text())["phys_to_log"]), out


def test_vllm_ascend_reads_our_export_as_we_wrote_it(tmp_path):
    path = READERS / "vllm_ascend" / "eplb" / "core" / "eplb_utils.py"
    if not path.exists():
        pytest.skip(f"vllm-ascend is not installed in {READERS} (the README's test set-up puts it there)")
    pytest.importorskip("vllm")  # the reader logs through vllm.logger
    # the module file itself: vllm_ascend/__init__.py imports torch_npu, which needs an Ascend NPU
    spec = importlib.util.spec_from_file_location("ascend_eplb_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    p2l, exported = _plan_and_export(tmp_path, "vllm-ascend", "--num-physical", "72", "--one-copy-per-rank")
    for layer, row in enumerate(p2l):
        placement, count = utils.expert_file_to_tensor(str(exported), layer)
        assert count == 72 and placement.tolist() == row.reshape(4, 18).tolist()


def test_sglang_reads_our_export_as_we_wrote_it(tmp_path):
    if not (READERS / "sglang").exists():
        pytest.skip(f"sglang is not installed in {READERS} (the README's test set-up puts it there)")
    sys.path.insert(0, str(READERS))
    try:
        location = importlib.import_module("sglang.srt.eplb.expert_location")
    finally:
        sys.path.remove(str(READERS))
    import torch
    p2l, exported = _plan_and_export(tmp_path, "sglang", "--num-physical", "72")
    data = json.loads(exported.read_text())  # as compute_initial_expert_location_metadata loads it
    assert set(data) == {"physical_to_logical_map"}
    # what init_by_mapping builds from it (without a server's model config and device)
    l2p = location._compute_logical_to_all_physical_map(
        physical_to_logical_map=torch.tensor(data["physical_to_logical_map"]),
        num_logical_experts=60, ep_size=4, moe_ep_rank=None)
    assert l2p.shape[:2] == (p2l.shape[0], 60)  # [layers, experts, most copies], padded with -1
    for layer, row in enumerate(p2l):
        for e in range(60):
            slots = l2p[layer, e]
            assert slots[slots >= 0].tolist() == np.flatnonzero(row == e).tolist()
