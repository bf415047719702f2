"""The exact MILP with replicas and its certified bound, against brute force on tiny cases."""

import itertools

import numpy as np
import pytest

from vllm_gem.certify import certify, copies_to_phys_to_log, solve_layer
from vllm_gem.latency import GroupModel
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.simulate import rank_times


def brute_force(loads: np.ndarray, group: GroupModel, num_physical: int) -> float:
    """The best mean slowest-rank time over every placement of one layer (loads: [steps, 1,
    experts]): each rank's slots a multiset of experts, every expert at least once."""
    experts = loads.shape[2]
    slots = num_physical // group.num_ranks
    rank_sets = list(itertools.combinations_with_replacement(range(experts), slots))
    best = np.inf
    for combo in itertools.product(rank_sets, repeat=group.num_ranks):
        row = np.concatenate(combo)
        if len(set(row.tolist())) < experts:
            continue
        best = min(best, rank_times(loads, row[None], group).max(-1).mean())
    return float(best)


@pytest.mark.parametrize("seed, num_physical", [(0, 6), (1, 6), (2, 4), (3, 8)])
def test_milp_matches_brute_force_and_its_bound_holds(seed, num_physical):
    rng = np.random.default_rng(seed)
    loads = rng.poisson(rng.gamma(1.0, 40.0, size=(1, 1, 4)).repeat(5, 0)).astype(float)
    group = GroupModel(np.array([[5.0, 2.0, 3.0, 0.1], [6.0, 2.4, 3.3, 0.13]]), block_m=16)
    truth = brute_force(loads, group, num_physical)
    sol = solve_layer(loads[:, 0, :], group, num_physical, time_limit=30.0)
    assert sol.proven
    assert sol.objective == pytest.approx(truth, rel=1e-4)
    assert sol.bound <= truth * (1 + 1e-6)
    row = copies_to_phys_to_log(sol.copies, num_physical // 2)
    assert rank_times(loads, row[None], group).max(-1).mean() == pytest.approx(sol.objective, rel=1e-9)
    # certifying a worse placement: its gap is at least its real distance from the optimum
    linear = np.concatenate([np.arange(4), np.arange(num_physical - 4) % 4])[None]
    cert = certify(loads, linear, group, seconds=30.0)
    assert cert.bound_us <= truth * (1 + 1e-6) <= cert.plan_us * (1 + 1e-6)
    assert cert.best_us == pytest.approx(truth, rel=1e-4)


def test_exact_planner_with_replicas_is_no_worse_than_gem_and_reports_its_bound():
    rng = np.random.default_rng(5)
    loads = rng.poisson(rng.gamma(0.8, 30.0, size=(1, 2, 12)).repeat(8, 0)).astype(float)
    g = GroupModel.tokens_over_speed(np.array([1.0, 0.8, 1.2]))
    prob = PlacementProblem(loads, g, 15)  # 3 redundant slots
    exact = make("exact", time_limit=10, max_steps=8)
    p2l = exact.place(prob)
    assert p2l.shape == (2, 15) and set(np.unique(p2l)) == set(range(12))
    assert (np.bincount(np.arange(15) // 5) == 5).all()
    t_exact = rank_times(loads, p2l, g).max(-1).mean()
    rep = exact.report
    assert t_exact == pytest.approx(rep["planning_us"], rel=1e-6)  # all 8 steps were planned on
    assert rep["certified_bound_us"] <= t_exact * (1 + 1e-6) <= rep["gem_start_us"] * (1 + 1e-6)


def test_plan_and_simulate_report_the_certified_bound(tmp_path, capsys):
    import json

    from vllm_gem.cli import main
    out = tmp_path / "p.json"
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,0.8", "--num-physical", "62",
                 "--certify", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "certified lower bound" in text and "of 24 layers proven optimal" in text
    assert main(["simulate", "--json", "--trace", "bundled:qwen", "--speeds", "1,0.8", "--placement",
                 str(out), "--certify", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["certified_bound_us"] >= d["existing_bound_us"] > 0
    assert d["certified_bound_us"] <= d["exact_best_us"] * (1 + 1e-9) <= d["plan_us"] * (1 + 1e-9)
    assert d["certified_gap"] == pytest.approx(d["plan_us"] / d["certified_bound_us"] - 1)


def test_compare_certifies_gems_plan_for_the_demo():
    from vllm_gem.cli import _demo_summary
    from vllm_gem.evaluate import compare
    rng = np.random.default_rng(3)
    loads = rng.poisson(rng.gamma(0.8, 30.0, size=(1, 1, 8)).repeat(8, 0)).astype(float)
    g = GroupModel.tokens_over_speed(np.array([1.0, 0.8]))
    rows = compare(loads, g, 10, ["linear", "gem"], certify_seconds=2.0)
    cert = rows[1].report["certificate"]
    assert cert["certified_bound_us"] <= rows[1].result.mean * (1 + 1e-9)
    line = _demo_summary({"trace": "t", "profiles": "p", "num_physical": 10,
                          "rows": [r.as_dict() for r in rows]})
    assert "the certified bound (1/1 layers proven)" in line or "the certified bound (0/1 layers proven)" in line


@pytest.mark.parametrize("seed, ranks, experts, num_physical", [
    (0, 2, 4, 4), (1, 2, 4, 6), (2, 2, 4, 8), (3, 3, 4, 6), (4, 3, 5, 6), (5, 2, 5, 6)])
def test_split_relaxation_bounds_brute_force_and_is_exact_without_replicas(seed, ranks, experts, num_physical):
    """The relaxation certify uses: its proven bound never above the true optimum (replicas
    split unevenly and tiles relaxed only lower it), equal to it with no redundant slot, and
    its copies a real placement; the time floors it is given are valid cuts."""
    from vllm_gem.bounds import lower_bounds
    from vllm_gem.certify import split_relaxation
    rng = np.random.default_rng(seed)
    loads = rng.poisson(rng.gamma(1.0, 40.0, size=(1, 1, experts)).repeat(4, 0)
                        * rng.uniform(0.3, 1.7, size=(4, 1, experts))).astype(float)
    coef = np.array([[5.0, 2.0, 3.0, 0.1], [6.0, 2.4, 3.3, 0.13], [4.0, 1.5, 4.0, 0.08]])[:ranks]
    group = GroupModel(coef, block_m=16)
    truth = brute_force(loads, group, num_physical)
    _, tight, static = lower_bounds(loads, group, num_physical)
    for floors in ({}, {"step_floor": tight[:, 0], "mean_floor": float(max(tight.mean(), static[0]))}):
        sol = split_relaxation(loads[:, 0, :], group, num_physical, time_limit=30.0, **floors)
        assert sol.proven
        assert sol.bound <= truth * (1 + 1e-6)
        if num_physical == experts:  # every expert single: solve_layer's MILP exactly
            assert sol.bound == pytest.approx(truth, rel=1e-4)
        slots = num_physical // ranks
        row = copies_to_phys_to_log(sol.copies, slots)  # raises unless slots are equal
        assert set(row.tolist()) == set(range(experts))


def test_certify_bound_holds_below_every_planner_and_best_plan_is_real():
    """On a 4-GPU case with replicas the certificate's bound is below every planner's plan
    (the bound is for all placements), its best plan is the time it reports, and time goes
    where the gap is (the whole budget is used only while some layer stays open)."""
    from vllm_gem.profiles import fleet_group
    from vllm_gem.traces import SyntheticParams, synthetic_trace
    tr = synthetic_trace(SyntheticParams(steps=8, layers=2, experts=16, top_k=4, tokens_per_step=256, seed=7))
    g = fleet_group(4, 7)
    gem = make("gem", min_steps=0).place(PlacementProblem(tr.loads, g, 20))
    cert = certify(tr.loads, gem, g, seconds=6.0)
    for name in ("linear", "vllm-default", "greedy-speed", "gem"):
        p2l = make(name).place(PlacementProblem(tr.loads, g, 20))
        assert cert.bound_us <= rank_times(tr.loads, p2l, g).max(-1).mean() * (1 + 1e-9), name
    best = rank_times(tr.loads, cert.best_phys_to_log, g).max(-1).mean()
    assert best == pytest.approx(cert.best_us, rel=1e-9) and cert.best_us <= cert.plan_us * (1 + 1e-12)
    assert cert.existing_bound_us <= cert.bound_us <= cert.best_us * (1 + 1e-9)
    assert cert.best_gap <= cert.gap


def test_a_layer_solved_to_optimality_is_not_certified_above_its_plan():
    """One layer of 6 GPUs without redundant slots, which the relaxation solves: GEM's plan is
    optimal there, and the bound must not land above it (HiGHS's "optimal" is within a
    relative gap, so the bound is its dual bound, not its solution's value)."""
    from vllm_gem.profiles import fleet_group
    from vllm_gem.traces import SyntheticParams, synthetic_trace
    tr = synthetic_trace(SyntheticParams(steps=64, layers=1, experts=60, top_k=8, tokens_per_step=1024,
                                         seed=103))
    plan = tr.loads[:32]
    g = fleet_group(6, 103)
    gem = make("gem", min_steps=0).place(PlacementProblem(plan, g, 60))
    cert = certify(plan, gem, g, seconds=30.0)
    assert cert.proven_layers == 1
    assert cert.bound_us <= cert.best_us <= cert.plan_us
    assert cert.gap >= 0.0 and cert.best_gap >= 0.0
