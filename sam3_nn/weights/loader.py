"""Read released SAM 3 checkpoints and map them onto our parameters.

Formats:
* HF snapshot directory (``config.json`` + ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``), or a single ``.safetensors`` file: read with
  ``safetensors`` + numpy, no torch.
* the original ``sam3.pt`` (torch is used to read it, nothing else).

Every one of our parameters must be produced with the expected shape; every
source tensor must be mapped, or explicitly unused with a reason. Anything else
is an error that lists the offending names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import ml_dtypes  # numpy has no bfloat16; ml_dtypes ships with TVM
import numpy as np
from safetensors import safe_open

from sam3_nn.config import Sam3Config
from sam3_nn.errors import UserError
from sam3_nn.weights.mapping import ParamMapping
from sam3_nn.interface import builds_detector_neck
from sam3_nn.weights.parts import PARTS, Context, Part
from sam3_nn.weights.tracker_map import VIDEO_TRACKER


# the largest finite value of the narrow dtypes a library may take its weights in
_LARGEST = {"float16": float(np.finfo(np.float16).max)}


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------
# tensor sources
# ----------------------------------------------------------------------------
@dataclass
class TensorSource:
    """Names, shapes and dtypes of a checkpoint's tensors, each read on demand."""

    path: str
    fmt: str  # "hf" or "pt"
    meta: Dict[str, Tuple[Tuple[int, ...], str]]
    _read: Callable[[str], np.ndarray]
    config: Optional[dict] = None

    def read(self, name: str) -> np.ndarray:
        try:
            return self._read(name)
        except Exception as e:  # corrupt data inside an otherwise readable file
            raise CheckpointError(f"{self.path}: cannot read tensor {name}: {e}") from e

    def names(self) -> List[str]:
        return list(self.meta)


def _safetensors_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index: {e}") from e
        return [os.path.join(path, f) for f in files]
    raise CheckpointError(
        f"{path}: no model.safetensors or model.safetensors.index.json; expected an HF SAM 3 snapshot"
    )


def open_safetensors(path: str) -> TensorSource:
    files = _safetensors_files(path)
    handles, meta, where = {}, {}, {}
    for fname in files:
        if not os.path.isfile(fname):
            raise CheckpointError(f"{fname}: missing shard of {path}")
        try:
            h = safe_open(fname, framework="numpy")
            for name in h.keys():
                sl = h.get_slice(name)
                meta[name] = (tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()).lower())
                where[name] = fname
        except Exception as e:
            raise CheckpointError(f"{fname}: not a readable safetensors file ({e})") from e
        handles[fname] = h

    def read(name: str) -> np.ndarray:
        h = handles[where[name]]
        if meta[name][1] == "bf16":
            raw = h.get_slice(name)
            return np.asarray(raw[...]).view(ml_dtypes.bfloat16)
        return h.get_tensor(name)

    config = None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            try:
                config = json.load(f)
            except ValueError as e:
                raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from e
    return TensorSource(path, "hf", meta, read, config)


def open_torch_checkpoint(path: str) -> TensorSource:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a declared dependency
        raise CheckpointError("reading a sam3.pt needs torch (pip install torch)") from e
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (SAM 3 sam3.pt)")
    meta = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in ckpt.items()}

    def read(name: str) -> np.ndarray:
        t = ckpt[name]
        if t.is_complex():
            raise CheckpointError(f"{name} is complex; it is never loaded")
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.detach().contiguous().numpy()

    return TensorSource(path, "pt", meta, read)


def open_checkpoint(path: str) -> TensorSource:
    """Open an HF snapshot directory, a ``.safetensors`` file or a ``sam3.pt``."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return open_safetensors(path)
    if path.endswith((".pt", ".pth")):
        return open_torch_checkpoint(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint kind; expected an HF snapshot directory, a .safetensors file or a sam3.pt"
    )


# ----------------------------------------------------------------------------
# mapping
# ----------------------------------------------------------------------------
def source_prefix(source: TensorSource, part: Part) -> Optional[str]:
    """The prefix under which ``part``'s tensors live in this checkpoint, or None."""
    names = source.meta
    for prefix in part.prefixes[source.fmt]:
        if any(n.startswith(prefix + part.probe[source.fmt]) for n in names):
            return prefix
    return None


def build_mapping(cfg: Sam3Config, source: TensorSource, parts: Sequence[str]) -> ParamMapping:
    m = ParamMapping(source.fmt)
    ctx = Context(tuple(parts), {part.name: source_prefix(source, part) for part in PARTS})
    if source.fmt == "hf" and ctx.prefixes["interactive"] == "" and builds_detector_neck(parts) \
            and "vision" in parts:
        raise CheckpointError(
            f"{source.path}: a Sam3TrackerModel checkpoint: its vision encoder's neck is the "
            "tracker's, and it holds no detector; it serves a library of parts vision,interactive")
    for part in PARTS:
        prefix = ctx.prefixes[part.name]
        if part.name in parts:
            if prefix is None:
                raise CheckpointError(
                    f"{source.path}: no {part.description} tensors found "
                    f"(looked for names like {part.prefixes[source.fmt][0]}{part.probe[source.fmt]}...); "
                    "is this a SAM 3 checkpoint?"
                )
            part.add(m, cfg, prefix, ctx)
        else:
            for owned in part.owns[source.fmt] if prefix is not None else ():
                m.part(prefix + owned, f"{part.description}: not built in this model")
            for owned in part.owns_outside(source.fmt, ctx):
                m.part(owned, f"{part.description}: not built in this model")
    for prefix in ("tracker.", "tracker_model."):
        m.part(prefix, VIDEO_TRACKER)
    return m


