"""The measured replay: each rank's work built as vLLM routes it, the report, the command.

CPU tests cover what needs no GPU (the batch, the split over copies, step choice, the
report, the command's checks); tests marked gpu time real kernels."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_gem.cli import main
from vllm_gem.latency import GroupModel
from vllm_gem.replay import (
    KNUTH_MULTIPLIER,
    Fleet,
    PlacementReplay,
    ReplaySpec,
    compare,
    physical_ids,
    replay_steps,
    slot_tokens_split,
    step_topk_ids,
)
from vllm_gem.simulate import slot_tokens


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=24), st.integers(1, 8))
def test_a_step_batch_has_the_traces_counts_and_distinct_experts_per_token(counts, top_k):
    top_k = min(top_k, len(counts))
    counts = np.array(counts)
    ids = step_topk_ids(counts, top_k)
    assert ids.shape[1] == top_k
    assert np.array_equal(np.bincount(ids[ids >= 0], minlength=len(counts)), counts)
    assert (ids < 0).sum() == ids.size - counts.sum()  # padding only where counts run out
    for row in ids:
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real)  # a token never routes to one expert twice


def _vllm_router_reference(topk_ids, phys_to_log, num_logical):
    """vLLM's router kernel (fused_moe/router/base_router.py) written as a scalar loop."""
    l2p = [[] for _ in range(num_logical)]
    for slot, e in enumerate(phys_to_log):  # EplbState: replicas in increasing slot order
        l2p[e].append(slot)
    out = np.full(topk_ids.shape, -1)
    for t in range(topk_ids.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = topk_ids[t, k]
            if e >= 0:
                out[t, k] = l2p[e][((t * KNUTH_MULTIPLIER) & 0xFFFFFFFF) % len(l2p[e])]
    return out


def test_physical_ids_follow_vllms_router():
    rng = np.random.default_rng(0)
    for _ in range(20):
        experts = int(rng.integers(2, 12))
        p2l = np.concatenate([np.arange(experts), rng.integers(0, experts, int(rng.integers(0, 10)))])
        rng.shuffle(p2l)
        ids = step_topk_ids(rng.integers(0, 30, experts), min(3, experts))
        assert np.array_equal(physical_ids(ids, p2l, experts), _vllm_router_reference(ids, p2l, experts))


def test_copies_split_an_experts_tokens_in_whole_tokens_near_the_simulators_even_split():
    rng = np.random.default_rng(1)
    loads = rng.integers(0, 400, (3, 2, 8)).astype(float)
    p2l = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 3, 5]] * 2)
    got = slot_tokens_split(loads, p2l, top_k=2)
    even = slot_tokens(loads, p2l)
    assert np.array_equal(got.sum(-1), loads.sum(-1))  # no token lost or made up
    for s in range(3):  # each expert's copies hold all its tokens
        for layer in range(2):
            for e in range(8):
                assert got[s, layer, p2l[layer] == e].sum() == loads[s, layer, e]
    assert np.abs(got - even).max() <= 0.1 * even.max() + 2  # the hash splits close to evenly


def test_replay_steps_are_the_held_out_half_thinned_evenly():
    assert replay_steps(12).tolist() == [6, 7, 8, 9, 10, 11]
    assert replay_steps(12, max_steps=3).tolist() == [6, 8, 11]
    assert replay_steps(5, "all").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="held-out or all"):
        replay_steps(5, "first")


def test_the_report_takes_ratios_to_the_baseline_and_errors_per_rank():
    pred_v = np.array([[[10.0, 20.0]]])
    rows = compare([PlacementReplay("gem", np.array([[[9.0, 15.0]]]), np.array([[[9.0, 16.5]]])),
                    PlacementReplay("vllm-default", np.array([[[10.0, 25.0]]]), pred_v)],
                   "vllm-default")["placements"]
    gem = rows[0]
    assert gem["measured_vs_baseline"] == pytest.approx(15 / 25)
    assert gem["predicted_vs_baseline"] == pytest.approx(16.5 / 20)
    assert gem["ratio_gap_pp"] == pytest.approx(100 * (16.5 / 20 - 15 / 25))
    assert gem["rank_error_max"] == pytest.approx(0.1)  # (16.5 - 15) / 15
    assert gem["rank_error_rms"] == pytest.approx(np.sqrt((0 + 0.1 ** 2) / 2))
    assert rows[1]["rank_error_max"] == pytest.approx(0.2) and gem["measured_straggler"] == 1


