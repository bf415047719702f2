#!/usr/bin/env python3
"""Greedy outputs across placements inside ONE running server (GPU machine, >= 2 GPUs).

Starts `vllm serve MODEL --plugin gem` on the model's real weights (prefix caching off, so no
KV computed under another placement is reused; vLLM's dev mode for the switch), sends the
same prompts as one request (one batch) with greedy decoding, then switches the placement
through GEM's `gem_place` (the start-up's verified transfer) and sends them again:

    initial (vLLM's start map) -> gem -> vllm-default (vLLM's EPLB policy) -> initial

Every run is compared with the first. Unlike greedy_identity.py, which compares fresh
processes, nothing else changes between the runs: same process, compiled graphs, caches and
batch. The closing `initial` checks that restoring vLLM's map restores the outputs.

    python3 benchmarks/e2e/switch_identity.py MODEL_DIR OUT.json [--slowdown 0.3]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from greedy_identity import PROMPTS, compare  # noqa: E402
from serve_matrix import start_server, stop_server, switch  # noqa: E402

SEQUENCE = ("initial", "gem", "vllm-default", "initial")


def greedy(port: int, model: str, max_tokens: int) -> dict:
    """All PROMPTS in one request -> {"tokens": [[id, ...] per prompt], "top2": [[[lp, lp], ...]]}."""
    body = {"model": model, "prompt": PROMPTS, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 2, "return_token_ids": True, "seed": 0}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        choices = sorted(json.loads(resp.read())["choices"], key=lambda c: c["index"])
    return {"tokens": [c["token_ids"] for c in choices],
            "top2": [[sorted(d.values(), reverse=True)[:2] for d in c["logprobs"]["top_logprobs"]]
                     for c in choices]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--slowdown", type=float, default=0.3, help="GPU 1's emulated extra expert work")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args()
    gem = {"emulate_slowdown": {"1": a.slowdown}, "strict": True, "warmup_prompts": 32, "min_gain": -1}
    cfg = {"name": "switch-identity", "load_format": "auto",
           "args": ["--plugin", "gem", "--additional-config", json.dumps({"gem": gem}),
                    "--no-enable-prefix-caching", "--seed", "0"],
           "env": {"VLLM_SERVER_DEV_MODE": "1"}}
    log = a.out.with_suffix(".serve.log")
    proc, ready = start_server(a.model, cfg, a.port, log, 400)
    runs = []
    try:
        for planner in SEQUENCE:
            rep = switch(a.port, planner)
            runs.append({"placement": planner, "slots_changed": rep.get("slots_changed", 0),
                         **greedy(a.port, a.model, a.max_tokens)})
    finally:
        stop_server(proc)
    first = runs[0]
    result = {"ready_s": ready, "sequence": list(SEQUENCE), "runs": [
        {"placement": r["placement"], "slots_changed": r["slots_changed"], **compare(first, r)}
        for r in runs]}
    a.out.write_text(json.dumps({**result, "outputs": runs}, indent=1))
    for r in result["runs"]:
        print(f"{r['placement']:13s} moved {r['slots_changed']:4d} slots: identical to the first run "
              f"on {r['identical_prompts']}/{r['prompts']} prompts")
    moved = any(r["slots_changed"] for r in result["runs"][1:])
    if not moved:  # nothing moved: identical outputs would prove nothing
        print("no switch moved an expert: not a test")
        return 4
    return 0 if all(r["identical_prompts"] == r["prompts"] for r in result["runs"]) else 3


if __name__ == "__main__":
    sys.exit(main())
