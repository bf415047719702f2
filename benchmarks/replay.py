"""Measured replay on one GPU: GEM against vLLM's policy on real kernels, unequal partitions.

    python benchmarks/replay.py --json replay.json [--deadline 420] [--kernel auto|vllm|triton]
                                [--max-steps 6] [--only qwen,switch,dsv3]

For each trace (HarMoEny Qwen1.5-MoE: 60 experts top-4, hidden 2048, intermediate 1408,
bf16; Switch-128: top-1, hidden 768, intermediate 3072 (gated here: our and vLLM's kernels
are SiLU-gated), bf16; a DeepSeek-V3-shaped synthetic trace: 256 experts top-8, hidden 7168,
intermediate 2048, fp8-block), each fleet of ranks sharing GPU 0 in green-context
partitions (FLEETS: SMs per rank, None = the whole GPU), and each slot count (the fewest
the fleet allows, and one redundant slot per rank more):

1. calibrate every distinct partition once per trace shape (vllm_gem.calibrate, the
   served precision, with the kernel that measures: vLLM's fused_experts where importable,
   else vllm-gem's Triton kernel, what the plugin calibrates with),
2. plan on the first half of the steps with GEM, vLLM's DefaultEplbPolicy and linear,
3. replay up to --max-steps held-out steps of the second half through each placement on
   real kernels (vllm_gem.replay.measure: each rank gets the tokens routed to its slots),
4. report measured and predicted layer time, each placement's ratio to vLLM's policy, and
   the per-rank prediction error.

Rows are printed and written to --json as each case ends, so a run cut short keeps them.
Each rank's slowdown is emulated inside this process only (green contexts).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from vllm_gem.calibrate import CalibrationSpec, calibrate_device, held_out_report
from vllm_gem.evaluate import bundled_trace, split_steps
from vllm_gem.latency import GroupModel, fit
from vllm_gem.planners import PlacementProblem, make
from vllm_gem.replay import Fleet, PlacementReplay, ReplaySpec, calibration_kernel, compare, \
    format_report, measure, replay_steps
from vllm_gem.simulate import rank_times
from vllm_gem.traces import SyntheticParams, synthetic_trace

FULL = 132  # an H100's or H200's SMs: partitions below are 8%, 16% and 30% fewer
FLEETS = {
    "4 ranks (132/122/110/92 SMs)": [None, 122, 110, 92],
    "8 ranks (3x132, 2x122, 2x110, 92 SMs)": [None, None, None, 122, 122, 110, 110, 92],
}
PLANNERS = ["gem", "vllm-default", "linear"]
DSV3 = SyntheticParams(steps=16, layers=4, experts=256, top_k=8, tokens_per_step=256, seed=11)
TRACES = {  # name -> (trace loader, hidden, intermediate, top_k, precision)
    "qwen": (lambda: bundled_trace("qwen"), 2048, 1408, 4, "bf16"),
    "switch": (lambda: bundled_trace("switch-exp128"), 768, 3072, 1, "bf16"),
    "dsv3": (lambda: synthetic_trace(DSV3, model="synthetic-dsv3-256e"), 7168, 2048, 8, "fp8-block"),
}


def slot_counts(experts: int, ranks: int) -> list[int]:
    """The fewest slots a fleet allows (a multiple of its ranks), and one per rank more."""
    least = -(-experts // ranks) * ranks
    return [least, least + ranks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="replay.json")
    ap.add_argument("--deadline", type=float, default=420.0, help="start no case after this many s")
    ap.add_argument("--kernel", default="auto", choices=["auto", "vllm", "triton"])
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--only", default=",".join(TRACES))
    a = ap.parse_args()
    import torch
    t_start = time.perf_counter()
    out = {"host": platform.node(), "gpu": torch.cuda.get_device_name(0),
           "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
           "date": time.strftime("%Y-%m-%d"), "kernel_option": a.kernel, "max_steps": a.max_steps,
           "fleets": FLEETS, "cases": [], "calibration": []}

    def dump() -> None:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=float)

    for tname in a.only.split(","):
        load_trace, hidden, inter, top_k, precision = TRACES[tname]
        tr = load_trace()
        loads = np.rint(tr.loads)
        experts = loads.shape[2]
        max_local = max(max(slot_counts(experts, len(f))) // len(f) for f in FLEETS.values())
        models = {}
        for sms in sorted({s for f in FLEETS.values() for s in f}, key=lambda s: -(s or FULL)):
            t0 = time.perf_counter()
            prof = calibrate_device(0, CalibrationSpec(hidden, inter, max_local, sm_limit=sms,
                                                       precision=precision),
                                    kernel=calibration_kernel(ReplaySpec(hidden, inter, top_k, precision,
                                                                         kernel=a.kernel)))
            models[sms] = fit(prof, f"{tname} sm{sms}")
            rep = held_out_report(prof)
            out["calibration"].append({"trace": tname, "sms": sms or FULL, "local_experts": max_local,
                                       "seconds": time.perf_counter() - t0, **rep,
                                       "coef": models[sms].coef.tolist()})
            print(f"calibrated {tname} {sms or FULL} SMs: held-out {rep['held_out_rel_rms']:.1%} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        dump()
        plan, _ = split_steps(loads)
        idx = replay_steps(loads.shape[0], "held-out", a.max_steps)
        test = loads[idx]
        for fname, sms in FLEETS.items():
            group = GroupModel.of([models[s] for s in sms])
            for num_physical in slot_counts(experts, len(sms)):
                if time.perf_counter() - t_start > a.deadline:
                    print(f"deadline: skipping {tname} / {fname} / {num_physical} slots", flush=True)
                    continue
                t0 = time.perf_counter()
                placements = {p: make(p).place(PlacementProblem(plan, group, num_physical))
                              for p in PLANNERS}
                fleet = Fleet(list(sms), [0] * len(sms))
                spec = ReplaySpec(hidden, inter, top_k, precision, kernel=a.kernel)
                measured, kernel, stats = measure(test, placements, fleet, spec)
                replays = [PlacementReplay(p, measured[p], rank_times(test, placements[p], group), kernel)
                           for p in PLANNERS]
                rep = compare(replays, "vllm-default")
                case = {"trace": tname, "model": tr.model, "fleet": fname, "sms": [s or FULL for s in sms],
                        "experts": experts, "num_physical": num_physical, "top_k": top_k,
                        "precision": precision, "steps": idx.tolist(), "layers": int(loads.shape[1]),
                        "seconds": time.perf_counter() - t0, **stats, **rep,
                        "measured": {p: measured[p].tolist() for p in PLANNERS},
                        "predicted": {r.name: r.predicted.tolist() for r in replays}}
                out["cases"].append(case)
                dump()
                print(f"\n== {tname} / {fname} / {num_physical} slots ({experts} experts), "
                      f"{len(idx)} held-out steps x {loads.shape[1]} layers, {stats['calls_timed']} "
                      f"calls timed in {case['seconds']:.0f} s\n{format_report(rep)}", flush=True)
    print("\n## Summary: GEM / vLLM's policy, measured and predicted; per-rank prediction error")
    print(f"{'trace':7s} {'fleet':>8s} {'slots':>5s} {'measured':>9s} {'predicted':>9s} {'gap pp':>7s} "
          f"{'rms err':>8s} {'max err':>8s}")
    for c in out["cases"]:
        g = next(r for r in c["placements"] if r["placement"] == "gem")
        errs = np.concatenate([PlacementReplay(p, np.array(c["measured"][p]), np.array(c["predicted"][p])
                                               ).rank_errors() for p in PLANNERS])
        print(f"{c['trace']:7s} {len(c['sms']):>5d} rk {c['num_physical']:5d} {g['measured_vs_baseline']:9.3f} "
              f"{g['predicted_vs_baseline']:9.3f} {g['ratio_gap_pp']:7.2f} "
              f"{np.sqrt(np.mean(errs ** 2)):8.1%} {np.abs(errs).max():8.1%}")
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
