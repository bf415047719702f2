"""Entry point of the `vllm.general_plugins` group: `gem = vllm_gem.plugin:register`."""

from __future__ import annotations


def register() -> None:
    """Called by vLLM in every process; imports vLLM only here, so vllm_gem works without it."""
    from .vllm.plugin import register as _register  # vllm_gem.vllm needs vLLM: loaded by vLLM only
    _register()
