import json

import pytest

from vllm_gem.cli import main
from vllm_gem.formats import Placement, load


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_simulate_inspect_roundtrip(tmp_path, capsys):
    pl = tmp_path / "pl.json"
    rc, out, _ = run(capsys, "plan", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4",
                     "--num-physical", "64", "-o", str(pl), "--json")
    assert rc == 0 and json.loads(out)["gap"] >= 1.0
    p = load(pl, Placement)
    assert p.num_ranks == 4 and len(p.phys_to_log) == 24 and p.inputs["report"]["planning_steps"] > 0
    rc, out, _ = run(capsys, "simulate", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4",
                     "--placement", str(pl), "--json")
    assert rc == 0 and json.loads(out)["mean"] == pytest.approx(p.predicted["mean_layer_us"])
    rc, out, _ = run(capsys, "inspect", str(pl), "--json")
    assert rc == 0 and json.loads(out)["num_physical"] == 64
    # migration-aware re-plan from the current placement
    rc, out, _ = run(capsys, "plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8",
                     "--num-physical", "64", "--current", str(pl), "--migration-weight", "2",
                     "-o", str(tmp_path / "p2.json"))
    assert rc == 0, out


def test_import_and_inspect_trace(tmp_path, capsys):
    t = tmp_path / "syn.msgpack"
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"steps": 20, "layers": 2, "experts": 8, "top_k": 2}))
    rc, out, _ = run(capsys, "import-trace", "--format", "synthetic", str(params), "-o", str(t))
    assert rc == 0 and "20 steps x 2 layers x 8 experts" in out
    rc, out, _ = run(capsys, "inspect", str(t), "--json")
    assert json.loads(out)["params"]["steps"] == 20


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "trace.json"
    bad.write_text('{"kind": "routing_trace", "schema_version": 7}')
    rc, out, err = run(capsys, "plan", "--trace", str(bad), "--speeds", "1,1", "-o", str(tmp_path / "x.json"))
    assert rc == 2
    assert err.strip().count("\n") == 0 and "schema_version: is 7; expected 1" in err
    rc, _, err = run(capsys, "inspect", str(tmp_path / "missing.json"))
    assert rc == 2 and "missing.json: file: does not exist" in err
    # a placement for another model shape
    pl = tmp_path / "pl.json"
    run(capsys, "plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,1", "-o", str(pl))
    rc, _, err = run(capsys, "simulate", "--trace", "bundled:switch-exp128", "--speeds", "1,1,1,1",
                     "--placement", str(pl))
    assert rc == 2 and "pl.json: num_logical_experts: is 60; expected 128 (the model's experts)" in err


def test_demo_json(capsys, tmp_path):
    rc, out, _ = run(capsys, "demo", "--json", "--plot", str(tmp_path / "d.png"))
    assert rc == 0
    res = json.loads(out)
    assert len(res) == 12 and (tmp_path / "d.png").stat().st_size > 10_000
    for case in res:
        rows = {r["planner"]: r for r in case["rows"]}
        assert rows["gem"]["gap"] >= 1.0


def test_help_says_which_files_are_written_by_default(capsys):
    for cmd, default in (("plan", "placement.json"), ("demo", "gem-demo.png")):
        assert main([cmd, "--help"]) == 0
        assert f"default: {default}" in capsys.readouterr().out


def test_the_demo_says_in_full_why_a_planner_did_not_run():
    import numpy as np

    from vllm_gem.evaluate import _why_not
    from vllm_gem.latency import GroupModel
    from vllm_gem.planners import PlacementProblem, make
    try:
        make("round_robin").place(PlacementProblem(np.ones((2, 1, 4)), GroupModel.tokens_over_speed([1, 1]), 6))
    except ValueError as e:
        assert _why_not(e).endswith("it needs 4: vLLM supports round_robin only without redundant experts")
    else:
        raise AssertionError("round_robin placed redundant slots")
