"""vllm-gem: GPU-variability-aware expert placement for vLLM expert parallelism."""

__version__ = "0.1.0"
