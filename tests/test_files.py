"""No input lost, no write torn, no read that blocks: vllm_gem.files through the commands."""

import os
import stat
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


def _one_line_error(capsys, argv, message):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    return err


def _ascend(devices):
    import json
    return json.dumps({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_count": len(devices),
                       "device_list": [{"device_id": d, "device_expert": e} for d, e in devices]}]})


@pytest.mark.parametrize("devices, message", [
    # 28 + 32 experts would have been re-sliced 30 + 30 onto the wrong devices
    ([(0, list(range(28))), (1, list(range(28, 60)))], "has [28, 32] experts per device"),
    ([(0, list(range(30))), (0, list(range(30, 60)))], "has device ids [0, 0]"),
    ([(5, list(range(30))), (7, list(range(30, 60)))], "has device ids [5, 7]"),
])
def test_vllm_ascend_maps_are_read_as_written_or_refused(tmp_path, capsys, devices, message):
    cur = tmp_path / "ascend.json"
    cur.write_text(_ascend(devices))
    from vllm_gem.export import read_engine_placement
    with pytest.raises(GemInputError, match=r"layer_list\[0\]\.device_list: " + message.replace("[", r"\[")
                       .replace("]", r"\]")):
        read_engine_placement(cur, 60)


def test_an_ascend_map_of_two_devices_round_trips(tmp_path):
    from vllm_gem.export import read_engine_placement
    cur = tmp_path / "ascend.json"
    cur.write_text(_ascend([(1, list(range(30, 60))), (0, list(range(30)))]))  # listed out of order
    p2l, ranks, fmt = read_engine_placement(cur, 60)
    assert (ranks, fmt) == (2, "vllm-ascend") and p2l[0].tolist() == list(range(60))


def _npz(path, window, p2l):
    import numpy as np
    np.savez(path, expert_load_window=window, physical_to_logical_map=p2l)
    return path


@pytest.mark.parametrize("dtype", ["complex128", "bool"])
def test_eplb_counts_that_are_not_numbers_are_refused(tmp_path, capsys, dtype):
    import numpy as np
    window = np.ones((2, 1, 4), dtype=dtype) * (1 + 1j if dtype == "complex128" else True)
    src = _npz(tmp_path / "w.npz", window, np.arange(4).reshape(1, 4))
    _one_line_error(capsys, ["import-trace", "--format", "vllm-eplb", str(src), "-o", str(tmp_path / "t.msgpack")],
                    f"expert_load_window: has dtype {dtype}")


def test_an_npz_that_declares_a_huge_array_is_refused_before_allocating(tmp_path, capsys):
    import io
    import zipfile

    import numpy as np
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False,
                                               "shape": (1 << 20, 64, 64)})  # 32 GiB declared
    src = tmp_path / "bomb.npz"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("expert_load_window.npy", buf.getvalue() + b"\0" * 64)
        z.writestr("physical_to_logical_map.npy", buf.getvalue())
    assert src.stat().st_size < 2048
    _one_line_error(capsys, ["import-trace", "--format", "vllm-eplb", str(src), "-o", str(tmp_path / "t.msgpack")],
                    "declares shape (1048576, 64, 64); expected at most 268435456 elements")


@pytest.mark.parametrize("content, message", [(b"", "file: is empty"),
                                              (b"hello, not a torch file", "is neither a .npz archive nor a torch.save file")])
def test_an_eplb_file_that_is_not_one_says_what_it_is(tmp_path, capsys, content, message):
    src = tmp_path / "state.pt"
    src.write_bytes(content)
    _one_line_error(capsys, ["import-trace", "--format", "vllm-eplb", str(src), "-o", str(tmp_path / "t.msgpack")],
                    message)


def test_migration_weight_needs_a_current_placement(tmp_path, capsys):
    _one_line_error(capsys, ["plan", "--trace", "bundled:qwen", "--speeds", "1,1", "--migration-weight", "5",
                             "-o", str(tmp_path / "p.json")], "--migration-weight: is given without --current")


def test_a_placement_for_another_model_is_refused(tmp_path, capsys):
    from vllm_gem.evaluate import bundled_trace
    from vllm_gem.formats import save
    placement = _plan(tmp_path)
    other = bundled_trace("qwen")
    other.model = "someone/else-moe"  # same shape, another model
    save(other, tmp_path / "other.msgpack")
    _one_line_error(capsys, ["simulate", "--trace", str(tmp_path / "other.msgpack"), "--speeds", "1,1,1,0.8",
                             "--placement", str(placement)],
                    "model: is 'Qwen/Qwen1.5-MoE-A2.7B-Chat'; expected 'someone/else-moe' (the trace's model)")


def test_a_file_name_with_a_newline_stays_on_one_line(tmp_path, capsys):
    bad = tmp_path / "a\nb.json"
    bad.write_bytes(b"")
    err = _one_line_error(capsys, ["inspect", str(bad)], "a\\nb.json: file: is empty")
    assert err.count("\n") == 0


