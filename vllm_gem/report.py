"""`vllm-gem report`: one self-contained HTML page from the files GEM writes.

Inputs are folders and files: GPU profiles, routing traces and placements (any of the three
formats) and the plugin's event log (``gem-events.jsonl``: every start-up, switch and
recalibration decision). A plugin run with ``trace_dir`` writes all of them there, so
``vllm-gem report TRACE_DIR -o report.html`` shows that run. The page embeds matplotlib
figures as inline SVG (their text kept as text) and plain HTML tables: no server, no script.
Files sort by name with numbers by value (placement-gen2 before placement-gen10).

Sections, each drawn when its inputs are there:
1. Straggler: for each placement (and vLLM's linear start map), predicted on a trace of its
   shape with the group's profiles: the layer time, which rank is slowest, by how much over
   the mean rank, and how often it is the last at a layer's barrier.
2. Files read (and skipped, with why).
3. GPU latency curves: each profile's measured points, its fitted latency model at the same
   loads, and the kernel's tile boundaries (multiples of BLOCK_M tokens per expert).
4. Routing: mean tokens per step of every expert in every layer, per trace.
5. Placements: where the hot experts went (each rank's tokens per layer against the layer's
   mean rank; the ranks holding the hottest experts) and what each placement is.
6. Predicted per-rank layer time: each rank's mean against the mean rank, the straggler
   outlined, and each placement's layer time against the start map and the lower bound.
7. Placement decisions: what each start-up, switch and recalibration had and planned
   (predicted), moved or refused and why, the slots it moved; the newest one per rank.
"""

from __future__ import annotations

import html
import io
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bounds import lower_bounds, placement_bound
from .certify import Certificate, certify
from .errors import GemInputError
from .evaluate import BUNDLED_TRACES, bundled_trace
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
from .planners.base import PlacementProblem
from .planners.baselines import LinearPolicy
from .profiles import bundled_profiles, bundled_set_names
from .simulate import rank_times, replica_counts, slot_tokens

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
            for f in sorted((q for q in p.iterdir() if q.is_file() and q.suffix in SUFFIXES),
                            key=lambda q: natural_key(q.name)):
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
    got.traces.sort(key=lambda ft: natural_key(ft[0]))  # gen2 before gen10
    got.placements.sort(key=lambda fp: natural_key(fp[0]))
    got.events.sort(key=lambda fe: (fe[1].time, fe[1].step))
    return got


