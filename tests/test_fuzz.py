"""Hypothesis fuzzing of every file loader, GEM's vLLM settings and the plugin's decision:
whatever the input, the only failure is the documented GemInputError."""

import re

import msgspec
import numpy as np
import pytest
from conftest import load_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_gem.errors import GemInputError
from vllm_gem.formats import (
    GpuProfile,
    NdArray,
    Placement,
    RoutingTrace,
    decode,
    encode,
)
from vllm_gem.profiles import example_profile
from vllm_gem.vllm.config import GemConfig


def valid_files():
    trace = RoutingTrace(model="m", source="t",
                         counts=NdArray.from_numpy(np.arange(24, dtype=np.int32).reshape(2, 3, 4)))
    place = Placement(num_logical_experts=4, num_ranks=2, phys_to_log=[[0, 1, 2, 3]],
                      rank_of_slot=[0, 0, 1, 1], planner="t")
    return [(example_profile("g", num_experts=8), GpuProfile), (trace, RoutingTrace), (place, Placement)]


FILES = valid_files()


@st.composite
def mutated(draw):
    obj, cls = draw(st.sampled_from(FILES))
    as_json = draw(st.booleans())
    raw = bytearray(encode(obj, json=as_json))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if not raw:
            break
        i = draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[i:i + draw(st.integers(1, 16))]
    return bytes(raw), cls, as_json


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_corrupted_files_give_one_clear_error_or_a_valid_object(case):
    raw, cls, as_json = case
    try:
        obj = decode(raw, cls, "fuzz.file", json=as_json)
    except GemInputError as e:
        assert str(e).startswith("fuzz.file: ")
        return
    assert isinstance(obj, cls)  # a mutation that kept the file valid: it was validated


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.sampled_from([GpuProfile, RoutingTrace, Placement]), st.booleans())
def test_random_bytes_are_rejected_clearly(raw, cls, as_json):
    with pytest.raises(GemInputError, match=r"^fuzz\.file: "):
        decode(raw, cls, "fuzz.file", json=as_json)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6)
GEM_FIELDS = [f.name for f in msgspec.structs.fields(GemConfig)] + ["bogus"]  # and one unknown


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(GEM_FIELDS), json_values, max_size=4)))
def test_any_gem_setting_parses_or_names_the_field(raw):
    pytest.importorskip("vllm")  # only to keep the vllm_gem.vllm package import honest
    from vllm_gem.vllm.config import GemConfig, parse
    try:
        cfg = parse(raw)
    except GemInputError as e:
        assert_whole_message(e, "--additional-config gem", GEM_FIELDS + ["gem"])
        return
    assert isinstance(cfg, GemConfig)


INTERNAL_WORDS = ("Annotated", "`", "NoneType", "msgspec", "Struct", "Traceback", "<class")


def assert_whole_message(e: GemInputError, source: str, fields: list[str]) -> None:
    """The whole message, not only its prefix: one line '<source>: <field>: <problem>;
    expected <what>', the field one the user can set, and no library's internal words."""
    msg = str(e)
    assert "\n" not in msg, msg
    assert e.source == source, msg
    assert e.field.split(".")[0].split("[")[0] in fields, msg
    assert e.problem and e.expected, msg
    assert msg.startswith(f"{source}: ") and msg.endswith(f": {e.problem}; expected {e.expected}"), msg
    ours = re.sub(r"'[^']*'|\"[^\"]*\"", "", msg)  # the user's own values may hold anything
    assert not any(w in ours for w in INTERNAL_WORDS), msg


@st.composite
def decisions(draw):
    loads, group, phys = draw(load_cases(max_ranks=8, max_experts=20, max_redundant=6,
                                         max_steps=6, rate=80, hot=5000,
                                         kinds=("random", "zeros", "hot", "one-step")))
    old = np.tile(np.arange(phys) % loads.shape[2], (loads.shape[1], 1))
    return loads, group, old, draw(st.sampled_from([4, 10**6]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decisions())
def test_the_plugin_decision_on_any_load(case):
    # any shapes, zero loads, one hot expert, more GPUs than experts, replicas, and GEM's
    # many-ranks construction forced on small groups
    pytest.importorskip("vllm")
    from vllm_gem.vllm.planning import decide
    loads, group, old, construct_ranks = case
    profiles = [example_profile(f"g{r}", 1 + 0.1 * r, num_experts=max(1, old.shape[1] // group.num_ranks))
                for r in range(group.num_ranks)]
    try:
        d = decide(loads, profiles, old, planner_params={"construct_ranks": construct_ranks})
    except GemInputError as e:
        assert loads.sum() == 0 and "holds no routed tokens" in str(e)
        return
    assert d.phys_to_log.shape == old.shape
    for row in d.phys_to_log:
        assert set(row.tolist()) == set(range(loads.shape[2]))
    assert np.isfinite([d.predicted_before_us, d.predicted_after_us]).all()
    # the reported bound holds for both maps it was computed for
    assert d.predicted_bound_us <= min(d.predicted_before_us, d.predicted_after_us) * (1 + 1e-9)
    msgspec.json.encode(d.rank_us_after)
