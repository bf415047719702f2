"""`vllm-gem report`: the page, its figures, bad input, and the page in a real browser."""

from __future__ import annotations

import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec
import numpy as np
import pytest

from vllm_gem.cli import main
from vllm_gem.formats import PlacementEvent, append_event, save
from vllm_gem.profiles import bundled_profiles
from vllm_gem.traces import SyntheticParams, synthetic_trace

mpimg = pytest.importorskip("matplotlib.image")

SECTIONS = ["Straggler", "Files", "GPU latency curves", "Routing", "Placements",
            "Predicted per-rank layer time", "Placement decisions"]
SVG = "{http://www.w3.org/2000/svg}"


def event(step: int, applied: bool, gain: float, **kw) -> PlacementEvent:
    before = [100.0, 101.0, 99.0, 123.0]
    after = [b * (1 - gain) for b in before]
    return PlacementEvent(time=f"2026-12-06T05:{step // 1000:02d}:00+00:00", step=step,
                          reason="start" if step == 0 else "recalibration", planner="gem",
                          applied=applied, predicted_layer_us_before=max(before),
                          predicted_layer_us_after=max(after), predicted_bound_us=95.0,
                          predicted_gain=gain, rank_us_before=before, rank_us_after=after, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A folder laid out as the plugin's trace_dir: profile-rankN.json, a trace, placements
    and gem-events.jsonl (with a moved and a refused decision)."""
    d = tmp_path_factory.mktemp("run")
    for r, p in enumerate(bundled_profiles("one-slow4")):
        save(p, d / f"profile-rank{r}.json")
    save(synthetic_trace(SyntheticParams(steps=48, layers=4, experts=16, top_k=4, tokens_per_step=256,
                                         seed=1)), d / "planning-history-start.msgpack")
    for planner in ("vllm-default", "gem"):
        assert main(["plan", "--trace", str(d / "planning-history-start.msgpack"), "--profiles",
                     *(str(d / f"profile-rank{r}.json") for r in range(4)), "--num-physical", "20",
                     "--planner", planner, "-o", str(d / f"placement-{planner}.json")]) == 0
    append_event(event(0, True, 0.08, slots_changed=12, move_seconds=0.2, generation=1), d)
    append_event(event(5000, False, 0.004, why="saving below the move's cost", generation=1), d)
    (d / "rank0.json").write_text('{"rank": 0, "generation": 1}')  # a metrics file: not GEM's formats
    return d


def figures(page: str) -> list[ET.Element]:
    """Every inline SVG figure of the page, parsed."""
    return [ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", page, flags=re.DOTALL)]


def test_report_of_a_run_folder_draws_every_section_and_every_figure_parses(run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sections"] == SECTIONS and summary["images"] == 5
    page = out.read_text()
    figs = figures(page)
    assert len(figs) == 5 and "<script" not in page
    for fig in figs:  # a drawn figure whose labels are text: axes, marks, words
        texts = [t.text for t in fig.iter(f"{SVG}text") if (t.text or "").strip()]
        marks = list(fig.iter(f"{SVG}path")) + list(fig.iter(f"{SVG}image")) + list(fig.iter(f"{SVG}use"))
        assert len(texts) > 8 and len(marks) > 10, fig.get("aria-label")
    ids = re.findall(r'\bid="([^"]+)"', page)  # figures never share a clip path or marker id
    refs = set(re.findall(r'(?:href="#|url\(#)([^")]+)', page))
    assert all(ids.count(i) == 1 for i in refs), [i for i in refs if ids.count(i) != 1][:5]
    # both placements and vLLM's start map are predicted; the tables say what was moved or refused
    for text in ("placement-gem.json", "placement-vllm-default.json", "vLLM linear start map",
                 "refused", "saving below the move&#x27;s cost", "moved"):
        assert text in page, text
    assert "rank0.json" in page and "skipped" in page  # a foreign file in the folder is listed


def test_report_predicts_gem_below_vllms_policy_on_the_planned_trace(run_dir):
    from vllm_gem import report
    inp = report.read_inputs([str(run_dir)])
    scored = report.score_placements(report._trace_for(inp), report._rank_profiles(inp), inp.placements,
                                     inp.models)
    layer = {s.name: s.layer_us for s in scored}
    assert layer["placement-gem.json"] < layer["placement-vllm-default.json"]
    assert all(s.gap_to_bound >= 1.0 for s in scored)


def test_the_straggler_table_names_the_slowest_rank_and_by_how_much(run_dir):
    """Checked against the simulator's own per-rank times, computed here apart from the report."""
    from vllm_gem import report
    from vllm_gem.formats import Placement, RoutingTrace, load
    from vllm_gem.latency import GroupModel, fit
    from vllm_gem.simulate import rank_times
    page, _ = report.build_report(report.read_inputs([str(run_dir)]))
    glance = page.split("<h2>Straggler</h2>")[1].split("<h2>")[0]
    loads = load(run_dir / "planning-history-start.msgpack", RoutingTrace).loads
    group = GroupModel.of([fit(p) for p in bundled_profiles("one-slow4")])
    for name in ("placement-gem.json", "placement-vllm-default.json"):
        t = rank_times(loads, load(run_dir / name, Placement).array, group)  # [steps, layers, ranks]
        mean = t.mean((0, 1))
        r = int(mean.argmax())
        last = (t.argmax(-1) == r).mean()
        row = re.search(rf"<tr><td>{re.escape(name)}</td>(.*?)</tr>", glance).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert cells[0] == f"{t.max(-1).mean():.1f}" and cells[2] == f"rank {r}", cells
        assert cells[5] == f"{mean[r] / mean.mean() - 1:+.1%}" and cells[6] == f"{last:.0%}", cells


def test_report_certifies_every_placement_against_one_bound(run_dir, tmp_path, capsys):
    """`report --certify`: one certified bound for the run's slots, every placement's gap its
    layer time over it, the bound below every placement's time, the fastest one certified."""
    import json
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "-o", str(out), "--certify", "3", "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["certificate"]
    glance = out.read_text().split("<h2>Straggler</h2>")[1].split("<h2>")[0]
    assert "Certified lower bound" in glance and "certified gap" in glance
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([0-9.]+)</td>.*?<td>([0-9.]+)%</td></tr>", glance)
    assert len(rows) == 3, rows  # linear start map, vLLM's policy, GEM
    for name, layer_us, gap in rows:
        assert float(layer_us) >= cert["certified_bound_us"] * (1 - 1e-3), name
        # both cells are rounded: the gap to 0.1%, the layer time to 0.1 us
        rounding = 0.0005 + 0.05 / cert["certified_bound_us"] + 1e-9
        assert float(gap) / 100 == pytest.approx(float(layer_us) / cert["certified_bound_us"] - 1, abs=rounding)
    assert cert["plan_us"] == pytest.approx(min(float(u) for _, u, _ in rows), abs=0.06)


def test_the_same_folder_gives_the_same_page(run_dir):
    """No timestamp in the figures: two reports of one folder are byte for byte the same."""
    from vllm_gem import report
    first, _ = report.build_report(report.read_inputs([str(run_dir)]))
    second, _ = report.build_report(report.read_inputs([str(run_dir)]))
    assert first == second


def test_files_sort_with_numbers_by_value(tmp_path):
    from vllm_gem import report
    from vllm_gem.formats import Placement, load
    gem = load(bundled_run_placement(tmp_path), Placement)
    for g in (1, 2, 10, 11):
        save(gem, tmp_path / f"placement-gen{g}.json")
    names = [Path(f).name for f, _ in report.read_inputs([str(tmp_path)]).placements]
    assert names == ["placement-gen1.json", "placement-gen2.json", "placement-gen10.json",
                     "placement-gen11.json", "placement-src.json"]


def bundled_run_placement(d: Path) -> Path:
    out = d / "placement-src.json"
    assert main(["plan", "--trace", "bundled:qwen", "--profiles", "bundled:one-slow4", "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("bad, field", [
    ('{"kind": "placement_event", "time": "t", "step": "x"}', "step"),
    ("{not json", "line"),
])
def test_a_bad_event_line_names_the_file_line_and_field(tmp_path, capsys, bad, field):
    f = tmp_path / "gem-events.jsonl"
    append_event(event(0, True, 0.05), tmp_path)
    with f.open("a") as fh:
        fh.write(bad + "\n")
    assert main(["report", str(f), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{f}:2: {field}" in err, err


def test_nothing_to_report_and_unreadable_files_are_one_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "hold no profile, trace, placement or event log" in capsys.readouterr().err
    broken = tmp_path / "profile-rank0.json"
    broken.write_text('{"kind": "gpu_profile", "gpu": ')
    assert main(["report", str(broken), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{broken}: file: is neither JSON nor msgpack" in err and "\n" not in err, err
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


# Each figure's text is SVG text the browser lays out. Boxes of two labels that intersect are
# an overlap; text ink (what changes when the labels are hidden) drawn over graphics (what is
# not background with the labels hidden) is a label covering data, a legend over bars.
TEXT_BOXES = """Array.from(document.querySelectorAll('svg.figure')).map(svg => {
  const s = svg.getBoundingClientRect();
  const texts = Array.from(svg.querySelectorAll('text')).filter(t => t.textContent.trim()).map(t => {
    const r = t.getBoundingClientRect();
    return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY, t.textContent];
  });
  return {label: svg.getAttribute('aria-label'), box: [s.left + scrollX, s.top + scrollY,
          s.right + scrollX, s.bottom + scrollY], texts: texts};
})"""


def overlapping_labels(figs: list[dict]) -> list[tuple[str, str, str]]:
    """(figure, label, label) for every two labels of one figure whose boxes intersect by more
    than a pixel each way (anti-aliasing of neighbouring lines aside)."""
    out = []
    for f in figs:
        t = f["texts"]
        for i in range(len(t)):
            for j in range(i + 1, len(t)):
                w = min(t[i][2], t[j][2]) - max(t[i][0], t[j][0])
                h = min(t[i][3], t[j][3]) - max(t[i][1], t[j][1])
                if w > 1 and h > 1:
                    out.append((f["label"], t[i][4], t[j][4]))
    return out


def labels_outside_their_figure(figs: list[dict]) -> list[tuple[str, str]]:
    return [(f["label"], t[4]) for f in figs for t in f["texts"]
            if t[0] < f["box"][0] - 1 or t[1] < f["box"][1] - 1 or t[2] > f["box"][2] + 1 or t[3] > f["box"][3] + 1]


def ink_over_graphics(page) -> float:
    """Share of the figures' text pixels drawn on something other than the page's white."""
    shown = mpimg.imread(io.BytesIO(page.screenshot(full_page=True)), format="png")[..., :3]
    page.add_style_tag(content="svg.figure text{visibility:hidden}")
    hidden = mpimg.imread(io.BytesIO(page.screenshot(full_page=True)), format="png")[..., :3]
    ink = np.abs(shown - hidden).max(-1) > 0.15
    return float((ink & (hidden.min(-1) < 0.85)).sum() / max(ink.sum(), 1))


def open_page(p, exe: str, html_file: Path):
    browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(html_file.as_uri())
    page.wait_for_load_state("load")
    return browser, page


@pytest.fixture(scope="module")
def crowded_run(tmp_path_factory) -> Path:
    """A run as crowded as a long recalibrating one: 8 ranks with long GPU names, 12 placements
    (placement-gen1..12), 12 decisions."""
    d = tmp_path_factory.mktemp("crowded")
    for r, p in enumerate(bundled_profiles("spread8")):
        save(msgspec.structs.replace(p, gpu=msgspec.structs.replace(p.gpu, name="NVIDIA H100 80GB HBM3")),
             d / f"profile-rank{r}.json")
    save(synthetic_trace(SyntheticParams(steps=32, layers=6, experts=32, top_k=4, tokens_per_step=512, seed=1)),
         d / "planning-history-start.msgpack")
    planners = ["vllm-default", "gem", "linear", "greedy-speed"]
    for g in range(1, 13):
        assert main(["plan", "--trace", str(d / "planning-history-start.msgpack"), "--profiles",
                     *(str(d / f"profile-rank{r}.json") for r in range(8)), "--num-physical", "40",
                     "--planner", planners[g % 4], "-o", str(d / f"placement-gen{g}.json")]) == 0
    for i in range(12):
        append_event(event(1000 * i, i % 3 != 2, 0.01 * (i % 5), generation=i + 1, slots_changed=3 * i), d)
    return d


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def browser_exe() -> str:
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    return exe


@pytest.mark.browser
@pytest.mark.parametrize("which", ["run_dir", "crowded_run"])
def test_the_page_opens_in_headless_chromium_and_no_text_overlaps(which, request, browser_exe, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out = tmp_path / "report.html"
    assert main(["report", str(request.getfixturevalue(which)), "-o", str(out)]) == 0
    with sync_playwright() as p:
        browser, page = open_page(p, browser_exe, out)
        figs = page.evaluate(TEXT_BOXES)
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        overflow = page.evaluate("document.documentElement.scrollWidth - innerWidth")
        shot = mpimg.imread(io.BytesIO(page.screenshot(full_page=True)), format="png")[..., :3]
        covered = ink_over_graphics(page)
        browser.close()
    assert headings == SECTIONS
    assert len(figs) == 5 and all(f["box"][2] - f["box"][0] > 300 and f["box"][3] - f["box"][1] > 150
                                  for f in figs), [f["box"] for f in figs]
    assert sum(len(f["texts"]) for f in figs) > 100
    assert overlapping_labels(figs) == []
    assert labels_outside_their_figure(figs) == []
    assert overflow <= 0, overflow  # no table or figure wider than the window
    assert covered < 0.01, covered
    assert shot.shape[0] > 2000 and (shot.min(-1) < 0.9).mean() > 0.1 and shot.std() > 0.1  # not blank


@pytest.mark.browser
def test_the_overlap_checks_find_crowded_ticks_and_a_legend_over_bars(browser_exe, tmp_path):
    """The checks above see what they look for: GPU names as tick labels of 8 ranks x 13 bars
    (the report's old per-rank chart) and a frameless legend drawn on the bars."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    import matplotlib
    matplotlib.use("Agg")
    from vllm_gem import report
    fig, ax = report._figure(6, 3, "crowded")
    for k in range(13):
        ax.bar(np.arange(8) + k * 0.06, 50 + k, 0.06, label=f"placement-gen{k}.json")
    ax.set_xticks(np.arange(8) + 0.4, [f"rank {r}\nNVIDIA H100 80GB" for r in range(8)])
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    out = tmp_path / "bad.html"
    out.write_text(f"<!DOCTYPE html><html><body style='margin:0'>{report._svg(fig)}</body></html>")
    with sync_playwright() as p:
        browser, page = open_page(p, browser_exe, out)
        figs = page.evaluate(TEXT_BOXES)
        covered = ink_over_graphics(page)
        browser.close()
    assert any("NVIDIA" in a and "NVIDIA" in b for _, a, b in overlapping_labels(figs))
    assert covered > 0.05, covered


def test_a_newcomer_gets_a_report_without_serving(tmp_path, capsys):
    import json

    from vllm_gem.cli import main
    run = tmp_path / "run"
    assert main(["demo", "--plot", "", "--run-dir", str(run)]) == 0
    assert {p.name for p in run.iterdir()} >= {"trace.msgpack", "profile-rank0.json", "placement-gem.json",
                                               "placement-vllm-default.json"}
    capsys.readouterr()
    assert main(["report", "--json", str(run), "-o", str(tmp_path / "r.html")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "Placements" in summary["sections"] and "Predicted per-rank layer time" in summary["sections"]
    # bundled names, as the other commands take them
    assert main(["report", "--json", "bundled:qwen", "bundled:one-slow4", "-o", str(tmp_path / "b.html")]) == 0
    assert "GPU latency curves" in json.loads(capsys.readouterr().out)["sections"]
    assert main(["report", "bundled:nope", "-o", str(tmp_path / "c.html")]) == 2
