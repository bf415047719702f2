"""Python started in the repository root finds the top-level kernels/ folder as a bare
`kernels`: it must not stand in for the PyPI package of that name, which transformers
imports while vLLM loads its plugins."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_without_an_installed_kernels_package_the_folder_reads_as_not_installed():
    # -S: no site-packages, so the repository's folder is the only `kernels` on the path
    r = _run_in_root("import kernels; print(kernels.__file__, list(kernels.__path__))", "-S")
    assert r.returncode == 0 and r.stdout.split() == ["None", "[]"], r.stderr


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vllm")
def test_vllm_loads_the_plugin_from_the_repository_root():
    r = _run_in_root(
        "import os; os.environ['VLLM_PLUGINS'] = 'gem'\n"
        "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
        "import transformers.integrations.hub_kernels  # imports `kernels` where installed\n"
        "import kernels, vllm_gem.kernels.moe_gemm as ours\n"
        "print(kernels.__file__); print(ours.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    theirs, ours = r.stdout.split()[-2:]
    assert theirs == "None" or not theirs.startswith(str(ROOT / "kernels"))
    assert ours.endswith(os.path.join("kernels", "moe_gemm.py"))  # vllm_gem's own, as installed


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vllm's metadata")
def test_the_readmes_torch_is_the_one_vllm_pins():
    import importlib.metadata
    import re
    pins = {m.group(1) for m in re.finditer(r"torch==([\d.]+)", (ROOT / "README.md").read_text())}
    wanted = {m.group(1) for r in importlib.metadata.requires("vllm") or []
              if (m := re.fullmatch(r"torch\s*==\s*([\d.]+)", r.split(";")[0].strip()))}
    assert wanted and pins == wanted, (pins, wanted)
