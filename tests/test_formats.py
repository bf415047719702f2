
import msgspec
import numpy as np
import pytest

from vllm_gem.errors import GemInputError
from vllm_gem.formats import GpuProfile, NdArray, Placement, RoutingTrace, load, save, validate_placement
from vllm_gem.profiles import example_profile


def trace(counts=None):
    c = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) if counts is None else counts
    return RoutingTrace(model="m", source="test", counts=NdArray.from_numpy(c))


def placement(rows=((0, 1, 2, 3),), ranks=2, experts=4):
    width = len(rows[0])
    return Placement(num_logical_experts=experts, num_ranks=ranks, phys_to_log=[list(r) for r in rows],
                     rank_of_slot=[s // (width // ranks) for s in range(width)], planner="test")


@pytest.mark.parametrize("suffix", [".json", ".msgpack"])
def test_roundtrip_every_kind(tmp_path, suffix):
    prof = example_profile("g", seed=1)
    for obj, cls in ((prof, GpuProfile), (trace(), RoutingTrace), (placement(), Placement)):
        p = save(obj, tmp_path / f"{cls.__name__}{suffix}")
        back = load(p, cls)
        assert msgspec.to_builtins(back) == msgspec.to_builtins(obj)
    np.testing.assert_array_equal(load(tmp_path / f"RoutingTrace{suffix}", RoutingTrace).loads,
                                  trace().loads)


def _err(tmp_path, name, data, cls):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(GemInputError) as e:
        load(p, cls)
    return str(e.value)


def test_empty_truncated_wrong_version_wrong_kind(tmp_path):
    good = msgspec.json.encode(trace())
    assert "is empty" in _err(tmp_path, "e.json", b"", RoutingTrace)
    msg = _err(tmp_path, "t.json", good[: len(good) // 2], RoutingTrace)
    assert "t.json: file: is not valid JSON" in msg and "truncated" in msg
    v2 = good.replace(b'"schema_version":1', b'"schema_version":2')
    assert "schema_version: is 2; expected 1" in _err(tmp_path, "v.json", v2, RoutingTrace)
    assert "kind: is 'routing_trace'; expected 'placement'" in _err(tmp_path, "k.json", good, Placement)
    mp = msgspec.msgpack.encode(trace())
    assert "not valid msgpack" in _err(tmp_path, "t.msgpack", mp[:-7], RoutingTrace)


def test_trace_values_checked(tmp_path):
    bad = trace(np.array([[[1, -3]]], dtype=np.int32))
    p = tmp_path / "neg.json"
    p.write_bytes(msgspec.json.encode(bad))
    with pytest.raises(GemInputError,
                       match=r"neg.json: counts\[0\]\[0\]\[1\]: is -3; expected a whole token count in \[0, 2147483647\]"):
        load(p, RoutingTrace)
    nan = trace(np.array([[[1.0, np.nan]]], dtype=np.float32))
    p.write_bytes(msgspec.json.encode(nan))
    with pytest.raises(GemInputError, match=r"counts\[0\]\[0\]\[1\]: is nan"):
        load(p, RoutingTrace)
    # a fractional count is refused, not truncated; a count above int32 is refused, not wrapped
    for values, shown in (([[[1.0, 2.5]]], "2.5"), ([[[1, 2**31]]], "2147483648")):
        dtype = np.float64 if isinstance(values[0][0][1], float) else np.int64
        p.write_bytes(msgspec.json.encode(trace(np.array(values, dtype=dtype))))
        with pytest.raises(GemInputError, match=rf"counts\[0\]\[0\]\[1\]: is {shown}; expected a whole"):
            load(p, RoutingTrace)
    t = trace()
    short = RoutingTrace(model="m", source="s", counts=NdArray("int32", [2, 3, 4], t.counts.data[:-4]))
    p.write_bytes(msgspec.json.encode(short))
    with pytest.raises(GemInputError, match=r"counts.data: holds 92 bytes; expected 96 bytes"):
        load(p, RoutingTrace)


def test_profile_values_checked(tmp_path):
    prof = example_profile("g")
    d = msgspec.to_builtins(prof)
    d["points"][3]["median_us"] = -1.0
    assert "points[3].median_us: is -1.0; expected a finite positive number" in _err(
        tmp_path, "p.json", msgspec.json.encode(d), GpuProfile)
    d = msgspec.to_builtins(prof)
    d["points"][0]["median_us"] = "fast"
    assert "q.json: points[0].median_us: is text; expected a number" in _err(tmp_path, "q.json", msgspec.json.encode(d), GpuProfile)
    d = msgspec.to_builtins(prof)
    d["points"][2]["tokens_per_expert"] = [1, 2]
    err = _err(tmp_path, "r.json", msgspec.json.encode(d), GpuProfile)
    assert "points[2].tokens_per_expert: has 2 experts" in err
    d = msgspec.to_builtins(prof)
    d["points"][1]["median_us"] = 1e12
    assert "a layer time under 10 s" in _err(tmp_path, "s.json", msgspec.json.encode(d), GpuProfile)


def test_placement_checks():
    with pytest.raises(GemInputError, match=r"does not place logical expert 3"):
        validate_placement(placement(((0, 1, 2, 2),)), "x")
    with pytest.raises(GemInputError, match=r"phys_to_log\[0\]\[1\]: is 9"):
        validate_placement(placement(((0, 9, 2, 3),)), "x")
    p = placement()
    p.rank_of_slot = [0, 0, 0, 1]
    with pytest.raises(GemInputError, match="same contiguous 2 slots"):
        validate_placement(p, "x")
    with pytest.raises(GemInputError, match="a multiple of num_ranks=2"):
        validate_placement(placement(((0, 1, 2, 3, 0),), ranks=2), "x")
    with pytest.raises(GemInputError, match=r"has 1 layers; expected 48"):
        validate_placement(placement(), "x", num_layers=48)
    with pytest.raises(GemInputError, match=r"num_logical_experts: is 4; expected 128"):
        validate_placement(placement(), "x", num_logical_experts=128)


def test_invalid_utf8_inside_msgpack_is_a_clear_error(tmp_path):
    # found by tests/test_fuzz.py: msgspec raised UnicodeDecodeError, not a GemInputError
    raw = msgspec.msgpack.encode(trace()).replace(b"test", b"\xff\xfe\xfd\xfc")
    assert "c.msgpack: file: is not valid msgpack" in _err(tmp_path, "c.msgpack", raw, RoutingTrace)
