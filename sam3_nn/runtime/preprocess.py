"""Image and prompt pre-processing as SAM 3's (transformers ``Sam3ImageProcessor`` /
``Sam3Processor``), with numpy and Pillow only.

Image: convert to RGB (transparency composited onto white), resize to the model's
square size *without* keeping the aspect ratio, bilinear with antialiasing on the
uint8 image (Pillow's ``BILINEAR`` is the filter the reference's uint8 resize was
written to reproduce), rescale by 1/255 and normalise with mean 0.5 / std 0.5
(fused as ``(x - 127.5) / 127.5`` in float32, as the reference does), channels first.

Boxes: ``xyxy`` in pixels of the original image -> divided by the original width
and height -> ``cxcywh`` in [0, 1]; labels 1 (positive) / 0 (negative).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam3_nn.errors import InputError

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]

MEAN = 0.5
STD = 0.5
RESCALE = 1.0 / 255.0


# Pillow's image modes holding more than 8 bits per value (16-bit PNG/TIFF greys): scaled to
# 0..255 here, as the image displays; Pillow's own conversion to RGB clips them (all white)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open_errors():
    """What Pillow raises for a file it cannot decode (its plugins raise more than OSError)."""
    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError,
            IndexError, EOFError)


def check_pixels(width: int, height: int, what: str) -> None:
    """Refuse images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise InputError(f"{what} is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the "
                         f"{limit / 1e6:.0f} megapixel limit (Pillow's guard against decompression bombs, "
                         "PIL.Image.MAX_IMAGE_PIXELS); scale it down first")


def open_image(path: str) -> Image.Image:
    """The image file ``path`` decoded, its EXIF orientation applied (as it is displayed).
    ``InputError`` says why a file is not an image this runtime takes."""
    if not os.path.isfile(path):
        raise InputError(f"image {path}: no such file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and decodes) up to twice its pixel limit: refused here from the limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_pixels(im.width, im.height, f"image {path}")
                im.load()  # decodes: a truncated or corrupt file fails here
                im = ImageOps.exif_transpose(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path}: over Pillow's pixel limit against decompression bombs "
                         f"(PIL.Image.MAX_IMAGE_PIXELS): {e}; scale it down first") from None
    except _open_errors() as e:
        raise InputError(f"image {path}: cannot be read as an image ({e})") from None
    return im


def image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file as displayed, after checking that it decodes fully and
    that its pixel format is one :func:`load_image` takes."""
    im = open_image(path)
    _pil_to_rgb(im, f"image {path}", check_only=True)
    return im.height, im.width


def load_image(image: ImageLike) -> np.ndarray:
    """A path, a PIL image or an ``HxWx3`` uint8 array -> ``HxWx3`` uint8 RGB array.

    Files are opened with their EXIF orientation applied (as the image is displayed).
    ``HxW`` (grey) and ``HxWx4`` (RGBA) uint8 arrays are accepted too; 16-bit greys are
    scaled to 8 bits (``round(v / 257)``); 32-bit float images are refused.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        return _pil_to_rgb(open_image(path), f"image {path}")
    if isinstance(image, Image.Image):
        check_pixels(image.width, image.height, "image")
        return _pil_to_rgb(image, "image")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise InputError(f"expected an image path, a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")


def _pil_to_rgb(im: Image.Image, what: str = "image", check_only: bool = False) -> np.ndarray:
    if im.width < 1 or im.height < 1:
        raise InputError(f"{what} has no pixels ({im.width}x{im.height})")
    if im.mode in _WIDE_MODES:
        v = np.asarray(im)
        if v.size and (int(v.min()) < 0 or int(v.max()) > 65535):
            raise InputError(f"{what}: {im.mode} pixel values {int(v.min())}..{int(v.max())} are "
                             "outside 0..65535; expected an 8- or 16-bit image")
        if check_only:
            return v
        grey = np.round(v.astype(np.float32) / np.float32(257.0)).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode == "F":
        raise InputError(f"{what} holds 32-bit floating-point pixels (mode F), whose range is unknown; "
                         "save it as an 8- or 16-bit image")
    if check_only:
        return np.zeros(0, np.uint8)
    try:
        has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
        if has_alpha:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            im = im.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert
        raise InputError(f"{what}: pixel format {im.mode} cannot be converted to RGB ({e})") from None
    return np.asarray(im, dtype=np.uint8).copy()


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 (0..255), got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise InputError(f"image arrays must be HxWx3 (or HxW, HxWx4), got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"image has no pixels ({a.shape[1]}x{a.shape[0]})")
    if a.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=2))
    if a.shape[2] == 4:
        alpha = a[..., 3:4] / 255.0
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(a)


