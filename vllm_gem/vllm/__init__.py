"""The only part of vllm_gem that imports vLLM: the plugin and what it installs.

plugin.py (register: flags, worker and engine-core hooks), flags.py (--plugin gem),
config.py (GemConfig), recorder.py (routing ring buffer), experts.py (the served experts'
shape, precision and weights), planning.py (the decision, pure numpy), background.py
(recalibration's planning off the serving thread), apply.py (weight move + integrity check),
engine.py (warm-up and start-up placement in the engine core), metrics.py (/metrics),
routing.py (trace replay for vLLM's routing simulator), emulate.py (slower-GPU emulation for
experiments). One worker (EP rank), each importing only those after it: entry.py (the
process's GemWorker; attach, detach and the collective_rpc targets), runtime.py (GemWorker:
its parts composed, its step hook), recalibration.py (what runs on a recalibration),
placing.py (Placer: how a placement is planned and applied), gpu_profiles.py (where the
profiles come from, this GPU's calibration), context.py (what the rank is, how far it has
served).
"""
