"""`vllm-gem`: plan expert placements offline, simulate them, inspect and import files.

    vllm-gem demo                      every planner on the bundled real and synthetic cases
    vllm-gem plan --trace T --profiles P... --num-physical N -o placement.json
    vllm-gem simulate --trace T --profiles P... --placement placement.json
    vllm-gem inspect FILE
    vllm-gem report DIR|FILE... -o report.html   plots of what GEM wrote, one self-contained page
    vllm-gem import-trace --format harmoeny|vllm-eplb|synthetic SRC -o trace.msgpack
    vllm-gem replay --trace T --placement P1 P2 --measure   each rank's work timed on real kernels

Traces and profiles may name bundled data: `bundled:qwen`, `bundled:one-slow4`. Bad input
exits with code 2 and one line naming the file, field and expectation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .calibrate import main as calibrate_main
from .certify import certify
from .errors import GemInputError
from .evaluate import bundled_trace, compare, format_table, split_steps
from .export import (
    dense_layers,
    is_engine_file,
    load_any_placement,
    read_engine_placement,
    to_engine,
)
from .files import refuse_same_file, write_atomic
from .formats import (
    GpuProfile,
    Placement,
    RoutingTrace,
    load,
    load_any,
    rank_of_slots,
    save,
    validate_placement,
)
from .latency import TERMS, GroupModel, fit, held_out_error
from .planners import NAMES, PlacementProblem, PlannerUnavailable, make
from .planners.constraints import spread_copies
from .precision import PRECISIONS
from .profiles import bundled_profiles, bundled_set_names, group_from_profiles
from .replay import (
    Fleet,
    PlacementReplay,
    ReplaySpec,
    calibrate_partitions,
    format_report,
    measure,
    replay_steps,
)
from .replay import compare as compare_replays
from .report import write_report
from .simulate import misspecified, rank_times, simulate
from .traces import (
    SyntheticParams,
    decode_params,
    import_harmoeny,
    import_vllm_eplb,
    synthetic_trace,
)
from .validation import (
    CLI,
    Device,
    Draws,
    LocalExperts,
    MigrationWeight,
    Parser,
    Seconds,
    Seed,
    Slots,
    Speed,
    SpeedError,
    Steps,
    Width,
    argtype,
    check_slots,
    listtype,
    sm_limits,
)

DEMO_PLANNERS = ["linear", "round_robin", "vllm-default", "greedy-speed", "gem"]


# --------------------------------------------------------------------------- inputs
def _trace(spec: str) -> RoutingTrace:
    if spec.startswith("bundled:"):
        return bundled_trace(spec.split(":", 1)[1])
    return load(spec, RoutingTrace)


def _profiles(specs: list[str]) -> list[tuple[str, GpuProfile]]:
    """(source, profile) in rank order; a bundled set expands to `bundled:SET[i]` sources."""
    out: list[tuple[str, GpuProfile]] = []
    for spec in specs:
        if spec.startswith("bundled:"):
            name = spec.split(":", 1)[1]
            if name not in bundled_set_names():
                raise GemInputError(spec, "profiles", "is not a bundled set", f"one of {bundled_set_names()}")
            out += [(f"{spec}[{i}]", p) for i, p in enumerate(bundled_profiles(name))]
        else:
            out.append((spec, load(spec, GpuProfile)))
    return out


def _group(args: argparse.Namespace) -> GroupModel:
    """The EP group's latency models, each with its speed error: --speed-error where given,
    else a profile's own (0 for --speeds: speeds typed in are taken as exact)."""
    error = getattr(args, "speed_error", None)
    if args.speeds:
        return GroupModel.tokens_over_speed(np.array(args.speeds), error or 0.0)
    return _profile_group(args).with_errors(error) if error is not None else _profile_group(args)


def _profile_group(args: argparse.Namespace) -> GroupModel:
    if not args.profiles:
        raise GemInputError(CLI, "--profiles", "is missing", "profile files or --speeds")
    profs = _profiles(args.profiles)
    shapes = {(p.expert.hidden, p.expert.intermediate, p.expert.dtype, p.expert.scale_layout)
              for _, p in profs}
    if len(shapes) > 1:
        raise GemInputError(", ".join(args.profiles), "expert", f"shapes differ ({sorted(shapes)})",
                            "profiles of the same expert shape and precision")
    return GroupModel.of([fit(p, src) for src, p in profs])


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1, default=float) if args.json else text)


