"""The Triton MoE grouped GEMM against a float32 torch reference.

On CPU (CI) the kernel runs under TRITON_INTERPRET=1 at tiny shapes, in a subprocess since
the variable must be set before triton is imported. On a GPU: real model shapes in bf16.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import gpu_moe_layer

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

INTERPRET_CHECK = textwrap.dedent("""
    import torch
    from vllm_gem.kernels.moe_gemm import TileConfig, align, moe_ffn, moe_ffn_reference
    torch.manual_seed(0)
    T, H, I, E, K = 13, 32, 16, 5, 2
    w13 = torch.randn(E, 2 * I, H) / H ** 0.5
    w2 = torch.randn(E, H, I) / I ** 0.5
    cases = {
        "random": torch.stack([torch.randperm(E)[:K] for _ in range(T)]),
        "one hot expert": torch.stack([torch.tensor([3, 1])] * T),  # experts 0, 2, 4 idle
    }
    for name, ids in cases.items():
        x, w = torch.randn(T, H), torch.rand(T, K)
        for cfg in (TileConfig(16, 16, 16), TileConfig(16, 32, 16, group_m=2)):
            out = moe_ffn(x, w13, w2, w, ids, cfg)
            ref = moe_ffn_reference(x, w13, w2, w, ids)
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 1e-5, (name, cfg, err)
    al = align(cases["one hot expert"], E, 16)
    assert al.num_padded.item() == 32  # experts 3 and 1: 13 rows each, one 16-row tile each
    assert al.block_expert[:2].tolist() == [1, 3]
    # the one-program path (<= 1024 rows: 1, 300 tokens) and the three-kernel path (2100 rows);
    # experts not a power of two, some idle, int32 and int64 ids: every row once, in its expert's tiles
    E2, B = 37, 16
    for tokens, dtype in ((4, torch.int64), (300, torch.int32), (700, torch.int64)):
        ids = torch.randint(0, E2 - 5, (tokens, 3)).to(dtype)
        al = align(ids, E2, B)
        counts = torch.bincount(ids.reshape(-1), minlength=E2)
        assert al.num_padded.item() == int(((counts + B - 1) // B * B).sum()), tokens
        seen = []
        for t in range(al.num_padded.item() // B):
            rows = al.sorted_ids[t * B:(t + 1) * B]
            rows = rows[rows < ids.numel()].long()
            assert (ids.reshape(-1)[rows] == al.block_expert[t]).all(), (tokens, t)
            seen += rows.tolist()
        assert sorted(seen) == list(range(ids.numel())), tokens
        assert (al.sorted_ids[al.num_padded.item():] == ids.numel()).all(), tokens
    # fewer rows than experts: room for one padded tile per row, not per expert (the GEMMs'
    # grids follow), and the worst case, every row its own expert, fills it exactly
    al = align(torch.arange(12).reshape(4, 3), E2, B)
    assert al.sorted_ids.numel() == 12 * B and al.num_padded.item() == 12 * B
    assert al.sorted_ids[::B].tolist() == list(range(12))
    # rows * 4 <= experts: one row per tile and no align kernel (vLLM's naive block assignment);
    # the layer still matches the reference, repeated experts included
    al = align(torch.tensor([[0, 5, 36]]), E2, B)
    assert al.sorted_ids is None and al.num_padded.item() == 3 * B and al.max_padded == 3 * B
    assert al.block_expert.tolist() == [0, 5, 36]
    # under expert parallelism vLLM always sorts (its naive path needs expert_map None), and
    # calibration times that path: one tile per expert, not per row
    al = align(torch.tensor([[5], [5], [5]]), E2, B, expert_parallel=True)
    assert al.sorted_ids is not None and al.num_padded.item() == B
    E3 = 24
    w13, w2 = torch.randn(E3, 2 * I, H) / H ** 0.5, torch.randn(E3, H, I) / I ** 0.5
    for ids in (torch.tensor([[3, 17, 0], [17, 23, 3]]), torch.tensor([[5, 9, 11]])):
        x, w = torch.randn(ids.shape[0], H), torch.rand(ids.shape)
        assert align(ids, E3, 16).sorted_ids is None
        out = moe_ffn(x, w13, w2, w, ids, TileConfig(16, 16, 16))
        ref = moe_ffn_reference(x, w13, w2, w, ids)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5, ids
    print("ok")
""")


def test_kernel_matches_reference_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", INTERPRET_CHECK], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


SHAPES = {  # name: (hidden, moe_intermediate, experts on this GPU, top_k)
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3": (7168, 2048, 32, 8),
    "mixtral": (4096, 14336, 8, 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_kernel_matches_reference_on_gpu(shape, tokens):
    from vllm_gem.kernels.moe_gemm import moe_ffn, moe_ffn_reference
    w13, w2, x, ids, w = gpu_moe_layer(*SHAPES[shape], tokens)
    out = moe_ffn(x, w13, w2, w, ids)
    torch.cuda.synchronize()
    ref = moe_ffn_reference(x, w13, w2, w, ids)
    assert torch.isfinite(out).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu
def test_calibration_on_gpu_gives_a_usable_profile(tmp_path):
    from vllm_gem.calibrate import CalibrationSpec, calibrate_device, held_out_report
    from vllm_gem.formats import GpuProfile, load, save
    prof = calibrate_device(0, CalibrationSpec(num_experts=16, reps=10))
    back = load(save(prof, tmp_path / "p.json"), GpuProfile)
    assert back.gpu.sm_count > 0 and back.state_before is not None
    rep = held_out_report(back)
    assert rep["held_out_rel_rms"] < 0.25, rep  # the 5% goal is measured in docs, not here


@pytest.mark.gpu
def test_repeated_calibration_leaves_no_gpu_memory_behind():
    """Serving re-profiles every few hundred steps: a run that made a new stream would leave
    a 32 MiB cuBLAS workspace behind each time (benchmarks/studies/calibration_memory.py), so
    repeated calibrations must not grow the GPU memory in use."""
    from vllm_gem.calibrate import CalibrationSpec, calibrate_device
    spec = CalibrationSpec(num_experts=16, reps=3, extra_work=0.2)
    calibrate_device(0, spec)  # the first run may cache kernels and one workspace
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    for _ in range(3):
        calibrate_device(0, spec)
        torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated(0) == before


@pytest.mark.gpu
def test_speed_checks_of_one_gpu_agree_with_each_other_and_see_it_slower():
    """The recalibration's cheap check. Against a profile from idle, the same GPU reads 2-25%
    slower at small loads after heavy work (its clocks rise), so a check against the idle
    profile would call a healthy GPU slow: checks are compared with each other (relative_speed_changes), as the GPUs of a group are. Two checks of the
    unchanged GPU agree; one doing 25% extra expert work (emulate.slow_down_experts' way)
    reads slower than the one before it."""
    from vllm_gem.calibrate import CalibrationSpec, calibrate_device, check_speed, relative_speed_changes
    spec = CalibrationSpec(num_experts=64, reps=10)  # model-q3's local experts on 2 GPUs
    prof = calibrate_device(0, spec)
    first, second = check_speed(0, spec, prof), check_speed(0, spec, prof)
    slower = check_speed(0, CalibrationSpec(num_experts=64, reps=10, extra_work=0.25), prof)
    assert first.points == len(first.point_ratios) == 8
    same = relative_speed_changes([first.point_ratios, second.point_ratios])
    assert np.abs(same - 1).max() < 0.05, (first, second)
    assert relative_speed_changes([second.point_ratios, slower.point_ratios])[1] > 1.1, (second, slower)


def test_relative_speed_changes_compare_each_gpu_with_the_others():
    from vllm_gem.calibrate import relative_speed_changes
    clocks = np.array([1.2, 1.05, 1.0, 0.96])  # every GPU after heavy work: small loads slowest
    np.testing.assert_allclose(relative_speed_changes([clocks, clocks]), [1, 1])
    np.testing.assert_allclose(relative_speed_changes([clocks, clocks, clocks, 1.1 * clocks]),
                               [1, 1, 1, 1.1])  # the median of the others: the slow one aside
    np.testing.assert_allclose(relative_speed_changes([clocks, 1.1 * clocks]), [1 / 1.1, 1.1])
    failed = relative_speed_changes([clocks, None, 1.1 * clocks])  # compared with who checked
    np.testing.assert_allclose(failed, [1 / 1.1, np.nan, 1.1])
    assert np.isnan(relative_speed_changes([clocks, None])).all()  # nobody to compare with
    unpaired = relative_speed_changes([[1.0, 1.2], [1.2, 1.3, 1.4]])  # other patterns: medians
    np.testing.assert_allclose(unpaired, [1.1 / 1.3, 1.3 / 1.1])
    np.testing.assert_allclose(relative_speed_changes([clocks, 1.1 * clocks], paired=False),
                               [1 / 1.1, 1.1])
    np.testing.assert_allclose(relative_speed_changes([clocks]), [np.median(clocks)])  # one GPU


def test_speed_check_points_and_ratio():
    from vllm_gem.calibrate import check_points, point_ratios
    from vllm_gem.formats import LatencyPoint
    assert check_points(69).tolist() == [0, 10, 19, 29, 39, 49, 58, 68]  # decode .. mixed loads
    assert check_points(3).tolist() == [0, 1, 2]
    ref = [LatencyPoint([1, 0], t) for t in (10.0, 20.0, 40.0)]
    now = [LatencyPoint([1, 0], t) for t in (11.0, 22.0, 80.0)]  # one outlier does not decide
    assert np.median(point_ratios(ref, now)) == pytest.approx(1.1)  # SpeedCheck.ratio's way
    with pytest.raises(ValueError, match="2 measured points for 3 reference points"):
        point_ratios(ref, now[:2])


def test_a_speed_check_against_a_profile_of_another_shape_names_it():
    from vllm_gem.calibrate import CalibrationSpec, check_speed
    from vllm_gem.formats import ExpertShape, GpuIdentity, GpuProfile, KernelSpec, LatencyPoint
    prof = GpuProfile(gpu=GpuIdentity(name="H200", index=1), expert=ExpertShape(2048, 768, "bfloat16"),
                      kernel=KernelSpec("k", 64, 64, 64), points=[LatencyPoint([1] * 8, 9.0)])
    with pytest.raises(ValueError, match=r"reference profile of H200 #1: points.tokens_per_expert "
                                         r"has 8 experts, expected 16"):
        check_speed(0, CalibrationSpec(num_experts=16), prof)  # raised before any GPU work


def test_calibration_reuses_one_stream_per_device(monkeypatch):
    """A new stream per calibration leaks a cuBLAS workspace each time (see the GPU test)."""
    from vllm_gem import calibrate
    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    calibrate.calibration_stream.cache_clear()
    try:
        first = calibrate.calibration_stream(0)
        assert calibrate.calibration_stream(0) is first and first[0] is None
        calibrate.calibration_stream(1)
        assert made == [0, 1]
    finally:
        calibrate.calibration_stream.cache_clear()


def test_compile_ahead_compiles_each_launch_and_runs_none(monkeypatch):
    from vllm_gem.kernels.moe_gemm import compile_ahead, launch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []

    class Kernel:  # what launch() uses of a triton.jit function
        def warmup(self, *args, grid, **kwargs):
            calls.append(("compile", grid, args, kwargs))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("run", grid, args, kwargs))

    with compile_ahead(4) as ahead:
        assert ahead
        launch(Kernel(), (2,), 1, B=3)
    launch(Kernel(), (2,), 1, B=3)
    with compile_ahead(1) as ahead:  # one thread: nothing to gain, and nothing is compiled
        assert not ahead
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with compile_ahead(4) as ahead:
        assert not ahead
    assert calls == [("compile", (2,), (1,), {"B": 3}), ("run", (2,), (1,), {"B": 3})]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bf16", "block", "tensor"])
def test_compile_ahead_leaves_nothing_to_compile_at_launch(layout):
    from vllm_gem.kernels import moe_gemm as mg
    from vllm_gem.kernels import moe_gemm_fp8 as f8
    w13, w2, x, ids, w = gpu_moe_layer(256, 128, 8, 2, 23)
    cfg = mg.TileConfig(32, 64, 128, 1, 4, 2)  # a tile no other test compiles
    if layout == "bf16":
        def call():
            return mg.moe_ffn(x, w13, w2, w, ids, cfg)
    else:
        q13, q2 = f8.quantize_weights(w13, layout), f8.quantize_weights(w2, layout)

        def call():
            return f8.moe_ffn_fp8(x, q13, q2, w, ids, cfg)
    kernels = [mg.align_one_program_kernel, mg.silu_and_mul_kernel, mg.moe_grouped_gemm_kernel,
               f8.quantize_rows_kernel, f8.abs_max_kernel, f8.moe_fp8_gemm_kernel]
    compiled = lambda: [len(k.device_caches[torch.cuda.current_device()][0]) for k in kernels]  # noqa: E731
    before = compiled()
    with mg.compile_ahead(4) as ahead:
        assert ahead
        call()
    ahead_of_launch = compiled()
    out = call()
    torch.cuda.synchronize()
    assert ahead_of_launch != before  # the GEMMs at least were new
    assert compiled() == ahead_of_launch  # and the launch found every kernel compiled
    assert torch.isfinite(out.float()).all()
