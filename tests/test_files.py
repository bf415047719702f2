"""No input lost, no write torn, no read that blocks: vllm_gem.files through the commands."""

import os
import subprocess
import sys
import textwrap

import pytest

from vllm_gem.cli import main
from vllm_gem.errors import GemInputError
from vllm_gem.files import append_line, read_bytes, refuse_same_file, write_atomic


def _plan(tmp_path, name="p.json", *extra):
    out = tmp_path / name
    assert main(["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", "-o", str(out), *extra]) == 0
    return out


def _fails_leaving(capsys, path, argv, message):
    before = path.read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert path.read_bytes() == before  # the input is untouched


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path, capsys):
    trace = tmp_path / "t.msgpack"
    assert main(["import-trace", "--format", "synthetic", "-o", str(trace)]) == 0
    _fails_leaving(capsys, trace, ["plan", "--trace", str(trace), "--speeds", "1,1", "-o", str(trace)],
                   "-o/--output: is the same file as --trace")
    placement = _plan(tmp_path)
    link = tmp_path / "other-name.json"
    os.link(placement, link)  # the same file by inode, under another name
    _fails_leaving(capsys, placement, ["export", str(placement), "--to", "sglang", "-o", str(link)],
                   "is the same file as the placement")
    _fails_leaving(capsys, placement, ["report", str(tmp_path), "-o", str(placement)],
                   "is the same file as an input")
    _fails_leaving(capsys, placement, ["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8",
                                       "--current", str(placement), "-o", str(link)],
                   "is the same file as --current")
    src = tmp_path / "params.json"
    src.write_text('{"steps": 4, "layers": 1, "experts": 8, "top_k": 2}')
    _fails_leaving(capsys, src, ["import-trace", "--format", "synthetic", str(src), "-o", str(src)],
                   "is the same file as SOURCE")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_are_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    placement = _plan(tmp_path)
    cases = [["inspect", str(fifo)], ["plan", "--trace", str(fifo), "--speeds", "1,1"],
             ["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,1", "-o", str(fifo)],
             ["export", str(placement), "--to", "sglang", "-o", str(fifo)],
             ["simulate", "--trace", "bundled:qwen", "--speeds", "1,1,1,1", "--placement", str(fifo)],
             ["inspect", "/dev/zero"]]
    for argv in cases:  # in a child: a read that blocks would hang the test run, not fail it
        r = subprocess.run([sys.executable, "-m", "vllm_gem.cli", *argv], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 2, (argv, r.stderr)
        assert ("is a FIFO" in r.stderr or "is a character device" in r.stderr), (argv, r.stderr)
        assert r.stderr.count("\n") == 1


_UNDER_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    from vllm_gem.cli import main
    from vllm_gem.errors import GemInputError
    if sys.argv[1] == "append":
        from vllm_gem.files import append_line
        try:
            append_line(sys.argv[2], b"x" * 3000)
        except GemInputError as e:
            print(e, file=sys.stderr); sys.exit(2)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
""")


def _under_file_size_limit(*argv):
    return subprocess.run([sys.executable, "-c", _UNDER_LIMIT, *argv], capture_output=True, text=True,
                          timeout=120)


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path):
    old = _plan(tmp_path, "placement.json")
    before = old.read_bytes()
    assert len(before) > 4096  # the new plan cannot fit under the limit either
    r = _under_file_size_limit("plan", "--trace", "bundled:qwen", "--speeds", "1,1,0.8", "-o", str(old))
    assert r.returncode == 2 and "cannot be written" in r.stderr and "unchanged" in r.stderr, r.stderr
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["placement.json"]  # no temporary left


def test_an_append_that_does_not_fit_adds_nothing(tmp_path):
    log = tmp_path / "gem-events.jsonl"
    log.write_bytes(b'{"a": 1}\n' * 200)  # 1800 bytes: a 3000-byte line crosses the 4096 limit
    before = log.read_bytes()
    r = _under_file_size_limit("append", str(log))
    assert r.returncode == 2 and "it is unchanged" in r.stderr, r.stderr
    assert log.read_bytes() == before
    append_line(log, b'{"b": 2}')
    assert log.read_bytes() == before + b'{"b": 2}\n'


def test_writes_replace_whole_files_and_reads_are_bounded(tmp_path):
    p = tmp_path / "f.bin"
    write_atomic(p, b"one")
    write_atomic(p, b"two two")
    assert p.read_bytes() == b"two two"
    with pytest.raises(GemInputError, match="is 7 bytes; expected at most 4 bytes"):
        read_bytes(p, max_bytes=4)
    with pytest.raises(GemInputError, match="is a folder; expected a regular file"):
        read_bytes(tmp_path)
    with pytest.raises(GemInputError, match="is a folder"):
        write_atomic(tmp_path, b"x")
    refuse_same_file(tmp_path / "new.json", "-o", [("--trace", p)])  # a new file is no input


@pytest.mark.parametrize("raw, message", [
    ({"trace": ""}, "trace: is empty; expected a path, or the key left out"),
    ({"trace_dir": "  "}, "trace_dir: is empty"),
    ({"profiles": {"a.json", "b.json"}}, "profiles: is a set; expected a list of profile paths in EP-rank order"),
    ({"planner_params": {"threads": 0}}, "planner_params.threads: is 0; expected an integer in [1, 1024]"),
    ({"planner_params": {"bogus": 1}}, "planner_params.bogus: is not a parameter of planner gem"),
    ({"planner_params": {"migration_weight": -5}}, "planner_params.migration_weight: is -5; expected a finite number in [0, 1e+09]"),
    ({"planner_params": {"max_iters": "many"}}, "planner_params.max_iters: is 'many'"),
    ({"emulate_slowdown": {"0": 9}}, "emulate_slowdown: is {'0': 9}; expected an object mapping an integer in [0, 4095]"),
])
def test_plugin_settings_that_would_mean_something_else_are_refused(raw, message):
    from vllm_gem.vllm.config import parse
    with pytest.raises(GemInputError) as e:
        parse(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gem_flags_do_not_replace_a_gem_value_that_is_not_an_object():
    import argparse

    from vllm_gem.vllm.flags import merge_flags
    args = argparse.Namespace(plugin=["gem"], gem_trace="t.msgpack", gem_profiles=None, gem_strict=None)
    with pytest.raises(GemInputError, match="gem: is 'x'; expected a JSON object"):
        merge_flags(args, {"gem": "x"})


@pytest.mark.parametrize("value", ["99999999999999999999", "\u00b2", "5" * 5000])
def test_the_drift_variable_takes_step_counts_only(monkeypatch, value):
    pytest.importorskip("torch")
    from vllm_gem.vllm.routing import drift_steps
    monkeypatch.setenv("VLLM_GEM_ROUTING_DRIFT_STEPS", value)
    with pytest.raises(GemInputError, match="expected a whole number of engine steps in"):
        drift_steps()