# --------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm


    # measured H200 profiles (one GPU emulated slower in a green context) and examples
    cases = [("qwen", "h200x2-sm66"), ("synthetic", "h200x2"), ("qwen", "one-slow4"),
             ("switch-exp128", "spread8"), ("synthetic", "one-slow4"), ("synthetic", "spread8")]
    results, texts = [], []
    for trace_name, prof in tqdm(cases, desc="demo cases", disable=args.json, file=sys.stderr):
        tr = bundled_trace(trace_name)
        group = group_from_profiles(bundled_profiles(prof))
        if args.speed_error is not None:
            group = group.with_errors(args.speed_error)
        experts = tr.shape[2]
        for redundant in (0, group.num_ranks):
            num_physical = experts + redundant
            rows = compare(tr.loads, group, num_physical, DEMO_PLANNERS, certify_seconds=args.certify)
            title = (f"{tr.model} [{tr.source}] on {prof} ({group.num_ranks} GPUs), "
                     f"{num_physical} slots ({redundant} redundant); plan on the first half, "
                     "replay the second")
            result = {"trace": trace_name, "profiles": prof, "num_physical": num_physical,
                      "rows": [r.as_dict() for r in rows]}
            table = format_table(rows)
            if args.draws:
                result["misspecified"] = _demo_misspecified(tr.loads, rows, group, args)
                table += "\n" + _misspecified_text(result["misspecified"])
            texts.append(f"\n== {title}\n{table}")
            results.append(result)
            if args.run_dir and len(results) == 1:  # the first case, as a folder `report` reads
                texts.append(_write_run_dir(Path(args.run_dir), tr, bundled_profiles(prof), rows,
                                            group.num_ranks))
    if args.plot:
        texts.append(_plot_demo(results, Path(args.plot)))
    texts.append("\ngap = mean layer time / tighter lower bound; vs vllm-default < 1 is faster than "
                 "vLLM's EPLB policy.\n\nGEM's simulated mean MoE layer time, per case:")
    texts += [_demo_summary(r) for r in results]
    _emit(args, results, "\n".join(texts))
    return 0


def _write_run_dir(folder: Path, tr: Any, profiles: list, rows: list, num_ranks: int) -> str:
    """The trace, the ranks' profiles and each planner's placement of one demo case, named as
    the plugin names them, so `vllm-gem report FOLDER` shows a run without serving."""
    folder.mkdir(parents=True, exist_ok=True)
    save(tr, folder / "trace.msgpack")
    for r, prof in enumerate(profiles):
        save(prof, folder / f"profile-rank{r}.json")
    for row in rows:
        if row.phys_to_log is None:
            continue
        n = row.phys_to_log.shape[1]
        save(Placement(model=tr.model, num_logical_experts=tr.shape[2], num_ranks=num_ranks,
                       phys_to_log=row.phys_to_log.tolist(), rank_of_slot=rank_of_slots(n, num_ranks),
                       planner=row.planner, predicted={"mean_layer_us": row.result.mean}),
             folder / f"placement-{row.planner}.json")
    return f"run folder written to {folder}: open it with `vllm-gem report {folder} -o report.html`"


def _demo_misspecified(loads: np.ndarray, rows: list, group: GroupModel, args: argparse.Namespace
                       ) -> dict[str, Any]:
    """GEM's plan scored on the held-out steps under --draws true-speed draws, against vLLM's
    policy's plan under the same draws (simulate.misspecified)."""
    plans = {r.planner: r.phys_to_log for r in rows if r.phys_to_log is not None}
    if "gem" not in plans:
        return {"note": "GEM did not run"}
    _, test = split_steps(loads)
    truths = group.perturbed(args.draws, args.seed, args.speed_error)
    return misspecified(test, plans["gem"], truths, plans.get("vllm-default"))


def _misspecified_text(m: dict[str, Any]) -> str:
    if "note" in m:
        return f"misspecified speeds: {m['note']}"
    line = (f"true speeds drawn {m['draws']} times: GEM mean {m['mean_us']:.1f} us, worst draw "
            f"{m['worst_draw_us']:.1f} us")
    if "ratio_mean" in m:
        line += (f"; against vLLM's policy under the same draws {m['ratio_mean']:.3f}x mean, "
                 f"{m['ratio_worst']:.3f}x worst draw")
    return line


