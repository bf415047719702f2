"""`vllm serve ... --plugin gem`: the flag, its sugar, and the engine settings GEM needs.

vLLM loads general plugins while it builds its argument parser (AsyncEngineArgs.add_cli_args
calls load_general_plugins before EngineArgs.add_cli_args), so wrapping
EngineArgs.add_cli_args here adds our flags to `vllm serve`. The flags only fill
`additional_config["gem"]`; everything downstream reads that dict.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Any

from ..errors import GemInputError
from .config import from_additional, wants_strict
from .metrics import register_collector

logger = logging.getLogger("vllm.gem")

KNOWN_PLUGINS = ("gem",)
NO_PERIODIC_REBALANCE = 1 << 62  # vLLM's own periodic EPLB off: GEM decides when to move


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    if "--plugin" in parser._option_string_actions:  # add_cli_args can run more than once
        return parser
    group = parser.add_argument_group("vllm-gem", "GPU-variability-aware expert placement")
    group.add_argument("--plugin", action="append", default=None, metavar="NAME",
                       help="Switch on an installed plugin: 'gem' places experts by measured "
                            "GPU speed and routing (sugar for --additional-config "
                            "'{\"gem\": {}}'; needs --enable-expert-parallel).")
    group.add_argument("--gem-trace", default=None, metavar="PATH",
                       help="Routing trace to plan from (else warm-up prompts are recorded).")
    group.add_argument("--gem-profiles", nargs="+", default=None, metavar="PATH",
                       help="One GPU profile per EP rank (else each GPU is calibrated at start).")
    group.add_argument("--gem-strict", action="store_true", default=None,
                       help="Fail the start if GEM cannot place (default: warn, serve on "
                            "vLLM's own placement).")
    return parser


def merge_flags(args: argparse.Namespace, additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """The additional_config that the --plugin/--gem-* flags in `args` stand for."""
    out = dict(additional_config or {})
    plugins = [p for item in (getattr(args, "plugin", None) or []) for p in item.split(",") if p]
    unknown = sorted(set(plugins) - set(KNOWN_PLUGINS))
    if unknown:
        raise GemInputError("--plugin", "value", f"names {unknown}", f"one of {list(KNOWN_PLUGINS)}")
    sugar = {k: v for k, v in (("trace", getattr(args, "gem_trace", None)),
                               ("profiles", getattr(args, "gem_profiles", None)),
                               ("strict", getattr(args, "gem_strict", None))) if v is not None}
    if "gem" in plugins or ("gem" in out and sugar):
        gem = out.get("gem", {})
        if gem is True:
            gem = {}
        if not isinstance(gem, dict):  # the flags would silently replace it
            raise GemInputError("--additional-config", "gem", f"is {gem!r}",
                                "a JSON object (or true) that the --gem-* flags can add to")
        gem = dict(gem)
        gem.update(sugar)
        out["gem"] = gem
    elif sugar:
        raise GemInputError("--gem-*", "flags", f"given ({', '.join(sugar)}) without GEM",
                            "--plugin gem as well")
    return out


def prepare_engine_args(engine_args: Any) -> None:
    """Adjust EngineArgs (in the API server, before VllmConfig exists) for GEM.

    GEM moves experts through vLLM's EPLB maps, so it needs --enable-eplb; when the user did
    not ask for EPLB, it is switched on with vLLM's own periodic rebalancing off. Without
    expert parallelism there is nothing to place: one warning, or an error in strict mode.
    """
    try:  # settings and VLLM_GEM_* are checked here, in process 0, before any worker starts
        cfg = from_additional(engine_args.additional_config)
    except GemInputError as e:
        if wants_strict(engine_args.additional_config.get("gem")):
            raise
        # GEM off for every process (they read this dict): one warning, vLLM's own placement
        logger.warning("vllm-gem: %s; GEM is off, serving with vLLM's own placement "
                       "(\"strict\": true fails the start instead)", e)
        engine_args.additional_config = {**engine_args.additional_config, "gem": {"enabled": False}}
        return
    if cfg is None:
        return
    gem = engine_args.additional_config["gem"]
    gem = dict(gem) if isinstance(gem, dict) else {}
    if not engine_args.enable_expert_parallel:
        msg = "GEM needs --enable-expert-parallel; serving with vLLM's own placement"
        if cfg.strict:
            raise GemInputError("--plugin gem", "enable_expert_parallel", "is off",
                                "--enable-expert-parallel")
        logger.warning("vllm-gem: %s", msg)
        gem["enabled"] = False
    elif not engine_args.enable_eplb:
        engine_args.enable_eplb = True
        engine_args.eplb_config.step_interval = NO_PERIODIC_REBALANCE
        engine_args.eplb_config.window_size = 1
        logger.info("vllm-gem: EPLB maps switched on for GEM (vLLM's periodic rebalancing off)")
    if gem.get("state_dir") is None:
        gem["state_dir"] = os.path.join(tempfile.gettempdir(), f"vllm-gem-{os.getpid()}")
    engine_args.additional_config = {**engine_args.additional_config, "gem": gem}
    if gem.get("enabled", True):
        register_collector(gem["state_dir"])
