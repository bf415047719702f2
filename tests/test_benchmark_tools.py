"""The serving benchmark's measuring helpers on CPU: profiler trace sums, the profiling window
against a stand-in server, and the soak's memory-growth and recalibration-stall readings."""

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "e2e"))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))  # no kernels.py there (see speed_drift below)
import moe_profile  # noqa: E402
from soak import memory_growth, recalibration_stalls  # noqa: E402

from vllm_gem.vllm.recorder import RECORD_RANGE  # noqa: E402


def _trace(device: int, moe_us: float, comm_us: float, start: float = 0.0) -> dict:
    # as torch's Chrome traces write them: a kernel names its device in args, a GPU-side range
    # only through pid (the device's timeline), with its External id
    k = lambda name, ts, dur: {"cat": "kernel", "name": name, "ts": ts, "dur": dur,  # noqa: E731
                               "pid": device, "args": {"device": device}}
    return {"traceEvents": [
        {"cat": "cpu_op", "name": "aten::mm", "ts": start, "dur": 999.0},  # not a GPU kernel
        k("fused_moe_kernel", start + 10, moe_us / 2),
        k("void vllm::moe::moe_align_block_size_kernel<int>", start + 100, moe_us / 4),
        k("void vllm::act_and_mul_kernel<silu>", start + 200, moe_us / 4),
        k("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", start + 300, comm_us),
        k("void flash_fwd_kernel", start + 300 + comm_us, 40.0),
        # the recorder's range on the GPU timeline, over a scatter kernel counted once as a kernel
        {"cat": "gpu_user_annotation", "name": RECORD_RANGE, "ts": start + 340 + comm_us, "dur": 3.0,
         "pid": device, "args": {"External id": 7}},
        k("void at::native::scatter_gather_elementwise_kernel", start + 341 + comm_us, 2.0),
        {"cat": "gpu_user_annotation", "name": "some_other_range", "ts": start, "dur": 500.0,
         "pid": device, "args": {"External id": 3}},
    ]}


def test_kernel_times_split_moe_collectives_recorder_and_the_rest_per_gpu():
    t = moe_profile.kernel_times(_trace(1, moe_us=80.0, comm_us=20.0, start=1000.0))
    assert t == {1: {"moe_us": 80.0, "comm_us": 20.0, "kernel_us": 142.0, "record_us": 3.0,
                     "span_us": 363.0 - 10.0}}


class _StandIn(BaseHTTPRequestHandler):
    """/start_profile, /stop_profile: on stop, each 'worker' writes its gzip'd trace."""
    trace_dir: Path
    devices: list[int]
    calls: list[str] = []

    def do_POST(self):  # noqa: N802
        type(self).calls.append(self.path)
        if self.path == "/stop_profile":
            for d in self.devices:
                with gzip.open(self.trace_dir / f"worker{d}.pt.trace.json.gz", "wt") as f:
                    json.dump(_trace(d, moe_us=100.0 * (d + 1), comm_us=10.0), f)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("devices", [[0, 1], [0]])
def test_profile_window_sums_every_workers_trace_and_removes_it(tmp_path, devices):
    handler = type("H", (_StandIn,), {"trace_dir": tmp_path, "devices": devices, "calls": []})
    srv = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    ran = []
    try:
        if len(devices) < 2:  # a worker wrote no trace: one error naming the folder and the GPUs
            with pytest.raises(RuntimeError, match=rf"{tmp_path} cover GPUs \[0\], expected 2"):
                moe_profile.profile_window(srv.server_port, tmp_path, lambda: ran.append(1), 2, wait_s=4)
        else:
            t = moe_profile.profile_window(srv.server_port, tmp_path, lambda: ran.append(1), 2, wait_s=10)
            assert {d: v["moe_us"] for d, v in t.items()} == {0: 100.0, 1: 200.0}
            assert t[1]["comm_us"] == 10.0
    finally:
        srv.shutdown()
    assert ran == [1] and handler.calls == ["/start_profile", "/stop_profile"]
    assert not list(tmp_path.glob("*.json*"))  # traces are big: deleted once read