def _demo_summary(result: dict) -> str:
    """One line: GEM's mean layer time against vLLM's EPLB policy and against the lower bound."""
    rows = {r["planner"]: r for r in result["rows"]}
    gem, vllm = rows.get("gem", {}), rows.get("vllm-default", {})
    case = f"{result['trace']} on {result['profiles']}, {result['num_physical']} slots:"
    if "mean" not in gem:
        return f"{case:42s} GEM n/a ({gem.get('note', 'not run')})"
    against = (f"{gem['mean'] / vllm['mean']:.3f}x vLLM's EPLB policy" if "mean" in vllm
               else f"vLLM's EPLB policy n/a ({vllm.get('note', 'not run')})")
    line = f"{case:42s} GEM {gem['mean']:7.1f} us = {against}, {gem['gap']:.3f}x the lower bound"
    cert = gem.get("report", {}).get("certificate")
    if cert:
        line += (f", {cert['plan_us'] / cert['certified_bound_us']:.3f}x the certified bound "
                 f"({cert['proven_layers']}/{cert['layers']} layers proven)")
    return line


def _plot_demo(results: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no plot: install vllm-gem[plot] for matplotlib)"
    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [f"{r['trace']}\n{r['profiles']}\nP={r['num_physical']}" for r in results]
    width = 0.8 / len(DEMO_PLANNERS)
    for i, name in enumerate(DEMO_PLANNERS):
        vals = [next((x.get("gap", np.nan) for x in r["rows"] if x["planner"] == name), np.nan)
                for r in results]
        ax.bar(np.arange(len(results)) + i * width, vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_ylabel("mean MoE layer time / lower bound")
    ax.set_ylim(0.95, None)
    ax.legend(fontsize=8)
    ax.set_title("Simulated MoE layer time per planner (held-out steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def cmd_plan(args: argparse.Namespace) -> int:
    refuse_same_file(args.output, "-o/--output", [("--trace", args.trace), ("--current", args.current or "")]
                     + [("--profiles", p) for p in args.profiles or []])
    tr = _trace(args.trace)
    group = _group(args)
    loads = tr.loads
    num_physical = args.num_physical or tr.shape[2]
    check_slots(num_physical, tr.shape[2], group.num_ranks,
                "--num-physical" if args.num_physical else "--num-physical (default: the trace's experts)")
    old = None
    params: dict[str, Any] = {}
    if args.current:
        cur = load_any_placement(args.current, group.num_ranks, tr.shape[2])
        validate_placement(cur, args.current, num_layers=tr.shape[1],
                           num_logical_experts=tr.shape[2], num_ranks=group.num_ranks, model=tr.model)
        old = cur.array
        if len(cur.phys_to_log[0]) != num_physical:
            raise GemInputError(args.current, "phys_to_log", f"has {len(cur.phys_to_log[0])} slots",
                                f"{num_physical} (--num-physical)")
    if args.migration_weight is not None:
        if not args.current:
            raise GemInputError(CLI, "--migration-weight", "is given without --current",
                                "--current PLACEMENT too: it prices moves away from the current placement")
        params["migration_weight"] = args.migration_weight
    policy = make(args.planner, **params)
    try:
        p2l = policy.place(PlacementProblem(loads, group, num_physical, old_phys_to_log=old))
    except PlannerUnavailable as e:
        raise GemInputError(CLI, "--planner", f"{args.planner} cannot run here ({e})",
                            f"another planner ({', '.join(NAMES)})") from None
    if args.one_copy_per_rank:  # what vllm-ascend's expert map can hold
        p2l = _one_copy_per_rank(args.planner, p2l, loads, group, num_physical)
    sim = simulate(loads, p2l, group)
    cert = _certify(args, loads, p2l, group)
    placement = Placement(
        model=tr.model, num_logical_experts=tr.shape[2], num_ranks=group.num_ranks,
        phys_to_log=p2l.tolist(), rank_of_slot=rank_of_slots(num_physical, group.num_ranks),
        planner=args.planner,
        inputs={"trace": args.trace, "profiles": args.profiles or [], "speeds": ",".join(f"{v:g}" for v in args.speeds or []),
                "params": {k: v for k, v in policy.params.items() if v is not None}
                | ({"one_copy_per_rank": True} if args.one_copy_per_rank else {}),
                "report": getattr(policy, "report", {})},
        predicted={"mean_layer_us": sim.mean, "p99_layer_us": sim.p99, "gap": sim.gap,
                   "straggler_ratio": sim.straggler_ratio, **cert})
    save(placement, args.output)
    _emit(args, {"output": args.output, **placement.predicted},
          f"wrote {args.output}: {args.planner}, predicted mean layer {sim.mean:.1f} us "
          f"(gap to lower bound {sim.gap:.3f}, straggler ratio {sim.straggler_ratio:.3f})"
          + _certificate_text(cert))
    return 0


def _one_copy_per_rank(planner: str, p2l: np.ndarray, loads: np.ndarray, group: GroupModel,
                       num_physical: int) -> np.ndarray:
    """The plan with at most one copy of an expert per rank (planners.constraints). For GEM
    the constrained vLLM plan is a candidate too, and the one with the shorter predicted
    layer time on the planning steps is kept, so the constraint never leaves GEM behind it."""
    plans = [spread_copies(p2l, group.num_ranks, loads, f"--planner {planner}")]
    if planner in ("gem", "gem-migrate", "greedy-speed"):
        try:
            base = make("vllm-default").place(PlacementProblem(loads, group, num_physical))
            plans.append(spread_copies(base, group.num_ranks, loads, "--planner vllm-default"))
        except PlannerUnavailable:
            pass
    return min(plans, key=lambda q: simulate(loads, q, group).mean)


def cmd_export(args: argparse.Namespace) -> int:
    refuse_same_file(args.output, "-o/--output", [("the placement", args.placement)])
    placement = load(args.placement, Placement)
    engine = "vllm-ascend" if args.to == "vllm-expert-map" else args.to
    dense = 0
    if args.model_config:
        dense = dense_layers(args.model_config, len(placement.phys_to_log))
    obj = to_engine(placement, engine, args.placement, dense)
    out = write_atomic(args.output, msgspec.json.format(msgspec.json.encode(obj), indent=1))
    extra = len(placement.phys_to_log[0]) - placement.num_logical_experts
    note = ""
    if engine == "sglang":
        note = f"; serve with --ep-num-redundant-experts {extra} (SGLang accepts a mismatch silently)"
        if dense:
            note += f"; {dense} dense layers first"
        elif not args.model_config:
            note += "; rows are MoE layers: pass --model-config for models whose first layers are dense"
    _emit(args, {"output": str(out), "format": engine, "dense_layers": dense, "redundant_slots": extra},
          f"wrote {out}: {len(placement.phys_to_log)} layers x {len(placement.phys_to_log[0])} slots "
          f"as {engine}'s placement" + note)
    return 0


def _certify(args: argparse.Namespace, loads: np.ndarray, p2l: np.ndarray, group: GroupModel
             ) -> dict[str, float]:
    """With --certify SECONDS: the exact MILP's certified lower bound for any placement on
    these loads, and how far p2l is from it (vllm_gem.certify); else {}."""
    if not getattr(args, "certify", None):
        return {}
    return certify(loads, p2l, group, args.certify).as_dict()


def _certificate_text(cert: dict[str, float]) -> str:
    if not cert:
        return ""
    return (f"\ncertified lower bound {cert['certified_bound_us']:.1f} us for any placement (the search's "
            f"{cert['milp_bound_us']:.1f}, earlier bounds' {cert['existing_bound_us']:.1f}; "
            f"{cert['proven_layers']} of {cert['layers']} layers proven optimal in "
            f"{cert['certify_seconds']:.0f} s): this plan is within {cert['certified_gap']:.1%} of "
            f"optimal; the search's best plan {cert['exact_best_us']:.1f} us, within "
            f"{cert['best_certified_gap']:.1%}")


def cmd_simulate(args: argparse.Namespace) -> int:
    tr = _trace(args.trace)
    group = _group(args)
    pl = load_any_placement(args.placement, group.num_ranks, tr.shape[2])
    validate_placement(pl, args.placement, num_layers=tr.shape[1], num_logical_experts=tr.shape[2],
                       num_ranks=group.num_ranks, model=tr.model)
    sim = simulate(tr.loads, pl.array, group)
    d = {**sim.as_dict(), **_certify(args, tr.loads, pl.array, group)}
    truths = _truths(args, group)
    if truths:
        d["misspecified"] = _misspecified(tr.loads, pl.array, group, truths, pl.array.shape[1])
    _emit(args, d, "\n".join(f"{k:18s} {v:.4g}" if isinstance(v, float) else f"{k:18s} {v}"
                             for k, v in d.items()))
    return 0


def _truths(args: argparse.Namespace, group: GroupModel) -> list[GroupModel]:
    """The true groups a placement is scored under: --true-profiles (one), or --draws groups
    whose speeds are the believed ones times 1 + N(0, --speed-error or each profile's error)."""
    if getattr(args, "true_profiles", None):
        truth = GroupModel.of([fit(p, src) for src, p in _profiles(args.true_profiles)])
        if truth.num_ranks != group.num_ranks or truth.block_m != group.block_m:
            raise GemInputError(", ".join(args.true_profiles), "profiles",
                                f"give {truth.num_ranks} ranks of BLOCK_M {truth.block_m}",
                                f"{group.num_ranks} ranks of BLOCK_M {group.block_m}, as --profiles")
        return [truth]
    if not getattr(args, "draws", None):
        return []
    return group.perturbed(args.draws, args.seed, args.speed_error)


def _misspecified(loads: np.ndarray, p2l: np.ndarray, group: GroupModel, truths: list[GroupModel],
                  num_physical: int) -> dict[str, Any]:
    """Mean and worst-draw layer time under the truths, and the ratio to vLLM's policy (planned
    on the same loads with the believed speeds) under the same truths."""
    try:
        base = make("vllm-default").place(PlacementProblem(loads, group, num_physical))
    except PlannerUnavailable as e:
        return {**misspecified(loads, p2l, truths), "baseline": f"n/a ({e})"}
    return {**misspecified(loads, p2l, truths, base), "baseline": "vllm-default"}


def cmd_report(args: argparse.Namespace) -> int:
    refuse_same_file(args.output, "-o/--output", [("an input", p) for p in _report_files(args.paths)])
    summary = write_report(args.paths, args.output, certify_seconds=args.certify)
    _emit(args, summary, f"wrote {summary['file']}: {summary['images']} figures, sections "
          f"{', '.join(summary['sections'])} ({summary['files']} files)"
          + _certificate_text(summary.get("certificate", {})))
    return 0


def _report_files(paths: list[str]) -> list[Path]:
    """The files report may read: those named and those directly in the folders named."""
    out = []
    for spec in paths:
        if spec.startswith("bundled:"):
            continue  # not a file
        p = Path(spec)
        out += sorted(p.iterdir()) if p.is_dir() else [p]
    return out


def _import_sources(source: str | None) -> list[tuple[str, Path]]:
    """The files an import reads: SOURCE, or the files in the SOURCE folder and its rank folders."""
    if not source:
        return []
    p = Path(source)
    if not p.is_dir():
        return [("SOURCE", p)]
    return [("a file in SOURCE", f) for f in p.rglob("*") if f.is_file()]


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        obj = load_any(path)
    except GemInputError:
        if not is_engine_file(path):  # only a file that is none of ours is read again
            raise
        obj = None
    if obj is None:  # a file `vllm-gem export` wrote, or one an engine wrote
        p2l, ranks, fmt = read_engine_placement(path)
        experts = int(p2l.max()) + 1
        info = {"file": str(path), "kind": f"placement ({fmt}'s format)", "layers": p2l.shape[0],
                "num_physical": p2l.shape[1], "num_logical_experts": experts,
                "num_ranks": ranks if ranks is not None else "not recorded (SGLang's files do not say)",
                "replicated_experts_per_layer": float(p2l.shape[1] - experts)}
        _emit(args, info, "\n".join(f"{k:20s} {v}" for k, v in info.items()))
        return 0
    kind = obj.kind
    info: dict[str, Any] = {"file": str(path), "kind": kind}
    if isinstance(obj, GpuProfile):
        m = fit(obj, str(path))
        info.update(gpu=obj.gpu.name, uuid=obj.gpu.uuid, source=obj.source, emulation=obj.emulation,
                    expert=msgspec.to_builtins(obj.expert), block_m=obj.kernel.block_m,
                    points=len(obj.points),
                    coef_us=dict(zip(TERMS, m.coef.round(5).tolist(), strict=True)),
                    fit_rel_rms=m.fit_rel_rms, held_out_rel_rms=held_out_error(obj))
    elif isinstance(obj, RoutingTrace):
        c = obj.loads
        share = c.sum(0) / np.maximum(c.sum(axis=(0, 2))[:, None], 1)
        info.update(model=obj.model, source=obj.source, steps=c.shape[0], layers=c.shape[1],
                    experts=c.shape[2], top_k=obj.top_k,
                    tokens_per_step=float(c.sum((1, 2)).mean() / c.shape[1]),
                    hottest_over_mean=float((share.max(1) * c.shape[2]).mean()), params=obj.params)
    else:
        a = obj.array
        info.update(model=obj.model, planner=obj.planner, layers=a.shape[0], num_physical=a.shape[1],
                    num_logical_experts=obj.num_logical_experts, num_ranks=obj.num_ranks,
                    replicated_experts_per_layer=float(a.shape[1] - obj.num_logical_experts),
                    predicted=obj.predicted)
    _emit(args, info, "\n".join(f"{k:20s} {v}" for k, v in info.items()))
    return 0


def cmd_import_trace(args: argparse.Namespace) -> int:
    refuse_same_file(args.output, "-o/--output", _import_sources(args.source))
    if args.format == "harmoeny":
        tr = import_harmoeny(args.source)
    elif args.format == "vllm-eplb":
        tr = import_vllm_eplb(args.source, model=args.model or "")
    else:
        params = decode_params(args.source) if args.source else SyntheticParams()
        tr = synthetic_trace(params, model=args.model or "synthetic", source=args.source or "defaults")
    if args.model:
        tr.model = args.model
    save(tr, args.output)
    s = tr.shape
    _emit(args, {"output": args.output, "steps": s[0], "layers": s[1], "experts": s[2]},
          f"wrote {args.output}: {s[0]} steps x {s[1]} layers x {s[2]} experts ({tr.source})")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """`vllm-gem replay`: predicted (and with --measure, measured) per-rank times of placements."""

    tr = _trace(args.trace)
    loads = np.rint(tr.loads)
    top_k = args.top_k or tr.top_k
    if not top_k:
        raise GemInputError(args.trace, "top_k", "is not recorded in the trace",
                            "--top-k K (the experts each token is routed to)")
    placements: dict[str, np.ndarray] = {}
    ranks = set()
    for path in args.placement:
        pl = load(path, Placement)
        validate_placement(pl, path, num_layers=tr.shape[1], num_logical_experts=tr.shape[2],
                           model=tr.model)
        name = pl.planner if pl.planner not in placements else path
        placements[name] = pl.array
        ranks.add(pl.num_ranks)
    if len(ranks) != 1 or len({a.shape[1] for a in placements.values()}) != 1:
        raise GemInputError(", ".join(args.placement), "num_ranks / phys_to_log",
                            f"differ between the files (ranks {sorted(ranks)})",
                            "placements of one fleet with one slot count")
    num_ranks = ranks.pop()
    idx = replay_steps(tr.shape[0], args.steps, args.max_steps)
    test = loads[idx]
    baseline = args.baseline or ("vllm-default" if "vllm-default" in placements else next(iter(placements)))
    if baseline not in placements:
        raise GemInputError("command line", "--baseline", f"is {baseline!r}",
                            f"one of the placements' planners: {', '.join(placements)}")
    say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    group = _group(args) if (args.profiles or args.speeds) else None
    if group is not None and group.num_ranks != num_ranks:
        raise GemInputError("command line", "--profiles", f"gives {group.num_ranks} ranks",
                            f"{num_ranks} (the placements' ranks)")
    kernel = "predicted only (no --measure)"
    measured: dict[str, np.ndarray] = {}
    if args.measure:
        try:
            import torch
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            visible = 0
        if not visible:
            raise GemInputError("command line", "--measure", "sees no CUDA GPU",
                                "a machine with a CUDA GPU and torch (pip install vllm-gem[vllm])")
        hidden, inter = args.hidden, args.intermediate
        if args.profiles:
            e = _profiles(args.profiles)[0][1].expert
            hidden, inter = hidden or e.hidden, inter or e.intermediate
        if not (hidden and inter):
            raise GemInputError("command line", "--hidden/--intermediate", "are missing",
                                "the model's expert shape (or --profiles, which record it)")
        fleet = Fleet.on_local_gpus(num_ranks, args.slow_sms or {}, visible)
        spec = ReplaySpec(hidden, inter, top_k, args.dtype, kernel=args.kernel)
        if group is None:
            per_rank = next(iter(placements.values())).shape[1] // num_ranks
            group = GroupModel.of(calibrate_partitions(fleet, spec, per_rank, say))
        measured, kernel, _ = measure(test, placements, fleet, spec, say)
    if group is None:
        raise GemInputError("command line", "--profiles", "is missing",
                            "profile files or --speeds for the prediction (or --measure, which "
                            "calibrates the partitions itself)")
    replays = [PlacementReplay(n, measured.get(n, np.full((len(idx),) + (tr.shape[1], num_ranks), np.nan)),
                               rank_times(test, p2l, group), kernel)
               for n, p2l in placements.items()]
    report = {"trace": args.trace, "steps": idx.tolist(), "top_k": top_k, "kernel": kernel,
              **compare_replays(replays, baseline)}
    _emit(args, report, f"{len(idx)} {args.steps} steps x {tr.shape[1]} layers, {num_ranks} ranks, "
          f"kernel: {kernel}\n{format_report(report)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    return calibrate_main(args)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="vllm-gem", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def certify_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--certify", type=argtype(Seconds), metavar="SECONDS",
                       help="also search that long (per case) for a certified lower bound on "
                            "every placement (vllm_gem.certify) and report the plan's certified gap")

    def misspecified_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--draws", type=argtype(Draws),
                       help="also score under this many draws of true speeds, each GPU's the "
                            "believed one times 1 + N(0, --speed-error or its profile's error)")
        p.add_argument("--seed", type=argtype(Seed), default=0, help="seed of the draws")

    def common(p: argparse.ArgumentParser, group: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if group:
            g = p.add_mutually_exclusive_group()
            g.add_argument("--profiles", nargs="+", help="GpuProfile files in rank order, or bundled:SET")
            g.add_argument("--speeds", type=listtype(Speed),
                           help="instead of profiles: time = tokens / speed, e.g. 1,1,1,0.83")
            p.add_argument("--speed-error", type=argtype(SpeedError), metavar="SIGMA",
                           help="each GPU's relative speed error (1 sigma, e.g. 0.03): what robust "
                                "planning plans against (default: each profile's own; 0 for --speeds)")

    p = sub.add_parser("demo", help="compare every planner on bundled real and synthetic traces")
    common(p, group=False)
    p.add_argument("--speed-error", type=argtype(SpeedError), metavar="SIGMA",
                   help="each GPU's relative speed error (1 sigma): what robust planning plans "
                        "against, and what --draws draws (default: each bundled profile's own)")
    misspecified_options(p)
    p.add_argument("--run-dir", metavar="DIR",
                   help="also write the first case's trace, profiles and placements to DIR, "
                        "a folder `vllm-gem report` reads")
    p.add_argument("--plot", default="gem-demo.png",
                   help="bar chart written here (default: %(default)s in the current folder; '' for none)")
    certify_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plan", help="plan a placement")
    common(p)
    p.add_argument("--trace", required=True, help="RoutingTrace file or bundled:NAME")
    p.add_argument("--planner", default="gem", choices=NAMES)
    p.add_argument("--num-physical", type=argtype(Slots),
                   help="slots per layer (experts + redundant; default: the experts)")
    p.add_argument("--current", help="the placement in use (for migration-aware planning)")
    p.add_argument("--migration-weight", type=argtype(MigrationWeight), help="us of layer time one expert move is worth")
    p.add_argument("--one-copy-per-rank", action="store_true",
                   help="at most one copy of an expert per rank (what vllm-ascend's expert map holds; "
                        "needed for `export --to vllm-ascend` with redundant slots)")
    p.add_argument("-o", "--output", default="placement.json",
                   help="placement file written (default: %(default)s in the current folder)")
    certify_option(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("simulate", help="replay a trace through a placement")
    common(p)
    p.add_argument("--trace", required=True)
    p.add_argument("--placement", required=True)
    misspecified_options(p)
    p.add_argument("--true-profiles", nargs="+", metavar="FILES",
                   help="score the placement also on these profiles (the GPUs as they really are)")
    certify_option(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("export", help="write a placement as another engine reads it (SGLang, vllm-ascend)")
    common(p, group=False)
    p.add_argument("placement")
    p.add_argument("--to", required=True, choices=["sglang", "vllm-ascend", "vllm-expert-map"],
                   help="sglang: --init-expert-location; vllm-ascend (alias vllm-expert-map): "
                        "expert_map_path")
    p.add_argument("--model-config", metavar="CONFIG_JSON",
                   help="the model's config.json: SGLang indexes rows by decoder layer, so dense "
                        "layers before the MoE ones (first_k_dense_replace) get rows too")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="one HTML page of plots from profiles, traces, placements "
                       "and the plugin's event log (a plugin trace_dir)")
    common(p, group=False)
    p.add_argument("paths", nargs="+", help="folders (a plugin trace_dir) and files")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write")
    certify_option(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("inspect", help="summarise a profile, trace or placement file")
    common(p, group=False)
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import-trace", help="convert routing data into a RoutingTrace")
    common(p, group=False)
    p.add_argument("--format", required=True, choices=["harmoeny", "vllm-eplb", "synthetic"])
    p.add_argument("source", nargs="?", help="HarMoEny model folder, EPLB .npz/.pt, or SyntheticParams JSON")
    p.add_argument("--model", help="model name to record")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_import_trace)

    p = sub.add_parser("replay", help="per-rank times of placements on the trace's steps: predicted, "
                       "and with --measure timed on real kernels (unequal ranks as green-context partitions)")
    common(p)
    p.add_argument("--trace", required=True, help="RoutingTrace file or bundled:NAME")
    p.add_argument("--placement", nargs="+", required=True, help="placement files of one fleet")
    p.add_argument("--measure", action="store_true",
                   help="time every rank's work on the GPUs (vLLM's fused_experts where importable)")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="bf16", help="the experts' precision")
    p.add_argument("--kernel", choices=["auto", "vllm", "triton"], default="auto",
                   help="vllm: vLLM's fused_experts; triton: vllm-gem's kernel; auto: vllm where importable")
    p.add_argument("--slow-sms", type=sm_limits,
                   help="RANK:SMS[,RANK:SMS] run those ranks in green contexts of that many SMs")
    p.add_argument("--steps", choices=["held-out", "all"], default="held-out",
                   help="held-out: the second half (what a plan made on the first half did not see)")
    p.add_argument("--max-steps", type=argtype(Steps), default=8, help="replay at most this many steps, spread evenly")
    p.add_argument("--top-k", type=argtype(LocalExperts), help="experts per token (default: the trace's)")
    p.add_argument("--hidden", type=argtype(Width), help="expert hidden size (default: the profiles')")
    p.add_argument("--intermediate", type=argtype(Width), help="expert intermediate size (default: the profiles')")
    p.add_argument("--baseline", help="the placement (by planner) ratios are taken to (default: vllm-default)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("calibrate", help="time MoE expert work on the local GPUs, write GpuProfiles")
    common(p, group=False)
    p.add_argument("--out-dir", default="profiles")
    p.add_argument("--hidden", type=argtype(Width), default=2048)
    p.add_argument("--intermediate", type=argtype(Width), default=768)
    p.add_argument("--experts", type=argtype(LocalExperts), default=32, help="local experts per GPU")
    p.add_argument("--devices", type=listtype(Device, max_len=1024),
                   help="comma-separated CUDA device indices (default: all)")
    p.add_argument("--slow-sms", type=sm_limits,
                   help="DEVICE:SMS[,DEVICE:SMS] emulate a slower GPU with a green context")
    p.add_argument("--time-limit", type=argtype(Seconds), default=None,
                   help="seconds per GPU; past it the calibration stops with an error naming the GPU")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="bf16",
                   help="the served experts' precision: bf16, fp8 (per-tensor scales, vLLM's "
                        "--quantization fp8), fp8-channel, or fp8-block (128x128 blocks: DeepSeek-V3, "
                        "Qwen3 FP8)")
    p.set_defaults(func=cmd_calibrate)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad value (2, its one line printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except GemInputError as e:
        print(f"vllm-gem: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vllm-gem inspect F | head`: the reader left, which is not an error of ours
        # point stdout at /dev/null so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
