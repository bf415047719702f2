"""Placements in and out of other engines' formats (docs/formats.md says where each is read).

- ``sglang``: what SGLang's ``--init-expert-location FILE.json`` reads,
  ``{"physical_to_logical_map": [layers][num_physical]}`` (its
  ``compute_initial_expert_location_metadata`` passes the dict to
  ``ExpertLocationMetadata.init_by_mapping``); slots are rank-major with equal slots per
  rank, as in vLLM.
- ``vllm-ascend``: what vllm-ascend's ``expert_map_path`` reads (upstream vLLM 0.26 takes no
  placement file): ``{"moe_layer_count": L, "layer_list": [{"layer_id", "device_count",
  "device_list": [{"device_id", "device_expert": [global expert id of each local slot]}]}]}``.
  It cannot hold two copies of one expert on one device.

Both map to and from our Placement's ``phys_to_log: [layers, num_physical]``.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from .errors import GemInputError
from .files import read_bytes
from .formats import ExpertId, Placement, field_error, load, rank_of_slots

FORMATS = ("sglang", "vllm-ascend")


class SglangExpertLocation(msgspec.Struct, forbid_unknown_fields=False):
    physical_to_logical_map: list[list[ExpertId]]


class AscendDevice(msgspec.Struct):
    device_id: int
    device_expert: list[ExpertId]


class AscendLayer(msgspec.Struct):
    layer_id: int
    device_count: int
    device_list: list[AscendDevice]


class AscendExpertMap(msgspec.Struct):
    moe_layer_count: int
    layer_list: list[AscendLayer]


class ModelLayers(msgspec.Struct, forbid_unknown_fields=False):
    """What of a Hugging Face config.json says which decoder layers are MoE layers."""
    num_hidden_layers: int
    first_k_dense_replace: int = 0  # DeepSeek-V2/V3: the first k layers are dense
    moe_layer_freq: int = 1
    decoder_sparse_step: int = 1  # Qwen-MoE
    mlp_only_layers: list[int] = []


def dense_layers(config_path: str | Path, moe_layers: int) -> int:
    """How many dense decoder layers come before the MoE layers, from the model's config.json;
    GemInputError where the layout is not 'k dense layers, then MoE layers only' or does not
    give `moe_layers` MoE layers."""
    src = str(config_path)
    try:
        cfg = msgspec.json.decode(read_bytes(config_path), type=ModelLayers)
    except msgspec.ValidationError as e:
        raise field_error(e, src) from None
    except (msgspec.DecodeError, RecursionError) as e:
        raise GemInputError(src, "file", f"is not valid JSON ({e})", "a model's config.json") from None
    if cfg.moe_layer_freq != 1 or cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers:
        raise GemInputError(src, "moe_layer_freq / decoder_sparse_step / mlp_only_layers",
                            "interleave dense and MoE layers", "k dense layers, then MoE layers only")
    if cfg.num_hidden_layers - cfg.first_k_dense_replace != moe_layers:
        raise GemInputError(src, "num_hidden_layers", f"is {cfg.num_hidden_layers} with "
                            f"first_k_dense_replace {cfg.first_k_dense_replace}",
                            f"{moe_layers} MoE layers, as the placement has")
    return cfg.first_k_dense_replace


def to_engine(placement: Placement, engine: str, source: str = "placement", dense: int = 0) -> msgspec.Struct:
    """Placement -> the engine's file object (GemInputError where the engine cannot hold it).
    dense: decoder layers before the first MoE layer; SGLang indexes its rows by decoder layer,
    so those get rows too (the first MoE layer's, a valid map their dense MLPs never read)."""
    p2l = placement.array  # [layers, num_physical]
    if engine == "sglang":
        return SglangExpertLocation([p2l[0].tolist()] * dense + p2l.tolist())
    if engine != "vllm-ascend":
        raise GemInputError("command line", "--to", f"is {engine!r}", " or ".join(FORMATS))
    slots = p2l.shape[1] // placement.num_ranks
    layers = []
    for layer, row in enumerate(p2l):
        devices = []
        for g in range(placement.num_ranks):
            local = row[g * slots:(g + 1) * slots].tolist()
            if len(set(local)) < len(local):
                raise GemInputError(source, f"phys_to_log[{layer}]",
                                    f"puts two copies of one expert on rank {g}",
                                    "one copy per expert and device (what vllm-ascend's expert map "
                                    "holds): plan with --one-copy-per-rank")
            devices.append(AscendDevice(g, local))
        layers.append(AscendLayer(layer, placement.num_ranks, devices))
    return AscendExpertMap(len(layers), layers)


def engine_format(head: object) -> str | None:
    """Which engine's placement a decoded JSON document is, by its keys, or None."""
    if isinstance(head, dict) and "physical_to_logical_map" in head:
        return "sglang"
    if isinstance(head, dict) and "layer_list" in head:
        return "vllm-ascend"
    return None


def read_engine_placement(path: str | Path, num_logical_experts: int | None = None
                          ) -> tuple[np.ndarray, int | None, str]:
    """An SGLang or vllm-ascend placement file -> (phys_to_log [layers, num_physical], ranks
    (None for SGLang, which does not say), format). Errors name the file and the field."""
    src = str(path)
    raw = read_bytes(path)
    try:
        head = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as e:
        raise GemInputError(src, "file", f"is not valid JSON ({e})",
                            "an SGLang or vllm-ascend placement") from None
    fmt = engine_format(head)
    if fmt == "sglang":
        rows, ranks = _decode(raw, SglangExpertLocation, src).physical_to_logical_map, None
    elif fmt == "vllm-ascend":
        rows, ranks = _ascend_rows(_decode(raw, AscendExpertMap, src), src)
    else:
        raise GemInputError(src, "file", "has neither physical_to_logical_map nor layer_list",
                            "SGLang's {\"physical_to_logical_map\": ...} or vllm-ascend's expert map")
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise GemInputError(src, "physical_to_logical_map", "has rows of different or zero lengths",
                            "one row of slots per MoE layer, all of one length")
    p2l = np.asarray(rows, dtype=np.int64)
    if num_logical_experts is not None:
        _check_experts(p2l, num_logical_experts, src)
    return p2l, ranks, fmt


def _check_experts(p2l: np.ndarray, num_logical_experts: int, src: str) -> None:
    """Every one of experts 0..n-1, and no other, in every layer of p2l [layers, num_physical]."""
    missing = [e for e in range(num_logical_experts) if not (p2l == e).any(1).all()]
    if missing or p2l.max() >= num_logical_experts:
        raise GemInputError(src, "physical_to_logical_map",
                            f"does not hold experts 0..{num_logical_experts - 1} exactly in every layer",
                            f"every one of the model's {num_logical_experts} experts in every layer")


def _decode(raw: bytes, cls: type, src: str):
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as e:
        raise field_error(e, src) from None


def _ascend_rows(obj: AscendExpertMap, src: str) -> tuple[list[list[int]], int]:
    if obj.moe_layer_count != len(obj.layer_list) or not obj.layer_list:
        raise GemInputError(src, "moe_layer_count",
                            f"is {obj.moe_layer_count} for {len(obj.layer_list)} layers",
                            "the number of entries of layer_list (> 0)")
    ranks = obj.layer_list[0].device_count
    rows = []
    for i, layer in enumerate(obj.layer_list):
        if layer.device_count != ranks or len(layer.device_list) != ranks:
            raise GemInputError(src, f"layer_list[{i}].device_list", f"has {len(layer.device_list)} devices",
                                f"{ranks} in every layer (device_count)")
        if layer.layer_id != i:
            raise GemInputError(src, f"layer_list[{i}].layer_id", f"is {layer.layer_id}",
                                f"{i} (layers listed in order, from 0)")
        ids = sorted(d.device_id for d in layer.device_list)
        if ids != list(range(ranks)):
            raise GemInputError(src, f"layer_list[{i}].device_list", f"has device ids {ids}",
                                f"each of 0..{ranks - 1} exactly once")
        devices = sorted(layer.device_list, key=lambda d: d.device_id)
        sizes = [len(d.device_expert) for d in devices]
        # vLLM-style maps are rank-major with equal slots per rank: unequal lists would be
        # re-sliced onto the wrong devices, so they are refused, not reshaped.
        if len(set(sizes)) != 1 or not sizes[0]:
            raise GemInputError(src, f"layer_list[{i}].device_list", f"has {sizes} experts per device",
                                "the same number (> 0) of experts on every device")
        rows.append([e for d in devices for e in d.device_expert])
    return rows, ranks


def is_engine_file(path: str | Path) -> bool:
    """Whether a file is an SGLang or vllm-ascend placement (by its JSON keys); False for
    anything else, unreadable or not JSON included (formats.load then says what it is)."""
    try:
        return engine_format(msgspec.json.decode(read_bytes(path))) is not None
    except (GemInputError, msgspec.DecodeError, RecursionError):
        return False


def engine_placement(path: str | Path, num_ranks: int | None = None) -> Placement:
    """An engine's placement file as our Placement, its experts read off the file and its
    ranks from the file (vllm-ascend) or `num_ranks` (SGLang's file does not say)."""
    p2l, ranks, fmt = read_engine_placement(path)
    if (ranks or num_ranks) is None:
        raise GemInputError(str(path), "physical_to_logical_map",
                            "does not say how many EP ranks it spans (SGLang's files do not)",
                            "the number of EP ranks from elsewhere (the ranks' profiles read with it)")
    experts = int(p2l.max()) + 1
    _check_experts(p2l, experts, str(path))
    return _as_placement(str(path), p2l, ranks, fmt, ranks or num_ranks, experts)


def load_any_placement(path: str | Path, num_ranks: int, num_logical_experts: int) -> Placement:
    """Our Placement file, or an SGLang or vllm-ascend one (engine_format), as our Placement."""
    if is_engine_file(path):
        return placement_from_engine(path, num_ranks, num_logical_experts)
    return load(path, Placement)


def placement_from_engine(path: str | Path, num_ranks: int, num_logical_experts: int, model: str = ""
                          ) -> Placement:
    """An engine's placement file as our Placement (for `plan --current` and `inspect`)."""
    p2l, ranks, fmt = read_engine_placement(path, num_logical_experts)
    return _as_placement(str(path), p2l, ranks, fmt, num_ranks, num_logical_experts, model)


def _as_placement(src: str, p2l: np.ndarray, ranks: int | None, fmt: str, num_ranks: int,
                  num_logical_experts: int, model: str = "") -> Placement:
    """p2l [layers, num_physical] read from an engine's file (`ranks` as the file says, None
    for SGLang) as our Placement on num_ranks ranks."""
    if ranks is not None and ranks != num_ranks:
        raise GemInputError(src, "device_count", f"is {ranks}", f"{num_ranks} (the EP ranks planned for)")
    if p2l.shape[1] % num_ranks:
        raise GemInputError(src, "physical_to_logical_map", f"has {p2l.shape[1]} slots per layer",
                            f"a multiple of {num_ranks} ranks")
    return Placement(model=model, num_logical_experts=num_logical_experts, num_ranks=num_ranks,
                     phys_to_log=p2l.tolist(), rank_of_slot=rank_of_slots(p2l.shape[1], num_ranks),
                     planner=f"imported from {fmt}")
