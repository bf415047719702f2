#!/usr/bin/env python3
"""Serve one model several ways and run `vllm bench serve` against each (GPU machine).

For every repeat, every configuration in turn (alternating, so drift hits all alike): start
`vllm serve` (TP = EP over all GPUs, default compiled mode), wait until it is healthy and,
with GEM, until the start-up placement is logged; warm up; run `vllm bench serve` for every
(prompt/output shape, request rate); scrape /metrics; stop the server. Raw JSON, logs and
a summary (medians over repeats, ratios against the first configuration) go to OUT.

    python3 benchmarks/e2e/serve_matrix.py MODEL_DIR OUT --configs CONFIGS.json \
        [--repeats 1] [--bench-repeats 3] [--shapes 512x128,2048x16] [--rates 16,inf]

CONFIGS.json: [{"name": ..., "args": [extra `vllm serve` args], "env": {...},
"tensor_parallel_size": N (default: every GPU)}, ...]

--switch initial,vllm-default,gem (GEM configurations): inside each server start, switch the
placement before every benchmark run through GEM's `gem_place` worker method (vLLM's dev-mode
POST /collective_rpc), rotating the order every round. Every placement then runs on the same
compiled model, CUDA graphs and GPUs, planned from the same profiles and routing history;
only the placement differs, and one server start serves all of them. `PLANNER:norecord` also
turns GEM's routing recorder off for that entry (its overhead).

--profile-prompts N: once per placement (per configuration without --switch), also run N
prompts under vLLM's torch profiler (at rate inf when it is benchmarked, else the first rate)
and sum each GPU's MoE and collective kernel time (moe_profile.py): per-rank MoE time
measured in serving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import moe_profile  # noqa: E402

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
            "VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONUNBUFFERED": "1"}
VLLM = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
METRICS = ("ttft", "tpot", "itl", "e2el")  # e2el: a 16-token output's TPOT says little
GEM_DONE = re.compile(r"vllm-gem: (placed experts before serving in ([\d.]+) s|kept vLLM's placement"
                      r"|start-up placement failed)")


def num_gpus() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return len(out.strip().splitlines())


def healthy(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        return True
    except OSError:
        return False


NCCL_COMMUNICATORS = ("pynccl", "torch_nccl")  # vLLM 0.26: "incompatible with async EPLB"


def with_eplb_communicator(args: list[str], communicator: str) -> list[str]:
    """`vllm serve` args with vLLM's EPLB weight-transfer backend set (merged into an existing
    --eplb-config JSON). vLLM 0.26 picks 'torch_gloo', staged through CPU memory, when NIXL is
    absent; 'pynccl' sends GPU to GPU. vLLM refuses the NCCL ones with async EPLB (its default),
    which only its own periodic rebalancing uses, off under GEM: they get use_async false."""
    setting = {"communicator": communicator}
    if communicator in NCCL_COMMUNICATORS:
        setting["use_async"] = False
    args = list(args)
    if "--eplb-config" in args:
        i = args.index("--eplb-config") + 1
        args[i] = json.dumps({**json.loads(args[i]), **setting})
    else:
        args += ["--eplb-config", json.dumps(setting)]
    return args


def rotated(entries: list[str], k: int) -> list[str]:
    """entries turned left by k (round k of an A/B benchmark starts with another placement)."""
    k = k % len(entries) if entries else 0
    return entries[k:] + entries[:k]


def serve_command(model: str, cfg: dict, port: int, max_num_seqs: int | None = None) -> list[str]:
    """`vllm serve` for one configuration. Prefix caching is off unless the configuration sets
    "prefix_caching": the runs of one A/B round reuse one seed's prompts, so with it every run
    after a round's first found 63-97% of its prompt tokens cached (2xH200, 2026-11-23), and each
    round's first run was the slow one whatever its placement."""
    tp = cfg["tensor_parallel_size"] if "tensor_parallel_size" in cfg else num_gpus()  # asks nvidia-smi
    cmd = [*VLLM, "serve", model, "--load-format", cfg.get("load_format", "dummy"),
           "--tensor-parallel-size", str(tp), "--enable-expert-parallel",
           "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port), *cfg.get("args", [])]
    if not cfg.get("prefix_caching", False):
        cmd.append("--no-enable-prefix-caching")
    if max_num_seqs:  # vLLM then captures CUDA graphs only up to 2 x max_num_seqs: a faster start
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    return cmd


def start_server(model: str, cfg: dict, port: int, log: Path, limit: float,
                 max_num_seqs: int | None = None) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, **SAFE_ENV, **cfg.get("env", {})}
    cmd = serve_command(model, cfg, port, max_num_seqs)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # own process group: kill workers with it
    wait_gem = "gem" in " ".join(cfg.get("args", []))
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited during start-up; see {log}")
        if time.time() - t0 > limit:
            stop_server(proc)
            raise RuntimeError(f"server not ready after {limit:.0f} s; see {log}")
        if healthy(port) and (not wait_gem or GEM_DONE.search(log.read_text(errors="replace"))):
            return proc, time.time() - t0
        time.sleep(2)


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def bench(model: str, port: int, shape: tuple[int, int], rate: str, n: int, out: Path, seed: int,
          max_concurrency: int | None = None) -> dict:
    """One `vllm bench serve` run, in this process (vLLM is imported once, not per run)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    argv = ["--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--dataset-name", "random", "--random-input-len", str(shape[0]),
            "--random-output-len", str(shape[1]), "--num-prompts", str(n), "--request-rate", rate,
            "--ignore-eos", "--seed", str(seed), "--percentile-metrics", ",".join(METRICS),
            "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(out.parent),
            "--result-filename", out.name]
    if max_concurrency:  # a steady batch size: far less run-to-run spread than a burst at rate inf
        argv += ["--max-concurrency", str(max_concurrency)]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with out.with_suffix(".log").open("w") as log, contextlib.redirect_stdout(log):
        bench_main(parser.parse_args(argv))
    return json.loads(out.read_text())


def worker_rpc(port: int, method: str, **kwargs: str) -> list[dict]:
    """Call a worker method on every rank (vLLM's dev-mode POST /collective_rpc)."""
    body = json.dumps({"method": method, "kwargs": kwargs}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/collective_rpc", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["results"]


def switch(port: int, entry: str) -> dict:
    """entry 'PLANNER[:norecord]' -> rank 0's report of the switch (raises if a rank failed)."""
    planner, _, flag = entry.partition(":")
    worker_rpc(port, "gem_record", on=str(flag != "norecord"))
    reports = worker_rpc(port, "gem_place", planner=planner)
    rep = reports[0] or {}
    if not rep.get("applied") and rep.get("why") != "the plan is the map in use":
        raise RuntimeError(f"switch to {planner} failed: {rep.get('why', rep)}")
    return rep


def scrape_gem_metrics(port: int) -> list[str]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError as e:
        return [f"# /metrics unreachable: {e}"]
    return [ln for ln in text.splitlines() if ln.startswith("vllm_gem")]


def summarize(rows: list[dict], base: str) -> tuple[list[dict], str]:
    keys = sorted({(r["shape"], r["rate"]) for r in rows})
    names = list(dict.fromkeys(r["config"] for r in rows))
    table, lines = [], []
    head = "| shape | rate | config | runs | " + " | ".join(
        f"{m.upper()} p{q} ms" for m in METRICS for q in (50, 90, 99)) + " | TPOT p50 vs " + base + " |"
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    for shape, rate in keys:
        med: dict[str, dict] = {}
        for name in names:
            rs = [r for r in rows if (r["config"], r["shape"], r["rate"]) == (name, shape, rate)]
            if not rs:
                continue
            med[name] = {f"{m}_p{q}": statistics.median(r["result"][f"p{q}_{m}_ms"] for r in rs)
                         for m in METRICS for q in (50, 90, 99)}
            med[name]["runs"] = len(rs)
        for name, m in med.items():
            ratio = m["tpot_p50"] / med[base]["tpot_p50"] if base in med else float("nan")
            table.append({"shape": shape, "rate": rate, "config": name, **m, "tpot_p50_ratio": ratio})
            lines.append(f"| {shape} | {rate} | {name} | {m['runs']} | " + " | ".join(
                f"{m[f'{x}_p{q}']:.2f}" for x in METRICS for q in (50, 90, 99)) + f" | {ratio:.3f} |")
    return table, "\n".join(lines)


def gpu_rows(gpus: dict[str, dict]) -> list[tuple[str, dict]]:
    """A profile's {device: sums} (JSON keys) -> (device, sums) in GPU order, host rows (-1) left out."""
    return sorted(((d, v) for d, v in gpus.items() if int(d) >= 0), key=lambda dv: int(dv[0]))


def ceiling(switches: list[dict], moe_times: list[dict], reference: str = "vllm-default") -> str:
    """Per switched-to placement: GEM's prediction (slowest rank and the lower bound no
    placement with these slots beats, us per MoE layer), the per-GPU MoE time measured by the
    profiler where there is one, and each placement's share of the predicted ceiling against
    `reference`: (reference - placement) / (reference - bound)."""
    pred = {sw["config"]: sw["report"] for sw in switches if "predicted_bound_us" in sw.get("report", {})}
    if not pred:
        return ""
    measured = {m["config"]: m["gpus"] for m in moe_times}
    ref = next((r for label, r in pred.items() if label.endswith("/" + reference)), None)
    lines = ["| placement | predicted slowest rank us | bound us | predicted per rank us | "
             "measured MoE ms per GPU | share of the ceiling vs " + reference + " |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, r in pred.items():
        after, bound = r["predicted_layer_us_after"], r["predicted_bound_us"]
        moe = ", ".join(f"{v['moe_us'] / 1e3:.0f}" for _, v in gpu_rows(measured.get(label, {}))) or "-"
        top = ref["predicted_layer_us_after"] if ref else bound
        share = f"{(top - after) / (top - bound):.2f}" if top > bound else "-"
        lines.append(f"| {label} | {after:.1f} | {bound:.1f} | {r.get('rank_us_after')} | {moe} | {share} |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    """METRICS' P50-P90-P99 per configuration, one panel row per (shape, rate)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(dict.fromkeys((r["shape"], r["rate"]) for r in table))
    fig, axes = plt.subplots(len(keys), len(METRICS), figsize=(4.4 * len(METRICS), 3.2 * len(keys)),
                             squeeze=False)
    for row, (shape, rate) in enumerate(keys):
        rs = [r for r in table if (r["shape"], r["rate"]) == (shape, rate)]
        for col, m in enumerate(METRICS):
            ax = axes[row][col]
            for k, q in enumerate((50, 90, 99)):
                ax.bar([i + 0.27 * k for i in range(len(rs))], [r[f"{m}_p{q}"] for r in rs], 0.27,
                       label=f"p{q}")
            ax.set_xticks([i + 0.27 for i in range(len(rs))], [r["config"] for r in rs],
                          rotation=20, fontsize=7)
            ax.set_title(f"{m.upper()} ms, {shape}, rate {rate}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def file_tag(label: str) -> str:
    """A run label ('config/planner:norecord') as a file-name part."""
    return label.replace("/", ".").replace(":", "-")


def plot_moe(moe_times: list[dict], path: Path) -> None:
    """Per-GPU kernel time in the profiled window per placement: MoE, collectives (waiting for
    the straggler) and the rest, stacked; one bar per GPU, grouped by placement."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(moe_times), 3.6))
    x, ticks, names = 0.0, [], []
    for m in moe_times:
        for d, v in gpu_rows(m["gpus"]):
            parts = [v["moe_us"], v["comm_us"], v["kernel_us"] - v["moe_us"] - v["comm_us"]]
            bottom = 0.0
            for part, color, label in zip(parts, ("C3", "C0", "C7"), ("MoE", "collectives", "other kernels"),
                                          strict=True):
                ax.bar(x, part / 1e3, 0.8, bottom=bottom, color=color, label=label if x == 0 else None)
                bottom += part / 1e3
            ticks.append(x)
            names.append(f"{m['config'].split('/')[-1]}\nGPU {d}")
            x += 1
        x += 0.6
    ax.set_xticks(ticks, names, fontsize=7)
    ax.set_ylabel("ms of GPU kernel time in the window")
    ax.set_title(f"per-GPU kernel time, {moe_times[0]['shape']} (profiled prompts)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def profile_rate(rates: list[str]) -> str:
    """The rate the profiled window runs at: saturating ('inf') when benchmarked, since the
    straggler matters most there and its window is shortest (at 16/s, 128 prompts took 8 s
    of trace and about 150 s to write and read on nvidia-h200-x2), else the first rate."""
    return "inf" if "inf" in rates else rates[0]


def profile_placement(a: argparse.Namespace, raw: Path, name: str, label: str, shape: tuple[int, int],
                      rate: str) -> dict:
    """--profile-prompts prompts under vLLM's torch profiler -> per-GPU kernel time sums."""
    out = raw / f"profiled-{file_tag(label)}.json"
    t = moe_profile.profile_window(
        a.port, raw / f"traces-{name}",
        lambda: bench(a.model, a.port, shape, rate, a.profile_prompts, out, 999, a.max_concurrency),
        num_gpus())
    print(f"[{label}] profiled: " + "; ".join(
        f"GPU {d}: MoE {v['moe_us'] / 1e3:.1f} ms, collectives {v['comm_us'] / 1e3:.1f} ms, "
        f"GEM recorder {v['record_us'] / 1e3:.2f} ms of {v['span_us'] / 1e3:.1f} ms"
        for d, v in sorted(t.items()) if d >= 0), flush=True)
    return {"config": label, "shape": f"{shape[0]}x{shape[1]}",
            "gpus": {str(d): v for d, v in sorted(t.items())}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--configs", type=Path, required=True)
    p.add_argument("--only", default="", help="comma-separated config names to run")
    p.add_argument("--repeats", type=int, default=1, help="server starts per configuration")
    p.add_argument("--bench-repeats", type=int, default=3, help="benchmark runs per server start")
    p.add_argument("--shapes", default="512x128")
    p.add_argument("--rates", default="inf")
    p.add_argument("--num-prompts", type=int, default=1000,
                   help="200 prompts at rate inf last under 2 s on 2xH200: too short to measure")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="also the servers' --max-num-seqs: every request is in the batch at once")
    p.add_argument("--warmup-prompts", type=int, default=32)
    p.add_argument("--switch", default="",
                   help="placements to alternate inside each GEM server start, e.g. initial,vllm-default,gem")
    p.add_argument("--profile-prompts", type=int, default=0,
                   help="per placement, also profile this many prompts (per-rank MoE kernel time)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--startup-limit", type=float, default=400)
    p.add_argument("--eplb-communicator", default=None,
                   help="vLLM's EPLB weight-transfer backend for every configuration (e.g. pynccl)")
    a = p.parse_args()
    os.environ.update(SAFE_ENV)
    configs = json.loads(a.configs.read_text())
    if a.only:
        configs = [c for c in configs if c["name"] in a.only.split(",")]
    entries = [e for e in a.switch.split(",") if e]
    if entries:  # the switch goes through vLLM's dev-mode /collective_rpc endpoint
        configs = [{**c, "env": {**c.get("env", {}), "VLLM_SERVER_DEV_MODE": "1"}} for c in configs]
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    rates = a.rates.split(",")
    raw = a.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if a.eplb_communicator:
        configs = [{**c, "args": with_eplb_communicator(c.get("args", []), a.eplb_communicator)}
                   for c in configs]
    if a.profile_prompts:
        configs = [{**c, "args": [*c.get("args", []),
                                  *moe_profile.server_args(raw / f"traces-{c['name']}")]} for c in configs]
    rows, starts, switches, moe_times = [], [], [], []
    for rep in range(a.repeats):
        for cfg in configs:
            name = cfg["name"]
            log = raw / f"serve-{name}-rep{rep}.log"
            try:
                proc, ready = start_server(a.model, cfg, a.port, log, a.startup_limit, a.max_concurrency)
            except RuntimeError as e:
                print(f"[{name} rep{rep}] {e}", flush=True)
                continue
            gem = GEM_DONE.search(log.read_text(errors="replace"))
            starts.append({"config": name, "rep": rep, "ready_s": ready,
                           "gem_startup_s": float(gem.group(2)) if gem and gem.group(2) else None})
            try:
                bench(a.model, a.port, (256, 16), "inf", a.warmup_prompts, raw / f"warmup-{name}.json", 99)
                for brep in range(a.bench_repeats):
                    # one entry per run without --switch; with it, every entry in a rotated order
                    for entry in rotated(entries, brep) or [""]:
                        label = f"{name}/{entry}" if entry else name
                        if entry:
                            t0 = time.time()
                            rep_ = switch(a.port, entry)
                            switches.append({"config": label, "rep": f"{rep}.{brep}",
                                             "seconds": round(time.time() - t0, 2), "report": rep_})
                            print(f"[{label}] switched in {time.time() - t0:.1f} s: predicted "
                                  f"{rep_.get('predicted_layer_us_after')} us/layer (bound "
                                  f"{rep_.get('predicted_bound_us')}), moved "
                                  f"{rep_.get('slots_changed', 0)} slots", flush=True)
                        for shape in shapes:
                            for rate in rates:
                                tag = f"{file_tag(label)}-{shape[0]}x{shape[1]}-r{rate}-rep{rep}.{brep}"
                                res = bench(a.model, a.port, shape, rate, a.num_prompts,
                                            raw / f"{tag}.json", 100 * rep + brep, a.max_concurrency)
                                rows.append({"config": label, "shape": f"{shape[0]}x{shape[1]}",
                                             "rate": rate, "rep": f"{rep}.{brep}", "result": res})
                                print(f"[{tag}] TPOT p50 {res['median_tpot_ms']:.2f} ms, TTFT p50 "
                                      f"{res['median_ttft_ms']:.1f} ms, {res['completed']} done", flush=True)
                        if a.profile_prompts and brep == 0:
                            try:  # a profiler failure costs the per-rank times, not the benchmark
                                moe_times.append(profile_placement(a, raw, name, label, shapes[0],
                                                                   profile_rate(rates)))
                            except Exception as e:
                                print(f"[{label}] profiling failed: {type(e).__name__}: {e}", flush=True)
                (raw / f"metrics-{name}-rep{rep}.txt").write_text("\n".join(scrape_gem_metrics(a.port)))
            except Exception as e:  # a failed run or switch: the next configuration still runs
                print(f"[{name} rep{rep}] {type(e).__name__}: {str(e)[-2000:]}", flush=True)
            finally:
                stop_server(proc)
    if not rows:
        print("no results")
        return 1
    base = f"{configs[0]['name']}/{entries[0]}" if entries else configs[0]["name"]
    table, md = summarize(rows, base)
    summary = {"rows": table, "startup": starts, "switches": switches, "moe_profile": moe_times,
               "argv": sys.argv[1:]}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    md += "\n\n" + ceiling(switches, moe_times) if switches else ""
    (a.out / "summary.md").write_text(md + "\n")
    plot(table, a.out / "summary.png")
    if moe_times:
        plot_moe(moe_times, a.out / "moe-per-gpu.png")
    print(md)
    print(json.dumps(starts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
