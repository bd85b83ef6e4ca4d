"""Final label files from a job's records: COCO (checked by loading it with ``pycocotools``)
and YOLO-seg.

COCO (``OUTPUT/coco.json``): ``images`` sorted by key (``id`` 1.., ``file_name`` the key),
``categories`` the concepts in the order given (``id`` 1..), one annotation per object:
``segmentation`` COCO RLE (``{"size": [h, w], "counts": str}``) or, with ``polygons``, the
outer contours of the mask (OpenCV ``findContours``; COCO polygons have no holes, and a mask
too small for a 3-point contour keeps its RLE), ``bbox`` the model's box as ``[x, y, w, h]``,
``area`` the mask's pixels, ``score`` detection x presence, ``iscrowd`` 0.

YOLO-seg (``OUTPUT/yolo/``): ``labels/<key without extension>.txt`` with one line per object,
``class x1 y1 x2 y2 ...`` (class: the concept's index from 0; the points of the mask's largest
outer contour, normalised by the image's width and height), an empty file for an image with
no object; ``images/<key>`` links to the images (YOLO finds labels by swapping ``images`` for
``labels`` in an image's path); ``data.yaml`` with ``path``, ``train``, ``val`` and ``names``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Dict, List, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO

from sam3_nn.runtime import rle
from sam3_nn.runtime.label.options import LabelError
from sam3_nn.files import atomic_write_path

COCO_FILE = "coco.json"
YOLO_DIR = "yolo"


def need_opencv(what: str):
    try:
        import cv2
    except ImportError:
        raise LabelError(f"{what} needs OpenCV (mask contours): pip install 'sam3_nn[label]' "
                         "(opencv-python-headless)") from None
    return cv2


def contours(mask: np.ndarray) -> List[np.ndarray]:
    """Outer contours of a binary mask, each ``[n, 2]``: (x, y) of boundary pixels, n >= 3;
    largest area first."""
    cv2 = need_opencv("polygons")
    found, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                cv2.CHAIN_APPROX_SIMPLE)
    out = [c.reshape(-1, 2) for c in found if len(c) >= 3]
    return sorted(out, key=lambda c: -abs(float(cv2.contourArea(c))))


def _xywh(box: Sequence[float], h: int, w: int) -> List[float]:
    x0, y0 = min(max(box[0], 0.0), w), min(max(box[1], 0.0), h)
    x1, y1 = min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)
    return [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)]


def coco_dict(records: Sequence[Dict], concepts: Sequence[str], polygons: bool = False,
              description: str = "sam3_nn label") -> Tuple[Dict, int]:
    """The COCO dataset of the ``ok`` records -> (dict, objects that kept their RLE under ``polygons``)."""
    images, annotations, kept_rle = [], [], 0
    ok = [r for r in records if r["status"] == "ok"]
    for image_id, r in enumerate(sorted(ok, key=lambda r: r["key"]), 1):
        h, w = int(r["height"]), int(r["width"])
        images.append({"id": image_id, "file_name": r["key"], "height": h, "width": w})
        for o in r["objects"]:
            seg = o["segmentation"]
            if polygons:
                polys = [c.astype(float).ravel().tolist() for c in contours(rle.decode(seg))]
                if polys:
                    seg = polys
                else:
                    kept_rle += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(o["concept"]) + 1, "segmentation": seg,
                                "area": int(o["area"]), "bbox": _xywh(o["box"], h, w),
                                "score": float(o["score"]), "iscrowd": 0})
    categories = [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(concepts)]
    return {"info": {"description": description}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}, kept_rle


def write_coco(path: str, dataset: Dict) -> None:
    """Write atomically, then load it with ``pycocotools.coco.COCO`` and check what it indexed
    (a file the COCO API cannot read is an error, not an output)."""
    def write_checked(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataset, f, separators=(",", ":"))
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            coco = COCO(tmp)
        if (len(coco.imgs), len(coco.anns), len(coco.cats)) != (
                len(dataset["images"]), len(dataset["annotations"]), len(dataset["categories"])):
            raise LabelError(f"{path}: pycocotools indexed {len(coco.imgs)} images, {len(coco.anns)} "
                             f"annotations, {len(coco.cats)} categories; written "
                             f"{len(dataset['images'])}, {len(dataset['annotations'])}, "
                             f"{len(dataset['categories'])}")
        for ann in dataset["annotations"][:1]:  # the segmentation format decodes
            coco.annToMask(ann)

    atomic_write_path(path, write_checked)


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a YAML double-quoted scalar


def yolo_lines(record: Dict) -> Tuple[List[str], int]:
    """One image's YOLO-seg lines -> (lines, objects left out: no contour of 3 points)."""
    h, w = int(record["height"]), int(record["width"])
    lines, dropped = [], 0
    for o in record["objects"]:
        found = contours(rle.decode(o["segmentation"]))
        if not found:
            dropped += 1
            continue
        pts = found[0].astype(np.float64) / np.array([w, h], np.float64)
        pts = np.clip(pts, 0.0, 1.0)
        lines.append(" ".join([str(int(o["concept"]))] + [f"{v:.6f}" for v in pts.ravel()]))
    return lines, dropped


def write_yolo(folder: str, records: Sequence[Dict], concepts: Sequence[str]) -> int:
    """The YOLO-seg dataset of the ``ok`` records, replacing ``folder`` whole (built aside, then
    renamed). -> objects left out."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-yolo-", dir=parent)
    dropped = 0
    try:
        for r in records:
            if r["status"] != "ok":
                continue
            lines, d = yolo_lines(r)
            dropped += d
            stem = os.path.splitext(r["key"])[0]
            label = os.path.join(tmp, "labels", *stem.split("/")) + ".txt"
            os.makedirs(os.path.dirname(label), exist_ok=True)
            with open(label, "w", encoding="utf-8") as f:
                f.write("".join(ln + "\n" for ln in lines))
            link = os.path.join(tmp, "images", *r["key"].split("/"))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.abspath(r["file"]), link)
        names = "".join(f"  {i}: {_yaml_str(c)}\n" for i, c in enumerate(concepts))
        with open(os.path.join(tmp, "data.yaml"), "w", encoding="utf-8") as f:
            f.write(f"# YOLO-seg dataset written by sam3_nn label\npath: {_yaml_str(os.path.abspath(folder))}\n"
                    f"train: images\nval: images\nnames:\n{names}")
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=".old-yolo-", dir=parent)
            os.replace(folder, os.path.join(old, "yolo"))
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dropped


def check_yolo_names(keys: Sequence[str]) -> None:
    """YOLO names a label after its image without the extension: two images may not share one."""
    stems: Dict[str, str] = {}
    clash = []
    for k in keys:
        s = os.path.splitext(k)[0]
        if s in stems:
            clash.append(f"{stems[s]} / {k}")
        stems[s] = k
    if clash:
        raise LabelError(f"YOLO-seg labels are named after the image without its extension; these "
                         f"images would share one: {', '.join(clash[:5])}")
