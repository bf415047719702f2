"""The only part of vllm_gem that imports vLLM: the plugin and what it installs.

plugin.py (register: flags, worker and engine-core hooks), flags.py (--plugin gem),
config.py (GemConfig), recorder.py (routing ring buffer), planning.py (the decision, pure
numpy), background.py (recalibration's planning off the serving thread), apply.py (weight
move + integrity check), runtime.py (one worker), engine.py
(warm-up and start-up placement), metrics.py (/metrics), routing.py (trace replay for
vLLM's routing simulator), emulate.py (slower-GPU emulation for experiments).
"""
