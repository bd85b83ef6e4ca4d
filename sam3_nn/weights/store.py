"""Our converted parameters as one ``.safetensors`` file (readable with numpy alone)."""

from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO, Dict, Tuple

import numpy as np
from safetensors import safe_open

from sam3_nn.files import atomic_write
from sam3_nn.weights.loader import CheckpointError

# numpy dtype -> safetensors dtype name (the dtypes a library's parameters can have)
_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32",
           "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(f: BinaryIO, params: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """The safetensors format (8-byte header size, JSON header padded to 8 bytes, the tensors'
    bytes in order) streamed to ``f``. ``safetensors.numpy.save_file`` takes only a path and
    writes its own temporary file beside it (a killed process leaves it behind);
    ``safetensors.numpy.save`` would hold a second copy of every tensor in memory."""
    header, offset, arrays = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0, []
    for name, value in params.items():
        a = np.asarray(value)
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (which makes 0-d arrays 1-d)
        if a.dtype.name not in _DTYPES:
            raise CheckpointError(f"tensor {name}: dtype {a.dtype} cannot be stored")
        header[name] = {"dtype": _DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)
    for a in arrays:
        if a.size:  # little-endian bytes, without a copy on little-endian machines
            f.write(memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False).reshape(-1)).cast("B"))


def save_converted(path: str, params: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write atomically (``sam3_nn.files.atomic_write``): nothing at or beside ``path`` until the
    file is complete, even when the process is killed."""
    atomic_write(path, lambda f: write_safetensors(f, params, metadata))


def load_converted(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a file written by ``save_converted``: (params, metadata)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            params = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != "sam3_nn":
        raise CheckpointError(
            f"{path}: not converted sam3_nn weights (metadata format={meta.get('format')!r}); "
            "convert a checkpoint with `python -m sam3_nn convert`"
        )
    return params, meta