@pytest.mark.parametrize("params, message", [
    ('{"zipf": 1e400}', "zipf: is a number out of range; expected a number a 64-bit float or integer can hold"),
    ('{"steps": 0}', "steps: is out of range; expected an integer >= 1"),
    ('{"steps": "x"}', "steps: is text; expected an integer"),
])
def test_synthetic_parameters_are_named_in_plain_words(tmp_path, capsys, params, message):
    src = tmp_path / "s.json"
    src.write_text(params)
    err = _one_line_error(capsys, ["import-trace", "--format", "synthetic", str(src), "-o", str(tmp_path / "t.msgpack")],
                          message)
    assert "`" not in err  # msgspec's own wording (`int`) is not shown


def test_a_profile_with_no_experts_per_point_says_so(tmp_path, capsys):
    import msgspec
    from vllm_gem.profiles import example_profile
    d = msgspec.to_builtins(example_profile("g", num_experts=8))
    for pt in d["points"]:
        pt["tokens_per_expert"] = []
    src = tmp_path / "p.json"
    src.write_bytes(msgspec.json.encode(d))
    _one_line_error(capsys, ["inspect", str(src)], "points[0].tokens_per_expert: is empty; expected the tokens")


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    # `vllm-gem inspect F | head`: the pipe closes before the output is written
    placement = _plan(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "vllm_gem.cli", "inspect", str(placement)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err, err


# --------------------------------------------------------------------------- property: every class, every command
BAD_CLASSES = ("fifo", "device", "deep", "same-path", "huge-shape")
INPUT_SLOTS = {  # command line with {F} for the bad input and {P} a good placement, {O} the output
    "inspect": ["inspect", "{F}"],
    "simulate": ["simulate", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", "--placement", "{F}"],
    "plan --trace": ["plan", "--trace", "{F}", "--speeds", "1,1", "-o", "{O}"],
    "plan --profiles": ["plan", "--trace", "bundled:qwen", "--profiles", "{F}", "-o", "{O}"],
    "plan --current": ["plan", "--trace", "bundled:qwen", "--speeds", "1,1,1,0.8", "--current", "{F}", "-o", "{O}"],
    "import-trace": ["import-trace", "--format", "vllm-eplb", "{F}", "-o", "{O}"],
    "export": ["export", "{F}", "--to", "sglang", "-o", "{O}"],
    "report": ["report", "{F}", "-o", "{O}"],
}


def _bad_input(kind: str, where, placement):
    """A path of the given bad class (and, for same-path, the output that is that input)."""
    import io
    import zipfile

    import numpy as np
    if kind == "fifo":
        f = where / "fifo.json"
        if not f.exists():
            os.mkfifo(f)
        return f, where / "out.json"
    if kind == "device":
        return "/dev/zero", where / "out.json"
    if kind == "deep":
        f = where / "deep.json"
        f.write_text("[" * 100000 + "]" * 100000)
        return f, where / "out.json"
    if kind == "huge-shape":
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<i8", "fortran_order": False, "shape": (1 << 40,)})
        f = where / "bomb.npz"
        with zipfile.ZipFile(f, "w") as z:
            for name in ("expert_load_window", "physical_to_logical_map"):
                z.writestr(name + ".npy", buf.getvalue())
        return f, where / "out.json"
    link = where / "same-as-input.json"  # same-path: the output is the input, under another name
    if not link.exists():
        os.link(placement, link)
    return placement, link


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_every_bad_input_class_exits_2_in_one_line_and_changes_no_input(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    base = tmp_path_factory.mktemp("bad")
    placement = _plan(base)
    before = placement.read_bytes()

    @settings(max_examples=BAD_INPUT_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.sampled_from(BAD_CLASSES), st.sampled_from(sorted(INPUT_SLOTS)))
    def run(kind, command):
        bad, out = _bad_input(kind, base, placement)
        argv = [a.format(F=bad, O=out) for a in INPUT_SLOTS[command]]
        if kind == "same-path" and "{O}" not in " ".join(INPUT_SLOTS[command]):
            return  # no output to collide with
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        msg = err.getvalue().strip()
        assert rc == 2 and msg.startswith("vllm-gem: error: ") and "\n" not in msg, (kind, command, msg)
        assert placement.read_bytes() == before  # no input changed, whatever failed
    run()


BAD_INPUT_EXAMPLES = 60  # 5 classes x 8 commands: docs/formats.md states the count


@pytest.mark.parametrize("command", [["inspect", "{F}"], ["report", "{F}", "-o", "{O}"]])
def test_an_unreadable_file_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch, command):
    import vllm_gem.files as files
    placement = _plan(tmp_path)

    def no_permission(path, *a, **k):  # as for a file of mode 000 read by another user (root reads anything)
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(files, "open", no_permission, raising=False)
    argv = [a.format(F=placement, O=tmp_path / "r.html") for a in command]
    _one_line_error(capsys, argv, "file: cannot be read (Permission denied)")


def test_written_files_get_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path):
    """A plan or profile written for a server running as another user must be readable as a
    plain open() would leave it; chmod 600 on a replaced file is kept."""
    old = os.umask(0o022)
    try:
        fresh = write_atomic(tmp_path / "plan.json", b"{}")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        fresh.chmod(0o600)
        write_atomic(fresh, b"{ }")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and fresh.read_bytes() == b"{ }"
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left behind
