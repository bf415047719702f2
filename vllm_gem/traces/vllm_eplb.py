"""Import vLLM's own EPLB load statistics.

vLLM's EplbModelState keeps ``expert_load_window: [window, layers, num_physical]`` (tokens
per *physical* slot, per step) and ``physical_to_logical_map: [layers, num_physical]``. Save
them from a running server (``torch.save({...}, path)`` or ``numpy.savez``) under those
names; this folds replicas back to logical experts.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import numpy as np

from ..errors import GemInputError
from ..files import read_bytes
from ..formats import MAX_ELEMENTS, NdArray, RoutingTrace, token_counts
from ..validation import MAX_EXPERTS

KEYS = ("expert_load_window", "physical_to_logical_map")


def _npz_member(zf: zipfile.ZipFile, name: str, src: str) -> np.ndarray:
    """One array of an .npz, its declared shape checked before anything is allocated (a 1 KB
    archive can declare a 4 GiB array)."""
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise GemInputError(src, name[:-4], f"is .npy format {version}", "format 1.0 or 2.0 (numpy.savez)")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise GemInputError(src, name[:-4], "holds Python objects", "a numeric array")
        if math.prod(shape) > MAX_ELEMENTS:
            raise GemInputError(src, name[:-4], f"declares shape {shape}",
                                f"at most {MAX_ELEMENTS} elements (the limit on routing traces)")
        out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")  # read on from the header
        raw = out.reshape(-1, order="A").view(np.uint8)
        if f.readinto(raw) != raw.size or f.read(1):
            raise GemInputError(src, name[:-4], f"does not hold the {raw.size} bytes its shape {shape} declares",
                                "an array saved whole (numpy.savez)")
        return out


def fold_to_logical(window: np.ndarray, phys_to_log: np.ndarray, num_logical: int | None = None
                    ) -> np.ndarray:
    """window: [steps, layers, num_physical], phys_to_log: [layers, num_physical]
    -> loads: [steps, layers, num_logical] (replica loads summed)."""
    steps, layers, _ = window.shape
    n = int(num_logical or phys_to_log.max() + 1)
    out = np.zeros((steps, layers, n), dtype=np.int64)
    for layer in range(layers):
        np.add.at(out[:, layer, :], (slice(None), phys_to_log[layer]), window[:, layer, :])
    return out


def import_vllm_eplb(path: str | Path | None, model: str = "") -> RoutingTrace:
    """A .npz or torch-saved dict holding vLLM's EPLB state arrays -> RoutingTrace."""
    if not path:
        raise GemInputError("command line", "source", "is missing", "an EPLB state .npz or .pt file")
    path = Path(path)
    src = str(path)
    raw = read_bytes(path)  # regular file, size bounded: nothing below reads past it
    if not raw:
        raise GemInputError(src, "file", "is empty", f"a .npz or torch.save dict with {KEYS}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw)) if raw[:4] == b"PK\x03\x04" else None
    except zipfile.BadZipFile as e:
        raise GemInputError(src, "file", f"is a damaged zip archive ({e})",
                            f"a .npz or torch.save dict with {KEYS}") from None
    try:
        if zf is not None and all(n.endswith(".npy") for n in zf.namelist()):
            data = {n[:-4]: _npz_member(zf, n, src) for n in zf.namelist()}
        elif zf is None and raw[:1] != b"\x80":  # neither a zip (npz, torch) nor a legacy torch pickle
            raise GemInputError(src, "file", "is neither a .npz archive nor a torch.save file",
                                f"a .npz or torch.save dict with {KEYS}")
        else:
            try:
                import torch
            except ImportError:
                raise GemInputError(src, "file", "is a torch.save file and torch is not installed",
                                    "torch (pip install vllm-gem[vllm]), or the arrays saved "
                                    "with numpy.savez as .npz") from None
            # torch.save archives store tensors uncompressed: memory is bounded by the file size
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise GemInputError(src, "file", f"holds a {type(obj).__name__}", f"a dict with {KEYS}")
            data = {k: v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v) for k, v in obj.items()}
    except GemInputError:
        raise
    except Exception as e:  # unreadable or not the expected container
        raise GemInputError(src, "file", f"cannot be read ({type(e).__name__}: {e})",
                            f"a .npz or torch.save dict with {KEYS}") from None
    for k in KEYS:
        if k not in data:
            raise GemInputError(src, k, "is missing", f"vLLM EplbModelState arrays {KEYS}")
    win, p2l = np.asarray(data[KEYS[0]]), np.asarray(data[KEYS[1]])
    if win.ndim != 3 or win.size == 0:
        raise GemInputError(src, KEYS[0], f"has shape {win.shape}", "[window, layers, num_physical], non-empty")
    if p2l.shape != win.shape[1:]:
        raise GemInputError(src, KEYS[1], f"has shape {p2l.shape}", f"{win.shape[1:]} (layers, num_physical)")
    win = token_counts(win, src, KEYS[0])
    ids = token_counts(p2l, src, KEYS[1])
    if ids.max() >= MAX_EXPERTS:
        raise GemInputError(src, KEYS[1], f"holds expert id {ids.max()}", f"ids below {MAX_EXPERTS}")
    loads = fold_to_logical(win, ids.astype(np.int64))
    loads = loads[loads.sum(axis=(1, 2)) > 0]  # the ring buffer's unused (all-zero) steps
    if loads.shape[0] == 0:
        raise GemInputError(src, KEYS[0], "is all zeros", "at least one recorded step")
    return RoutingTrace(model=model, source=f"vLLM EPLB load window from {path.name}",
                        counts=NdArray.from_numpy(token_counts(loads, src, f"{KEYS[0]} (summed over replicas)")))
