"""Triton kernels for calibration (installed as vllm_gem.kernels)."""
