"""GEM's file formats: GpuProfile, RoutingTrace and Placement, and the PlacementEvent log.

The three files are msgspec Structs carrying ``kind`` and ``schema_version``; they are written as JSON
(``.json``) or msgpack (any other suffix, ``.msgpack`` by convention). Loading checks the
header, decodes with msgspec's typed decoder, then checks shapes and values; every problem
becomes a :class:`GemInputError` naming the file, the field and the expectation. Nothing is
silently fixed up.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np
from msgspec import Meta

from .errors import GemInputError
from .files import append_line, read_bytes, write_atomic
from .precision import PRECISIONS, precision_name
from .validation import MAX_COUNT, MAX_EXPERTS, MAX_RANKS

SCHEMA_VERSION = 1  # routing traces and placements
# GPU profiles: 2 adds expert.scale_layout (the fp8 scales timed); version 1 files are read
# as bf16 profiles, which is what every version 1 profile timed
PROFILE_SCHEMA_VERSION = 2
_DTYPES = ("int32", "int64", "float32", "float64")
MAX_POINTS = 10000  # timed points one profile may hold (calibration writes under 100)
MAX_ELEMENTS = 1 << 28  # a trace larger than this is not a routing trace (1 GiB as int32)
Dim = Annotated[int, Meta(ge=0, le=MAX_ELEMENTS)]
ExpertId = Annotated[int, Meta(ge=0, lt=MAX_EXPERTS)]
RankId = Annotated[int, Meta(ge=0, lt=MAX_RANKS)]


class NdArray(msgspec.Struct, frozen=True):
    """A dense array stored compactly: raw little-endian C-order bytes plus dtype and shape."""

    dtype: str
    shape: list[Dim]
    data: bytes

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> "NdArray":
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _DTYPES:
            raise ValueError(f"dtype {a.dtype} not storable; use one of {_DTYPES}")
        return cls(a.dtype.name, list(a.shape), a.astype(a.dtype.newbyteorder("<")).tobytes())

    def to_numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(
            self.shape).astype(self.dtype)


# --------------------------------------------------------------------------- GPU profiles
class GpuIdentity(msgspec.Struct):
    """Which physical GPU was measured (from nvidia-ml-py where available)."""

    name: str
    uuid: str = ""
    serial: str = ""
    driver: str = ""
    index: int = 0
    sm_count: int = 0


class GpuState(msgspec.Struct):
    """Clocks, power and temperature read at one moment; None where not readable."""

    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None


class ExpertShape(msgspec.Struct):
    """The expert FFN that was timed: hidden -> 2*intermediate (gate/up) -> hidden (down), in
    `dtype` with fp8 scales laid out as `scale_layout` (vllm_gem.precision.PRECISIONS)."""

    hidden: int
    intermediate: int
    dtype: str = "bfloat16"
    scale_layout: str = "none"


class KernelSpec(msgspec.Struct):
    """The grouped-GEMM kernel that was timed; block_m is the token tile of the latency model."""

    name: str
    block_m: int
    block_n: int = 0
    block_k: int = 0


class LatencyPoint(msgspec.Struct):
    """One timed MoE-layer call: tokens routed to each local expert and the measured time.

    tokens_per_expert: [local_experts] (zeros allowed: inactive experts)
    """

    tokens_per_expert: list[int]
    median_us: float
    p10_us: float | None = None
    p90_us: float | None = None


class GpuProfile(msgspec.Struct, kw_only=True):
    kind: Literal["gpu_profile"] = "gpu_profile"
    schema_version: int = PROFILE_SCHEMA_VERSION
    gpu: GpuIdentity
    expert: ExpertShape
    kernel: KernelSpec
    points: list[LatencyPoint]
    state_before: GpuState | None = None
    state_after: GpuState | None = None
    emulation: str = ""  # e.g. "green context, 106 of 132 SMs": how a slower GPU was emulated
    # relative error (1 sigma) of these times as a model of the GPU: calibration's held-out
    # RMS error (None in files written before profiles carried it: latency.DEFAULT_PROFILE_ERROR)
    error: float | None = None
    source: str = "measured"  # "measured" or what else produced the points
    created: str = ""


# --------------------------------------------------------------------------- routing traces
class RoutingTrace(msgspec.Struct, kw_only=True):
    """Tokens routed to each expert, per step and MoE layer.

    counts: [steps, layers, experts] integer token counts (one step = one forward pass or
    one recorded batch). layer_ids: [layers] the model's index of each MoE layer.
    """

    kind: Literal["routing_trace"] = "routing_trace"
    schema_version: int = SCHEMA_VERSION
    model: str
    source: str
    counts: NdArray
    layer_ids: list[int] = []
    top_k: int | None = None
    params: dict[str, Any] = {}

    @property
    def loads(self) -> np.ndarray:
        """loads: [steps, layers, experts] as float64."""
        return self.counts.to_numpy().astype(np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.counts.shape
        return (s[0], s[1], s[2])


# --------------------------------------------------------------------------- placements
class Placement(msgspec.Struct, kw_only=True):
    """Which logical expert each physical slot holds, per MoE layer.

    phys_to_log: [layers, num_physical] logical expert id of every slot (replicas allowed).
    rank_of_slot: [num_physical] EP rank owning each slot; vLLM requires rank r to own the
    contiguous slots [r*S, (r+1)*S) with S = num_physical / num_ranks.
    """

    kind: Literal["placement"] = "placement"
    schema_version: int = SCHEMA_VERSION
    model: str = ""
    num_logical_experts: Annotated[int, Meta(ge=1, le=MAX_EXPERTS)]
    num_ranks: Annotated[int, Meta(ge=1, le=MAX_RANKS)]
    phys_to_log: list[list[ExpertId]]
    rank_of_slot: list[RankId]
    planner: str
    inputs: dict[str, Any] = {}
    predicted: dict[str, float] = {}

    @property
    def array(self) -> np.ndarray:
        """phys_to_log as int64 [layers, num_physical]."""
        return np.asarray(self.phys_to_log, dtype=np.int64)


class PlacementEvent(msgspec.Struct, kw_only=True):
    """One placement decision of the plugin (start-up, switch or recalibration), moved or not:
    one JSON line of ``gem-events.jsonl`` in the plugin's trace_dir, written by EP rank 0.

    rank_us_before / rank_us_after: [ranks] predicted mean MoE layer time of each rank (us)
    under the placement in use and the planned one.
    """

    kind: Literal["placement_event"] = "placement_event"
    schema_version: int = SCHEMA_VERSION
    time: str  # ISO 8601, UTC
    step: int  # engine steps served when it was decided
    reason: str  # start, switch, recalibration
    planner: str
    applied: bool
    why: str = ""  # why it was not applied
    predicted_layer_us_before: float
    predicted_layer_us_after: float
    predicted_bound_us: float | None = None
    predicted_gain: float
    rank_us_before: list[float]
    rank_us_after: list[float]
    gpus: list[str] = []
    planning_seconds: float = 0.0
    move_seconds: float = 0.0
    slots_changed: int = 0
    generation: int = 0  # placements applied by GEM so far, this one included


EVENTS_FILE = "gem-events.jsonl"


def append_event(event: PlacementEvent, trace_dir: str | Path) -> Path:
    """Append one event line to trace_dir/gem-events.jsonl."""
    return append_line(Path(trace_dir) / EVENTS_FILE, msgspec.json.encode(event))


def load_events(path: str | Path) -> list[PlacementEvent]:
    """Every event of a gem-events.jsonl file; a bad line is one GemInputError naming it."""
    src = str(path)
    lines = read_bytes(path).splitlines()
    dec = msgspec.json.Decoder(PlacementEvent)
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = dec.decode(line)
        except msgspec.ValidationError as e:
            raise field_error(e, f"{src}:{n}", "a placement_event") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            raise GemInputError(f"{src}:{n}", "line", f"is not valid JSON ({e})",
                                "one placement_event per line") from None
        if len(ev.rank_us_before) != len(ev.rank_us_after) or not ev.rank_us_after:
            raise GemInputError(f"{src}:{n}", "rank_us_after", f"has {len(ev.rank_us_after)} ranks "
                                f"and rank_us_before {len(ev.rank_us_before)}", "one time per EP rank in both")
        out.append(ev)
    if not out:
        raise GemInputError(src, "file", "holds no event", "one placement_event per line")
    return out


AnyFile = GpuProfile | RoutingTrace | Placement
T = TypeVar("T", GpuProfile, RoutingTrace, Placement)
_KIND = {GpuProfile: "gpu_profile", RoutingTrace: "routing_trace", Placement: "placement"}
# the schema versions each kind of file is read in (the newest is written)
READ_VERSIONS = {GpuProfile: (1, PROFILE_SCHEMA_VERSION), RoutingTrace: (SCHEMA_VERSION,),
                 Placement: (SCHEMA_VERSION,)}


class _Header(msgspec.Struct):
    kind: str = ""
    schema_version: int | None = None


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def encode(obj: AnyFile, json: bool) -> bytes:
    """JSON (indented) or msgpack bytes of a file object; the inverse of `decode`."""
    if json:
        return msgspec.json.format(msgspec.json.encode(obj), indent=1)
    return msgspec.msgpack.encode(obj)


def rank_of_slots(num_physical: int, num_ranks: int) -> list[int]:
    """vLLM's layout: rank r owns the contiguous slots [r*S, (r+1)*S), S = num_physical / num_ranks."""
    return (np.arange(num_physical) // (num_physical // num_ranks)).tolist()


def ranks_to_phys_to_log(log_of_item: np.ndarray, rank_of_item: np.ndarray, num_ranks: int
                         ) -> np.ndarray:
    """Lay items out rank-major, as vLLM wants.

    log_of_item, rank_of_item: [layers, num_physical] -> phys_to_log [layers, num_physical];
    within a rank, slots are ordered by logical id (deterministic).
    """
    layers, p = log_of_item.shape
    key = rank_of_item * (log_of_item.max() + 1) + log_of_item
    order = np.argsort(key, axis=1, kind="stable")
    counts = np.stack([(rank_of_item == r).sum(1) for r in range(num_ranks)], axis=1)
    if (counts != p // num_ranks).any():
        raise AssertionError("planner produced unequal slots per rank")
    return np.take_along_axis(log_of_item, order, axis=1)


def save(obj: AnyFile, path: str | Path) -> Path:
    """Write `obj` as JSON (.json) or msgpack (other suffixes), after validating it."""
    path = Path(path)
    if not isinstance(obj, RoutingTrace):  # the typed limits a reader checks (a trace's are in validate)
        try:
            msgspec.convert(msgspec.to_builtins(obj), type(obj))
        except msgspec.ValidationError as e:
            raise field_error(e, str(path)) from None
    validate(obj, str(path))
    return write_atomic(path, encode(obj, json=_is_json(path)))


def load(path: str | Path, cls: type[T]) -> T:
    """Load and validate a file of type `cls`; every failure is one GemInputError."""
    path = Path(path)
    return decode(read_bytes(path), cls, str(path), json=_is_json(path))


def load_any(path: str | Path) -> AnyFile:
    """A profile, trace or placement file, whichever its `kind` says."""
    path = Path(path)
    raw = read_bytes(path)
    if not raw.strip():
        raise GemInputError(str(path), "file", "is empty", "a profile, trace or placement")
    for mod in (msgspec.json, msgspec.msgpack):
        try:
            kind = mod.decode(raw, type=_Header).kind
            break
        except (msgspec.DecodeError, RecursionError):  # ValidationError included: a header of the wrong type
            continue
    else:
        raise GemInputError(str(path), "file", "is neither JSON nor msgpack with a kind field "
                            "(truncated or corrupt?)", "a profile, trace or placement")
    cls = {v: k for k, v in _KIND.items()}.get(kind)
    if cls is None:
        raise GemInputError(str(path), "kind", f"is {kind!r}",
                            "'gpu_profile', 'routing_trace' or 'placement'")
    return decode(raw, cls, str(path), json=_is_json(path))


def decode(raw: bytes, cls: type[T], source: str, json: bool) -> T:
    """Decode `raw` bytes (JSON or msgpack) into `cls` with the checks of `load`."""
    fmt = "JSON" if json else "msgpack"
    if not raw.strip():
        raise GemInputError(source, "file", "is empty", f"a {_KIND[cls]} in {fmt}")
    mod = msgspec.json if json else msgspec.msgpack
    # msgspec.ValidationError is a DecodeError: it is caught first, so that a wrong value
    # names its field instead of reading as a corrupt file
    # msgpack strings are not re-checked; a value nested 100000 deep exhausts the decoder's stack
    corrupt = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

    def not_valid(e: Exception) -> GemInputError:
        return GemInputError(source, "file", f"is not valid {fmt} ({e}); truncated or corrupt?",
                             f"a {_KIND[cls]} in {fmt}")

    try:
        head = mod.decode(raw, type=_Header)
    except msgspec.ValidationError as e:
        raise (not_valid(e) if "at `$" not in str(e) else field_error(e, source)) from None
    except corrupt as e:
        raise not_valid(e) from None
    if head.kind != _KIND[cls]:
        raise GemInputError(source, "kind", f"is {head.kind!r}", repr(_KIND[cls]))
    versions = READ_VERSIONS[cls]
    if head.schema_version not in versions:
        readable = " or ".join(map(str, versions))
        raise GemInputError(source, "schema_version", f"is {head.schema_version}",
                            f"{readable} (this vllm-gem reads {_KIND[cls]} schema {readable})")
    try:
        obj = mod.decode(raw, type=cls)
    except msgspec.ValidationError as e:
        raise field_error(e, source) from None
    except corrupt as e:  # the header decoded, something after it did not
        raise not_valid(e) from None
    validate(obj, source)
    return obj


def field_error(e: msgspec.ValidationError, source: str, expected: str | None = None) -> GemInputError:
    """msgspec's "Expected `int` >= 1, got ... - at `$.points[0].x`" as a GemInputError
    naming the field `points[0].x`."""
    text = str(e)
    # "- at `$.a.b`", or "- at `key` in `$.a`" for a mapping's key
    field = text.rsplit("`$", 1)[1].rstrip("`").lstrip(".") if "`$" in text else "file"
    if " - at `key` in " in text:
        field += " (a key)"
    problem, wanted = _plain(text.split(" - at ")[0])
    if problem == "is missing" and (m := re.search(r"field `([^`]+)`", text)):
        field = f"{field}.{m.group(1)}" if field != "file" else m.group(1)
    return GemInputError(source, field or "file", problem, expected or wanted)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "text", "array": "a list",
               "object": "an object", "bool": "true or false", "null": "null",
               "bytes": "bytes", "ext": "a msgpack extension"}


def _words(t: str) -> str:
    """`int | null` -> 'an integer or null'."""
    return " or ".join(_TYPE_WORDS.get(x.strip(" `"), x.strip(" `")) for x in t.split("|"))


def _plain(msg: str) -> tuple[str, str | None]:
    """msgspec's validation message -> (problem, expected) in the words of our other errors:
    'Expected `int` >= 1, got `str`' -> ('is text', 'an integer >= 1')."""
    if msg == "Number out of range":  # 1e400 in JSON: beyond a float (or an int beyond 64 bits)
        return "is a number out of range", "a number a 64-bit float or integer can hold"
    if re.fullmatch(r"Object missing required field `[^`]+`", msg):
        return "is missing", "a required field"
    if m := re.fullmatch(r"Object contains unknown field `([^`]+)`", msg):
        return f"holds unknown field {m.group(1)!r}", "only the documented fields"
    if m := re.fullmatch(r"Expected `([^`]+)`(.*?)(?:, got `([^`]+)`)?", msg):
        want, bound, got = m.groups()
        return (f"is {_words(got)}" if got else "is out of range"), f"{_words(want)}{bound}"
    return msg, None


def decode_json(path: str | Path, cls: type, what: str) -> Any:
    """A small JSON settings file (not one of the three formats) -> `cls`, errors naming the field."""
    raw = read_bytes(path)
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as e:
        raise field_error(e, str(path)) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GemInputError(str(path), "file", f"is not valid JSON ({e})", f"{what} JSON") from None


# --------------------------------------------------------------------------- validation
def _finite_positive(x: float | None, source: str, field: str, allow_zero: bool = False) -> None:
    if x is None:
        return
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise GemInputError(source, field, f"is {x}", "a finite positive number")


def validate(obj: AnyFile, source: str) -> None:
    """Check shapes and values of a decoded file; raise GemInputError on the first problem."""
    if isinstance(obj, GpuProfile):
        _validate_profile(obj, source)
    elif isinstance(obj, RoutingTrace):
        _validate_trace(obj, source)
    elif isinstance(obj, Placement):
        validate_placement(obj, source)
    else:  # pragma: no cover - typing guards this
        raise TypeError(type(obj))


def _validate_profile(p: GpuProfile, source: str) -> None:
    if precision_name(p.expert.dtype, p.expert.scale_layout) is None:
        raise GemInputError(source, "expert.dtype", f"is {p.expert.dtype!r} with scale_layout "
                            f"{p.expert.scale_layout!r}", "one of " + ", ".join(
                                f"{q.dtype}/{q.scale_layout}" for q in PRECISIONS.values()))
    for name in ("hidden", "intermediate"):
        v = getattr(p.expert, name)
        if not 0 < v <= 1 << 20:
            raise GemInputError(source, f"expert.{name}", f"is {v}", "between 1 and 1048576")
    if not 1 <= p.kernel.block_m <= 1024:
        raise GemInputError(source, "kernel.block_m", f"is {p.kernel.block_m}", "between 1 and 1024")
    if len(p.points) < 4:
        raise GemInputError(source, "points", f"has {len(p.points)} entries",
                            "at least 4 timed points to fit the latency model")
    width = len(p.points[0].tokens_per_expert)
    if width == 0:
        raise GemInputError(source, "points[0].tokens_per_expert", "is empty",
                            "the tokens of each expert of the timed rank (at least one)")
    for i, pt in enumerate(p.points):
        f = f"points[{i}]"
        if len(pt.tokens_per_expert) != width:
            raise GemInputError(source, f"{f}.tokens_per_expert",
                                f"has {len(pt.tokens_per_expert)} experts",
                                f"{width} (the same for every point)")
        if min(pt.tokens_per_expert) < 0 or max(pt.tokens_per_expert) > 1 << 24:
            raise GemInputError(source, f"{f}.tokens_per_expert", "holds out-of-range counts",
                                "token counts between 0 and 16777216")
        _finite_positive(pt.median_us, source, f"{f}.median_us")
        if pt.median_us > 1e7:
            raise GemInputError(source, f"{f}.median_us", f"is {pt.median_us}",
                                "a layer time under 10 s (10000000 us)")
        if pt.median_us < 1e-3:
            raise GemInputError(source, f"{f}.median_us", f"is {pt.median_us}",
                                "a layer time of at least 0.001 us (a kernel launch takes microseconds)")
        _finite_positive(pt.p10_us, source, f"{f}.p10_us")
        _finite_positive(pt.p90_us, source, f"{f}.p90_us")
        lo, hi = pt.p10_us or pt.median_us, pt.p90_us or pt.median_us  # percentiles are optional
        if not lo <= pt.median_us <= hi:
            raise GemInputError(source, f"{f}", f"has p10 {pt.p10_us:g}, median {pt.median_us:g}, "
                                f"p90 {pt.p90_us:g} us", "p10_us <= median_us <= p90_us")
    tokens = [sum(pt.tokens_per_expert) for pt in p.points]
    lo, hi = int(np.argmin(tokens)), int(np.argmax(tokens))
    if tokens[hi] == tokens[lo] or p.points[hi].median_us <= p.points[lo].median_us:
        raise GemInputError(source, "points", f"take {p.points[hi].median_us:g} us at {tokens[hi]} tokens "
                            f"and {p.points[lo].median_us:g} us at {tokens[lo]}",
                            "layer times that grow with the tokens routed to the GPU")
    if p.error is not None and not (math.isfinite(p.error) and 0 <= p.error <= 1):
        raise GemInputError(source, "error", f"is {p.error}", "a relative error in [0, 1] (0.03: 3%)")
    if p.gpu.index < 0 or not 0 <= p.gpu.sm_count <= 4096:
        raise GemInputError(source, "gpu", f"has index {p.gpu.index} and sm_count {p.gpu.sm_count}",
                            "index >= 0 and sm_count in [0, 4096] (0: not recorded)")
    if len(p.points) > MAX_POINTS:
        raise GemInputError(source, "points", f"has {len(p.points)} entries",
                            f"at most {MAX_POINTS} (a calibration times under 100)")
    for state in ("state_before", "state_after"):
        s = getattr(p, state)
        if s is not None:
            for k, hi in (("sm_clock_mhz", 1e5), ("mem_clock_mhz", 1e5), ("power_w", 1e5)):
                _finite_positive(getattr(s, k), source, f"{state}.{k}", allow_zero=True)
                if (getattr(s, k) or 0) > hi:
                    raise GemInputError(source, f"{state}.{k}", f"is {getattr(s, k)}", f"at most {hi:g}")
            t = s.temperature_c
            if t is not None and not (math.isfinite(t) and -50 <= t <= 200):
                raise GemInputError(source, f"{state}.temperature_c", f"is {t}",
                                    "a GPU temperature between -50 and 200 C")


def token_counts(values: Any, source: str, field: str) -> np.ndarray:
    """Any array of token counts -> int32 of the same shape, or one GemInputError naming
    `source` and `field`: counts must be finite whole numbers in [0, 2^31 - 1], never
    wrapped, rounded or clipped."""
    if isinstance(values, np.ndarray) and values.dtype.kind not in "iuf":
        # bools and complex numbers would convert silently (True -> 1, the imaginary part dropped)
        raise GemInputError(source, field, f"has dtype {values.dtype}",
                            "whole token counts (an integer or float array)")
    a = np.asarray(values) if isinstance(values, np.ndarray) else None
    if a is None or a.dtype.kind not in "iuf":
        try:
            a = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise GemInputError(source, field, "holds values that are not numbers",
                                "whole token counts") from None
    if a.dtype.kind in "iu":  # no float round trip: int64 counts above 2^53 stay exact
        bad = (a < 0) | (a > MAX_COUNT)
    else:
        bad = ~np.isfinite(a) | (a < 0) | (a > MAX_COUNT) | (a != np.floor(a))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise GemInputError(source, field + "".join(f"[{i}]" for i in where), f"is {a[where].item()!r}",
                            f"a whole token count in [0, {MAX_COUNT}]")
    return a.astype(np.int32)


def _validate_trace(t: RoutingTrace, source: str) -> None:
    a = t.counts
    if a.dtype not in _DTYPES:
        raise GemInputError(source, "counts.dtype", f"is {a.dtype!r}", f"one of {_DTYPES}")
    if len(a.shape) != 3 or min(a.shape) < 1 or math.prod(a.shape) > MAX_ELEMENTS:
        raise GemInputError(source, "counts.shape", f"is {a.shape}",
                            f"[steps, layers, experts], each at least 1, at most {MAX_ELEMENTS} in all")
    if a.shape[2] > MAX_EXPERTS:  # the limit a placement of it must keep
        raise GemInputError(source, "counts.shape", f"has {a.shape[2]} experts", f"at most {MAX_EXPERTS}")
    need = math.prod(a.shape) * np.dtype(a.dtype).itemsize
    if len(a.data) != need:
        raise GemInputError(source, "counts.data", f"holds {len(a.data)} bytes",
                            f"{need} bytes for shape {a.shape} of {a.dtype}")
    token_counts(a.to_numpy(), source, "counts")
    if t.layer_ids and len(t.layer_ids) != a.shape[1]:
        raise GemInputError(source, "layer_ids", f"has {len(t.layer_ids)} entries",
                            f"{a.shape[1]} (one per layer of counts)")
    if t.top_k is not None and not 1 <= t.top_k <= a.shape[2]:
        raise GemInputError(source, "top_k", f"is {t.top_k}", f"between 1 and {a.shape[2]}")


def validate_placement(p: Placement, source: str, *, num_layers: int | None = None,
                       num_logical_experts: int | None = None, num_ranks: int | None = None,
                       model: str | None = None) -> None:
    """Check a placement, optionally against the model it is meant for.

    Every logical expert must appear in every layer, ranks must own equal contiguous slot
    ranges (vLLM's layout), and ids must be in range. With ``model``, a placement that names
    another model is refused (an unnamed one, as imported from another engine, is not).
    """
    if p.num_logical_experts < 1:
        raise GemInputError(source, "num_logical_experts", f"is {p.num_logical_experts}", ">= 1")
    if p.num_ranks < 1:
        raise GemInputError(source, "num_ranks", f"is {p.num_ranks}", ">= 1")
    if num_logical_experts is not None and p.num_logical_experts != num_logical_experts:
        raise GemInputError(source, "num_logical_experts", f"is {p.num_logical_experts}",
                            f"{num_logical_experts} (the model's experts)")
    if num_ranks is not None and p.num_ranks != num_ranks:
        raise GemInputError(source, "num_ranks", f"is {p.num_ranks}",
                            f"{num_ranks} (the expert-parallel group size)")
    rows = p.phys_to_log
    if not rows:
        raise GemInputError(source, "phys_to_log", "has no layers", "[layers, num_physical]")
    if num_layers is not None and len(rows) != num_layers:
        raise GemInputError(source, "phys_to_log", f"has {len(rows)} layers",
                            f"{num_layers} (the model's MoE layers)")
    width = len(rows[0])
    for li, r in enumerate(rows):
        if len(r) != width:
            raise GemInputError(source, f"phys_to_log[{li}]", f"has {len(r)} slots",
                                f"{width} (the same in every layer)")
    if width % p.num_ranks or width < p.num_logical_experts:
        raise GemInputError(source, "phys_to_log", f"has {width} slots per layer",
                            f"a multiple of num_ranks={p.num_ranks} and >= {p.num_logical_experts}")
    a = np.asarray(rows, dtype=np.int64)
    bad = np.argwhere((a < 0) | (a >= p.num_logical_experts))
    if bad.size:
        li, s = bad[0]
        raise GemInputError(source, f"phys_to_log[{li}][{s}]", f"is {a[li, s]}",
                            f"a logical expert id in [0, {p.num_logical_experts})")
    present = np.zeros((a.shape[0], p.num_logical_experts), dtype=bool)
    np.put_along_axis(present, a, True, axis=1)
    missing = np.argwhere(~present)
    if missing.size:
        li, e = missing[0]
        raise GemInputError(source, f"phys_to_log[{li}]", f"does not place logical expert {e}",
                            "every logical expert in at least one slot of every layer")
    per_rank = width // p.num_ranks
    if list(p.rank_of_slot) != rank_of_slots(width, p.num_ranks):
        raise GemInputError(source, "rank_of_slot", "does not give every rank the same contiguous "
                            f"{per_rank} slots", f"slot s on rank s // {per_rank} (vLLM's layout)")
    if model and p.model and p.model != model:
        raise GemInputError(source, "model", f"is {p.model!r}",
                            f"{model!r} (the trace's model): a placement is made for one model")
