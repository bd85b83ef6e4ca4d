"""A pure-PyTorch RoIAlign with the semantics of ``torchvision.ops.roi_align``.

torchvision cannot be imported beside the CPU torch of this project, so this is
the reference the geometry encoder's box pooling is tested against (and what the
transformers model is given in place of ``torchvision.ops.roi_align``).

Written from torchvision's documented algorithm (``roi_align_kernel.cpp``):
per box and output bin, average ``gh x gw`` bilinear samples; all scalar
arithmetic in the input's float type (float32 here, as torchvision's kernel
uses ``T``). Slow and simple on purpose: a scalar loop over boxes, bins and
samples, vectorised over channels only.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import numpy as np
import torch

f32 = np.float32


def _bilinear(feat: torch.Tensor, y: np.float32, x: np.float32) -> torch.Tensor:
    """``bilinear_interpolate`` of torchvision for one point, over all channels of ``feat[C, H, W]``."""
    _, height, width = feat.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feat.shape[0], dtype=feat.dtype)
    y = max(y, f32(0.0))
    x = max(x, f32(0.0))
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - f32(y_low)), f32(x - f32(x_low))
    hy, hx = f32(1.0) - ly, f32(1.0) - lx
    w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
    return (float(w1) * feat[:, y_low, x_low] + float(w2) * feat[:, y_low, x_high]
            + float(w3) * feat[:, y_high, x_low] + float(w4) * feat[:, y_high, x_high])


def _as_rois(boxes: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """``[K, 5]`` (batch index, x1, y1, x2, y2) from a ``[K, 5]`` tensor or a list of ``[L_i, 4]``."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes tensor must be [K, 5], got {tuple(boxes.shape)}")
        return boxes
    rois = []
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be [L, 4], got {tuple(b.shape)}")
        rois.append(torch.cat([torch.full((b.shape[0], 1), float(i), dtype=b.dtype), b], dim=1))
    return torch.cat(rois, dim=0) if rois else torch.zeros(0, 5)


def roi_align(input: torch.Tensor, boxes, output_size: Union[int, Tuple[int, int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> torch.Tensor:
    """``[N, C, H, W]`` features, boxes as torchvision takes them -> ``[K, C, R_h, R_w]``."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    out_h, out_w = output_size
    rois = _as_rois(boxes).to(torch.float32)
    feats = input.detach().to(torch.float32)
    out = torch.zeros(rois.shape[0], input.shape[1], out_h, out_w, dtype=torch.float32)
    offset = f32(0.5) if aligned else f32(0.0)
    scale = f32(spatial_scale)
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        x1, y1, x2, y2 = (f32(v) * scale - offset for v in rois[k, 1:].tolist())
        roi_w, roi_h = f32(x2 - x1), f32(y2 - y1)
        if not aligned:
            roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
        bin_h, bin_w = f32(roi_h / f32(out_h)), f32(roi_w / f32(out_w))
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(f32(roi_h / f32(out_h))))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(f32(roi_w / f32(out_w))))
        count = f32(max(gh * gw, 1))
        for ph in range(out_h):
            for pw in range(out_w):
                acc = torch.zeros(input.shape[1], dtype=torch.float32)
                for iy in range(gh):
                    y = f32(y1 + f32(ph) * bin_h) + f32(f32(f32(iy + 0.5) * bin_h) / f32(gh))
                    for ix in range(gw):
                        x = f32(x1 + f32(pw) * bin_w) + f32(f32(f32(ix + 0.5) * bin_w) / f32(gw))
                        acc = acc + _bilinear(feats[b], y, x)
                out[k, :, ph, pw] = acc / float(count)
    return out.to(input.dtype)
