"""The shape of the code: imports point one way, lazy imports say why, benchmarks are cited."""

from __future__ import annotations

import ast
import graphlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_gem"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(every module's vllm_gem imports, module-level and inside functions alike;
    [(module, line, source line)] of the imports inside functions)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    lazy = []
    for mod, path in files.items():
        text = path.read_text()
        lines = text.splitlines()
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            named = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
            for t in named or [target]:
                if t in files and t != mod:
                    graph[mod].add(t)
            if node.col_offset > 0:
                lazy.append((mod, node.lineno, lines[node.lineno - 1]))
    return graph, lazy


def test_the_import_graph_of_vllm_gem_has_no_cycle_even_through_function_level_imports():
    graph, _ = imports()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the walk saw the package
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_every_function_level_import_says_why_on_its_line():
    """Inside a function only for a reason a reader sees at once (vLLM or triton loaded only
    where needed, the planners kept out of processes that never place)."""
    _, lazy = imports()
    assert lazy, "the walk found no function-level import at all"
    silent = [f"{m}:{n}: {line.strip()}" for m, n, line in lazy if "#" not in line]
    assert silent == []


def test_the_plugin_worker_parts_take_their_inputs_in_their_constructors():
    """GemWorker is composed, not mixed in: no part of it inherits from another."""
    from vllm_gem.vllm.gpu_profiles import GpuProfiles
    from vllm_gem.vllm.placing import Placer
    from vllm_gem.vllm.recalibration import Recalibration
    from vllm_gem.vllm.runtime import GemWorker
    for cls in (GemWorker, GpuProfiles, Placer, Recalibration):
        assert cls.__bases__ == (object,), cls


def test_every_file_in_benchmarks_is_cited_by_the_docs():
    tracked = subprocess.run(["git", "ls-files", "benchmarks"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist): nothing to compare
        return
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    uncited = [f for f in tracked if f not in docs and Path(f).name not in docs]
    assert uncited == []
