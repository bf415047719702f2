import json
from pathlib import Path

import numpy as np
import pytest

from vllm_gem.errors import GemInputError
from vllm_gem.evaluate import bundled_trace
from vllm_gem.traces import SyntheticParams, import_harmoeny, import_vllm_eplb, synthetic_trace

SHARED = Path(__file__).resolve().parents[2] / "shared/data/routing-traces/harmoeny"


def write_harmoeny(root: Path, ranks=2, layers=3, experts=5, iters=2):
    rng = np.random.default_rng(0)
    (root).mkdir(parents=True)
    (root / "data.json").write_text(json.dumps({"model_name": "toy/moe", "batch_size": 8}))
    truth = rng.integers(0, 50, (iters, ranks, layers, experts))
    for r in range(ranks):
        (root / str(r)).mkdir()
        for ly in range(layers):
            lines = ["iteration,latency (ms),expert distribution"]
            lines += [f'{i},1.0,"{truth[i, r, ly].tolist()}"' for i in range(iters)]
            (root / str(r) / f"moe_layer-{ly}.csv").write_text("\n".join(lines) + "\n")
    return truth


def test_harmoeny_import(tmp_path):
    truth = write_harmoeny(tmp_path / "toy")
    tr = import_harmoeny(tmp_path / "toy")
    assert tr.model == "toy/moe" and tr.shape == (4, 3, 5)
    np.testing.assert_array_equal(tr.loads, truth.reshape(4, 3, 5))  # step = iter * ranks + rank


def test_harmoeny_bad_input(tmp_path):
    write_harmoeny(tmp_path / "toy")
    (tmp_path / "toy/1/moe_layer-2.csv").unlink()
    with pytest.raises(GemInputError, match=r"1/moe_layer-2.csv: file: is missing"):
        import_harmoeny(tmp_path / "toy")
    with pytest.raises(GemInputError, match="has no rank sub-folders"):
        import_harmoeny(tmp_path / "nothing")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared HarMoEny traces not present")
def test_bundled_trace_equals_fresh_import():
    np.testing.assert_array_equal(bundled_trace("qwen").loads, import_harmoeny(SHARED / "qwen").loads)


def test_bundled_real_traces_are_skewed():
    tr = bundled_trace("qwen")
    assert tr.shape == (12, 24, 60)
    share = tr.loads.sum(0).max(1) / tr.loads.sum(0).mean(1)
    assert share.mean() > 3  # hottest expert several times the mean


def test_vllm_eplb_import_folds_replicas(tmp_path):
    win = np.zeros((5, 2, 6), dtype=np.int32)
    win[:3] = np.arange(12).reshape(2, 6)
    p2l = np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 3]])
    np.savez(tmp_path / "eplb.npz", expert_load_window=win, physical_to_logical_map=p2l)
    tr = import_vllm_eplb(tmp_path / "eplb.npz")
    assert tr.shape == (3, 2, 4)  # all-zero ring-buffer slots dropped
    assert tr.loads[0, 0].tolist() == [0 + 4, 1 + 5, 2, 3]
    assert tr.loads[0, 1].tolist() == [9, 8, 7, 6 + 10 + 11]
    np.savez(tmp_path / "bad.npz", expert_load_window=win)
    with pytest.raises(GemInputError, match="physical_to_logical_map: is missing"):
        import_vllm_eplb(tmp_path / "bad.npz")
    # an F-ordered window reads the same; a member cut short is one error naming it
    np.savez(tmp_path / "f.npz", expert_load_window=np.asfortranarray(win), physical_to_logical_map=p2l)
    assert np.array_equal(import_vllm_eplb(tmp_path / "f.npz").loads, tr.loads)
    import zipfile
    with zipfile.ZipFile(tmp_path / "eplb.npz") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data[:-8] if n.startswith("expert_load_window") else data)
    with pytest.raises(GemInputError, match=r"expert_load_window: does not hold the 240 bytes its shape \(5, 2, 6\)"):
        import_vllm_eplb(tmp_path / "cut.npz")


def test_synthetic_records_params_and_has_bursts():
    p = SyntheticParams(steps=300, layers=2, experts=32, temporal_groups=3, group_size=2, seed=3)
    tr = synthetic_trace(p)
    assert tr.params["seed"] == 3 and tr.params["burst_boost"] == p.burst_boost
    assert tr.shape == (300, 2, 32)
    np.testing.assert_array_equal(tr.loads, synthetic_trace(p).loads)  # deterministic
    c = tr.loads[:, 0]
    cv = c.std(0) / np.maximum(c.mean(0), 1e-9)
    assert cv.max() > 2 * np.median(cv)  # some experts are much burstier than the rest
    assert (tr.loads.sum(2) > 0).all()
