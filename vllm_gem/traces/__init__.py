"""Routing traces: importers for data users already have, and a synthetic generator."""

from .harmoeny import import_harmoeny
from .synthetic import SyntheticParams, decode_params, synthetic_trace
from .vllm_eplb import import_vllm_eplb

__all__ = ["import_harmoeny", "import_vllm_eplb", "synthetic_trace", "SyntheticParams", "decode_params"]
