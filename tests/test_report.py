"""`vllm-gem report`: the page, its figures, bad input, and the page in a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from vllm_gem.cli import main
from vllm_gem.formats import PlacementEvent, append_event, save
from vllm_gem.profiles import bundled_profiles
from vllm_gem.traces import SyntheticParams, synthetic_trace

mpimg = pytest.importorskip("matplotlib.image")

SECTIONS = ["Files", "GPU latency curves", "Routing", "Placements", "Predicted per-rank layer time",
            "Placement decisions"]


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


def images(page: str) -> list[np.ndarray]:
    return [mpimg.imread(io.BytesIO(base64.b64decode(b)), format="png")
            for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_of_a_run_folder_draws_every_section_and_every_image_decodes(run_dir, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sections"] == SECTIONS and summary["images"] == 5
    page = out.read_text()
    imgs = images(page)
    assert len(imgs) == 5 and "<script" not in page
    for im in imgs:  # a real picture: not one flat colour
        assert im.shape[0] > 100 and im.shape[1] > 200 and im[..., :3].std() > 0.05
    # both placements and vLLM's start map are predicted; the tables say what was moved or refused
    for text in ("placement-gem.json", "placement-vllm-default.json", "vLLM linear start map",
                 "refused", "saving below the move&#x27;s cost", "moved"):
        assert text in page, text
    assert "rank0.json" in page and "skipped" in page  # a foreign file in the folder is listed


def test_report_predicts_gem_below_vllms_policy_on_the_planned_trace(run_dir):
    from vllm_gem import report
    inp = report.read_inputs([str(run_dir)])
    _, rows = report.predicted_rank_times(report._trace_for(inp), report._rank_profiles(inp), inp.placements,
                                          inp.models)
    layer = {r["placement"]: r["layer_us"] for r in rows}
    assert layer["placement-gem.json"] < layer["placement-vllm-default.json"]
    assert all(r["gap_to_bound"] >= 1.0 for r in rows)


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


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.browser
def test_the_page_opens_in_headless_chromium_with_every_image_decoded(run_dir, tmp_path):
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(out.as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        shot = page.screenshot(full_page=True)
        browser.close()
    assert len(sizes) == 5 and all(ok and w > 200 and h > 100 for ok, w, h in sizes), sizes
    assert headings == SECTIONS
    im = mpimg.imread(io.BytesIO(shot), format="png")[..., :3]
    assert im.shape[0] > 2000  # the whole page, every section
    assert (im.min(-1) < 0.9).mean() > 0.1 and im.std() > 0.1  # not blank


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
