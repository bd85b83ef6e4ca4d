"""COCO run-length encoding of binary masks, through ``pycocotools`` (the COCO API's own codec).

A mask ``[H, W]`` is read column by column (Fortran order); ``counts`` alternates runs of
0s and 1s, starting with 0s. ``encode`` gives the compressed form
``{"size": [H, W], "counts": "<ascii>"}`` with ``counts`` as ``str`` (JSON-ready; pycocotools
gives ``bytes``); ``decode`` takes that form, ``bytes`` counts, or uncompressed list counts.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Union

import numpy as np
from pycocotools import mask as _coco_mask

# pycocotools' decode converts its RLE objects without numpy 2's ``copy`` keyword: a warning
# per call about their API, nothing about the result
warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                        category=DeprecationWarning, module="pycocotools")
Rle = Dict[str, Union[List[int], str]]


def _as_str(rle: Dict) -> Rle:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode(mask: np.ndarray) -> Rle:
    """``[H, W]`` binary mask -> ``{"size": [H, W], "counts": str}`` (COCO compressed RLE)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    return _as_str(_coco_mask.encode(np.asfortranarray(m.astype(bool, copy=False), dtype=np.uint8)))


def encode_many(masks: np.ndarray) -> List[Rle]:
    """``[N, H, W]`` binary masks -> N compressed RLEs (one pycocotools call)."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise ValueError(f"expected [N, H, W] masks, got shape {m.shape}")
    if m.shape[0] == 0:
        return []
    # pycocotools takes [H, W, N] in Fortran order: each mask column-major, one after another
    stacked = np.asfortranarray(np.transpose(m.astype(bool, copy=False), (1, 2, 0)), dtype=np.uint8)
    return [_as_str(r) for r in _coco_mask.encode(stacked)]


def _to_coco(rle: Dict) -> Dict:
    h, w = int(rle["size"][0]), int(rle["size"][1])
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [h, w], "counts": counts}
    counts = [int(c) for c in counts]
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h}x{w}={h * w}")
    return _coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)


def decode(rle: Dict) -> np.ndarray:
    """COCO RLE (compressed ``str``/``bytes`` or uncompressed list counts) -> ``[H, W]`` bool mask."""
    return _coco_mask.decode(_to_coco(rle)).astype(bool)


def area(rles: Sequence[Dict]) -> np.ndarray:
    """Pixels set in each RLE -> ``[N]`` int64."""
    if not len(rles):
        return np.zeros(0, np.int64)
    return np.asarray(_coco_mask.area([_to_coco(r) for r in rles]), np.int64)


def iou(a: Sequence[Dict], b: Sequence[Dict]) -> np.ndarray:
    """Mask IoU of every RLE in ``a`` with every RLE in ``b`` -> ``[len(a), len(b)]`` float64."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(_coco_mask.iou([_to_coco(r) for r in a], [_to_coco(r) for r in b],
                                      [0] * len(b)), np.float64).reshape(len(a), len(b))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``xyxy`` boxes ``a [N, 4]`` with ``b [M, 4]`` -> ``[N, M]`` float64 (pycocotools)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    xywh = lambda x: np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], 1)  # noqa: E731
    return np.asarray(_coco_mask.iou(xywh(a), xywh(b), [0] * len(b)), np.float64).reshape(len(a), len(b))
