"""Regenerate vllm_gem/data/: example profiles and the bundled routing traces.

    python benchmarks/make_bundled_data.py [--harmoeny ../shared/data/routing-traces/harmoeny]

Profiles are synthetic (analytic model + noise, marked so in their `source`) until the
calibration issue replaces them with measured ones. Traces: HarMoEny's real Qwen1.5-MoE and
Switch-128 routing, and one synthetic trace.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_gem.formats import save
from vllm_gem.profiles import BUNDLED_SETS, example_profile
from vllm_gem.traces import SyntheticParams, import_harmoeny, synthetic_trace

DATA = Path(__file__).resolve().parents[1] / "vllm_gem" / "data"
SYNTHETIC = SyntheticParams(steps=400, layers=16, experts=64, top_k=8, tokens_per_step=256, seed=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harmoeny", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/routing-traces/harmoeny")
    a = ap.parse_args()
    for name, slow in BUNDLED_SETS.items():
        for i, s in enumerate(slow):
            save(example_profile(f"example-{name}-{i}", slowdown=s, seed=i),
                 DATA / f"profile-{name}-{i}.json")
    for model in ("qwen", "switch-exp128"):
        save(import_harmoeny(a.harmoeny / model), DATA / f"trace-harmoeny-{model}.msgpack")
    save(synthetic_trace(SYNTHETIC, model="synthetic-64e"), DATA / "trace-synthetic.msgpack")
    print(f"wrote {sorted(p.name for p in DATA.iterdir() if p.suffix in ('.json', '.msgpack'))}")


if __name__ == "__main__":
    main()
