"""Interactive segmentation on the runtime side: prompts into ``predict_masks``' slots, its
outputs back to masks at the image's size, as the original SAM 3's image predictor
(``Sam3Image.predict_inst`` -> ``SAM3InteractiveImagePredictor``, ``sam1_task_predictor.py``
and ``SAM2Transforms``, ``model/utils/sam1_utils.py``). numpy only.

Prompts: clicks ``(x, y)`` in pixels of the original image with labels (1 positive, 0
negative), at most one box ``(x0, y0, x1, y1)``, a previous call's low-resolution logits.
Coordinates go to the model's input as the original's ``transform_coords``: ``x / w *
S``, ``y / h * S`` in float32 (the model adds the half-pixel shift); the box becomes its
two corners, labels 2 and 3, placed before the clicks. Slots past the prompt are empty
(``point_mask`` 0). A mask prompt is used as given (``[4g, 4g]`` logits, 288 x 288 at
1008 px: the ``low_res_logits`` a call returns).

Outputs: ``multimask`` -> the three multimask outputs (slots 1..3), else the single-mask
output (slot 0, the dynamic choice). Masks at the original size: holes of the low-res
mask (8-connected background components, ``logit <= threshold``, of at most
``max_hole_area`` pixels, 256 in the original) are set to ``threshold + 10``, the logits are
resized bilinearly (``align_corners=False``) and thresholded (``> threshold``, 0 by
default). The low-res logits returned for refinement are the model's, unfilled, clamped to
+-32 (docs/fidelity.md T10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from sam3_nn.runtime.postprocess import resize_bilinear
from sam3_nn.runtime.preprocess import InputError

MAX_HOLE_AREA = 256.0  # SAM3InteractiveImagePredictor(max_hole_area=256.0)
LOW_RES_CLAMP = 32.0  # _predict: torch.clamp(low_res_masks, -32.0, 32.0)
HOLE_FILL = 10.0  # SAM2Transforms.postprocess_masks: holes become threshold + 10
BOX_LABELS = (2, 3)  # top-left, bottom-right corner


@dataclass
class Prompt:
    """``predict_masks``' prompt inputs for one image (batch 1)."""

    points: np.ndarray  # [1, P, 2] float32, pixels of the model input
    labels: np.ndarray  # [1, P] int32
    mask: np.ndarray  # [1, P] int32, 1 = valid slot
    mask_input: np.ndarray  # [1, 1, 4g, 4g] float32
    mask_valid: np.ndarray  # [1] int32
    count: int  # valid points (a box counts two)


@dataclass
class InteractiveResult:
    """One object from clicks / a box / a mask: ``K`` candidate masks (3 with ``multimask``,
    else 1), in the model's order."""

    masks: np.ndarray  # [K, H, W] bool at the original resolution
    scores: np.ndarray  # [K] float32, predicted IoU
    low_res_logits: np.ndarray  # [K, 4g, 4g] float32, clamped to +-32: a later call's mask_input
    object_score: float  # object score logit (> 0: an object is present)
    raw: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def best(self) -> int:
        """Index of the candidate with the highest predicted IoU."""
        return int(np.argmax(self.scores))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def parse_point(text: str) -> Tuple[Tuple[float, float], int]:
    """``"x,y"`` or ``"x,y:neg"`` (``:pos`` too) -> ((x, y), label)."""
    spec, _, kind = text.partition(":")
    kind = kind.strip().lower() or "pos"
    if kind not in ("pos", "neg"):
        raise InputError(f"point {text!r}: label must be ':pos' or ':neg', got {kind!r}")
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2:
        raise InputError(f"point {text!r}: expected x,y (2 numbers), got {len(parts)} values")
    try:
        xy = (float(parts[0]), float(parts[1]))
    except ValueError as e:
        raise InputError(f"point {text!r}: not a number ({e})") from None
    return xy, 1 if kind == "pos" else 0


