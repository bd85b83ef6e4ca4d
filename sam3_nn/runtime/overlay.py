"""Draw detections on the image: translucent masks, box outlines, ``label score`` tags."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# distinct, saturated colours (RGB)
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (255, 225, 25), (128, 128, 128),
]

PROMPT_COLOR = (255, 255, 255)
POINT_POSITIVE = (0, 200, 0)
POINT_NEGATIVE = (230, 0, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_overlay(rgb: np.ndarray, boxes: np.ndarray, scores: np.ndarray, masks: np.ndarray,
                 label: str = "", alpha: float = 0.45,
                 prompt_boxes: Optional[Sequence[Sequence[float]]] = None,
                 prompt_labels: Optional[Sequence[int]] = None,
                 prompt_points: Optional[Sequence[Sequence[float]]] = None,
                 prompt_point_labels: Optional[Sequence[int]] = None) -> Image.Image:
    """``rgb`` ``[H, W, 3]`` uint8 + objects -> RGB PIL image.

    Prompt boxes (if given) are drawn dashed-looking in white (positive) or black (negative);
    prompt points (clicks) as discs, green (positive) or red (negative), outlined in white.
    """
    h, w = rgb.shape[:2]
    out = rgb.astype(np.float32)
    order = np.argsort(-np.asarray(scores))  # best last drawn on top
    for rank, i in enumerate(order[::-1]):
        color = np.array(PALETTE[int(i) % len(PALETTE)], np.float32)
        m = masks[i].astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * color
    img = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(min(h, w) / 300))
    font = _font(max(12, round(min(h, w) / 40)))
    for i in order[::-1]:
        color = PALETTE[int(i) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        tag = f"{label} {float(scores[i]):.2f}".strip()
        tb = draw.textbbox((0, 0), tag, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 2 * width if y0 - th - 2 * width >= 0 else y0
        tx = min(max(0.0, x0), max(0.0, w - tw - 2 * width))
        draw.rectangle([tx, ty, tx + tw + 2 * width, ty + th + 2 * width], fill=color)
        draw.text((tx + width - tb[0], ty + width - tb[1]), tag, fill=(0, 0, 0), font=font)
    for k, b in enumerate(prompt_boxes or []):
        neg = prompt_labels is not None and int(prompt_labels[k]) == 0
        c = (0, 0, 0) if neg else PROMPT_COLOR
        x0, y0, x1, y1 = (float(v) for v in b)
        draw.rectangle([x0, y0, x1, y1], outline=c, width=max(1, width // 2))
    radius = max(3, round(min(h, w) / 120))
    for k, (x, y) in enumerate(prompt_points or []):
        neg = prompt_point_labels is not None and int(prompt_point_labels[k]) == 0
        fill = POINT_NEGATIVE if neg else POINT_POSITIVE
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill,
                     outline=PROMPT_COLOR, width=max(1, radius // 3))
    return img
