"""Post-processing as the original SAM 3's ``Sam3Processor._forward_grounding``, in numpy.

* scores = sigmoid(pred_logits) * sigmoid(presence_logits); keep ``score > threshold``
  (0.5 by default: the original processor's ``confidence_threshold``)
* boxes (``xyxy`` in [0, 1]) * (width, height, width, height) of the original image
* masks: the mask *logits* resized bilinearly to the original size
  (``align_corners=False``, no antialiasing: PyTorch's ``F.interpolate(mode="bilinear")``,
  replicated below in float32 with the same source indices, weights and summation order;
  measured within 5e-7 of it), then sigmoid, then ``> mask_threshold``. Only pixels whose
  interpolated value lies within a few float32 ulps of the threshold can come out
  differently. ``transformers`` resizes the probabilities instead (sigmoid first), which
  moves mask edges (docs/fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)


def _linear_indices(in_size: int, out_size: int):
    """PyTorch's source indices and weights for ``align_corners=False`` (no scale given)."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # ``scale * (dst + 0.5) - 0.5`` rounded once, as PyTorch's compiled kernel does (fused
    # multiply-add): the float32 product is exact in float64
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor (src >= 0)
    lam1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, lam0, lam1


def resize_bilinear(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``[..., H, W]`` float32 -> ``[..., h, w]`` like ``F.interpolate(bilinear, align_corners=False)``."""
    x = np.asarray(x, dtype=np.float32)
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    h0, h1, hl0, hl1 = _linear_indices(in_h, out_h)
    w0, w1, wl0, wl1 = _linear_indices(in_w, out_w)
    hl0, hl1 = hl0[:, None], hl1[:, None]
    out = np.empty(x.shape[:-2] + (out_h, out_w), np.float32)
    flat_in = x.reshape(-1, in_h, in_w)
    flat_out = out.reshape(-1, out_h, out_w)
    for k in range(flat_in.shape[0]):  # one map at a time: bounded memory
        # each source row interpolated along the width once; output rows then mix two of
        # them: the same products and sums as PyTorch's, on in_h rows instead of out_h
        a = flat_in[k]
        rows = wl0 * a[:, w0] + wl1 * a[:, w1]
        o = flat_out[k]
        np.take(rows, h0, axis=0, out=o)  # in place: no full-size temporaries but one
        o *= hl0
        other = np.take(rows, h1, axis=0)
        other *= hl1
        o += other
    return out


@dataclass
class Detections:
    """Objects found in one image; arrays are ordered as the model's queries."""

    boxes: np.ndarray  # [N, 4] float32, xyxy pixels of the original image
    scores: np.ndarray  # [N] float32, detection x presence
    masks: np.ndarray  # [N, H, W] bool at the original resolution
    query_index: np.ndarray  # [N] int64: which query each object came from
    raw: Dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def post_process_instances(raw: Dict[str, np.ndarray], original_size: Tuple[int, int],
                           threshold: float = 0.5, mask_threshold: float = 0.5,
                           batch_index: int = 0) -> Detections:
    """Raw outputs (``pred_logits [B, Q]``, ``pred_boxes [B, Q, 4]``, ``pred_masks [B, Q, h, w]``,
    optional ``presence_logits [B, 1]``) of image ``batch_index`` -> its objects."""
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        if name not in raw:
            raise KeyError(f"raw outputs lack {name!r} (have {sorted(raw)})")
    h, w = int(original_size[0]), int(original_size[1])
    scores = sigmoid(raw["pred_logits"][batch_index])
    presence = raw.get("presence_logits")
    if presence is not None:
        scores = (scores * sigmoid(np.asarray(presence)[batch_index])).astype(np.float32)
    keep = np.nonzero(scores > threshold)[0]
    scale = np.array([w, h, w, h], np.float32)
    boxes = (np.asarray(raw["pred_boxes"][batch_index], np.float32)[keep] * scale).astype(np.float32)
    logits = np.asarray(raw["pred_masks"][batch_index])[keep]
    if len(keep):
        # logits resized, then sigmoid, as the original (not the port's probabilities)
        masks = sigmoid(resize_bilinear(logits, (h, w))) > np.float32(mask_threshold)
    else:
        masks = np.zeros((0, h, w), bool)
    return Detections(boxes, scores[keep], masks, keep.astype(np.int64), dict(raw))
