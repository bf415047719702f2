"""GEM in the engine-core process: warm-up prompts, then the start-up placement on all workers.

Runs once, after the engine core is built (KV cache allocated, CUDA graphs captured) and
before it takes its first request: the warm-up requests go through the real scheduler and
model, so the recorder sees the routing of real forward passes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .config import GemConfig, from_additional

logger = logging.getLogger("vllm.gem")

# Built-in calibration prompts: a spread of tasks, so warm-up routing is not one domain's.
WARMUP_TEXTS = [
    "Explain how a hash map handles collisions, with a short Python example.",
    "Write a haiku about the first snow in a mountain village.",
    "Solve step by step: a train leaves at 3 pm at 80 km/h; another at 4 pm at 100 km/h.",
    "Translate into French and German: The meeting is moved to Thursday morning.",
    "Summarise the causes of the French Revolution in five bullet points.",
    "def quicksort(xs):\n    # complete this function and explain its complexity\n",
    "What are the side effects of ibuprofen, and when should it be avoided?",
    "Draft a polite email asking a landlord to fix a broken heater.",
    "Compare TCP and UDP for a multiplayer game server.",
    "Give a recipe for a vegetarian lasagna for six people.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3; explain this query.",
    "Describe the life cycle of a star more massive than the sun.",
    "写一段关于秋天的短文，不超过一百字。",
    "Prove that the square root of two is irrational.",
    "List ten creative names for a coffee shop run by cats.",
    "How does gradient descent find a minimum? Use a one-dimensional example.",
]


def warmup_token_ids(engine_core: Any, count: int, seed: int = 0) -> list[list[int]]:
    """Token ids of `count` warm-up prompts: the built-in texts through the model's tokenizer,
    or fixed-seed random ids when the engine has no tokenizer (--skip-tokenizer-init)."""
    mc = engine_core.vllm_config.model_config
    texts = [WARMUP_TEXTS[i % len(WARMUP_TEXTS)] + (f" (variant {i // len(WARMUP_TEXTS)})"
                                                   if i >= len(WARMUP_TEXTS) else "")
             for i in range(count)]
    if not mc.skip_tokenizer_init:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
            return [tok(t)["input_ids"] for t in texts]
        except Exception as e:
            logger.warning("vllm-gem: no tokenizer for warm-up prompts (%s); using random ids", e)
    rng = np.random.default_rng(seed)
    vocab = mc.get_vocab_size()
    return [rng.integers(0, vocab, size=64).tolist() for _ in texts]


def run_warmup(engine_core: Any, cfg: GemConfig) -> int:
    """Serve the warm-up prompts to completion; returns the engine steps taken."""
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    params = SamplingParams(max_tokens=cfg.warmup_max_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(warmup_token_ids(engine_core, cfg.warmup_prompts)):
        req = EngineCoreRequest(request_id=f"vllm-gem-warmup-{i}", prompt_token_ids=ids,
                                mm_features=None, sampling_params=params.clone(),
                                pooling_params=None, arrival_time=time.time(), lora_request=None,
                                cache_salt=None, data_parallel_rank=None)
        engine_core.add_request(*engine_core.preprocess_add_request(req))
    steps = 0
    while engine_core.scheduler.has_requests():
        engine_core.step_fn()
        steps += 1
    return steps


def place_before_serving(engine_core: Any) -> None:
    """The once-per-start placement. Default: warn and serve on vLLM's placement if it fails."""
    if getattr(engine_core, "_gem_started", False):
        return
    engine_core._gem_started = True
    cfg = from_additional(engine_core.vllm_config.additional_config)
    if cfg is None:
        return
    from .entry import place_at_start  # loads the planners: only where GEM places
    t0 = time.perf_counter()
    try:
        warm = 0
        if cfg.place and not cfg.trace:  # recording only needs no warm-up routing
            if engine_core.vllm_config.parallel_config.data_parallel_size > 1:
                raise RuntimeError("with data parallelism the warm-up cannot keep the DP ranks in "
                                   "step: pass a routing trace (--gem-trace)")
            warm = run_warmup(engine_core, cfg)
        reports = engine_core.collective_rpc(place_at_start)
    except Exception as e:
        if cfg.strict:
            raise
        logger.warning("vllm-gem: start-up placement failed, serving on vLLM's own placement: %s", e)
        return
    lost = next((r["weights_lost"] for r in reports if r and r.get("weights_lost")), None)
    if lost:  # never swallowed, strict or not: the model's weights are no longer whole
        raise RuntimeError(f"vllm-gem: {lost}")
    rep = next((r for r in reports if r), {})
    if rep.get("applied"):
        communicator = engine_core.vllm_config.parallel_config.eplb_config.communicator
        rate = rep["move_gib_per_s"]
        logger.info("vllm-gem: placed experts before serving in %.1f s (warm-up %d steps): "
                    "predicted MoE layer time %.1f -> %.1f us (%.1f%% faster; no placement below "
                    "%.1f us), per rank %s -> %s; moved %s slots (%s MiB) in %.2f s (%.1f GiB/s, "
                    "vLLM EPLB communicator %s); calibration %.1f s, planning %.2f s; GPUs %s",
                    time.perf_counter() - t0, warm, rep["predicted_layer_us_before"],
                    rep["predicted_layer_us_after"], 100 * rep["predicted_gain"],
                    rep["predicted_bound_us"], rep["rank_us_before"], rep["rank_us_after"],
                    rep["slots_changed"], rep["moved_mib"], rep["move_seconds"], rate, communicator,
                    rep["profile_seconds"], rep["planning_seconds"], rep["gpus"])
        if communicator == "torch_gloo":
            # recalibration weighs a move's cost at the rate the last move achieved
            logger.warning("vllm-gem: expert weights moved through CPU memory (vLLM's EPLB "
                           "communicator 'torch_gloo', its choice when NIXL is absent) at %.1f GiB/s, "
                           "so recalibration will rarely find a move worth its cost; "
                           "--eplb-config '{\"communicator\": \"pynccl\", \"use_async\": false}' "
                           "sends them GPU to GPU",
                           rate)
    else:
        logger.warning("vllm-gem: kept vLLM's placement: %s", rep.get("why", rep))
