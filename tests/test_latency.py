import numpy as np
import pytest

from vllm_gem.errors import GemInputError
from vllm_gem.formats import ExpertShape
from vllm_gem.latency import GroupModel, LatencyModel, features, fit, held_out_error
from vllm_gem.profiles import analytic_model, calibration_patterns, example_profile


def test_features_step_at_tile_boundary():
    f = features(np.array([[64, 0, 0], [65, 0, 0], [1, 1, 1]]), block_m=64)
    np.testing.assert_array_equal(f, [[1, 1, 1, 64], [1, 1, 2, 65], [1, 3, 3, 3]])


def test_fit_recovers_coefficients_and_reports_error():
    prof = example_profile("g", slowdown=1.1, noise=0.0)
    m = fit(prof)
    truth = analytic_model(ExpertShape(2048, 768), slowdown=1.1)
    np.testing.assert_allclose(m.coef, truth, rtol=1e-6, atol=1e-9)
    assert m.fit_rel_rms < 1e-9
    noisy = example_profile("g", noise=0.02, seed=3)
    err = held_out_error(noisy)
    assert 0.005 < err < 0.05  # noise shows up, the model still generalises


def test_calibration_patterns_hit_tile_boundaries():
    pats = np.array(calibration_patterns(32, 64))
    assert pats.shape[1] == 32
    tok = pats[pats > 0]
    assert (tok % 64 == 0).sum() > 10 and (tok % 64 == 1).sum() > 10


def test_reference_speeds_give_valid_lower_costs():
    rng = np.random.default_rng(0)
    g = GroupModel(rng.uniform(0.1, 2, (5, 4)), 8)
    ref, speed = g.reference_speeds()
    items = g.item_features(rng.integers(0, 200, 1000).astype(float))
    for r in range(5):
        assert np.all(items @ g.slot_coef[r] >= items @ ref / speed[r] - 1e-9)


def test_scaled_model():
    m = LatencyModel(np.array([10.0, 1.0, 2.0, 0.1]), 16)
    assert m.scaled(1.5).coef.tolist() == [10.0, 1.5, 3.0, 0.15000000000000002]


def test_calibration_patterns_for_few_local_experts():
    # e.g. Mixtral's 8 experts on 2 GPUs: 4 per GPU, fewer than a pattern's sample size
    # (rng.choice without replacement must not be asked for more than there are)
    from vllm_gem.profiles import calibration_patterns
    for e in (1, 2, 4, 6):
        pats = calibration_patterns(e, 64)
        assert pats and all(len(p) == e and sum(p) > 0 for p in pats)


def test_calibration_stops_at_its_time_limit_between_patterns():
    import pytest

    from vllm_gem.calibrate import CalibrationTimeout, measure_within
    now = [0.0]

    def measure(p):  # each pattern takes 4 s of the fake clock
        now[0] += 4.0
        return p * 10

    clock = lambda: now[0]  # noqa: E731
    assert measure_within([1, 2, 3], measure, None, 0.0, clock) == [10, 20, 30]
    now[0] = 0.0
    assert measure_within([1, 2, 3], measure, 12.0, 0.0, clock) == [10, 20, 30]  # 8 s <= 12 before the last
    now[0] = 0.0
    with pytest.raises(CalibrationTimeout, match=r"passed its 6 s limit after 2 of 3 load patterns"):
        measure_within([1, 2, 3], measure, 6.0, 0.0, clock)


def test_group_model_rejects_negative_coefficients():
    coef = np.ones((2, 4))
    coef[1, 3] = -1e-3  # a rank whose time would fall as tokens are added
    with pytest.raises(GemInputError, match=r"latency model: coef: has negative \(or NaN\) coefficients"):
        GroupModel(coef, 16)