def test_soak_memory_growth_reads_the_floor_not_the_swing():
    # GPU memory swings by 1000 MiB with every recalibration; its floor stays at 100
    samples = [{"t": 60.0 + 5 * i, "gpu_mib": [100.0 + 1000 * (i % 2)],
                "rss_mib": {"api-server": 50.0 + i, "VLLM::Worker_TP0_EP0": 70.0}} for i in range(8)]
    g = memory_growth(samples)
    assert g["gpu_mib_floor_growth"] == [0.0] and g["gpu_mib_swing"] == [1000.0]
    assert g["rss_mib_per_min_by_process"] == {"VLLM::Worker_TP0_EP0": 0.0, "api-server": 12.0}
    assert g["rss_mib_per_min"] == 12.0 and g["rss_mib_growth"] == 7.0
    for s in samples[4:]:  # the floor of the second half rises: growth
        s["gpu_mib"] = [400.0]
    assert memory_growth(samples)["gpu_mib_floor_growth"] == [300.0]
    assert g["gpu_mib_floor_by_quarter"] == [[100.0] * 4]
    climbing = [dict(s, gpu_mib=[100.0 + 10 * i]) for i, s in enumerate(samples)]
    assert memory_growth(climbing)["gpu_mib_floor_by_quarter"] == [[100.0, 120.0, 140.0, 160.0]]


def test_soak_recalibration_stalls_from_session_8s_server_log():
    # the 12000-prompt GEM soak on nvidia-h200-x2: every 4th recalibration re-profiled
    text = (ROOT / "docs/results/2026-11-23-soak-gem-12k-h200x2/gem-server-lines.txt").read_text()
    s = recalibration_stalls(text)
    assert (s["profiled_count"], s["planned_only_count"], s["speed_checked_count"]) == (31, 91, 0)
    assert s["recalibration_seconds"] == pytest.approx(60.0, abs=0.05)
    assert s["profiled_median_s"] == pytest.approx(1.43, abs=0.01)
    assert s["planned_only_median_s"] == pytest.approx(0.165, abs=0.002)
    checked = "vllm-gem recalibration: {'profiled': False, 'speed_ratios': [1.0, nan], 'total_seconds': 0.3}"
    assert recalibration_stalls(checked)["speed_checked_median_s"] == 0.3


def test_soak_second_half_slope_tells_a_plateau_from_a_leak():
    # both workers grow 6 MiB a minute at first; only the leaking one keeps growing
    samples = [{"t": 60.0 + 5 * i, "gpu_mib": [100.0],
                "rss_mib": {"leak": 100.0 + 0.5 * i, "plateau": 100.0 + 0.5 * min(i, 10)}}
               for i in range(40)]
    g = memory_growth(samples)
    assert g["rss_mib_per_min_by_process"]["plateau"] > 1.0
    assert g["rss_mib_per_min_by_process_second_half"] == {"leak": 6.0, "plateau": 0.0}


def test_ceiling_table_gives_each_placement_its_share_of_the_predicted_ceiling():
    from serve_matrix import ceiling
    rep = lambda after, ranks: {"predicted_layer_us_after": after, "predicted_bound_us": 160.0,  # noqa: E731
                                "rank_us_after": ranks}
    switches = [{"config": "s/initial", "report": rep(231.48, [148.0, 231.48])},
                {"config": "s/vllm-default", "report": rep(236.98, [151.71, 236.98])},
                {"config": "s/gem", "report": rep(184.13, [166.01, 183.3])},
                {"config": "s/gem", "report": rep(184.13, [166.01, 183.3])},  # switched to twice: one row
                {"config": "s/old", "report": {"predicted_layer_us_after": 1.0}}]  # no bound: left out
    moe = [{"config": "s/gem",
            "gpus": {"-1": {"moe_us": 5.0}, "1": {"moe_us": 739e3}, "0": {"moe_us": 625e3}}}]
    rows = ceiling(switches, moe).splitlines()
    assert len(rows) == 2 + 3
    gem = next(r for r in rows if r.startswith("| s/gem |")).split(" | ")
    assert gem[4] == "625, 739"  # measured, GPU order, host rows (-1) left out
    assert float(gem[5].rstrip(" |")) == pytest.approx((236.98 - 184.13) / (236.98 - 160.0), abs=0.005)
    assert next(r for r in rows if r.startswith("| s/vllm-default |")).endswith("| - | 0.00 |")
    assert ceiling([], moe) == ""


