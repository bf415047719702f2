"""Placements out to and back from other engines' files (vllm_gem.export, `vllm-gem export`)."""

import json

import numpy as np
import pytest

from vllm_gem.cli import main
from vllm_gem.errors import GemInputError
from vllm_gem.export import placement_from_engine, read_engine_placement, to_engine
from vllm_gem.formats import Placement, encode, load, rank_of_slots


def _placement(p2l: np.ndarray, ranks: int) -> Placement:
    return Placement(num_logical_experts=int(p2l.max()) + 1, num_ranks=ranks, phys_to_log=p2l.tolist(),
                     rank_of_slot=rank_of_slots(p2l.shape[1], ranks), planner="test")


@pytest.mark.parametrize("engine", ["sglang", "vllm-ascend"])
def test_a_placement_round_trips_through_each_engines_file(tmp_path, engine):
    rng = np.random.default_rng(0)
    p2l = np.stack([rng.permutation(8) for _ in range(3)])  # 3 layers, 8 slots, 2 ranks
    src = tmp_path / "p.json"
    src.write_bytes(encode(_placement(p2l, 2), json=True))
    out = tmp_path / f"{engine}.json"
    assert main(["export", str(src), "--to", engine, "-o", str(out)]) == 0
    back = placement_from_engine(out, num_ranks=2, num_logical_experts=8)
    assert back.phys_to_log == p2l.tolist()


def test_files_written_the_way_each_engine_writes_them_are_read(tmp_path):
    # SGLang: compute_initial_expert_location_metadata json-loads the file and passes
    # physical_to_logical_map ([layers][num_physical]) to ExpertLocationMetadata.init_by_mapping
    sglang = json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 3, 0], [3, 2, 1, 0, 1, 2]]})
    # vllm-ascend: _export_tensor_to_file's record, json.dump(..., indent=4)
    devices = [{"device_id": 0, "device_expert": [2, 0]}, {"device_id": 1, "device_expert": [1, 3]}]
    ascend = json.dumps({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": 2,
                                                                "device_list": devices}]}, indent=4)
    (tmp_path / "s.json").write_text(sglang)
    (tmp_path / "a.json").write_text(ascend)
    p2l, ranks, fmt = read_engine_placement(tmp_path / "s.json", 4)
    assert fmt == "sglang" and ranks is None and p2l.shape == (2, 6)
    p2l, ranks, fmt = read_engine_placement(tmp_path / "a.json", 4)
    assert (fmt, ranks, p2l.tolist()) == ("vllm-ascend", 2, [[2, 0, 1, 3]])


def test_bad_engine_files_name_the_file_and_field(tmp_path):
    cases = {
        "ragged.json": ('{"physical_to_logical_map": [[0, 1], [1]]}', "physical_to_logical_map: has rows"),
        "negative.json": ('{"physical_to_logical_map": [[0, -1]]}', "physical_to_logical_map[0][1]"),
        "short.json": ('{"physical_to_logical_map": [[0, 0]]}', "does not hold experts 0..1"),
        "count.json": ('{"moe_layer_count": 2, "layer_list": [{"layer_id": 0, "device_count": 1, '
                       '"device_list": [{"device_id": 0, "device_expert": [0, 1]}]}]}',
                       "moe_layer_count: is 2"),
        "other.json": ('{"experts": []}', "has neither physical_to_logical_map nor layer_list"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(GemInputError) as e:
            read_engine_placement(path, 2)
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), e.value


def test_vllm_ascend_refuses_two_copies_on_one_device():
    p = _placement(np.array([[0, 0, 1, 1]]), 2)
    with pytest.raises(GemInputError, match="phys_to_log\\[0\\]: puts two copies of one expert on rank 0"):
        to_engine(p, "vllm-ascend", "p.json")
    assert to_engine(p, "sglang").physical_to_logical_map == [[0, 0, 1, 1]]


def test_plan_reads_an_engine_placement_as_the_current_one(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", "-o", str(out)]) == 0
    for engine in ("sglang", "vllm-ascend"):
        exported = tmp_path / f"{engine}.json"
        assert main(["export", str(out), "--to", engine, "-o", str(exported)]) == 0
        again = tmp_path / f"again-{engine}.json"
        assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", "--current", str(exported),
                     "--migration-weight", "1000000", "-o", str(again)]) == 0
        assert load(again, Placement).phys_to_log == load(out, Placement).phys_to_log  # nothing worth a move
    capsys.readouterr()
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,1,0.8", "--current",
                 str(tmp_path / "vllm-ascend.json"), "-o", str(tmp_path / "x.json")]) == 2
    assert "vllm-ascend.json: device_count: is 4; expected 3" in capsys.readouterr().err


