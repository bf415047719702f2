"""`vllm-gem report`: one self-contained HTML page from the files GEM writes.

Inputs are folders and files: GPU profiles, routing traces and placements (any of the three
formats) and the plugin's event log (``gem-events.jsonl``: every start-up, switch and
recalibration decision). A plugin run with ``trace_dir`` writes all of them there, so
``vllm-gem report TRACE_DIR -o report.html`` shows that run. The page embeds matplotlib PNGs
(base64) and plain HTML tables: no server, no script.

Sections, each drawn when its inputs are there:
1. GPU latency curves: each profile's measured points, its fitted latency model at the same
   loads, and the kernel's tile boundaries (multiples of BLOCK_M tokens per expert).
2. Routing: mean tokens per step of every expert in every layer, per trace.
3. Placements: which EP rank holds each logical expert in each layer, per placement.
4. Predicted per-rank MoE layer time of each placement of the group's shape (and of vLLM's
   linear start map) on a trace of that shape, with the group's profiles, against the lower
   bound.
5. The decision timeline: predicted gain of each start-up, switch and recalibration, moved or
   refused, with why; the newest decision's per-rank times before and after.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GemInputError
from .export import engine_placement, is_engine_file
from .files import write_atomic
from .formats import (
    EVENTS_FILE,
    GpuProfile,
    Placement,
    PlacementEvent,
    RoutingTrace,
    load_any,
    load_events,
)
from .latency import GroupModel, LatencyModel, fit

SUFFIXES = (".json", ".msgpack", ".jsonl")
MAX_PANELS = 16  # GPUs, traces or placements drawn (the rest are listed in the tables)
RANK_IN_NAME = re.compile(r"rank(\d+)")  # the plugin writes profile-rankN.json


@dataclass
class Inputs:
    """What was read, by kind, each with the file it came from."""

    profiles: list[tuple[str, GpuProfile]] = field(default_factory=list)
    traces: list[tuple[str, RoutingTrace]] = field(default_factory=list)
    placements: list[tuple[str, Placement]] = field(default_factory=list)
    events: list[tuple[str, PlacementEvent]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) in folders
    models: dict[str, LatencyModel] = field(default_factory=dict)  # each profile's fit, by file


def read_inputs(paths: list[str]) -> Inputs:
    """Read every file named, and every profile/trace/placement/event file in the folders
    named. A file named explicitly must be readable; in a folder, files of another kind
    (vLLM's own JSON, metrics files) are listed as skipped."""
    got = Inputs()
    engine_files: list[tuple[Path, bool]] = []  # read once the profiles say how many ranks
    for spec in paths:
        p = Path(spec)
        if spec.startswith("bundled:"):
            _add_bundled(got, spec)
            continue
        if p.is_dir():
            for f in sorted(q for q in p.iterdir() if q.is_file() and q.suffix in SUFFIXES):
                try:
                    _add(got, f)
                except GemInputError as e:
                    if is_engine_file(f):  # only a file that is none of ours is looked at again
                        engine_files.append((f, False))
                    else:
                        got.skipped.append((str(f), f"{e.field}: {e.problem}"))
        elif p.is_file():
            try:
                _add(got, p)
            except GemInputError:
                if not is_engine_file(p):
                    raise
                engine_files.append((p, True))
        else:
            raise GemInputError(spec, "path", "does not exist", "a folder or a file GEM wrote")
    for f, named in engine_files:  # exported for SGLang or vllm-ascend: shown as our placements
        try:
            got.placements.append((str(f), engine_placement(f, len(got.profiles) or None)))
        except GemInputError as e:
            if named:
                raise
            got.skipped.append((str(f), f"{e.field}: {e.problem}"))
    if not (got.profiles or got.traces or got.placements or got.events):
        raise GemInputError(", ".join(paths), "files", "hold no profile, trace, placement or event log",
                            f"files GEM wrote (a plugin trace_dir, `vllm-gem plan -o`, {EVENTS_FILE})")
    got.profiles.sort(key=_profile_order)
    got.events.sort(key=lambda fe: (fe[1].time, fe[1].step))
    return got


def _profile_order(item: tuple[str, GpuProfile]) -> tuple[int, str]:
    """EP-rank order where the file name says it (the plugin's profile-rankN.json), else the
    GPU index, then the name."""
    m = RANK_IN_NAME.search(Path(item[0]).stem)
    return (int(m.group(1)) if m else item[1].gpu.index, item[0])


def _add_bundled(got: Inputs, spec: str) -> None:
    """`bundled:qwen` (a trace) or `bundled:one-slow4` (a profile set), as the other commands
    take them."""
    from .evaluate import BUNDLED_TRACES, bundled_trace
    from .profiles import bundled_profiles, bundled_set_names
    name = spec.split(":", 1)[1]
    if name in BUNDLED_TRACES:
        got.traces.append((spec, bundled_trace(name)))
    elif name in bundled_set_names():
        for i, prof in enumerate(bundled_profiles(name)):
            src = f"{spec}[{i}]"
            got.models[src] = fit(prof, src)
            got.profiles.append((src, prof))
    else:
        raise GemInputError(spec, "bundled", f"names no bundled data ({name!r})",
                            f"a trace ({', '.join(BUNDLED_TRACES)}) or a profile set "
                            f"({', '.join(bundled_set_names())})")


def _add(got: Inputs, f: Path) -> None:
    if f.suffix == ".jsonl":
        got.events.extend((str(f), e) for e in load_events(f))
        return
    obj = load_any(f)
    if isinstance(obj, GpuProfile):  # fitted once here: a profile no model fits is skipped in a folder
        got.models[str(f)] = fit(obj, str(f))
    {GpuProfile: got.profiles, RoutingTrace: got.traces, Placement: got.placements}[type(obj)].append(
        (str(f), obj))


# --------------------------------------------------------------------------- figures
def _png(fig) -> str:
    """A matplotlib figure as an <img> tag with the PNG inline."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    alt = html.escape(fig.get_label() or "figure")
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _grid(n: int, width: float = 4.2, height: float = 3.2, label: str = ""):
    import matplotlib.pyplot as plt
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    fig.set_label(label)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def latency_curves(profiles: list[tuple[str, GpuProfile]], models: dict[str, LatencyModel]) -> str:
    """Measured time against the largest per-expert load, the model at the same loads, and
    the tile boundaries: one panel per GPU."""
    shown = profiles[:MAX_PANELS]
    fig, axes = _grid(len(shown), label="GPU latency curves")
    for ax, (f, prof) in zip(axes, shown):
        model = models[f]
        counts = [np.asarray(p.tokens_per_expert, dtype=np.float64) for p in prof.points]
        x = np.maximum([c.max() for c in counts], 1.0)  # log axis: an idle point sits at 1
        active = np.array([(c > 0).sum() for c in counts])
        measured = np.array([p.median_us for p in prof.points])
        predicted = np.array([model.predict(c) for c in counts])
        sc = ax.scatter(x, measured, c=active, cmap="viridis", s=18, label="measured (colour: active experts)")
        ax.scatter(x, predicted, marker="x", color="crimson", s=16, label="latency model")
        bm = prof.kernel.block_m
        for k in range(1, int(x.max() // bm) + 1):
            if k & (k - 1) == 0:  # powers of two: the boundaries calibration samples
                ax.axvline(k * bm, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(f"largest tokens per expert (dotted: BLOCK_M = {bm} steps)")
        ax.set_ylabel("MoE layer time (us)")
        ax.set_title(f"{Path(f).name}: {prof.gpu.name}\nfit RMS {model.fit_rel_rms:.1%}", fontsize=9)
        fig.colorbar(sc, ax=ax, fraction=0.05)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def routing_heatmaps(traces: list[tuple[str, RoutingTrace]]) -> str:
    """Mean tokens per step of each expert in each layer: one panel per trace."""
    shown = traces[:MAX_PANELS]
    fig, axes = _grid(len(shown), width=5.5, height=3.6, label="routing heat maps")
    for ax, (f, tr) in zip(axes, shown):
        loads = tr.loads
        im = ax.imshow(loads.mean(0), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xlabel("logical expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{Path(f).name}: {tr.model}\n{loads.shape[0]} steps, mean tokens per step",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return _png(fig)


def holder_map(phys_to_log: np.ndarray, num_logical: int, num_ranks: int) -> np.ndarray:
    """Which rank holds each logical expert (its first copy, in slot order).

    phys_to_log: [layers, num_physical] -> [layers, num_logical] rank
    """
    layers, slots = phys_to_log.shape
    rank_of_slot = np.arange(slots) // (slots // num_ranks)
    out = np.full((layers, num_logical), -1, dtype=np.int64)
    for s in range(slots - 1, -1, -1):  # backwards: the first copy writes last
        out[np.arange(layers), phys_to_log[:, s]] = rank_of_slot[s]
    return out


def placement_maps(placements: list[tuple[str, Placement]]) -> str:
    """One panel per placement: the EP rank holding each expert in each layer."""
    import matplotlib.pyplot as plt
    shown = placements[:MAX_PANELS]
    fig, axes = _grid(len(shown), width=5.5, height=3.6, label="placement maps")
    for ax, (f, p) in zip(axes, shown):
        held = holder_map(p.array, p.num_logical_experts, p.num_ranks)
        cmap = plt.get_cmap("tab20" if p.num_ranks > 10 else "tab10", p.num_ranks)
        im = ax.imshow(held, aspect="auto", cmap=cmap, vmin=-0.5, vmax=p.num_ranks - 0.5,
                       interpolation="nearest")
        replicas = p.array.shape[1] - p.num_logical_experts
        ax.set_xlabel("logical expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"{Path(f).name}: planner {p.planner}\n{p.num_ranks} ranks, "
                     f"{replicas} redundant slots per layer (colour: rank of the first copy)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05, ticks=range(p.num_ranks))
    fig.tight_layout()
    return _png(fig)


def predicted_rank_times(trace: tuple[str, RoutingTrace], profiles: list[tuple[str, GpuProfile]],
                         placements: list[tuple[str, Placement]], models: dict[str, LatencyModel]
                         ) -> tuple[str, list[dict[str, Any]]]:
    """Each placement's predicted mean MoE layer time per rank on the trace, with vLLM's
    linear start map and the lower bound: a bar chart and its rows."""
    import matplotlib.pyplot as plt

    from .bounds import lower_bounds
    from .planners.base import PlacementProblem
    from .planners.baselines import LinearPolicy
    from .simulate import simulate
    loads = trace[1].loads
    group = GroupModel.of([models[f] for f, _ in profiles])
    usable = [(f, p) for f, p in placements if p.num_ranks == group.num_ranks
              and p.num_logical_experts == loads.shape[2] and p.array.shape[0] == loads.shape[1]]
    physical = usable[0][1].array.shape[1] if usable else loads.shape[2]
    usable = [(f, p) for f, p in usable if p.array.shape[1] == physical]  # one bound for all
    start = LinearPolicy().place(PlacementProblem(loads, group, physical))
    cases = [("vLLM linear start map", start)] + [(Path(f).name, p.array) for f, p in usable]
    bounds = lower_bounds(loads, group, physical)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * group.num_ranks * len(cases) / 3), 3.8))
    fig.set_label("predicted per-rank layer time")
    width = 0.8 / len(cases)
    rows = []
    for k, (name, p2l) in enumerate(cases):
        sim = simulate(loads, p2l, group, bounds)
        ax.bar(np.arange(group.num_ranks) + k * width, sim.rank_mean, width,
               label=f"{name}: layer {sim.mean:.1f} us")
        rows.append({"placement": name, "layer_us": sim.mean, "slowest_rank_us": max(sim.rank_mean),
                     "per_rank_us": np.round(sim.rank_mean, 2).tolist(), "gap_to_bound": sim.gap})
    bound = sim.bound
    ax.axhline(bound, color="black", ls="--", lw=1, label=f"lower bound {bound:.1f} us")
    ax.set_xticks(np.arange(group.num_ranks) + 0.4 - width / 2)
    ax.set_xticklabels([f"rank {r}\n{p.gpu.name[:18]}" for r, (_, p) in enumerate(profiles)], fontsize=7)
    ax.set_ylabel("mean time per MoE layer (us)")
    ax.set_title(f"predicted on {Path(trace[0]).name} ({loads.shape[0]} steps): each rank's mean; "
                 "a layer waits for the slowest rank each step", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _png(fig), rows


def decision_figures(events: list[tuple[str, PlacementEvent]]) -> str:
    """Left: every decision's predicted gain, moved (filled) or refused (hollow). Right: the
    newest decision's per-rank times before and after, with its bound."""
    import matplotlib.pyplot as plt
    evs = [e for _, e in events]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 3.8))
    fig.set_label("placement decisions")
    x = np.arange(len(evs))
    gain = np.array([100 * e.predicted_gain for e in evs])
    moved = np.array([e.applied for e in evs])
    ax.plot(x, gain, color="grey", lw=0.8)
    ax.scatter(x[moved], gain[moved], s=40, color="tab:green", label="moved", zorder=3)
    ax.scatter(x[~moved], gain[~moved], s=40, facecolors="none", edgecolors="tab:red",
               label="refused", zorder=3)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{e.reason}\nstep {e.step}" for e in evs], fontsize=7, rotation=30)
    ax.set_ylabel("predicted MoE layer-time gain (%)")
    ax.set_title("decisions in order", fontsize=9)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=7)
    last = evs[-1]
    r = np.arange(len(last.rank_us_before))
    bx.bar(r - 0.2, last.rank_us_before, 0.4, label="before")
    bx.bar(r + 0.2, last.rank_us_after, 0.4, label="planned" + (" (moved)" if last.applied else " (refused)"))
    if last.predicted_bound_us is not None:
        bx.axhline(last.predicted_bound_us, color="black", ls="--", lw=1, label="lower bound")
    bx.set_xticks(r)
    bx.set_xticklabels([f"rank {i}" for i in r], fontsize=7)
    bx.set_ylabel("predicted mean MoE layer time (us)")
    bx.set_title(f"newest decision: {last.reason} at step {last.step} ({last.time})", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- page
def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return f"<td>{html.escape(str(v))}</td>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1500px}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
img{max-width:100%;display:block;margin:0.5em 0}
.note{color:#555;font-size:0.9em}"""


def build_report(inp: Inputs, title: str = "vllm-gem report") -> tuple[str, dict[str, Any]]:
    """The HTML page and a summary: {"sections": [...], "images": n, "files": n}."""
    parts, sections = [], []
    images = 0

    def section(name: str, body: str) -> None:
        nonlocal images
        sections.append(name)
        images += body.count("<img ")
        parts.append(f"<h2>{html.escape(name)}</h2>{body}")

    files = ([(f, "gpu_profile", f"{p.gpu.name}, {len(p.points)} points, {p.expert.dtype}")
              for f, p in inp.profiles]
             + [(f, "routing_trace", f"{t.model}, [steps, layers, experts] = {list(t.loads.shape)}")
                for f, t in inp.traces]
             + [(f, "placement", f"planner {p.planner}, {p.num_ranks} ranks, "
                 + f"{len(p.phys_to_log)} layers x {len(p.phys_to_log[0])} slots")
                for f, p in inp.placements]
             + [(f, "placement_event", f"{n} decisions")
                for f, n in Counter(f for f, _ in inp.events).items()]
             + [(f, "skipped", why) for f, why in inp.skipped])
    section("Files", _table(["file", "kind", "what"], [list(r) for r in files]))

    if inp.profiles:
        rows = []
        for f, p in inp.profiles:
            m = inp.models[f]
            rows.append([Path(f).name, p.gpu.name, p.emulation or "-", p.kernel.block_m,
                         f"{m.fit_rel_rms:.1%}", *m.coef.round(4).tolist()])
        section("GPU latency curves", latency_curves(inp.profiles, inp.models) + _table(
            ["file", "GPU", "emulation", "BLOCK_M", "fit RMS", "fixed us", "per expert", "per tile",
             "per token"], rows))
    if inp.traces:
        section("Routing", routing_heatmaps(inp.traces))
    if inp.placements:
        section("Placements", placement_maps(inp.placements))
    if inp.traces and inp.profiles:
        try:
            img, rows = predicted_rank_times(_trace_for(inp), _rank_profiles(inp), inp.placements,
                                             inp.models)
            section("Predicted per-rank layer time", img + _table(
                ["placement", "layer us", "slowest rank us", "over lower bound", "per rank us"],
                [[r["placement"], r["layer_us"], r["slowest_rank_us"], r["gap_to_bound"],
                  r["per_rank_us"]] for r in rows]))
        except GemInputError as e:
            section("Predicted per-rank layer time", f'<p class="note">not drawn: {html.escape(str(e))}</p>')
    if inp.events:
        rows = [[e.time, e.step, e.reason, e.planner, "moved" if e.applied else "refused",
                 e.why or "-", e.predicted_layer_us_before, e.predicted_layer_us_after,
                 f"{e.predicted_gain:+.1%}",
                 "-" if e.predicted_bound_us is None else e.predicted_bound_us,
                 e.planning_seconds, e.move_seconds, e.slots_changed] for _, e in inp.events]
        section("Placement decisions", decision_figures(inp.events) + _table(
            ["time (UTC)", "step", "reason", "planner", "outcome", "why", "layer us before",
             "layer us after", "gain", "bound us", "planning s", "move s", "slots moved"], rows))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>Predicted times come from each GPU's fitted latency model "
            f"(docs/design.md); measured serving times are in vLLM's own metrics.</p>"
            + "".join(parts) + "</body></html>")
    return page, {"sections": sections, "images": images, "files": len(files)}


def _rank_profiles(inp: Inputs) -> list[tuple[str, GpuProfile]]:
    """The EP group's profiles: the plugin's profile-rankN files where there are any (a trace_dir
    may also hold the profile files the run was given), else every profile, in order."""
    ranked = [fp for fp in inp.profiles if RANK_IN_NAME.search(Path(fp[0]).stem)]
    return ranked or inp.profiles


def _trace_for(inp: Inputs) -> tuple[str, RoutingTrace]:
    """The trace to predict on: the last (by name) of those shaped like a placement, else the last."""
    fits = [ft for ft in inp.traces if any(
        p.array.shape[0] == ft[1].loads.shape[1] and p.num_logical_experts == ft[1].loads.shape[2]
        for _, p in inp.placements)]
    return (fits or inp.traces)[-1]


def write_report(paths: list[str], out: str | Path) -> dict[str, Any]:
    """Read `paths`, write the page to `out`; returns the summary with the output file."""
    try:
        import matplotlib
    except ImportError:
        raise GemInputError("report", "matplotlib", "is not installed",
                            'pip install "vllm-gem[plot]"') from None
    matplotlib.use("Agg")
    page, summary = build_report(read_inputs(paths))
    out = write_atomic(out, page.encode("utf-8"))
    return {"file": str(out), **summary}