def test_per_gpu_moe_plot_is_written(tmp_path):
    from serve_matrix import plot_moe
    gpus = {"0": {"moe_us": 6e5, "comm_us": 6.7e5, "kernel_us": 1.6e6},
            "1": {"moe_us": 9.4e5, "comm_us": 6e4, "kernel_us": 1.3e6}, "-1": {"moe_us": 0.0}}
    plot_moe([{"config": "s/initial", "shape": "512x128", "gpus": gpus},
              {"config": "s/gem", "shape": "512x128", "gpus": gpus}], tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


class _Completions(BaseHTTPRequestHandler):
    """/v1/completions as vLLM answers a multi-prompt request, choices out of order."""
    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        choices = [{"index": i, "text": "", "token_ids": [i, i + 1],
                    "logprobs": {"top_logprobs": [{"a": -0.5, "b": -1.5}, {"c": -2.0, "d": -0.1}]}}
                   for i in range(len(body["prompt"]))][::-1]
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_switch_identity_sends_one_greedy_batch_and_reads_token_ids_in_prompt_order():
    from greedy_identity import PROMPTS
    from switch_identity import greedy
    handler = type("H", (_Completions,), {"bodies": []})
    srv = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = greedy(srv.server_port, "m", 2)
    finally:
        srv.shutdown()
    (body,) = handler.bodies
    assert body["prompt"] == PROMPTS and body["temperature"] == 0.0 and body["return_token_ids"]
    assert out["tokens"] == [[i, i + 1] for i in range(len(PROMPTS))]
    assert out["top2"][0] == [[-0.5, -1.5], [-0.1, -2.0]]


def test_eplb_communicator_is_merged_into_the_eplb_config_or_added_and_vllm_accepts_it():
    from serve_matrix import rotated, with_eplb_communicator
    from vllm.config.parallel import EPLBConfig
    args = ["--plugin", "gem", "--eplb-config", '{"num_redundant_experts": 16}']
    out = with_eplb_communicator(args, "pynccl")
    # vLLM 0.26 refuses NCCL communicators with async EPLB (its default) and the server dies at
    # start-up: the helper must turn async off whenever it picks an NCCL communicator
    assert json.loads(out[3]) == {"num_redundant_experts": 16, "communicator": "pynccl", "use_async": False}
    assert args[3] == '{"num_redundant_experts": 16}'  # the configuration itself is not changed
    for communicator in ("pynccl", "torch_nccl", "torch_gloo"):
        out = with_eplb_communicator(["--plugin", "gem"], communicator)
        assert out[2] == "--eplb-config"
        assert EPLBConfig(**json.loads(out[3])).communicator == communicator
    with pytest.raises(ValueError, match="incompatible with async EPLB"):  # why use_async is set
        EPLBConfig(communicator="pynccl")
    # the A/B rounds' order; no placements to switch (plain matrices) is no rotation, no error
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"] and rotated([], 1) == []


def test_the_dp_soak_serves_one_gpu_per_dp_rank_with_gems_trace():
    from serve_matrix import serve_command
    from soak import soak_config
    gem = '{"trace": "/tmp/gem/trace-skewed.msgpack"}'
    cfg = soak_config(gem, "/tmp/gem/trace-skewed.msgpack", data_parallel_size=2)
    cmd = serve_command("m", cfg, 8000)
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "1"
    assert cmd[cmd.index("--data-parallel-size") + 1] == "2" and "--enable-expert-parallel" in cmd
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"gem": json.loads(gem)}
    plain = soak_config("{}", "t", no_gem=True)
    assert plain["args"] == [] and "tensor_parallel_size" not in plain  # TP over every GPU


def test_the_profiled_window_runs_at_the_saturating_rate_when_there_is_one():
    from serve_matrix import profile_rate
    assert profile_rate(["16", "inf"]) == "inf"
    assert profile_rate(["8", "16"]) == "8"


def test_benchmark_servers_run_without_prefix_caching_unless_asked(monkeypatch):
    import serve_matrix
    monkeypatch.setattr(serve_matrix, "num_gpus", lambda: 2)
    cmd = serve_matrix.serve_command("m", {"args": ["--plugin", "gem"]}, 8000, max_num_seqs=64)
    assert "--no-enable-prefix-caching" in cmd and cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[-2:] == ["--max-num-seqs", "64"] and "--plugin" in cmd
    assert "--no-enable-prefix-caching" not in serve_matrix.serve_command("m", {"prefix_caching": True}, 8000)


def test_speed_drift_a_placement_for_the_old_speeds_loses_to_a_replan():
    """benchmarks/studies/speed_drift.py's reading, which sets speed_tolerance's default (docs/plugin.md):
    a GPU 20% slower than GEM placed for costs the stale placement, a re-plan wins it back."""
    # benchmarks/ itself stays off sys.path: benchmarks/kernels.py would become the `kernels`
    # package that transformers probes for when vLLM is imported (in later tests' processes too)
    from speed_drift import case

    from vllm_gem.evaluate import bundled_trace
    rows = case(bundled_trace("qwen").loads.astype(np.float64), ranks=2, slowdowns=[0.0, 0.2])
    same, slow = rows
    assert abs(same["missed_cost"]) < 0.01  # nothing changed: nothing to win back
    assert slow["missed_cost"] > 0.03 and slow["replanned_vs_eplb"] < 0.95
    assert slow["bound_us"] <= slow["replanned_us"] <= slow["stale_us"]

