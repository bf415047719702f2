#!/usr/bin/env python3
"""Greedy generations with and without GEM must be identical (GPU machine, >= 2 GPUs).

Runs vLLM three times in fresh processes on the same model, prompts and seed, in vLLM's
default compiled mode (torch.compile + CUDA graphs): plain vLLM with expert parallelism, then
`additional_config={"gem": ...}` (what `--plugin gem` sets) with one rank emulated slower so
the plan moves experts across ranks, then plain vLLM again. Compares GEM's token ids with the
second plain run (the first one fills the compile caches), and reports the two plain runs'
agreement as the floor; writes a JSON report.

    python3 benchmarks/e2e/greedy_identity.py MODEL_DIR OUT.json [--slowdown 0.3] [--dtype float32]

--dtype float32 serves the model in fp32: each rank's partial MoE sum then keeps 24 mantissa
bits instead of bf16's 8, which tells a placement bug from bf16 rounding of partial sums.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = [
    "The history of the printing press begins", "A recipe for bread needs", "In quantum mechanics, a",
    "def fibonacci(n):", "The capital cities of Europe include", "Once upon a time in a forest",
    "To configure a Linux firewall you", "The main causes of inflation are", "Dear hiring manager,",
    "The rules of chess say that", "Photosynthesis converts", "SELECT * FROM users WHERE",
    "The best way to learn a language is", "Mount Everest was first climbed", "In 1969 the Apollo",
    "A neural network is trained by",
]


def run(model: str, mode: str, slowdown: float, max_tokens: int, out: str, planner: str,
        dtype: str) -> None:
    from vllm import LLM, SamplingParams
    kwargs = dict(model=model, tensor_parallel_size=2, enable_expert_parallel=True,
                  max_model_len=1024, gpu_memory_utilization=0.6, seed=0, dtype=dtype)
    if mode == "gem":
        # planner vllm-default: vLLM's own EPLB policy moves the experts (the control run)
        kwargs["additional_config"] = {"gem": {"emulate_slowdown": {1: slowdown}, "strict": True,
                                               "warmup_prompts": 32, "planner": planner,
                                               "min_gain": -1}}
    t0 = time.time()
    llm = LLM(**kwargs)
    start = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, seed=0)
    outs = llm.generate(PROMPTS, sp)
    res = {"mode": mode, "startup_s": start,
           "tokens": [list(o.outputs[0].token_ids) for o in outs],
           "top2": [[sorted((x.logprob for x in lp.values()), reverse=True)[:2]
                     for lp in o.outputs[0].logprobs] for o in outs]}
    if mode == "gem":
        res["workers"] = llm.collective_rpc(_worker_state)
    with open(out, "w") as f:
        json.dump(res, f)


def _worker_state(worker) -> dict:
    import torch

    from vllm_gem.vllm.entry import current
    w = current()
    if w is None:
        return {"active": False}
    p2l = w.ctx.model_state.physical_to_logical_map.cpu()
    local = p2l.shape[1] // w.ctx.size
    linear = torch.arange(p2l.shape[1]) % w.ctx.model.num_logical_experts
    return {"active": True, "rank": w.ctx.rank, "generation": w.progress.generation,
            "recorded_steps": w.recorder.steps,
            "slots_moved_vs_linear": int((p2l != linear).sum()),
            "experts_on_rank0_layer0": sorted(p2l[0, :local].tolist())}


def compare(base: dict, gem: dict) -> dict:
    rows = []
    for i, (a, b) in enumerate(zip(base["tokens"], gem["tokens"], strict=True)):
        first = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        gap = None
        if first is not None:
            top2 = base["top2"][i][first]
            gap = top2[0] - top2[1] if len(top2) == 2 else None
        rows.append({"prompt": i, "identical": a == b, "first_divergence": first,
                     "baseline_top2_logprob_gap_there": gap})
    return {"identical_prompts": sum(r["identical"] for r in rows), "prompts": len(rows), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--slowdown", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--planner", default="gem",
                   help="who plans the moved placement: gem, or vllm-default (vLLM's policy)")
    p.add_argument("--dtype", default="auto", help="vLLM's --dtype for both runs (auto: the model's)")
    p.add_argument("--reuse-baseline", action="store_true",
                   help="keep existing OUT.baseline.json and OUT.baseline2.json from an earlier run")
    p.add_argument("--run", choices=["baseline", "gem"], help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run:
        run(a.model, a.run, a.slowdown, a.max_tokens, a.part, a.planner, a.dtype)
        return 0
    # plain vLLM twice: the first run on a fresh machine fills the torch.compile and Triton
    # caches, and on nvidia-h200-x2 it differed from every later run (plain or with GEM) at
    # exact logit ties. GEM is compared with the second; the first pair is plain vLLM's own
    # run-to-run agreement.
    parts = {}
    for mode in ("baseline", "gem", "baseline2"):
        part = f"{a.out}.{mode}.json"
        if mode != "gem" and a.reuse_baseline and os.path.exists(part):
            with open(part) as f:
                parts[mode] = json.load(f)
            continue
        # the GEM run asks the workers for their state through LLM.collective_rpc(function)
        env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"} if mode == "gem" else None
        rc = subprocess.call([sys.executable, __file__, a.model, a.out, "--run", mode.rstrip("2"),
                              "--part", part, "--slowdown", str(a.slowdown), "--max-tokens",
                              str(a.max_tokens), "--planner", a.planner, "--dtype", a.dtype], env=env)
        if rc:
            print(f"{mode} run failed with exit code {rc}")
            return 1
        with open(part) as f:
            parts[mode] = json.load(f)
    rep = compare(parts["baseline2"], parts["gem"])
    plain = compare(parts["baseline"], parts["baseline2"])
    rep.update(workers=parts["gem"]["workers"], startup_s={m: parts[m]["startup_s"] for m in parts},
               slowdown=a.slowdown, max_tokens=a.max_tokens, planner=a.planner, dtype=a.dtype,
               plain_vllm_first_vs_second=plain)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    print(json.dumps({k: v for k, v in rep.items() if k not in ("rows", "plain_vllm_first_vs_second")},
                     indent=1))
    print(f"plain vLLM, first run against second: identical on {plain['identical_prompts']}/"
          f"{plain['prompts']} prompts")
    print(f"greedy outputs identical on {rep['identical_prompts']}/{rep['prompts']} prompts")
    moved = [w.get("slots_moved_vs_linear", 0) for w in rep["workers"]]
    if not any(moved):  # nothing crossed ranks: identical outputs would prove nothing
        print(f"no expert moved off vLLM's linear map (slots moved per rank: {moved}): not a test")
        return 4
    return 0 if rep["identical_prompts"] == rep["prompts"] else 3


if __name__ == "__main__":
    sys.exit(main())
