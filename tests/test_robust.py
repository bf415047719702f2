"""Robust placement: plans for speeds off by the profiles' own error; exact speeds unchanged."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_gem.cli import main
from vllm_gem.evaluate import bundled_trace
from vllm_gem.latency import DEFAULT_PROFILE_ERROR, GroupModel
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.planners.gem import GemPolicy
from vllm_gem.planners.robust import MAX_SCORING_STEPS
from vllm_gem.profiles import bundled_profiles, group_from_profiles
from vllm_gem.simulate import misspecified, scenario_times


@pytest.mark.parametrize("trace, prof, extra", [("qwen", "one-slow4", 4), ("switch-exp128", "spread8", 8),
                                                ("synthetic", "h200x2-sm66", 0)])
def test_zero_error_gives_todays_plans_slot_for_slot(trace, prof, extra):
    tr = bundled_trace(trace)
    group = group_from_profiles(bundled_profiles(prof)).with_errors(0.0)
    slots = tr.shape[2] + extra
    problem = PlacementProblem(tr.loads, group, slots)
    today = GemPolicy().place(problem)
    assert np.array_equal(make("gem").place(problem), today)
    assert np.array_equal(make("gem", speed_error=0.0).place(PlacementProblem(
        tr.loads, group.with_errors(0.05), slots)), today)  # the override wins over the profiles'


def test_profiles_carry_their_error_and_older_files_the_documented_default():
    g = group_from_profiles(bundled_profiles("one-slow4"))  # written before profiles carried one
    assert g.errors.tolist() == [DEFAULT_PROFILE_ERROR] * 4
    p = bundled_profiles("one-slow4")[0]
    p.error = 0.017
    assert group_from_profiles([p]).errors.tolist() == [0.017]
    assert GroupModel.tokens_over_speed(np.ones(3)).max_error == 0.0  # typed-in speeds are exact


def test_the_misspecified_simulator_on_a_hand_computed_case():
    loads = np.array([[[4.0, 2.0]]])  # one step, one layer, two experts
    believed = GroupModel.tokens_over_speed(np.array([1.0, 1.0]))
    truth = GroupModel.tokens_over_speed(np.array([0.5, 1.0]))  # rank 0 runs at half speed
    plan, swapped = np.array([[0, 1]]), np.array([[1, 0]])
    # plan: rank 0 takes 4 tokens at speed 0.5 = 8 us, rank 1 2 us: layer 8 us;
    # swapped: rank 0 takes 2 tokens = 4 us, rank 1 4 tokens = 4 us: layer 4 us
    assert scenario_times(loads, plan, [believed, truth]).tolist() == [4.0, 8.0]
    got = misspecified(loads, plan, [truth], baseline=swapped)
    assert got == {"draws": 1, "mean_us": 8.0, "worst_draw_us": 8.0, "baseline_mean_us": 4.0,
                   "ratio_mean": 2.0, "ratio_worst": 2.0}


def test_perturbed_groups_scale_speeds_by_one_plus_a_normal_draw():
    g = GroupModel.tokens_over_speed(np.array([1.0, 0.8]))
    draws = g.perturbed(4000, seed=3, errors=0.05)
    speeds = np.array([1.0 / d.coef[:, 3] for d in draws])  # [draws, ranks]
    rel = speeds / np.array([1.0, 0.8])
    assert np.allclose(rel.mean(0), 1.0, atol=0.005) and np.allclose(rel.std(0), 0.05, atol=0.005)
    assert all(d.errors is None for d in draws[:3])  # a truth is exact
    assert g.perturbed(2, seed=3, errors=0.05)[1].coef.tolist() == draws[1].coef.tolist()  # seeded


@pytest.mark.vllm
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31), st.integers(2, 8), st.sampled_from([0.02, 0.05, 0.1]))
def test_robust_gem_never_expects_more_than_vllms_policy_on_its_scenarios(seed, ranks, sigma):
    """On the scenarios it planned with (the planning steps under its speed draws), robust
    GEM's expected time is at most vLLM's plan's, and no draw is more than the tolerance
    slower than vLLM's plan in that draw: vLLM's plan is always a candidate."""
    rng = np.random.default_rng(seed)
    experts = int(rng.integers(ranks, 4 * ranks))
    slots = -(-experts // ranks) * ranks + ranks * int(rng.integers(0, 2))
    loads = rng.poisson(rng.gamma(0.7, 40, (1, 2, experts)), (12, 2, experts)).astype(float)
    group = GroupModel.tokens_over_speed(1.0 - np.abs(rng.normal(0, 0.1, ranks)), error=sigma)
    pol = make("gem")
    plan = pol.place(PlacementProblem(loads, group, slots))
    vllm = make("vllm-default").place(PlacementProblem(loads, group, slots))
    rep = pol.report["robust"]
    idx = np.unique(np.linspace(0, 11, min(12, MAX_SCORING_STEPS)).round().astype(int))
    truths = group.perturbed(rep["scenarios"], seed=0)
    mine, theirs = scenario_times(loads[idx], plan, truths), scenario_times(loads[idx], vllm, truths)
    assert mine.mean() <= theirs.mean() * (1 + 1e-9)
    assert (mine / theirs).max() <= 1 + rep["tolerance"] + 1e-9


def test_plan_and_simulate_take_speed_errors_and_misspecified_truth(tmp_path, capsys):
    import json
    out = tmp_path / "p.json"
    speeds = "1,1,0.95,0.9"
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", speeds, "--speed-error", "0.03",
                 "-o", str(out)]) == 0
    placed = json.loads(out.read_text())
    assert placed["inputs"]["report"]["robust"]["speed_errors"] == [0.03] * 4
    capsys.readouterr()
    assert main(["simulate", "--trace", "bundled:qwen", "--speeds", speeds, "--placement", str(out),
                 "--speed-error", "0.03", "--draws", "20", "--seed", "4", "--json"]) == 0
    mis = json.loads(capsys.readouterr().out)["misspecified"]
    assert mis["draws"] == 20 and mis["worst_draw_us"] >= mis["mean_us"] > 0
    assert mis["baseline"] in ("vllm-default",) or mis["baseline"].startswith("n/a")
    assert main(["simulate", "--trace", "bundled:qwen", "--speeds", speeds, "--placement", str(out),
                 "--true-profiles", "bundled:equal2", "--json"]) == 2  # 2 ranks for a 4-rank plan
    assert "give 2 ranks" in capsys.readouterr().err



def test_the_demo_scores_gem_under_drawn_true_speeds(capsys):
    import json

    from vllm_gem.cli import main
    assert main(["demo", "--json", "--plot", "", "--speed-error", "0.03", "--draws", "8", "--seed", "2"]) == 0
    cases = json.loads(capsys.readouterr().out)
    for case in cases:
        m = case["misspecified"]
        assert m["draws"] == 8 and m["worst_draw_us"] >= m["mean_us"] > 0
        if "ratio_mean" in m:  # vLLM's policy ran: the same draws score its plan
            assert m["ratio_worst"] >= m["ratio_mean"] > 0
