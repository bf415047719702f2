"""Import HarMoEny's raw routing traces (sacs-epfl/HarMoEny, ExFlow/raw_trace).

Layout: ``MODEL/data.json`` (run settings) and ``MODEL/RANK/moe_layer-L.csv``, one row per
iteration; the column ``expert distribution`` lists the tokens that rank's batch routed to
each expert. One step of the RoutingTrace is one (iteration, rank) batch.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import msgspec
import numpy as np

from ..errors import GemInputError
from ..files import check_regular, read_bytes
from ..formats import NdArray, RoutingTrace, token_counts

_LAYER = re.compile(r"moe_layer-(\d+)\.csv$")


def import_harmoeny(folder: str | Path | None) -> RoutingTrace:
    """folder: a HarMoEny model folder (e.g. .../harmoeny/qwen) -> RoutingTrace."""
    if not folder:
        raise GemInputError("command line", "source", "is missing", "a HarMoEny model folder")
    folder = Path(folder)
    named = [d for d in folder.iterdir() if d.name.isdigit()] if folder.is_dir() else []
    for d in named:  # a rank folder that cannot be entered (a symlink loop) is an error, not a gap
        if not d.is_dir():
            try:
                d.stat()
            except OSError as e:
                raise GemInputError(str(d), "rank folder", f"cannot be opened ({e.strerror})",
                                    "a folder of moe_layer-L.csv files") from None
    ranks = sorted((d for d in named if d.is_dir()), key=lambda d: int(d.name))
    if not ranks:
        raise GemInputError(str(folder), "folder", "has no rank sub-folders (0/, 1/, ...)",
                            "a HarMoEny model folder: RANK/moe_layer-L.csv")
    meta: dict = {}
    if (folder / "data.json").is_file():
        try:
            meta = json.loads(read_bytes(folder / "data.json"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise GemInputError(str(folder / "data.json"), "file", f"is not valid JSON ({e})",
                                "HarMoEny's run settings, a JSON object") from None
        if not isinstance(meta, dict):
            raise GemInputError(str(folder / "data.json"), "file", f"holds a JSON {type(meta).__name__}",
                                "HarMoEny's run settings, a JSON object")
    layers = sorted(int(m.group(1)) for f in ranks[0].iterdir() if (m := _LAYER.search(f.name)))
    if not layers:
        raise GemInputError(str(ranks[0]), "folder", "has no moe_layer-L.csv files")
    per_rank = []
    for rank_dir in ranks:
        per_layer = []
        for layer in layers:
            path = rank_dir / f"moe_layer-{layer}.csv"
            if not path.is_file():
                raise GemInputError(str(path), "file", "is missing",
                                    f"one file per MoE layer {layers[0]}..{layers[-1]} in every rank")
            per_layer.append(_read_layer(path))
        n_iter = {len(x) for x in per_layer}
        if len(n_iter) != 1:
            raise GemInputError(str(rank_dir), "iterations", f"differ between layers ({sorted(n_iter)})",
                                "the same iterations in every layer file")
        per_rank.append(np.stack(per_layer, axis=1))  # [iters, layers, experts]
    widths = {a.shape for a in per_rank}
    if len(widths) != 1:
        raise GemInputError(str(folder), "expert distribution", f"shapes differ between ranks ({widths})",
                            "the same iterations and experts on every rank")
    # step = iteration * ranks + rank: batches of one iteration are adjacent
    counts = np.stack(per_rank, axis=1).reshape(-1, len(layers), per_rank[0].shape[2])
    model = meta.get("model_name", folder.name)
    if not isinstance(model, str):
        raise GemInputError(str(folder / "data.json"), "model_name", f"is a JSON {type(model).__name__}",
                            "text (the model's name)")
    return RoutingTrace(
        model=model,
        source=f"HarMoEny raw trace {folder.name} ({len(ranks)} ranks x {per_rank[0].shape[0]} iterations)",
        counts=NdArray.from_numpy(counts), layer_ids=layers,
        params={k: meta[k] for k in ("dataset", "batch_size", "seq_len", "world_size") if k in meta})


def _read_layer(path: Path) -> np.ndarray:
    """One moe_layer-L.csv -> [iterations, experts] token counts."""
    check_regular(path)  # a FIFO would block the read
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "expert distribution" not in reader.fieldnames:
                raise GemInputError(str(path), "expert distribution", "column is missing",
                                    "a HarMoEny moe_layer CSV")
            rows = []
            for i, row in enumerate(reader):
                try:
                    rows.append(_ROW.decode(row["expert distribution"] or ""))
                except msgspec.DecodeError:  # not JSON, not a list, or not numbers
                    raise GemInputError(str(path), f"row {i} expert distribution",
                                        f"is {row['expert distribution']!r}",
                                        "a JSON list of token counts per expert") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise GemInputError(str(path), "file", f"is not a text CSV ({e})", "a HarMoEny moe_layer CSV") from None
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise GemInputError(str(path), "expert distribution", "is empty or ragged",
                            "the same number of experts (> 0) in every row")
    return token_counts(np.asarray(rows, dtype=np.float64), str(path), "expert distribution")


_ROW = msgspec.json.Decoder(list[float])
