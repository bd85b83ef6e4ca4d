"""COCO run-length encoding of binary masks (the format of pycocotools' ``mask.encode``).

A mask ``[H, W]`` is read column by column (Fortran order); ``counts`` alternates
runs of 0s and 1s, starting with 0s (a mask starting with 1 has a leading 0 count).
``encode`` gives the compressed form ``{"size": [H, W], "counts": "<ascii>"}``
(pycocotools' string encoding: differences to the count two back, 5 bits per
character, offset 48); ``counts_to_string``/``string_to_counts`` convert between
the two forms.
"""

from __future__ import annotations

from typing import Dict, List, Union

import numpy as np


def mask_to_counts(mask: np.ndarray) -> List[int]:
    """Uncompressed COCO counts of a 2-D mask."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    flat = m.astype(bool).ravel(order="F")
    n = flat.size
    if n == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [n]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def counts_to_mask(counts: List[int], size: List[int]) -> np.ndarray:
    h, w = int(size[0]), int(size[1])
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}x{w}={h * w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    flat = np.repeat(values, np.asarray(counts, dtype=np.int64))
    return flat.reshape((w, h)).T.copy()


def counts_to_string(counts: List[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences stay negative
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def string_to_counts(s: str) -> List[int]:
    counts: List[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> Dict[str, Union[List[int], str]]:
    """``[H, W]`` binary mask -> ``{"size": [H, W], "counts": str}`` (COCO compressed RLE)."""
    m = np.asarray(mask)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts_to_string(mask_to_counts(m))}


def decode(rle: Dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> ``[H, W]`` bool mask."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = string_to_counts(counts)
    return counts_to_mask(list(counts), rle["size"])
