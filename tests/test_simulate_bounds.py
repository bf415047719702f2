import itertools

import numpy as np
from conftest import random_group
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_gem.bounds import lower_bounds
from vllm_gem.latency import GroupModel
from vllm_gem.simulate import rank_times, simulate


def brute_rank_times(loads, p2l, group):
    """Loop reference: every step, layer, rank, slot one at a time."""
    steps, layers, experts = loads.shape
    ranks, per = group.num_ranks, p2l.shape[1] // group.num_ranks
    out = np.zeros((steps, layers, ranks))
    for s in range(steps):
        for ly in range(layers):
            reps = np.bincount(p2l[ly], minlength=experts)
            for r in range(ranks):
                t = group.coef[r, 0]
                for slot in range(r * per, (r + 1) * per):
                    tok = loads[s, ly, p2l[ly, slot]] / reps[p2l[ly, slot]]
                    t += (group.coef[r, 1] * (tok > 0) + group.coef[r, 2] * np.ceil(tok / group.block_m)
                          + group.coef[r, 3] * tok)
                out[s, ly, r] = t
    return out


@st.composite
def case(draw, max_experts=6):
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    ranks = draw(st.integers(1, 3))
    experts = draw(st.integers(1, max_experts))
    redundant = draw(st.integers(0, 2))
    per = -(-(experts + redundant) // ranks)
    phys = per * ranks
    steps, layers = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    hot = draw(st.booleans())
    loads = rng.integers(0, 40, (steps, layers, experts)).astype(float)
    if hot:  # one hot expert holding all tokens
        loads[:] = 0
        loads[..., 0] = rng.integers(1, 500)
    p2l = np.stack([np.concatenate([rng.permutation(experts), rng.integers(0, experts, phys - experts)])
                    for _ in range(layers)])
    return loads, p2l, random_group(rng, ranks), phys


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case())
def test_simulator_matches_brute_force(c):
    loads, p2l, group, _ = c
    np.testing.assert_allclose(rank_times(loads, p2l, group), brute_rank_times(loads, p2l, group))


def all_placements(experts, ranks, phys):
    """Every phys_to_log row that places each expert at least once (tiny cases only)."""
    for row in itertools.product(range(experts), repeat=phys):
        if len(set(row)) == experts:
            yield np.array(row)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case(max_experts=4))
def test_bounds_never_above_any_placement(c):
    loads, _, group, phys = c
    if loads.shape[2] ** phys > 5000:
        phys = loads.shape[2] + (-loads.shape[2]) % group.num_ranks
    loads = loads[:, :1]
    fluid, tight, static = lower_bounds(loads, group, phys)
    assert np.all(fluid <= tight + 1e-9)
    best = np.full(loads.shape[0], np.inf)
    best_static = np.inf
    for row in all_placements(loads.shape[2], group.num_ranks, phys):
        layer = rank_times(loads, row[None], group).max(-1)[:, 0]
        best = np.minimum(best, layer)
        best_static = min(best_static, layer.mean())
    # per step, no placement (even one chosen for that step alone) beats the bound
    assert np.all(tight[:, 0] <= best * (1 + 1e-9) + 1e-9), (tight[:, 0], best)
    # no placement held over all steps beats the static bound on its mean
    assert static[0] <= best_static * (1 + 1e-9) + 1e-9, (static[0], best_static)


def test_vectorised_replay_is_fast_enough():
    import time
    rng = np.random.default_rng(0)
    loads = rng.poisson(20, (1000, 48, 128)).astype(np.float64)
    p2l = np.tile(np.arange(128), (48, 1))
    g = GroupModel.tokens_over_speed(np.ones(8))
    t0 = time.perf_counter()
    r = simulate(loads, p2l, g)
    elapsed = time.perf_counter() - t0
    assert r.mean >= r.bound
    # budget: the issue asks about a second; allow CI's slower cores 10x
    assert elapsed < 10, elapsed


def test_summary_statistics():
    loads = np.array([[[4.0, 0.0]], [[0.0, 8.0]]])  # 2 steps, 1 layer, 2 experts
    g = GroupModel.tokens_over_speed(np.array([1.0, 2.0]))
    r = simulate(loads, np.array([[0, 1]]), g)
    # step 0: ranks (4, 0) -> 4, mean 2; step 1: ranks (0, 4) -> 4, mean 2
    assert r.mean == 4.0 and r.straggler_ratio == 2.0
    assert r.bound_fluid == (4 / 3 + 8 / 3) / 2


def test_static_bound_sees_that_a_placement_cannot_follow_bursty_decode_steps():
    # decode-like: two of four experts active per step, alternating pairs; a fast and a half-
    # speed GPU with two slots each. Per step, the slow GPU could hold the two idle experts;
    # a fixed placement cannot, and the best one (one expert of each pair on each GPU) makes
    # the slow GPU run one expert every step, which only the static bound sees
    loads = np.array([[[8.0, 8.0, 0.0, 0.0]], [[0.0, 0.0, 8.0, 8.0]]] * 3)
    group = GroupModel(np.array([[5.0, 10.0, 0.0, 0.0], [5.0, 20.0, 0.0, 0.0]]), block_m=16)
    fluid, tight, static = lower_bounds(loads, group, 4)
    assert np.all(tight < 20.0) and np.allclose(static, 25.0)
    best = simulate(loads, np.array([[0, 2, 1, 3]]), group)
    assert best.mean == 25.0 and best.bound == 25.0  # proven optimal
    worst = simulate(loads, np.array([[2, 3, 0, 1]]), group)  # the slow GPU gets both of a pair
    assert worst.mean == (45.0 + 25.0) / 2 and worst.bound == 25.0


def test_static_lp_bound_uses_each_ranks_own_coefficients():
    # two GPUs whose fits trade one term for another: GPU 0 pays per expert, GPU 1 per token.
    # Through one reference speed each, both look 5.5x faster than the reference, so those
    # bounds fall far below any placement; the LP compares the ranks term by term
    import itertools
    loads = np.array([[[10.0, 10.0, 1.0, 1.0]], [[12.0, 8.0, 2.0, 0.0]]])
    group = GroupModel(np.array([[0.0, 10.0, 0.0, 0.1], [0.0, 1.0, 0.0, 1.0]]), block_m=16)
    fluid, tight, static = lower_bounds(loads, group, 4)
    best = min(simulate(loads, np.array([p]), group).mean for p in itertools.permutations(range(4)))
    assert tight.mean() < 0.2 * best  # the reference-speed bounds
    assert 0.98 * best <= static[0] <= best  # the LP: within 2% of the best static placement
    assert simulate(loads, np.array([[0, 3, 1, 2]]), group).bound == static[0]
