"""Every value a user types, declared once with its range.

A value's type is an ``Annotated[..., msgspec.Meta(...)]``: msgspec converts and range-checks
it (NaN and infinities fail every bound), and :func:`describe` turns the same declaration
into the "expected ..." of the error. The command line (argparse ``type=``), the
``VLLM_GEM_*`` environment variables and GemConfig's fields (``--additional-config``) all use
these declarations, so a range is written in one place. Consistency between values (speeds
against slots, slots against experts) is checked where both are known, in :func:`check_slots`.
"""

from __future__ import annotations

import argparse
import typing
from typing import Annotated, Any, Callable

import msgspec
from msgspec import Meta

from .errors import GemInputError

CLI = "command line"
MAX_RANKS = 4096  # EP ranks (GPUs) one placement may span
MAX_EXPERTS = 1 << 16  # logical experts per MoE layer
MAX_COUNT = (1 << 31) - 1  # token counts are stored as int32

# relative GPU speeds: a fleet's GPUs differ by percents, an emulated one by a few times
Speed = Annotated[float, Meta(ge=1e-3, le=1e3, description="a relative GPU speed")]
Slots = Annotated[int, Meta(ge=1, le=MAX_EXPERTS * 16, description="physical slots per layer")]
MigrationWeight = Annotated[float, Meta(ge=0, le=1e9, description="us of layer time per moved expert")]
Seconds = Annotated[float, Meta(gt=0, le=86400, description="seconds")]
Width = Annotated[int, Meta(ge=1, le=1 << 20, description="a hidden or intermediate size")]
LocalExperts = Annotated[int, Meta(ge=1, le=4096, description="local experts per GPU")]
Device = Annotated[int, Meta(ge=0, le=1023, description="a CUDA device index")]
SmCount = Annotated[int, Meta(ge=1, le=1024, description="a number of SMs")]
EngineSteps = Annotated[int, Meta(ge=0, le=10**9, description="engine steps (0: off)")]
Steps = Annotated[int, Meta(ge=1, le=1 << 20, description="trace steps")]
SpeedError = Annotated[float, Meta(ge=0, le=1, description="a relative speed error, 1 sigma")]
Draws = Annotated[int, Meta(ge=1, le=100000, description="draws of true speeds")]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1, description="a seed")]
TokenCount = Annotated[int, Meta(ge=0, le=MAX_COUNT, description="a token count")]


def describe(typ: Any) -> str:
    """'an integer in [1, 4096] (local experts per GPU)' from an Annotated declaration
    (`X | None`: the same, 'or null')."""
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return describe(args[0]) + " or null"
    if typing.get_origin(typ) is dict:
        k, val = typing.get_args(typ)
        return f"an object mapping {describe(k)} to {describe(val)}"
    base, *extra = typing.get_args(typ) or (typ,)
    meta = next((m for m in extra if isinstance(m, Meta)), None)
    noun = {int: "an integer", float: "a finite number", str: "text", bool: "true or false"}.get(
        base, getattr(base, "__name__", str(base)))
    if meta is None:
        return noun
    def num(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"
    lo = f"[{num(meta.ge)}" if meta.ge is not None else (f"({num(meta.gt)}" if meta.gt is not None else "(-inf")
    hi = f"{num(meta.le)}]" if meta.le is not None else (f"{num(meta.lt)})" if meta.lt is not None else "inf)")
    what = f" ({meta.description})" if meta.description else ""
    return f"{noun} in {lo}, {hi}{what}"


def convert(value: Any, typ: Any, source: str, field: str) -> Any:
    """value (text or a JSON value) -> typ, or one GemInputError naming source and field."""
    try:
        return msgspec.convert(value.strip() if isinstance(value, str) else value, typ, strict=False)
    except msgspec.ValidationError:
        raise GemInputError(source, field, f"is {value!r}", describe(typ)) from None


def argtype(typ: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that converts with `typ`'s declared range."""
    def parse(text: str) -> Any:
        try:
            return convert(text, typ, CLI, "value")
        except GemInputError as e:
            raise argparse.ArgumentTypeError(f"{e.problem}; expected {e.expected}") from None
    parse.__name__ = getattr(typ, "__name__", "value")
    return parse


def listtype(typ: Any, max_len: int = MAX_RANKS) -> Callable[[str], list]:
    """An argparse ``type=`` for a comma-separated list of `typ` (1 to `max_len` items)."""
    def parse(text: str) -> list:
        items = text.split(",")
        if not 1 <= len(items) <= max_len:
            raise argparse.ArgumentTypeError(f"has {len(items)} items; expected 1 to {max_len}")
        try:
            return [convert(x, typ, CLI, "value") for x in items]
        except GemInputError as e:
            raise argparse.ArgumentTypeError(
                f"is {text!r}; expected comma-separated values, each {e.expected}") from None
    return parse


def sm_limits(text: str) -> dict[int, int]:
    """``--slow-sms 1:92,3:66`` -> {1: 92, 3: 66}."""
    out: dict[int, int] = {}
    for item in text.split(","):
        dev, sep, sms = item.partition(":")
        try:
            if not sep:
                raise GemInputError(CLI, "value", "", "")
            out[convert(dev, Device, CLI, "device")] = convert(sms, SmCount, CLI, "sms")
        except GemInputError:
            raise argparse.ArgumentTypeError(
                f"is {text!r}; expected DEVICE:SMS[,DEVICE:SMS], a device index in [0, 1023] and "
                "a number of SMs in [1, 1024]") from None
    return out


def check_slots(num_physical: int, num_experts: int, num_ranks: int, option: str = "--num-physical",
                source: str = CLI) -> None:
    """Slots per layer must hold every expert, split evenly over ranks (vLLM's layout), and
    put no expert twice on one rank (more copies than ranks buy nothing)."""
    if num_physical < num_experts or num_physical % num_ranks or num_physical > num_experts * num_ranks:
        raise GemInputError(
            source, option, f"is {num_physical}",
            f"a multiple of the {num_ranks} GPUs between the model's {num_experts} experts and "
            f"{num_experts * num_ranks} (each expert at most once per GPU)")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: argument --x: is 'v'; expected ...`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")