def test_a_rank_with_no_tokens_counts_as_no_error():
    r = PlacementReplay("x", np.array([[[0.0, 10.0]]]), np.array([[[3.0, 11.0]]]))
    assert r.rank_errors().tolist() == pytest.approx([0.1])


def test_fleet_puts_ranks_on_their_own_gpus_or_shares_gpu_0():
    assert Fleet.on_local_gpus(4, {3: 92}, visible=4).devices == [0, 1, 2, 3]
    f = Fleet.on_local_gpus(4, {3: 92}, visible=1)
    assert f.devices == [0] * 4 and f.sms == [None, None, None, 92]
    from vllm_gem.errors import GemInputError
    with pytest.raises(GemInputError, match="--slow-sms.*ranks below the placement's 4"):
        Fleet.on_local_gpus(4, {5: 92}, visible=1)


def _plans(tmp_path):
    out = []
    for planner in ("gem", "vllm-default"):
        path = tmp_path / f"{planner}.json"
        assert main(["plan", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4", "--planner",
                     "linear" if planner == "vllm-default" else planner, "--num-physical", "64",
                     "-o", str(path)]) == 0
        out.append(str(path))
    return out


def test_replay_command_predicts_without_measuring(tmp_path, capsys):
    a, b = _plans(tmp_path)
    capsys.readouterr()
    assert main(["replay", "--trace", "bundled:qwen", "--placement", a, b, "--profiles", "bundled:one-slow4",
                 "--top-k", "4", "--baseline", "linear", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["steps"] == [6, 7, 8, 9, 10, 11] and rep["kernel"].startswith("predicted only")
    rows = {r["placement"]: r for r in rep["placements"]}
    assert rows["gem"]["predicted_vs_baseline"] < 1.0  # GEM plans for the slow GPU, linear does not


@pytest.mark.parametrize("extra, message", [
    ([], "top_k: is not recorded in the trace; expected --top-k"),
    (["--top-k", "4", "--measure"], "--measure: sees no CUDA GPU"),
    (["--top-k", "4", "--baseline", "exact"], "--baseline: is 'exact'"),
    (["--top-k", "4", "--profiles", "bundled:equal2"], "--profiles: gives 2 ranks; expected 4"),
])
def test_replay_command_says_what_is_missing(tmp_path, capsys, extra, message):
    a, b = _plans(tmp_path)
    args = ["replay", "--trace", "bundled:qwen", "--placement", a, b] + extra
    if "--profiles" not in extra and "--measure" not in extra and "--top-k" in extra:
        args += ["--profiles", "bundled:one-slow4"]
    capsys.readouterr()
    try:
        import torch
        if "--measure" in extra and torch.cuda.is_available():
            pytest.skip("a GPU is present: --measure runs")
    except ImportError:
        pass
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# --------------------------------------------------------------------------- on a GPU
def _tiny_case():
    rng = np.random.default_rng(3)
    loads = rng.integers(0, 300, (2, 2, 16)).astype(float)
    p2l = np.tile(np.concatenate([np.arange(16), [0, 1, 2, 3]]), (2, 1))  # 20 slots, 2 ranks
    return loads, {"a": p2l, "b": p2l[:, ::-1].copy()}


@pytest.mark.gpu
def test_measure_times_every_ranks_work_with_our_kernel():
    from vllm_gem.replay import measure
    loads, placements = _tiny_case()
    spec = ReplaySpec(512, 256, 2, kernel="triton", reps=3)
    got, kernel, stats = measure(loads, placements, Fleet([None, None], [0, 0]), spec)
    assert kernel == "vllm_gem.kernels bf16" and stats["calls_timed"] > 0
    for name, p2l in placements.items():
        work = slot_tokens_split(loads, p2l, 2).reshape(2, 2, 2, 10).sum(-1)
        assert got[name].shape == (2, 2, 2)
        assert np.array_equal(got[name] > 0, work > 0)  # timed exactly where a rank has tokens


@pytest.mark.gpu
def test_a_smaller_partition_measures_slower_on_compute_bound_work():
    from vllm_gem.replay import measure
    loads = np.full((1, 1, 4), 4096.0)
    p2l = np.array([[0, 1, 2, 3]])
    spec = ReplaySpec(2048, 1408, 1, kernel="triton", reps=5)
    got, _, _ = measure(loads, {"p": p2l}, Fleet([None, 66], [0, 0]), spec)
    assert got["p"][0, 0, 1] > 1.2 * got["p"][0, 0, 0]  # 66 of 132 SMs on prefill-sized tiles


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.parametrize("precision", ["bf16", "fp8-block"])
def test_vllm_rank_calls_add_up_to_the_whole_layer(precision):
    """Each rank's fused_experts with its expert_map computes exactly its slots' share:
    the ranks' outputs sum to the layer computed over every slot at once."""
    import torch

    from vllm_gem.calibrate import CalibrationSpec, calibration_weights
    from vllm_gem.replay import _vllm_call, vllm_fused_experts
    if vllm_fused_experts() is None:
        pytest.skip("vLLM's fused_experts cannot be imported")
    loads, placements = _tiny_case()
    p2l = placements["a"][0]
    hidden, inter, ranks, per_rank = 512, 256, 2, 10
    spec = ReplaySpec(hidden, inter, 2, precision, kernel="vllm")
    ids = physical_ids(step_topk_ids(loads[0, 0], 2), p2l, 16)
    gen = torch.Generator(device="cuda:0").manual_seed(5)
    w13, w2 = calibration_weights(CalibrationSpec(hidden, inter, 20, precision=precision), 0, gen)
    whole = _vllm_call(ids, 0, 20, 20, w13, w2, spec, 0)()  # one rank holding all 20 slots

    def part(w, r):
        if precision == "bf16":
            return w[r * per_rank:(r + 1) * per_rank]
        from dataclasses import replace
        return replace(w, q=w.q[r * per_rank:(r + 1) * per_rank], scale=w.scale[r * per_rank:(r + 1) * per_rank])
    total = torch.zeros_like(whole, dtype=torch.float32)
    for r in range(ranks):  # each rank computes the rows of the tokens dispatched to it
        mine = torch.as_tensor(((ids >= r * per_rank) & (ids < (r + 1) * per_rank)).any(1), device="cuda:0")
        share = _vllm_call(ids, r, per_rank, 20, part(w13, r), part(w2, r), spec, 0)()
        assert share.shape[0] == int(mine.sum())
        assert share.float().norm() > 0.1 * whole.float().norm()
        total[mine] += share.float()
    rel = (total - whole.float()).norm() / whole.float().norm()
    assert rel < 2e-2, rel


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.parametrize("precision", ["bf16", "fp8-block"])
def test_calibration_with_vllms_kernel_profiles_what_the_replay_measures(precision):
    from vllm_gem.calibrate import CalibrationSpec, calibrate_device
    from vllm_gem.latency import fit
    from vllm_gem.replay import measure, vllm_expert_kernel, vllm_fused_experts
    if vllm_fused_experts() is None:
        pytest.skip("vLLM's fused_experts cannot be imported")
    prof = calibrate_device(0, CalibrationSpec(512, 256, 8, precision=precision),
                            kernel=vllm_expert_kernel(precision))
    assert prof.kernel.name == "vllm.fused_experts" and len(prof.points) >= 4
    loads = np.full((1, 1, 8), 256.0)  # top-1: every token on one local expert, as calibrated
    got, kernel, _ = measure(loads, {"p": np.arange(8)[None]}, Fleet([None], [0]),
                             ReplaySpec(512, 256, 1, precision, kernel="vllm", reps=5))
    predicted = fit(prof, "t").predict(loads[0, 0][None])[0]
    assert kernel.startswith("vllm.fused_experts")
    assert abs(predicted - got["p"][0, 0, 0]) < 0.25 * got["p"][0, 0, 0], (predicted, got)