def natural_key(name: str) -> list[Any]:
    """Sort key that orders numbers by value: placement-gen2 before placement-gen10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _profile_order(item: tuple[str, GpuProfile]) -> tuple[int, list[Any]]:
    """EP-rank order where the file name says it (the plugin's profile-rankN.json), else the
    GPU index, then the name."""
    m = RANK_IN_NAME.search(Path(item[0]).stem)
    return (int(m.group(1)) if m else item[1].gpu.index, natural_key(item[0]))


def _add_bundled(got: Inputs, spec: str) -> None:
    """`bundled:qwen` (a trace) or `bundled:one-slow4` (a profile set), as the other commands
    take them."""
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
# Figures are inline SVG with their text kept as text: the browser lays every label out, so
# a reader can search and copy it and a test can check that no two labels overlap.
FIG_STYLE = {"svg.fonttype": "none", "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
             "legend.fontsize": 7, "legend.frameon": False, "xtick.labelsize": 7, "ytick.labelsize": 7}
MAX_TICKS = 16  # rank or decision tick labels per axis, so labels never run into each other


def _svg(fig) -> str:
    """A matplotlib figure as an inline <svg> element (its ids salted by the figure's label, so
    figures of one page never share one)."""
    import matplotlib.pyplot as plt
    buf = io.StringIO()
    with plt.rc_context({**FIG_STYLE, "svg.hashsalt": fig.get_label() or "figure"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})  # no timestamp: same inputs, same page
    plt.close(fig)
    text = buf.getvalue()
    svg = text[text.index("<svg"):]
    label = html.escape(fig.get_label() or "figure")
    return svg.replace("<svg ", f'<svg class="figure" role="img" aria-label="{label}" ', 1)


def _figure(width: float, height: float, label: str, **kw):
    """A constrained-layout figure; called, and drawn on, inside plt.rc_context(FIG_STYLE)
    (text sizes are read when each label is made)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(figsize=(width, height), layout="constrained", **kw)
    fig.set_label(label)
    return fig, axes


def _grid(n: int, width: float, height: float, label: str):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = _figure(width * cols, height * rows, label, nrows=rows, ncols=cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _thin_ticks(n: int) -> np.ndarray:
    """[k] positions 0..n-1 with at most MAX_TICKS of them, evenly stepped."""
    return np.arange(0, n, max(1, -(-n // MAX_TICKS)))


def _wrap(text: str, width: int = 44) -> str:
    return "\n".join(textwrap.wrap(text, width, break_long_words=True)) or text


def latency_curves(profiles: list[tuple[str, GpuProfile]], models: dict[str, LatencyModel]) -> str:
    """Measured time against the largest per-expert load, the model at the same loads, and
    the tile boundaries: one panel per GPU."""
    import matplotlib.pyplot as plt
    shown = profiles[:MAX_PANELS]
    with plt.rc_context(FIG_STYLE):
        fig, axes = _grid(len(shown), 3.4, 2.9, "GPU latency curves")
        for ax, (f, prof) in zip(axes, shown):
            model = models[f]
            counts = [np.asarray(p.tokens_per_expert, dtype=np.float64) for p in prof.points]
            x = np.maximum([c.max() for c in counts], 1.0)  # log axis: an idle point sits at 1
            active = np.array([(c > 0).sum() for c in counts])
            measured = np.array([p.median_us for p in prof.points])
            predicted = np.array([model.predict(c) for c in counts])
            sc = ax.scatter(x, measured, c=active, cmap="viridis", s=14, label="measured (colour: active experts)")
            ax.scatter(x, predicted, marker="x", color="crimson", s=12, label="latency model")
            bm = prof.kernel.block_m
            for k in range(1, int(x.max() // bm) + 1):
                if k & (k - 1) == 0:  # powers of two: the boundaries calibration samples
                    ax.axvline(k * bm, color="grey", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("largest tokens per expert")
            ax.set_ylabel("MoE layer time (us)")
            ax.set_title(_wrap(f"{Path(f).name}: {prof.gpu.name}", 40)
                         + f"\nfit RMS {model.fit_rel_rms:.1%}; dotted: {bm}-token tiles")
            fig.colorbar(sc, ax=ax, fraction=0.06).set_label("active experts")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2)
    return _svg(fig)


def routing_heatmaps(traces: list[tuple[str, RoutingTrace]]) -> str:
    """Mean tokens per step of each expert in each layer: one panel per trace."""
    import matplotlib.pyplot as plt
    shown = traces[:MAX_PANELS]
    with plt.rc_context(FIG_STYLE):
        fig, axes = _grid(len(shown), 4.2, 3.0, "routing heat maps")
        for ax, (f, tr) in zip(axes, shown):
            loads = tr.loads
            im = ax.imshow(loads.mean(0), aspect="auto", cmap="magma", interpolation="nearest")
            ax.set_xlabel("logical expert")
            ax.set_ylabel("MoE layer")
            ax.set_title(_wrap(f"{Path(f).name}: {tr.model}", 50) + f"\n{loads.shape[0]} steps")
            fig.colorbar(im, ax=ax, fraction=0.06).set_label("mean tokens per step")
    return _svg(fig)


@dataclass
class Scored:
    """One placement replayed on the report's trace with the group's models.

    rank_us: [steps, layers, ranks] predicted time; rank_tokens: [steps, layers, ranks]
    tokens each rank receives (an expert's tokens split evenly over its copies)
    """

    name: str
    phys_to_log: np.ndarray  # [layers, num_physical]
    rank_us: np.ndarray
    rank_tokens: np.ndarray
    layer_us: float  # mean over steps and layers of the slowest rank's time
    gap_to_bound: float

    @property
    def rank_mean(self) -> np.ndarray:
        """[ranks] each rank's mean time over steps and layers."""
        return self.rank_us.mean(axis=(0, 1))

    @property
    def straggler(self) -> int:
        return int(self.rank_mean.argmax())

    @property
    def slowest_share(self) -> np.ndarray:
        """[ranks] share of (step, layer) barriers each rank is the last to reach."""
        last = self.rank_us.argmax(-1)
        return np.bincount(last.ravel(), minlength=self.rank_us.shape[2]) / last.size


def score_placements(trace: tuple[str, RoutingTrace], profiles: list[tuple[str, GpuProfile]],
                     placements: list[tuple[str, Placement]], models: dict[str, LatencyModel]
                     ) -> list[Scored]:
    """vLLM's linear start map and every placement of the group's and the trace's shape (and
    of the first such placement's slot count: one bound for all), replayed on the trace."""
    loads = trace[1].loads
    group = GroupModel.of([models[f] for f, _ in profiles])
    usable = [(f, p) for f, p in placements if p.num_ranks == group.num_ranks
              and p.num_logical_experts == loads.shape[2] and p.array.shape[0] == loads.shape[1]]
    physical = usable[0][1].array.shape[1] if usable else loads.shape[2]
    usable = [(f, p) for f, p in usable if p.array.shape[1] == physical]
    start = LinearPolicy().place(PlacementProblem(loads, group, physical))
    _, tight, static = lower_bounds(loads, group, physical)
    bound = placement_bound(tight, static)
    out = []
    for name, p2l in [("vLLM linear start map", start)] + [(Path(f).name, p.array) for f, p in usable]:
        t = rank_times(loads, p2l, group)
        tok = slot_tokens(loads, p2l).reshape(*loads.shape[:2], group.num_ranks, -1).sum(-1)
        layer = float(t.max(-1).mean())
        out.append(Scored(name, p2l, t, tok, layer, layer / bound if bound > 0 else 1.0))
    return out


def straggler_figure(scored: list[Scored]) -> str:
    """Left: each placement's per-rank mean time relative to its mean rank (the outlined cell:
    the straggler). Right: each placement's layer time relative to vLLM's linear start map."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    ranks = scored[0].rank_us.shape[2]
    rel = np.array([100 * s.rank_mean / s.rank_mean.mean() for s in scored])  # [cases, ranks]
    span = max(1.0, float(np.abs(rel - 100).max()))
    with plt.rc_context(FIG_STYLE):
        fig, (ax, bx) = _figure(max(7.0, 3.5 + 0.28 * ranks), 1.4 + 0.28 * len(scored),
                                "predicted per-rank layer time", ncols=2, sharey=True,
                                width_ratios=[max(2.0, 0.28 * ranks), 2.2])
        im = ax.imshow(rel, aspect="auto", cmap="coolwarm", vmin=100 - span, vmax=100 + span,
                       interpolation="nearest")
        for row, s in enumerate(scored):
            ax.add_patch(Rectangle((s.straggler - 0.5, row - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
        ticks = _thin_ticks(ranks)
        ax.set_xticks(ticks, [str(r) for r in ticks])
        ax.set_yticks(range(len(scored)), [_wrap(s.name, 36) for s in scored])
        ax.set_xlabel("EP rank (GPUs: table below); outlined: the straggler")
        ax.set_title("each rank's mean time, % of the mean rank")
        fig.colorbar(im, ax=ax, fraction=0.06, location="top").set_label("% of the mean rank")
        base = scored[0].layer_us
        ratio = np.array([s.layer_us / base for s in scored])
        bx.barh(range(len(scored)), ratio, color=["grey"] + ["tab:blue"] * (len(scored) - 1), height=0.6)
        bx.axvline(1.0, color="black", lw=0.8)
        bx.set_xlim(min(0.95, ratio.min() - 0.02), max(1.05, ratio.max() + 0.02))
        bx.set_xlabel("layer time / vLLM linear start map")
        bx.set_title("slowest rank's time per layer")
    return _svg(fig)


def hot_expert_maps(scored: list[Scored]) -> str:
    """One panel per placement: tokens each rank receives in each layer, % of the layer's mean
    rank, on one colour scale (a hot expert left alone on a rank shows as a red cell)."""
    import matplotlib.pyplot as plt
    shown = scored[:MAX_PANELS]
    rel = [100 * s.rank_tokens.mean(0) / np.maximum(s.rank_tokens.mean(0).mean(-1, keepdims=True), 1e-12)
           for s in shown]  # [layers, ranks] each
    vmax = max(150.0, max(float(r.max()) for r in rel))
    with plt.rc_context(FIG_STYLE):
        fig, axes = _grid(len(shown), 3.4, 2.8, "tokens per rank and layer")
        for ax, s, r in zip(axes, shown, rel):
            im = ax.imshow(r, aspect="auto", cmap="RdBu_r", vmin=0, vmax=vmax, interpolation="nearest")
            ticks = _thin_ticks(r.shape[1])
            ax.set_xticks(ticks, [str(t) for t in ticks])
            layer, rank = np.unravel_index(r.argmax(), r.shape)
            ax.set_title(_wrap(s.name, 40) + f"\nmost: {r.max():.0f}% (layer {layer}, rank {rank})")
            ax.set_xlabel("EP rank")
            ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=list(axes[:len(shown)]), fraction=0.04).set_label(
            "tokens per step, % of the layer's mean rank")
    return _svg(fig)


def hot_expert_rows(trace: RoutingTrace, scored: list[Scored], top: int = 10, columns: int = 6
                    ) -> tuple[list[str], list[list[Any]]]:
    """The `top` hottest (layer, expert) pairs of the trace and the ranks holding their copies
    under each of the first `columns` placements: a table's head and rows."""
    mean = trace.loads.mean(0)  # [layers, experts]
    share = mean / np.maximum(mean.sum(-1, keepdims=True), 1e-12)
    order = np.argsort(-mean, axis=None, kind="stable")[:top]
    shown = scored[:columns]
    head = ["layer", "expert", "tokens per step", "share of the layer"] + [s.name for s in shown]
    rows = []
    for layer, expert in zip(*np.unravel_index(order, mean.shape)):
        holders = []
        for s in shown:
            slots = s.phys_to_log.shape[1] // s.rank_us.shape[2]
            ranks = np.flatnonzero(s.phys_to_log[layer] == expert) // slots
            holders.append(", ".join(f"r{r}" for r in ranks))
        rows.append([int(layer), int(expert), float(mean[layer, expert]), f"{share[layer, expert]:.1%}", *holders])
    return head, rows


def placement_rows(placements: list[tuple[str, Placement]]) -> list[list[Any]]:
    """What each placement is, without a trace to replay it on."""
    rows = []
    for f, p in placements:
        arr = p.array
        copies = replica_counts(arr, p.num_logical_experts)
        rows.append([Path(f).name, p.planner, p.num_ranks, arr.shape[0], arr.shape[1],
                     arr.shape[1] - p.num_logical_experts, int(copies.max())])
    return rows


def decision_figure(events: list[tuple[str, PlacementEvent]]) -> str:
    """Left: every decision's predicted layer time under what it had (grey) and what it
    planned (filled: moved, hollow: refused). Right: the newest decision per rank."""
    import matplotlib.pyplot as plt
    evs = [e for _, e in events]
    with plt.rc_context(FIG_STYLE):
        fig, (ax, bx) = _figure(11, 3.6, "placement decisions", ncols=2)
        x = np.arange(len(evs))
        before = np.array([e.predicted_layer_us_before for e in evs])
        after = np.array([e.predicted_layer_us_after for e in evs])
        moved = np.array([e.applied for e in evs])
        ax.vlines(x, np.minimum(before, after), np.maximum(before, after), color="grey", lw=1)
        ax.scatter(x, before, s=22, color="grey", label="had (placement in use)", zorder=3)
        ax.scatter(x[moved], after[moved], s=30, color="tab:green", label="planned, moved", zorder=3)
        ax.scatter(x[~moved], after[~moved], s=30, facecolors="none", edgecolors="tab:red",
                   label="planned, refused", zorder=3)
        ticks = _thin_ticks(len(evs))
        ax.set_xticks(ticks, [str(evs[i].step) for i in ticks])
        ax.set_xlim(-0.5, len(evs) - 0.5)
        ax.set_xlabel("decision, by engine step (table below)")
        ax.set_ylabel("predicted MoE layer time (us)")
        ax.set_title("each decision: what it had and what it planned")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=3)
        last = evs[-1]
        r = np.arange(len(last.rank_us_before))
        bx.bar(r - 0.2, last.rank_us_before, 0.4, color="grey", label="had")
        bx.bar(r + 0.2, last.rank_us_after, 0.4, color="tab:green" if last.applied else "tab:red",
               label="planned (moved)" if last.applied else "planned (refused)")
        if last.predicted_bound_us is not None:
            bx.axhline(last.predicted_bound_us, color="black", ls="--", lw=1, label="lower bound")
        ticks = _thin_ticks(len(r))
        bx.set_xticks(ticks, [str(i) for i in ticks])
        bx.set_xlabel("EP rank")
        bx.set_ylabel("predicted mean MoE layer time (us)")
        bx.set_title(_wrap(f"newest: {last.reason} at step {last.step}", 60))
        bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=3)
    return _svg(fig)


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
svg.figure{max-width:100%;height:auto;display:block;margin:0.5em 0}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.note{color:#555;font-size:0.9em}"""


def certify_scored(trace: tuple[str, RoutingTrace], profiles: list[tuple[str, GpuProfile]],
                   scored: list[Scored], models: dict[str, LatencyModel], seconds: float) -> Certificate:
    """The certificate (vllm_gem.certify) of the fastest scored placement on the trace: its
    bound holds for every placement of these slots, so every row's certified gap is its
    layer time over it."""
    group = GroupModel.of([models[f] for f, _ in profiles])
    fastest = min(scored, key=lambda s: s.layer_us)
    return certify(trace[1].loads, fastest.phys_to_log, group, seconds)


def build_report(inp: Inputs, title: str = "vllm-gem report", certify_seconds: float | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """The HTML page and a summary: {"sections": [...], "images": n, "files": n} (and
    "certificate" with certify_seconds: certify_scored's, as Certificate.as_dict)."""
    parts, sections = [], []
    images = 0

    def section(name: str, body: str) -> None:
        nonlocal images
        sections.append(name)
        images += body.count("<svg ")
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
    scored, scored_on, not_scored = [], None, ""
    group = _rank_profiles(inp)
    if inp.traces and inp.profiles:
        scored_on = _trace_for(inp)
        try:
            scored = score_placements(scored_on, group, inp.placements, inp.models)
        except GemInputError as e:
            not_scored = f'<p class="note">not drawn: {html.escape(str(e))}</p>'
    cert = None
    if scored and certify_seconds:
        cert = certify_scored(scored_on, group, scored, inp.models, certify_seconds)
    if scored:
        section("Straggler", _glance(scored, group, scored_on, cert))
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
        body = _table(["placement", "planner", "ranks", "layers", "slots per layer",
                       "redundant slots per layer", "most copies of one expert"], placement_rows(inp.placements))
        if len(scored) > 1:
            head, rows = hot_expert_rows(scored_on[1], scored[1:])
            body = (f'<p class="note">Where the hot experts went, on {html.escape(Path(scored_on[0]).name)}: '
                    "each rank's tokens per layer against the layer's mean rank, and the ranks "
                    "holding the hottest experts' copies.</p>" + hot_expert_maps(scored[1:])
                    + _table(head, rows) + body)
        else:
            body = '<p class="note">A trace of the placements\' shape shows where the hot experts went.</p>' + body
        section("Placements", body)
    if scored or not_scored:
        body = not_scored
        if scored:
            body = straggler_figure(scored) + _table(
                ["placement", "layer us", "vs linear start map", "over lower bound", "per rank us"],
                [[s.name, s.layer_us, f"{s.layer_us / scored[0].layer_us:.3f}x", s.gap_to_bound,
                  np.round(s.rank_mean, 2).tolist()] for s in scored]) + _table(
                ["rank", "GPU", "file"], [[r, p.gpu.name, Path(f).name]
                                          for r, (f, p) in enumerate(group)])
        section("Predicted per-rank layer time", body)
    if inp.events:
        rows = [[e.time, e.step, e.reason, e.planner, "moved" if e.applied else "refused",
                 e.why or "-", e.predicted_layer_us_before, e.predicted_layer_us_after,
                 f"{e.predicted_gain:+.1%}",
                 "-" if e.predicted_bound_us is None else e.predicted_bound_us,
                 e.planning_seconds, e.move_seconds, e.slots_changed,
                 f"placement-gen{e.generation}.json" if e.applied and e.generation else "-"]
                for _, e in inp.events]
        section("Placement decisions", decision_figure(inp.events) + _table(
            ["time (UTC)", "step", "reason", "planner", "outcome", "why", "layer us had",
             "layer us planned", "gain", "bound us", "planning s", "move s", "slots moved",
             "placement written"], rows))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>Predicted times come from each GPU's fitted latency model "
            f"(docs/design.md); measured serving times are in vLLM's own metrics.</p>"
            + "".join(parts) + "</body></html>")
    summary = {"sections": sections, "images": images, "files": len(files)}
    if cert is not None:
        summary["certificate"] = cert.as_dict()
    return page, summary


def _glance(scored: list[Scored], profiles: list[tuple[str, GpuProfile]],
            trace: tuple[str, RoutingTrace], cert: Certificate | None = None) -> str:
    """Which rank each placement waits for and by how much: one row per placement (and, with
    a certificate, how far each is from the best any placement could do at most)."""
    rows = []
    for s in scored:
        r = s.straggler
        mean = s.rank_mean
        rows.append([s.name, f"{s.layer_us:.1f}", f"{s.layer_us / scored[0].layer_us:.3f}x",
                     f"rank {r}", profiles[r][1].gpu.name, f"{mean[r]:.1f}",
                     f"{mean[r] / mean.mean() - 1:+.1%}", f"{s.slowest_share[r]:.0%}"]
                    + ([f"{s.layer_us / cert.bound_us - 1:.1%}"] if cert is not None else []))
    note = ""
    if cert is not None:
        note = (f'<p class="note">Certified lower bound {cert.bound_us:.1f} us for any placement of '
                f"these slots ({cert.seconds:.0f} s, {cert.proven_layers} of {cert.layers} layers proven "
                f"optimal): a placement's certified gap is at most how far it is from the optimum; "
                f"the best plan the search found is {cert.best_us:.1f} us.</p>")
    return (f'<p class="note">Predicted on {html.escape(Path(trace[0]).name)} '
            f"({trace[1].loads.shape[0]} steps) with the group's profiles.</p>" + note
            + _table(["placement", "layer us", "vs linear start map", "straggler", "its GPU",
                      "its mean us", "over the mean rank", "last at the barrier"]
                     + (["certified gap"] if cert is not None else []), rows))


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


def write_report(paths: list[str], out: str | Path, certify_seconds: float | None = None) -> dict[str, Any]:
    """Read `paths`, write the page to `out`; returns the summary with the output file
    (certify_seconds: also certify the placements, build_report)."""
    try:
        import matplotlib
    except ImportError:
        raise GemInputError("report", "matplotlib", "is not installed",
                            'pip install "vllm-gem[plot]"') from None
    matplotlib.use("Agg")
    page, summary = build_report(read_inputs(paths), certify_seconds=certify_seconds)
    out = write_atomic(out, page.encode("utf-8"))
    return {"file": str(out), **summary}