def resize_uint8(rgb: np.ndarray, size: int) -> np.ndarray:
    """``HxWx3`` uint8 -> ``size x size x 3`` uint8 (bilinear, antialiased, aspect not kept)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb, "RGB").resize((size, size), Image.Resampling.BILINEAR))


def _normalize_table(dtype) -> np.ndarray:
    """The normalised value of each of the 256 byte values, computed in float32 as before
    the table existed, then cast to ``dtype``."""
    mean = np.float32(MEAN / RESCALE)  # 127.5: rescale fused into the normalisation
    std = np.float32(STD / RESCALE)
    return ((np.arange(256, dtype=np.float32) - mean) / std).astype(dtype)


_TABLES = {np.dtype(t): _normalize_table(t) for t in (np.float32, np.float16)}


def normalize(rgb: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``HxWx3`` uint8 -> ``3xHxW`` ``dtype`` (float32 or float16), ``(x / 255 - 0.5) / 0.5``.
    A lookup of the byte values' table: the same numbers as the float32 arithmetic (and its
    cast), 4-5x faster on a 1008 px frame, which matters in per-frame video loops."""
    dtype = np.dtype(dtype)
    table = _TABLES.get(dtype)
    if table is None:
        table = _normalize_table(dtype)
    out = np.empty((3,) + rgb.shape[:2], dtype)
    for c in range(3):
        np.take(table, rgb[:, :, c], out=out[c])
    return out


def preprocess_image(image: ImageLike, size: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """-> (pixel_values ``[1, 3, size, size]`` float32, original (height, width))."""
    rgb = load_image(image)
    return normalize(resize_uint8(rgb, size))[None], (int(rgb.shape[0]), int(rgb.shape[1]))


def parse_box(text: str) -> Tuple[Tuple[float, float, float, float], int]:
    """``"x0,y0,x1,y1"`` or ``"x0,y0,x1,y1:neg"`` (``:pos`` too) -> (box, label)."""
    spec, _, kind = text.partition(":")
    kind = kind.strip().lower() or "pos"
    if kind not in ("pos", "neg"):
        raise InputError(f"box {text!r}: label must be ':pos' or ':neg', got {kind!r}")
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 4:
        raise InputError(f"box {text!r}: expected x0,y0,x1,y1 (4 numbers), got {len(parts)} values")
    try:
        box = tuple(float(p) for p in parts)
    except ValueError as e:
        raise InputError(f"box {text!r}: not a number ({e})") from None
    return box, 1 if kind == "pos" else 0


def check_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[int] | None,
                original_size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Validate ``xyxy`` pixel boxes -> (boxes ``[N, 4]`` float32, labels ``[N]`` int64)."""
    h, w = original_size
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InputError(f"boxes must be a list of [x0, y0, x1, y1], got shape {arr.shape}")
    if labels is None:
        lab = np.ones(len(arr), np.int64)
    else:
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if lab.shape[0] != arr.shape[0]:
            raise InputError(f"{arr.shape[0]} boxes but {lab.shape[0]} box labels")
        if not np.isin(lab, (0, 1)).all():
            raise InputError(f"box labels must be 1 (positive) or 0 (negative), got {sorted(set(lab.tolist()))}")
    for i, (x0, y0, x1, y1) in enumerate(arr):
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise InputError(f"box {i}: coordinates must be finite, got {[x0, y0, x1, y1]}")
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box {i}: expected x0 < x1 and y0 < y1 (xyxy pixels), got {[x0, y0, x1, y1]}")
        if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
            raise InputError(f"box {i}: {[x0, y0, x1, y1]} lies outside the {w}x{h} image")
    return arr.astype(np.float32), lab


def boxes_to_model(boxes_xyxy: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
    """Pixel ``xyxy`` -> normalised ``cxcywh`` (``Sam3Processor``'s box encoding), float32."""
    h, w = original_size
    b = boxes_xyxy.astype(np.float32).copy()
    b[:, 0::2] /= np.float32(w)
    b[:, 1::2] /= np.float32(h)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1).astype(np.float32)