def test_inspect_simulate_and_report_read_exported_files(tmp_path, capsys):
    import json

    from vllm_gem.cli import main
    run = tmp_path / "run"
    run.mkdir()
    assert main(["plan", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4", "-o", str(run / "p.json")]) == 0
    for fmt in ("sglang", "vllm-ascend"):
        assert main(["export", str(run / "p.json"), "--to", fmt, "-o", str(run / f"{fmt}.json")]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", str(run / "vllm-ascend.json")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["num_ranks"], info["num_logical_experts"]) == ("placement (vllm-ascend's format)", 4, 60)
    ours = {}
    for name in ("p", "sglang", "vllm-ascend"):
        assert main(["simulate", "--json", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4",
                     "--placement", str(run / f"{name}.json")]) == 0
        ours[name] = json.loads(capsys.readouterr().out)["mean"]
    assert ours["p"] == ours["sglang"] == ours["vllm-ascend"]  # the same slots, read back
    assert main(["report", "--json", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 3  # the SGLang file's ranks are not known here
    assert main(["report", str(run / "vllm-ascend.json"), "-o", str(tmp_path / "r2.html")]) == 0


def test_one_copy_per_rank_keeps_every_expert_and_no_duplicates():
    import numpy as np

    from vllm_gem.planners.constraints import duplicate_copies, spread_copies
    rng = np.random.default_rng(0)
    for _ in range(200):
        ranks, experts = int(rng.integers(2, 9)), int(rng.integers(4, 40))
        slots = int(rng.integers(-(-experts // ranks), 2 * -(-experts // ranks) + 2))
        extra = ranks * slots - experts
        if extra > experts * (ranks - 1):
            continue
        hot = rng.integers(0, experts, extra)  # replicas piled onto a few experts
        p2l = rng.permutation(np.concatenate([np.arange(experts), hot]))[None]
        loads = rng.gamma(0.5, 100, (3, 1, experts))
        out = spread_copies(p2l, ranks, loads)
        assert not duplicate_copies(out, ranks)
        assert set(out[0].tolist()) == set(range(experts))
        assert np.bincount(out[0], minlength=experts).max() <= ranks


def test_a_plan_with_redundant_slots_can_be_exported_to_vllm_ascend(tmp_path, capsys):
    from vllm_gem.cli import main
    args = ["plan", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4", "--num-physical", "72"]
    assert main(args + ["-o", str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "p.json"), "--to", "vllm-ascend", "-o", str(tmp_path / "a.json")]) == 2
    assert "plan with --one-copy-per-rank" in capsys.readouterr().err
    for planner in ("gem", "vllm-default"):
        assert main(args + ["--planner", planner, "--one-copy-per-rank", "--json", "-o", str(tmp_path / f"{planner}.json")]) == 0
        assert main(["export", str(tmp_path / f"{planner}.json"), "--to", "vllm-ascend", "-o", str(tmp_path / "a.json")]) == 0
    import json
    from vllm_gem.formats import Placement, load
    mean = {p: load(tmp_path / f"{p}.json", Placement).predicted["mean_layer_us"] for p in ("gem", "vllm-default")}
    assert mean["gem"] <= mean["vllm-default"] * (1 + 1e-9)  # the constraint does not leave GEM behind
    json.dumps(mean)


def test_sglang_rows_follow_the_decoder_layers_of_the_models_config(tmp_path, capsys):
    import json

    from vllm_gem.cli import main
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", "--num-physical", "64",
                 "-o", str(tmp_path / "p.json")]) == 0
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 27, "first_k_dense_replace": 3, "model_type": "deepseek_v3"}))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "p.json"), "--to", "sglang", "--model-config", str(cfg),
                 "-o", str(tmp_path / "s.json")]) == 0
    assert "--ep-num-redundant-experts 4" in capsys.readouterr().out
    rows = json.loads((tmp_path / "s.json").read_text())["physical_to_logical_map"]
    placed = json.loads((tmp_path / "p.json").read_text())["phys_to_log"]
    assert len(rows) == 27 and rows[3:] == placed  # decoder layer 3 is the first MoE layer
    cfg.write_text(json.dumps({"num_hidden_layers": 30, "first_k_dense_replace": 3}))
    assert main(["export", str(tmp_path / "p.json"), "--to", "sglang", "--model-config", str(cfg),
                 "-o", str(tmp_path / "s.json")]) == 2
    assert "expected 24 MoE layers, as the placement has" in capsys.readouterr().err
