"""Every value a user types: the command line driven by generated argument lists.

`vllm_gem.cli.main` either succeeds (exit 0, and what it wrote loads as a valid file) or
refuses (exit 2, one line on stderr, no traceback); never another exit code. The values mix
valid ones, edge numbers (0, -1, nan, inf, 1e308, huge integers), words, and file inputs of
every kind: valid, empty, truncated, random bytes, another kind of file, a folder, a missing
path. CI runs GEM_CLI_EXAMPLES (default 300) examples; docs/results/README.md records the
10000-example run with its seed.
"""

import contextlib
import io
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from vllm_gem.cli import main
from vllm_gem.export import read_engine_placement
from vllm_gem.formats import GpuProfile, NdArray, Placement, RoutingTrace, load, save
from vllm_gem.profiles import example_profile

EXAMPLES = int(os.environ.get("GEM_CLI_EXAMPLES", "300"))
SEED = int(os.environ.get("GEM_CLI_SEED", "20261206"))

NUMBERS = ["0", "1", "2", "3", "4", "8", "60", "64", "-1", "-5", "0.5", "1.5", "nan", "inf", "-inf", "1e308",
           "1e-308", "9" * 30, "abc", "", " ", "1,1", "1,0", "1,nan", "1,abc", "1,-1", "1,inf", "1,1e308",
           "1,1,1,0.83", "0x10", "1_000"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Input files of every kind a user might pass, by name."""
    d = tmp_path_factory.mktemp("cli-inputs")
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(6, 2, 8)).astype(np.int32)
    trace = save(RoutingTrace(model="tiny", source="test", counts=NdArray.from_numpy(counts)),
                 d / "trace.msgpack")
    out = {"trace": str(trace)}
    for r in range(2):
        prof = example_profile(f"g{r}", 1.0 + 0.2 * r, num_experts=4)
        out[f"profile{r}"] = str(save(prof, d / f"g{r}.json"))
    assert main(["plan", "--trace", str(trace), "--speeds", "1,1", "-o", str(d / "placement.json")]) == 0
    out["placement"] = str(d / "placement.json")
    raw = Path(out["placement"]).read_bytes()
    for name, data in (("empty.json", b""), ("truncated.json", raw[: len(raw) // 2]),
                       ("random.msgpack", rng.bytes(64)), ("list.json", b"[1, 2, 3]"),
                       ("params.json", b'{"steps": 4, "layers": 2, "experts": 8}'),
                       ("badparams.json", b'{"steps": -1, "experts": 0}'),
                       ("eplb.npz", rng.bytes(32)), ("harmoeny.csv", b"a,b\n1,2\n")):
        (d / name).write_bytes(data)
        out[name] = str(d / name)
    (d / "folder").mkdir()
    out["folder"] = str(d / "folder")
    out["missing"] = str(d / "missing.json")
    return out


def mostly(valid: list[str], bad: list[str]):
    """Valid values three times as often as the rest, so successes are exercised too."""
    return st.one_of(*[st.sampled_from(valid)] * 3, st.sampled_from(bad))


def command(files: dict[str, str]):
    """A generated argument list for one subcommand (never --help, demo or calibrate: those
    print many lines on purpose, take 20 s, or need a GPU)."""
    bad_files = [files[k] for k in ("empty.json", "truncated.json", "random.msgpack", "list.json",
                                    "folder", "missing", "badparams.json", "eplb.npz", "harmoeny.csv")]
    bad_files += ["bundled:nope", files["profile0"], files["placement"], files["trace"]]  # wrong kinds
    trace = mostly([files["trace"], files["trace"], "bundled:qwen"], bad_files)
    placement = mostly([files["placement"]], bad_files)
    profiles = st.one_of(st.just([files["profile0"], files["profile1"]]), st.just(["bundled:equal2"]),
                         st.lists(st.sampled_from(bad_files + [files["profile0"]]), min_size=1, max_size=3))

    @st.composite
    def build(draw) -> list[str]:
        sub = draw(st.sampled_from(["plan", "simulate", "inspect", "import-trace", "export", "report"]))
        args = [sub]
        if sub in ("plan", "simulate"):
            args += ["--trace", draw(trace)]
            if draw(st.booleans()):
                args += ["--speeds", draw(mostly(["1,1", "1,0.8"], NUMBERS))]
            else:
                args += ["--profiles"] + draw(profiles)
        if sub == "plan":
            if draw(st.booleans()):
                args += ["--num-physical", draw(mostly(["8", "10", "60", "64"], NUMBERS))]
            if draw(st.booleans()):
                args += ["--migration-weight", draw(mostly(["0", "5", "100"], NUMBERS))]
            if draw(st.booleans()):
                args += ["--current", draw(placement)]
            if draw(st.booleans()):
                args += ["--planner", draw(st.sampled_from(["gem", "linear", "greedy-speed", "nope"]))]
            args += ["-o", draw(mostly(["OUT.json", "OUT.msgpack"], [files["folder"], ""]))]
        if sub == "simulate":
            args += ["--placement", draw(placement)]
        if sub == "inspect":
            args += [draw(mostly([files["trace"], files["placement"], files["profile0"]], bad_files))]
        if sub == "import-trace":
            fmt = draw(mostly(["synthetic"], ["harmoeny", "vllm-eplb", "csv"]))
            args += ["--format", fmt]
            if draw(st.integers(0, 4)):
                args += [draw(mostly([files["params.json"]], bad_files))]
            if draw(st.booleans()):
                args += ["--model", draw(st.sampled_from(["m", "", "x" * 300]))]
            args += ["-o", draw(mostly(["OUT.msgpack", "OUT.json"], [files["folder"]]))]
        if sub == "export":
            args += [draw(placement), "--to", draw(mostly(["sglang", "vllm-ascend"], ["trtllm", ""])),
                     "-o", draw(mostly(["OUT.json"], [files["folder"]]))]
        if sub == "report":
            args += draw(st.lists(mostly([files["trace"], files["placement"], files["profile0"],
                                          files["profile1"], str(Path(files["trace"]).parent)],
                                         bad_files), min_size=1, max_size=4))
            args += ["-o", draw(mostly(["OUT.html"], [files["folder"], ""]))]
        if draw(st.booleans()):
            args.insert(1, "--json")
        return args
    return build()


def run_cli(argv: list[str]) -> tuple[int | None, str, str, BaseException | None]:
    """(exit code, stdout, stderr, exception that escaped main) of one in-process run."""
    out, err = io.StringIO(), io.StringIO()
    code, escaped = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - a traceback is what this test looks for
            escaped = e
            traceback.print_exc(file=err)
    return code, out.getvalue(), err.getvalue(), escaped


def check_run(argv: list[str], workdir: Path) -> int:
    """Run argv and check the contract; -> the exit code."""
    argv = [a.replace("OUT", str(workdir / "out")) for a in argv]
    for p in workdir.glob("out*"):
        p.unlink()
    code, out, err, escaped = run_cli(argv)
    assert escaped is None and "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, (argv, err)
        return code
    if "-o" in argv:  # a success wrote a file that loads as what it claims to be
        target = Path(argv[argv.index("-o") + 1])
        if "export" in argv[:2]:
            read_engine_placement(target)
        elif "report" in argv[:2]:
            assert target.read_text().startswith("<!DOCTYPE html>"), argv
        else:
            load(target, Placement if "plan" in argv[:2] else RoutingTrace)
    return code


def test_the_rows_of_the_input_checking_issue_exit_2_with_one_line(files, tmp_path):
    base = ["plan", "--trace", "bundled:qwen", "--num-physical", "60", "-o", "OUT.json"]
    for speeds in ("1,0", "1,nan", "1,abc", "1,-1", "1,inf", "1,1e308"):
        check_run(base[:3] + ["--speeds", speeds] + base[3:], tmp_path)
        assert not (tmp_path / "out.json").exists()
    argv = ["plan", "--trace", "bundled:qwen", "--speeds", "1,1", "--num-physical", "0", "-o", "OUT.json"]
    code, _, err, _ = run_cli([a.replace("OUT", str(tmp_path / "out")) for a in argv])
    assert code == 2 and "--num-physical: is '0'; expected an integer in [1, 1048576]" in err


def test_any_command_line_exits_0_with_a_valid_file_or_2_with_one_line(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cli-runs")
    codes: list[int] = []

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(command(files))
    def run(argv: list[str]) -> None:
        codes.append(check_run(argv, workdir))

    run()
    # the count the docs record (pytest -s shows it); both outcomes must have been reached
    print(f"\nCLI property test: {len(codes)} runs, seed {SEED}: {codes.count(0)} exit 0, "
          f"{codes.count(2)} exit 2")
    assert codes.count(0) and codes.count(2)


def test_profiles_and_traces_of_the_fixture_are_valid(files):
    assert load(files["profile0"], GpuProfile).expert.dtype == "bfloat16"
    assert load(files["trace"], RoutingTrace).shape == (6, 2, 8)
