"""Post-processing for labelling: ``post_process_instances``' result (the original SAM 3's:
mask logits resized bilinearly, then sigmoid, then ``> mask_threshold``) with less work per
pixel, which dominates a labelling job's CPU time (tens of masks per image at full size).

* The resize runs along the width on the source rows first, then along the height: each output
  value is the same two products and sums, in the same order, as ``resize_bilinear``'s (its
  ``top``/``bot`` rows are rows of the width pass), so the floats are identical.
* The threshold is taken on the logits: ``sigmoid`` is monotonic, so a pixel whose logit lies
  clearly above (below) ``logit(mask_threshold)`` is in (out of) the mask; only pixels within
  ``BAND`` of it go through the float32 sigmoid and the comparison ``post_process_instances``
  makes. ``BAND`` is far wider than the float32 sigmoid's rounding seen in logit space (below
  1e-4 for thresholds in [0.001, 0.999]); other thresholds take the sigmoid everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from sam3_nn.runtime import ffi
from sam3_nn.runtime.postprocess import _linear_indices, sigmoid

BAND = 1e-2


def resize_bilinear(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``[k, h, w]`` float32 -> ``[k, H, W]``: ``postprocess.resize_bilinear``'s values."""
    x = np.asarray(x, dtype=np.float32)
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    h0, h1, hl0, hl1 = _linear_indices(in_h, out_h)
    w0, w1, wl0, wl1 = _linear_indices(in_w, out_w)
    hl0, hl1 = hl0[:, None], hl1[:, None]
    out = np.empty((x.shape[0], out_h, out_w), np.float32)
    for k in range(x.shape[0]):
        rows = wl0 * x[k][:, w0] + wl1 * x[k][:, w1]  # [in_h, W]: the width pass once per source row
        top, bot = out[k], np.empty((out_h, out_w), np.float32)
        np.take(rows, h0, axis=0, out=top)
        np.take(rows, h1, axis=0, out=bot)
        top *= hl0  # in place: the same products and sum as hl0 * top + hl1 * bot
        bot *= hl1
        top += bot
    return out


def masks_above(logits: np.ndarray, size: Tuple[int, int], threshold: float) -> np.ndarray:
    """``sigmoid(resize_bilinear(logits, size)) > threshold`` -> ``[k, H, W]`` bool."""
    values = resize_bilinear(logits, size)
    t = float(threshold)
    if not 0.001 <= t <= 0.999:
        return sigmoid(values) > np.float32(t)
    edge = math.log(t / (1.0 - t))
    out = values > np.float32(edge + BAND)
    near = values >= np.float32(edge - BAND)
    near &= ~out
    out[near] = sigmoid(values[near]) > np.float32(t)
    return out


@dataclass
class Candidates:
    """One image's objects for one prompt before their masks are made: what ``finish`` needs,
    copied out of a batch's outputs so the batch can be freed."""

    scores: np.ndarray  # [N] float32, detection x presence, above the score threshold
    boxes: np.ndarray  # [N, 4] float32, xyxy in [0, 1]
    mask_logits: np.ndarray  # [N, h, w] float32


def select(raw: Dict[str, np.ndarray], index: int, threshold: float) -> Candidates:
    """Image ``index`` of a batch's raw outputs: the queries scoring above ``threshold``.
    ``pred_masks`` may still be on the device: then only the kept queries' rows are copied."""
    scores, keep = kept_queries(raw, index, threshold)
    masks = raw["pred_masks"]
    if ffi.is_tensor(masks):
        queries = int(masks.shape[1])
        kept = ffi.rows_to_numpy(masks, 2, index * queries + keep)
    else:
        kept = masks[index][keep]
    return Candidates(scores, np.asarray(raw["pred_boxes"][index][keep], np.float32),
                      np.asarray(kept, np.float32))


def kept_queries(raw: Dict[str, np.ndarray], index: int, threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``index``'s queries scoring above ``threshold`` -> (their scores, their indices)."""
    scores = sigmoid(np.asarray(raw["pred_logits"][index], np.float32))
    presence = raw.get("presence_logits")
    if presence is not None:
        scores = (scores * sigmoid(np.asarray(presence[index], np.float32))).astype(np.float32)
    keep = np.nonzero(scores > threshold)[0]
    return scores[keep], keep


def finish(c: Candidates, original_size: Tuple[int, int], mask_threshold: float
           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (scores ``[N]``, boxes ``[N, 4]`` xyxy pixels, masks ``[N, H, W]`` bool)."""
    h, w = int(original_size[0]), int(original_size[1])
    boxes = (c.boxes * np.array([w, h, w, h], np.float32)).astype(np.float32)
    if len(c.scores):
        masks = masks_above(c.mask_logits, (h, w), mask_threshold)
    else:
        masks = np.zeros((0, h, w), bool)
    return c.scores, boxes, masks


def post_process(raw: Dict[str, np.ndarray], original_size: Tuple[int, int], threshold: float,
                 mask_threshold: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image 0 of ``raw`` -> (scores, boxes, masks): ``post_process_instances``' objects, in
    query order."""
    return finish(select(raw, 0, threshold), original_size, mask_threshold)
