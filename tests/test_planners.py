import numpy as np
import pytest
from conftest import load_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_gem.errors import GemInputError
from vllm_gem.evaluate import compare
from vllm_gem.latency import GroupModel
from vllm_gem.planners import NAMES, PlacementProblem, PlannerUnavailable, make
from vllm_gem.planners.gem import choose_replicas, classify_experts
from vllm_gem.simulate import rank_times, simulate
from vllm_gem.traces import SyntheticParams, synthetic_trace

OFFLINE = [n for n in NAMES if n not in ("vllm-default", "exact")]


def check_valid(p2l, problem):
    assert p2l.shape == (problem.num_layers, problem.num_physical)
    for row in p2l:
        assert set(row.tolist()) == set(range(problem.num_experts))  # every expert placed


@st.composite
def problems(draw):
    loads, group, phys = draw(load_cases(max_ranks=6, max_experts=24, max_redundant=8,
                                         max_steps=12, rate=50, hot=1000))
    return PlacementProblem(loads, group, phys)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(OFFLINE))
def test_every_planner_places_every_expert(problem, name):
    try:
        p2l = make(name).place(problem)
    except GemInputError as e:  # round_robin refuses redundant slots, as vLLM does
        assert name == "round_robin" and problem.num_physical != problem.num_experts, e
        return
    check_valid(p2l, problem)


def test_more_ranks_than_experts():
    loads = np.random.default_rng(0).poisson(5, (4, 2, 3)).astype(float)
    prob = PlacementProblem(loads, GroupModel.tokens_over_speed(np.ones(4)), 4)
    for name in ("linear", "gem", "greedy-speed"):
        check_valid(make(name).place(prob), prob)


def test_bad_problem_is_rejected():
    g = GroupModel.tokens_over_speed(np.ones(3))
    with pytest.raises(GemInputError, match="a multiple of the 3 ranks"):
        PlacementProblem(np.ones((2, 1, 4)), g, 4)
    with pytest.raises(GemInputError, match="token counts >= 0"):
        PlacementProblem(-np.ones((2, 1, 6)), g, 6)


def het_trace(seed):
    return synthetic_trace(SyntheticParams(steps=160, layers=4, experts=32, top_k=4,
                                           tokens_per_step=256, seed=seed)).loads


def test_gem_uses_speed_and_beats_speed_blind_greedy_on_heterogeneous_gpus():
    g = GroupModel.tokens_over_speed(np.array([1.0, 1.0, 1.0, 1 / 1.3]))
    wins = []
    for seed in range(3):
        planners = ["linear", "greedy-speed", "gem"]
        rows = {r.planner: r.result for r in compare(het_trace(seed), g, 32, planners)}
        gem = rows["gem"].mean
        wins.append(gem <= rows["greedy-speed"].mean * 1.005 and gem < rows["linear"].mean)
        # the slow rank ends up with less work
        assert rows["gem"].rank_mean[3] <= max(rows["gem"].rank_mean[:3]) * 1.02
    assert all(wins)


@pytest.mark.vllm
@pytest.mark.parametrize("seed", range(4))
def test_gem_never_loses_to_token_balanced_on_equal_gpus(seed):
    g = GroupModel.tokens_over_speed(np.ones(4))
    rows = {r.planner: r.result for r in compare(het_trace(seed), g, 36, ["vllm-default", "gem"])}
    # held-out steps; "noise": 1% of the layer time
    assert rows["gem"].mean <= rows["vllm-default"].mean * 1.01


def test_gem_close_to_exact_milp_on_small_instance():
    loads = het_trace(5)[:16, :2, :12]
    g = GroupModel.tokens_over_speed(np.array([1.0, 0.8, 1.2]))
    prob = PlacementProblem(loads, g, 12)
    exact = make("exact", time_limit=20).place(prob)
    gem = make("gem", min_steps=0).place(prob)
    check_valid(exact, prob)
    t_exact = rank_times(loads, exact, g).max(-1).mean()
    t_gem = rank_times(loads, gem, g).max(-1).mean()
    assert t_exact <= t_gem * (1 + 1e-6)  # the MILP is optimal on what it plans for
    assert t_gem <= t_exact * 1.05  # the heuristic is within 5% of it


def test_migration_weight_trades_gain_for_moves():
    loads = het_trace(1)
    g = GroupModel.tokens_over_speed(np.array([1.0, 1.0, 1.0, 0.7]))
    old = make("linear").place(PlacementProblem(loads, g, 32))

    def moves(p2l):
        per = p2l.shape[1] // 4
        return sum(len(set(p2l[ly, r*per:(r+1)*per]) - set(old[ly, r*per:(r+1)*per]))
                   for ly in range(p2l.shape[0]) for r in range(4))

    res = {}
    for w in (0.0, 5.0, 1e9):
        p2l = make("gem", migration_weight=w).place(PlacementProblem(loads, g, 32, old_phys_to_log=old))
        res[w] = (moves(p2l), simulate(loads, p2l, g).mean)
    assert res[1e9][0] == 0  # moves are too expensive: nothing moves
    assert res[0.0][0] > res[5.0][0] > 0  # fewer moves as they cost more...
    assert res[0.0][1] < res[5.0][1] < res[1e9][1]  # ...for less gain