def check_points(points, labels, original_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Clicks in pixels of the image -> (``[N, 2]`` float32, ``[N]`` int32 labels)."""
    h, w = original_size
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
    if arr.ndim == 1 and arr.size == 2:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"points must be a list of (x, y) pixel coordinates, got shape {arr.shape}")
    if labels is None:
        lab = np.ones(len(arr), np.int32)
    else:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != arr.shape[0]:
            raise InputError(f"{arr.shape[0]} points but {lab.shape[0]} point labels")
        if not np.isin(lab, (0, 1)).all():
            raise InputError(f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(lab.tolist()))}")
        lab = lab.astype(np.int32)
    for i, (x, y) in enumerate(arr.tolist()):  # Python floats: messages read [600.0, 40.0]
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InputError(f"point {i}: coordinates must be finite, got {[x, y]}")
        if not (0 <= x <= w and 0 <= y <= h):
            raise InputError(f"point {i}: {[x, y]} lies outside the {w}x{h} image")
    return arr.astype(np.float32), lab


def check_box(box, original_size: Tuple[int, int]) -> np.ndarray:
    """One ``xyxy`` pixel box -> ``[4]`` float32."""
    h, w = original_size
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,):
        raise InputError(f"box must be one [x0, y0, x1, y1] (pixels), got {np.asarray(box).shape}")
    x0, y0, x1, y1 = (float(v) for v in b)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"box coordinates must be finite, got {[x0, y0, x1, y1]}")
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"box: expected x0 < x1 and y0 < y1 (xyxy pixels), got {[x0, y0, x1, y1]}")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise InputError(f"box {[x0, y0, x1, y1]} lies outside the {w}x{h} image")
    return b.astype(np.float32)


def to_model_coords(xy: np.ndarray, original_size: Tuple[int, int], image_size: int) -> np.ndarray:
    """``[..., 2]`` pixels of the image -> pixels of the ``S x S`` model input, float32, as
    ``SAM2Transforms.transform_coords(normalize=True)``: ``x / w * S``."""
    h, w = original_size
    out = np.asarray(xy, np.float32).copy()
    out[..., 0] = out[..., 0] / np.float32(w)
    out[..., 1] = out[..., 1] / np.float32(h)
    return (out * np.float32(image_size)).astype(np.float32)


def make_prompt(points, labels, box, mask_input, original_size: Tuple[int, int], image_size: int,
                slots: int, mask_size: int) -> Prompt:
    """Validated prompt -> ``predict_masks``' slot inputs (module docstring)."""
    if points is None and labels is not None:
        raise InputError("point labels given without points")
    pts, lab = check_points(points if points is not None else [], labels, original_size)
    rows, row_labels = [], []
    if box is not None:
        b = check_box(box, original_size)
        rows.append(b.reshape(2, 2))
        row_labels.append(np.array(BOX_LABELS, np.int32))
    rows.append(pts)
    row_labels.append(lab)
    all_pts = np.concatenate(rows, 0)
    all_lab = np.concatenate(row_labels, 0)
    n = len(all_pts)
    if n > slots:
        raise InputError(f"{len(pts)} points{' and a box (2 points)' if box is not None else ''} given; "
                         f"this library takes at most {slots} points (compile with --max-points)")
    out_pts = np.zeros((1, slots, 2), np.float32)
    out_lab = np.zeros((1, slots), np.int32)
    valid = np.zeros((1, slots), np.int32)
    out_pts[0, :n] = to_model_coords(all_pts, original_size, image_size)
    out_lab[0, :n] = all_lab
    valid[0, :n] = 1
    mi = np.zeros((1, 1, mask_size, mask_size), np.float32)
    mv = np.zeros((1,), np.int32)
    if mask_input is not None:
        m = np.asarray(mask_input)
        if m.ndim == 4 and m.shape[:2] == (1, 1):
            m = m[0, 0]
        elif m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        if m.shape != (mask_size, mask_size):
            raise InputError(f"mask_input must be {mask_size}x{mask_size} low-resolution logits (one of a "
                             f"previous call's low_res_logits), got shape {np.asarray(mask_input).shape}")
        if not np.issubdtype(m.dtype, np.floating) or not np.isfinite(m).all():
            raise InputError("mask_input must hold finite floating-point logits")
        mi[0, 0] = m
        mv[0] = 1
    if n == 0 and mask_input is None:
        raise InputError("give a prompt: points, a box or a mask_input")
    return Prompt(out_pts, out_lab, valid, mi, mv, n)


def background_components(background: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of a 2D bool array's True pixels, as runs: ``(row, start, end,
    component)`` arrays (``end`` exclusive), one entry per horizontal run. Runs of
    neighbouring rows touch when ``start_a <= end_b and start_b <= end_a`` (exclusive ends:
    diagonal contact included); components are found by label propagation with pointer
    jumping on the graph of touching runs."""
    h, w = background.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = background
    d = np.diff(padded, axis=1)
    r_start, c_start = np.nonzero(d == 1)
    r_end, c_end = np.nonzero(d == -1)  # row-major: starts and ends pair up in order
    n = len(r_start)
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    first = np.searchsorted(r_start, np.arange(h + 1))  # runs of row r: first[r]:first[r+1]
    src, dst = [], []
    for r in range(1, h):
        a0, a1, b0, b1 = first[r - 1], first[r], first[r], first[r + 1]
        if a0 == a1 or b0 == b1:
            continue
        sa, ea = c_start[a0:a1], c_end[a0:a1]
        sb, eb = c_start[b0:b1], c_end[b0:b1]
        lo = np.searchsorted(ea, sb, side="left")  # first run above whose end reaches sb
        hi = np.searchsorted(sa, eb, side="right")  # past the last run above starting by eb
        count = np.maximum(hi - lo, 0)
        if count.sum() == 0:
            continue
        b_idx = np.repeat(np.arange(b0, b1), count)
        offs = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        a_idx = a0 + np.repeat(lo, count) + offs
        src.append(a_idx)
        dst.append(b_idx)
    comp = np.arange(n)
    if src:
        a = np.concatenate(src)
        b = np.concatenate(dst)
        while True:
            m = np.minimum(comp[a], comp[b])
            new = comp.copy()
            np.minimum.at(new, a, m)
            np.minimum.at(new, b, m)
            new = new[new]  # pointer jumping
            while True:
                jumped = new[new]
                if np.array_equal(jumped, new):
                    break
                new = jumped
            if np.array_equal(new, comp):
                break
            comp = new
    return r_start, c_start, c_end, comp


def fill_holes(logits: np.ndarray, max_area: float, threshold: float = 0.0) -> np.ndarray:
    """``[H, W]`` logits with every background component (8-connected, ``<= threshold``) of at
    most ``max_area`` pixels set to ``threshold + 10``, as ``SAM2Transforms.postprocess_masks``
    (whose CPU path labels with ``skimage.measure.label``, full connectivity)."""
    logits = np.asarray(logits, np.float32)
    if max_area <= 0:
        return logits
    rows, starts, ends, comp = background_components(logits <= threshold)
    if len(rows) == 0:
        return logits
    area = np.bincount(comp, weights=ends - starts)
    hole = area[comp] <= max_area
    if not hole.any():
        return logits
    h, w = logits.shape
    cover = np.zeros((h, w + 1), np.int32)
    np.add.at(cover, (rows[hole], starts[hole]), 1)
    np.add.at(cover, (rows[hole], ends[hole]), -1)
    filled = np.cumsum(cover, axis=1)[:, :w] > 0
    return np.where(filled, np.float32(threshold + HOLE_FILL), logits).astype(np.float32)


def post_process(raw: Dict[str, np.ndarray], multimask: bool, original_size: Tuple[int, int],
                 mask_threshold: float = 0.0, max_hole_area: float = MAX_HOLE_AREA,
                 batch_index: int = 0) -> InteractiveResult:
    """``predict_masks``' outputs (``pred_masks [B, 4, 4g, 4g]``, ``iou_scores [B, 4]``,
    ``object_score_logits [B, 1]``) of image ``batch_index`` -> the result (module docstring)."""
    take = slice(1, 4) if multimask else slice(0, 1)
    low = np.asarray(raw["pred_masks"][batch_index, take], np.float32)
    scores = np.asarray(raw["iou_scores"][batch_index, take], np.float32)
    obj = float(np.asarray(raw["object_score_logits"]).reshape(-1)[batch_index])
    filled = np.stack([fill_holes(m, max_hole_area, mask_threshold) for m in low])
    masks = resize_bilinear(filled, original_size) > np.float32(mask_threshold)
    clamped = np.clip(low, -LOW_RES_CLAMP, LOW_RES_CLAMP).astype(np.float32)
    return InteractiveResult(masks, scores, clamped, obj, dict(raw))


def mask_box(mask: np.ndarray) -> Optional[Sequence[float]]:
    """The ``xyxy`` pixel box around a bool mask's pixels (None for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