@dataclass
class LoadReport:
    mapped: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    unused: Dict[str, List[str]] = field(default_factory=dict)  # reason -> source names

    def summary(self) -> str:
        lines = [f"mapped {len(self.mapped)} parameters"]
        for reason, names in sorted(self.unused.items()):
            lines.append(f"unused {len(names)} tensors: {reason}")
        return "\n".join(lines)


def _short(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    s = ", ".join(names[:limit])
    return s + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def plan(cfg: Sam3Config, source: TensorSource, expected: Dict[str, Tuple[Tuple[int, ...], str]],
         parts: Sequence[str], strict: bool = True) -> Tuple[ParamMapping, LoadReport]:
    """Check, without reading data, that ``source`` gives exactly ``expected``."""
    m = build_mapping(cfg, source, parts)
    missing_ours = sorted(set(expected) - set(m.entries))
    if missing_ours:
        raise CheckpointError(f"no mapping rule for parameters: {_short(missing_ours)}")
    report = LoadReport()
    used = set()
    missing_src = []
    for ours in expected:
        src = m.entries[ours]
        lost = [n for n in src.names if n not in source.meta]
        if lost:
            missing_src.extend(lost)
            continue
        used.update(src.names)
        report.mapped[ours] = src.names
    if missing_src:
        raise CheckpointError(
            f"{source.path}: missing tensors needed by the model: {_short(missing_src)}"
        )
    unexpected = []
    for name in source.meta:
        if name in used:
            continue
        reason = m.unused_reason(name)
        if reason is None:
            unexpected.append(name)
        else:
            report.unused.setdefault(reason, []).append(name)
    if unexpected and strict:
        raise CheckpointError(f"{source.path}: unexpected tensors (not mapped): {_short(unexpected)}")
    if unexpected:
        report.unused.setdefault("unexpected (not mapped)", []).extend(unexpected)
    # shape check from metadata (transforms are shape-checked after building)
    return m, report


def load_params(cfg: Sam3Config, source: TensorSource,
                expected: Dict[str, Tuple[Tuple[int, ...], str]],
                parts: Sequence[str], strict: bool = True) -> Tuple[Dict[str, np.ndarray], LoadReport]:
    """Build every expected parameter (ordered as ``expected``) from ``source``.

    ``expected``: our name -> (shape, dtype) (dtype is the cast target).
    """
    m, report = plan(cfg, source, expected, parts, strict)
    out: Dict[str, np.ndarray] = {}
    bad, nonfinite, too_big = [], [], []
    for ours, (shape, dtype) in expected.items():
        src = m.entries[ours]
        arr = src.build([source.read(n) for n in src.names])
        if tuple(arr.shape) != tuple(shape):
            got = {n: source.meta[n][0] for n in src.names}
            bad.append(f"{ours}: expected {tuple(shape)}, got {tuple(arr.shape)} from {got}")
            continue
        if not np.issubdtype(np.asarray(arr).dtype, np.floating) and arr.dtype.name != "bfloat16":
            bad.append(f"{ours}: expected floating point data, got {arr.dtype} from {src.names}")
            continue
        arr = np.asarray(arr)
        wide = arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr
        finite = np.isfinite(wide)
        if not finite.all():
            nonfinite.append(f"{ours} ({int(arr.size - finite.sum())} of {arr.size} values NaN or "
                             f"infinite, from {', '.join(src.names)})")
            continue
        limit = _LARGEST.get(np.dtype(dtype).name)
        if limit is not None and wide.size:
            peak = float(np.abs(wide).max())
            if peak > limit:
                too_big.append(f"{ours} (|value| up to {peak:.6g}, from {', '.join(src.names)})")
                continue
        out[ours] = np.ascontiguousarray(arr.astype(dtype))
    if bad:
        raise CheckpointError(f"{source.path}: wrong shapes or dtypes:\n  " + "\n  ".join(bad))
    if nonfinite:
        raise CheckpointError(f"{source.path}: tensors holding NaN or infinite values (a damaged or "
                              f"diverged checkpoint; nothing was written):\n  " + "\n  ".join(nonfinite))
    if too_big:
        dt = np.dtype(next(iter(expected.values()))[1]).name
        raise CheckpointError(
            f"{source.path}: tensors holding values beyond {dt}'s range (largest {_LARGEST[dt]:g}), "
            f"which would become infinities (the original SAM 3 does not clamp weights either; "
            f"nothing was written); use a float32 library (compile --dtype float32):\n  "
            + "\n  ".join(too_big))
    return out, report