def test_classification_and_replicas():
    loads = np.zeros((10, 1, 4))
    loads[:, 0, 0] = 100  # consistent and hot
    loads[::5, 0, 1] = 300  # bursty
    loads[:, 0, 2:] = 10
    cons = classify_experts(loads)
    assert cons[0].tolist() == [True, False, True, True]
    cnt = choose_replicas(loads, 6, GroupModel.tokens_over_speed(np.ones(2)))
    assert cnt.sum() == 6 and cnt[0, 0] >= 2  # the steady hot expert gets the extra slots


@pytest.mark.vllm
def test_vllm_default_policy_through_vllm():
    loads = het_trace(2)
    prob = PlacementProblem(loads, GroupModel.tokens_over_speed(np.ones(4)), 40)
    p2l = make("vllm-default").place(prob)
    check_valid(p2l, prob)
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    ref = DefaultEplbPolicy.rebalance_experts(torch.from_numpy(loads.sum(0)), 40, 1, 1, 4)
    np.testing.assert_array_equal(p2l, ref.numpy())


@pytest.mark.vllm
def test_vllm_policy_is_read_from_the_installed_vllm_without_importing_vllm():
    """The demo's set-up installs vllm without its dependencies: the policy runs from vLLM's
    own file all the same, and no `import vllm` happens (tests above check its results)."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("torch")
    code = ("import inspect, sys\n"
            "from vllm_gem.planners.vllm_policy import default_eplb_policy\n"
            "print(inspect.getfile(default_eplb_policy()))\n"
            "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    folder = Path(next(iter(importlib.util.find_spec("vllm").submodule_search_locations)))
    assert out.stdout.split() == [str(folder / "distributed" / "eplb" / "policy" / "default.py"), "False"]


@pytest.mark.vllm
def test_linear_and_round_robin_match_vllm():
    from vllm.distributed.eplb.eplb_state import EplbState
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
    prob = PlacementProblem(np.ones((1, 1, 16)), GroupModel.tokens_over_speed(np.ones(4)), 20)
    lin = make("linear").place(prob)
    assert lin[0].tolist() == list(EplbState.build_initial_global_physical_to_logical_map(16, 4))
    prob = PlacementProblem(np.ones((1, 1, 16)), GroupModel.tokens_over_speed(np.ones(4)), 16)
    rr = make("round_robin").place(prob)[0]
    for rank in range(4):
        _, emap, _ = determine_expert_map(4, rank, 16, "round_robin")
        local = [e for e in range(16) if emap[e] >= 0]
        assert sorted(rr[rank * 4:(rank + 1) * 4].tolist()) == local


def test_vllm_default_unavailable_message(monkeypatch):
    import importlib.util
    import sys
    for name in [m for m in sys.modules if m.startswith(("vllm.", "vllm_gem._vllm_eplb_policy"))]:
        monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PlannerUnavailable, match=r"is not importable \(No module named 'vllm'\); "
                                                 r"install torch and vllm \(README: the demo's set-up\)"):
        problem = PlacementProblem(np.ones((1, 1, 4)), GroupModel.tokens_over_speed(np.ones(2)), 4)
        make("vllm-default").place(problem)


@pytest.mark.parametrize("slots_per_rank", [1, 3])
def test_large_scale_construction_is_valid_and_close_to_the_full_one(slots_per_rank):
    # the many-ranks construction (candidate ranks, incremental slowest-rank tracking), forced
    # on 16 ranks by construct_ranks=4, against the full construction on the same problem
    rng = np.random.default_rng(0)
    g = GroupModel.tokens_over_speed(1 / (1 + np.minimum(np.abs(rng.normal(0, 0.1, 16)), 0.22)))
    loads = het_trace(1)
    num_physical = max(32, 16 * slots_per_rank)
    prob = PlacementProblem(loads, g, num_physical)
    times = {}
    for k in (4, 10**6):
        p2l = make("gem", construct_ranks=k, local_search=False).place(prob)
        assert p2l.shape == (4, num_physical)
        for layer in p2l:
            assert set(layer.tolist()) == set(range(32))  # every expert placed
        times[k] = simulate(loads, p2l, g).mean
    assert times[4] <= 1.05 * times[10**6], times


def test_replica_choice_in_rounds_for_many_redundant_slots():
    loads = synthetic_trace(SyntheticParams(steps=16, layers=2, experts=16, seed=0)).loads
    g = GroupModel.tokens_over_speed(np.ones(4))
    cnt = choose_replicas(loads, 16 + 200, g)  # 200 redundant slots: chosen in rounds
    assert (cnt.sum(1) == 216).all() and (cnt >= 1).all()
    hot = loads.sum(0).argmax(1)
    assert (cnt[np.arange(2), hot] == cnt.max(1)).all()  # the hottest expert got the most


def test_two_nodes_keep_expert_moves_inside_a_node():
    # 4 ranks on 2 nodes; replicas give each node copies to fetch locally
    loads = het_trace(2)
    g = GroupModel.tokens_over_speed(np.array([1.0, 0.7, 1.0, 1.0]))
    old = make("gem").place(PlacementProblem(het_trace(5), g, 40))

    def cross_node_fetches(p2l):
        per, n = p2l.shape[1] // 4, 0
        for ly in range(p2l.shape[0]):
            for r in range(4):
                node = slice((r // 2) * 2 * per, (r // 2 + 1) * 2 * per)
                n += len(set(p2l[ly, r * per:(r + 1) * per]) - set(old[ly, node]))
        return n

    res = {}
    for nodes in (1, 2):
        p2l = make("gem", migration_weight=3.0).place(
            PlacementProblem(loads, g, 40, num_nodes=nodes, old_phys_to_log=old))
        check_valid(p2l, PlacementProblem(loads, g, 40))
        res[nodes] = cross_node_fetches(p2l)
    assert res[2] < res[1], res  # node-aware costs move fewer experts across nodes
    with pytest.raises(GemInputError, match="num_nodes: is 3; expected a divisor of the 4 ranks"):
        PlacementProblem(loads, g, 40, num_nodes=3)


@pytest.mark.parametrize("with_fetch", [False, True])
def test_swap_scores_match_recomputing_the_layer(with_fetch):
    # best_swaps (compiled) against the slowest-rank time recomputed from scratch after each
    # allowed swap: its value, and that no allowed swap does better
    from vllm_gem.planners.swap_scores import best_swaps
    rng = np.random.default_rng(1)
    layers, ranks, slots, experts, steps = 6, 4, 3, 6, 5  # few experts: many swaps not allowed
    items = ranks * slots
    item_log = np.stack([np.concatenate([rng.permutation(experts), rng.integers(0, experts, items - experts)])
                         for _ in range(layers)])
    rank_of = np.stack([rng.permutation(np.repeat(np.arange(ranks), slots)) for _ in range(layers)])
    feat = rng.uniform(0, 1, (layers, steps, 3, items)).astype(np.float32)  # [L, S, 3, P]
    coef = rng.uniform(0.5, 1.5, (ranks, 3)).astype(np.float32)
    hold = np.zeros((layers, ranks, experts), dtype=np.int64)
    np.add.at(hold, (np.arange(layers)[:, None], rank_of, item_log), 1)
    fetch = rng.uniform(0, 1, (layers, ranks, experts)).astype(np.float32) if with_fetch \
        else np.zeros((0, 0, 0), dtype=np.float32)
    mw = 0.3

    def cost(lay, r):  # [S, P] every item's cost on rank(s) r
        return np.einsum("skp,pk->sp", feat[lay], coef[r])

    def layer_time(lay, rk):  # mean over steps of the slowest rank
        own = cost(lay, rk)
        return np.stack([own[:, rk == g].sum(1) for g in range(ranks)]).max(0).mean()

    t = np.stack([np.stack([cost(lay, rank_of[lay])[:, rank_of[lay] == g].sum(1) for g in range(ranks)])
                  for lay in range(layers)]).astype(np.float32)  # [L, G, S]
    own = np.stack([cost(lay, rank_of[lay]) for lay in range(layers)]).astype(np.float32)  # [L, S, P]
    lv = np.arange(layers)
    g1 = rng.integers(0, ranks, layers)
    sel = np.stack([np.nonzero(rank_of[lay] == g1[lay])[0][:2] for lay in range(layers)])  # 2 of 3
    val, ci, pj = best_swaps(t, feat, own, coef, item_log, rank_of, hold, fetch, mw, lv, g1, sel)
    masked_best = 0  # layers whose best swap overall is one the rule forbids
    for x, lay in enumerate(lv):
        best, best_any = np.inf, np.inf
        for c, i in enumerate(sel[x]):
            for p in range(items):
                li, lp, hp = item_log[lay, i], item_log[lay, p], rank_of[lay, p]
                if hp == g1[x]:
                    continue  # not a partner
                on_h = item_log[lay, rank_of[lay] == hp]
                on_g1 = item_log[lay, rank_of[lay] == g1[x]]
                rk = rank_of[lay].copy()
                rk[i], rk[p] = hp, g1[x]
                v = layer_time(lay, rk)
                if with_fetch:
                    f = fetch[lay]
                    v += mw * (f[hp, li] + f[g1[x], lp] - f[g1[x], li] - f[hp, lp])
                best_any = min(best_any, v)
                if li == lp or li in on_h or lp in on_g1:
                    continue  # two copies of one expert on a rank
                best = min(best, v)
                if (c, p) == (ci[x], pj[x]):
                    chosen = v
        assert np.isfinite(best)
        assert val[x] == pytest.approx(best, rel=1e-5)
        assert chosen == pytest.approx(best, rel=1e-5)
        masked_best += best_any < best * (1 - 1e-5)
    assert masked_best  # the case exercises the rule
