"""The only part of vllm_gem that imports vLLM: the plugin and what it installs.

plugin.py (register: flags, worker and engine-core hooks), flags.py (--plugin gem),
config.py (GemConfig), recorder.py (routing ring buffer), experts.py (the served experts'
shape, precision and weights), planning.py (the decision, pure numpy), background.py
(recalibration's planning off the serving thread), apply.py (weight move + integrity check),
engine.py (warm-up and start-up placement in the engine core), metrics.py (/metrics),
routing.py (trace replay for vLLM's routing simulator), emulate.py (slower-GPU emulation for
experiments). One worker (EP rank): runtime.py (what a worker holds: GemWorker, its step
hook, its own GPU's profiling; attach and detach), gpu_profiles.py (where its profiles come
from), placing.py (how a placement is planned and applied), recalibration.py (what runs on
a recalibration), startup.py (what runs at start and on request).
"""
