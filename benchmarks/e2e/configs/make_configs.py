"""Write the serving-matrix configurations of benchmarks/gpu/plugin_session.sh.

    python3 benchmarks/e2e/configs/make_configs.py

equal-gpus: vLLM / GEM recorder only / GEM, on the two GPUs as they are; gem-r16: GEM with
16 redundant slots (the A/B switching server: --switch initial,vllm-default,gem); gem-r16-dummy:
the same with vLLM's own dummy-weight routing instead of the trace replay.
slow10, slow20: GPU 1 does 10% / 20% extra expert work (emulated in-process); vLLM's
placement / vLLM's EPLB policy applied once after the same warm-up / GEM, 16 redundant slots.
mix-slow20: the same on the Mixtral-like model (8 experts, top-2), 2 redundant slots.
dp2-slow20: data parallelism 2 x TP 1 with expert parallelism over both GPUs, GPU 1 +20%:
vLLM's placement / GEM planned from the trace file (with DP there is no warm-up), one server
each (switching on request reaches one DP rank's workers only, so it is not used there).
Routing is replayed from a skewed trace (gem_trace) in every configuration.
real-slow10: the Qwen1.5-MoE-A2.7B-shaped model (60 experts, top-4) with the real HarMoEny
Qwen1.5-MoE trace replayed in its recorded order, GPU 1 10% slower, 4 redundant slots (the
two-GPU run of real routing). fp8-slow10: the Qwen3-30B-A3B-shaped model served in fp8
(`--quantization fp8`), GPU 1 10% slower: GEM calibrates and plans in the served precision.
one-gpu-q15-recorded.json and one-gpu-fp8.json (written by hand, not here): those two models
served on one GPU without GEM (vLLM's EPLB needs two ranks), the check that runs there.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def env(trace: str, order: str = "random") -> dict:
    return {"VLLM_MOE_ROUTING_SIMULATION_STRATEGY": "gem_trace", "VLLM_GEM_ROUTING_TRACE": trace,
            **({"VLLM_GEM_ROUTING_ORDER": order} if order != "random" else {})}


def gem(**settings) -> list[str]:
    return ["--plugin", "gem", "--additional-config", json.dumps({"gem": settings})]


def traces(name: str) -> str:
    """trace_dir of an A/B server: plugin_session.sh brings back what GEM planned from."""
    return f"/tmp/gem/traces-{name}"


def redundant(slots: int) -> list[str]:
    return ["--eplb-config", json.dumps({"num_redundant_experts": slots})]


def slow(fraction: float, trace: str, slots: int, prefix: str = "", order: str = "random",
         extra: list[str] | None = None) -> list[dict]:
    tag, e = f"{prefix}slow{round(fraction * 100)}", {"1": fraction}
    red = redundant(slots) + (extra or [])
    return [
        {"name": f"vllm-linear-{tag}", "args": gem(place=False, emulate_slowdown=e) + red,
         "env": env(trace, order)},
        {"name": f"vllm-eplb-{tag}",
         "args": gem(planner="vllm-default", min_gain=-1, emulate_slowdown=e) + red, "env": env(trace, order)},
        {"name": f"gem-{tag}",
         "args": gem(emulate_slowdown=e, trace_dir=traces(f"gem-{tag}")) + red, "env": env(trace, order)},
    ]


def main() -> None:
    q3, mix = "/tmp/gem/trace-skewed.msgpack", "/tmp/gem/trace-mix.msgpack"
    q15 = "/tmp/gem/trace-qwen15.msgpack"  # HarMoEny's Qwen1.5-MoE-A2.7B routing (bundled:qwen)
    sets = {
        "equal-gpus": [{"name": "vllm", "args": [], "env": env(q3)},
                       {"name": "gem-recorder-only", "args": gem(place=False), "env": env(q3)},
                       {"name": "gem", "args": gem(), "env": env(q3)},
                       {"name": "gem-r16",
                        "args": gem(trace_dir=traces("gem-r16")) + redundant(16), "env": env(q3)},
                       {"name": "gem-r16-dummy",
                        "args": gem(trace_dir=traces("gem-r16-dummy")) + redundant(16), "env": {}}],
        "slow20": slow(0.2, q3, 16),
        "slow10": slow(0.1, q3, 16),
        "mix-slow20": slow(0.2, mix, 2, prefix="mix-"),
        "real-slow10": slow(0.1, q15, 4, prefix="real-", order="recorded"),
        "fp8-slow10": slow(0.1, q3, 16, prefix="fp8-", extra=["--quantization", "fp8"]),
        "dp2-slow20": [
            {"name": "vllm-linear-dp2-slow20", "tensor_parallel_size": 1,
             "args": ["--data-parallel-size", "2"] + gem(place=False, emulate_slowdown={"1": 0.2})
             + redundant(16), "env": env(q3)},
            {"name": "gem-dp2-slow20", "tensor_parallel_size": 1,
             "args": ["--data-parallel-size", "2"] + gem(trace=q3, emulate_slowdown={"1": 0.2})
             + redundant(16), "env": env(q3)}],
    }
    for name, configs in sets.items():
        (HERE / f"{name}.json").write_text(json.dumps(configs, indent=1) + "\n")


if __name__ == "__main__":
    main()
