"""Our converted parameters as one ``.safetensors`` file (readable with numpy alone)."""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Tuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sam3_nn.weights.loader import CheckpointError


def save_converted(path: str, params: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write atomically: a temporary file in the same folder, renamed when complete."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, tmp,
                  metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
