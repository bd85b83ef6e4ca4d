"""What a labelling job takes: the images, the concepts, thresholds, NMS, exemplar boxes.

Everything here is checked before the library is loaded, so a typo fails in a second
with a message saying what was wrong, not after minutes of work.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam3_nn.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
NMS_KINDS = ("mask", "box")
FORMATS = ("coco", "yolo-seg", "both")


class LabelError(UserError):
    """A labelling job's input or output that cannot work: the message says why."""


# ----------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageItem:
    """One image of a job: ``key`` names it in every output (unique, '/'-separated)."""

    key: str
    path: str


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def list_images(spec: str) -> List[ImageItem]:
    """``DIR`` (every image below it, recursively; key: the path relative to DIR), a glob
    (``"photos/**/*.jpg"``; key: relative to the glob's fixed prefix), a list file (one path per
    line, relative to the list's folder; ``#`` comments; key: the line) or one image file.
    Sorted by key."""
    if os.path.isdir(spec):
        root = spec
        paths = []
        for d, dirs, files in os.walk(spec):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            paths += [os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
        items = [ImageItem(os.path.relpath(p, root).replace(os.sep, "/"), p) for p in paths]
        if not items:
            raise LabelError(f"--images {spec}: the folder holds no images ({', '.join(IMAGE_EXTS)})")
    elif _has_magic(spec):
        parts = spec.replace(os.sep, "/").split("/")
        fixed = []
        for p in parts[:-1]:
            if _has_magic(p):
                break
            fixed.append(p)
        root = "/".join(fixed) or "."
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        items = [ImageItem(os.path.relpath(p, root).replace(os.sep, "/"), p) for p in paths]
        if not items:
            raise LabelError(f"--images {spec!r}: the pattern matches no file")
    elif os.path.isfile(spec) and spec.lower().endswith(IMAGE_EXTS):
        items = [ImageItem(os.path.basename(spec), spec)]
    elif os.path.isfile(spec):
        folder = os.path.dirname(os.path.abspath(spec))
        items, seen = [], set()
        with open(spec, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                key = line.replace(os.sep, "/")
                if key in seen:
                    raise LabelError(f"--images {spec}:{n}: {line} is listed twice")
                seen.add(key)
                items.append(ImageItem(key, line if os.path.isabs(line) else os.path.join(folder, line)))
        if not items:
            raise LabelError(f"--images {spec}: the list names no image")
    else:
        raise LabelError(f"--images {spec}: no such folder, file or matching pattern")
    # absolute paths: a resumed job (or a Ray worker) may start in another folder
    return sorted((ImageItem(it.key, os.path.abspath(it.path)) for it in items), key=lambda it: it.key)


# ----------------------------------------------------------------------------
# concepts, thresholds, NMS
# ----------------------------------------------------------------------------
def parse_concepts(text: str) -> Tuple[str, ...]:
    """``"person, car"`` -> ``("person", "car")``: non-empty, unique."""
    names = tuple(c.strip() for c in (text or "").split(","))
    if not names or any(not c for c in names):
        raise LabelError(f"--concepts {text!r}: expected comma-separated noun phrases, e.g. \"person,car\"")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise LabelError(f"--concepts: {', '.join(dup)} given twice")
    return names


def _check_threshold(what: str, v: float) -> float:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
        raise LabelError(f"{what} must be a number in [0, 1], got {v!r}")
    return float(v)


def parse_class_thresholds(text: Optional[str], concepts: Sequence[str]) -> Dict[str, float]:
    """``"person=0.5,car=0.3"`` -> ``{"person": 0.5, "car": 0.3}`` (concepts of the job only)."""
    out: Dict[str, float] = {}
    if not text:
        return out
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise LabelError(f"--class-thresholds {text!r}: expected concept=threshold pairs, e.g. person=0.5,car=0.3")
        if name not in concepts:
            raise LabelError(f"--class-thresholds: {name!r} is not one of the concepts ({', '.join(concepts)})")
        try:
            v = float(value)
        except ValueError:
            raise LabelError(f"--class-thresholds {name}: {value.strip()!r} is not a number") from None
        out[name] = _check_threshold(f"--class-thresholds {name}", v)
    return out


@dataclass(frozen=True)
class LabelOptions:
    """What decides a job's labels (recorded in the output's ``job.json``: a restart with other
    values is refused, so one output never mixes two settings)."""

    concepts: Tuple[str, ...]
    score_threshold: float = 0.5  # detection x presence, as the original Sam3Processor
    class_thresholds: Dict[str, float] = field(default_factory=dict)
    mask_threshold: float = 0.5
    nms_iou: Optional[float] = None  # None: no NMS (SAM 3's own output)
    nms_kind: str = "mask"  # IoU of masks or of boxes
    class_agnostic_nms: bool = False  # NMS across concepts instead of within each
    max_detections: int = 0  # per image, highest scores kept; 0: no cap

    def __post_init__(self):
        if not self.concepts:
            raise LabelError("no concepts given")
        _check_threshold("--score-threshold", self.score_threshold)
        _check_threshold("--mask-threshold", self.mask_threshold)
        for c, v in self.class_thresholds.items():
            if c not in self.concepts:
                raise LabelError(f"class threshold for {c!r}, which is not a concept")
            _check_threshold(f"threshold of {c}", v)
        if self.nms_iou is not None:
            _check_threshold("--nms-iou", self.nms_iou)
        if self.nms_kind not in NMS_KINDS:
            raise LabelError(f"--nms-kind must be one of {', '.join(NMS_KINDS)}, got {self.nms_kind!r}")
        if not isinstance(self.max_detections, int) or self.max_detections < 0:
            raise LabelError(f"--max-detections must be 0 (no cap) or a positive integer, got {self.max_detections!r}")

    def threshold(self, concept: str) -> float:
        return self.class_thresholds.get(concept, self.score_threshold)

    def record(self) -> Dict:
        d = asdict(self)
        d["concepts"] = list(self.concepts)
        return d


# ----------------------------------------------------------------------------
# exemplars
# ----------------------------------------------------------------------------
Exemplars = Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]  # key -> concept -> (boxes, labels)

EXEMPLARS_FORMAT = """\
{"<image key>": {"<concept>": [[x0, y0, x1, y1], [x0, y0, x1, y1, 0], ...], ...}, ...}
  image key: as the job names the image (its path relative to --images DIR, or the list's line);
  boxes: xyxy pixels of that image; a fifth value 1 (default) marks a positive exemplar, 0 a negative one"""


def load_exemplars(path: str, concepts: Sequence[str], keys: Sequence[str],
                   max_boxes: Optional[int] = None) -> Exemplars:
    """Read an exemplar file (``EXEMPLARS_FORMAT``): example boxes drawn on some of the job's
    images. SAM 3 pools a box prompt from the queried image's own features, so an exemplar
    counts on the image it was drawn on: that image's query for the concept becomes text +
    boxes (as ``Sam3.predict(text=..., boxes=...)``); other images keep the text alone."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise LabelError(f"--exemplars {path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise LabelError(f"--exemplars {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LabelError(f"--exemplars {path}: expected an object keyed by image; format:\n{EXEMPLARS_FORMAT}")
    known = set(keys)
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise LabelError(f"--exemplars {path}: {len(unknown)} image key(s) are not images of this job: "
                         f"{', '.join(unknown[:5])} (keys are paths relative to --images)")
    out: Exemplars = {}
    for key, per_concept in data.items():
        if not isinstance(per_concept, dict):
            raise LabelError(f"--exemplars {path}: {key}: expected {{concept: [boxes]}}")
        for concept, boxes in per_concept.items():
            where = f"--exemplars {path}: {key}: {concept}"
            if concept not in concepts:
                raise LabelError(f"{where}: not one of the concepts ({', '.join(concepts)})")
            if not isinstance(boxes, list) or not boxes:
                raise LabelError(f"{where}: expected a non-empty list of [x0, y0, x1, y1(, label)]")
            b, lab = [], []
            for box in boxes:
                if (not isinstance(box, list) or len(box) not in (4, 5)
                        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
                    raise LabelError(f"{where}: box {box!r}: expected [x0, y0, x1, y1] or [x0, y0, x1, y1, label]")
                if len(box) == 5 and box[4] not in (0, 1):
                    raise LabelError(f"{where}: box {box!r}: label must be 1 (positive) or 0 (negative)")
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise LabelError(f"{where}: box {box!r}: expected x0 < x1 and y0 < y1 (xyxy pixels)")
                b.append(box[:4])
                lab.append(int(box[4]) if len(box) == 5 else 1)
            if max_boxes is not None and len(b) > max_boxes:
                raise LabelError(f"{where}: {len(b)} boxes; the library takes at most {max_boxes} per query "
                                 f"(compile with --max-boxes {len(b)})")
            out.setdefault(key, {})[concept] = (np.asarray(b, np.float32), np.asarray(lab, np.int64))
    return out
