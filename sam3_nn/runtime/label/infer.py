"""Label images in batches: each image encoded once, then queried with every concept.

``BatchLabeler`` splits the work so that a job can overlap it:

* ``prepare`` (any thread): decode, resize and normalise one image, check its exemplar boxes;
* ``infer`` (the one thread that calls the library): ``encode_image`` on N images at a time
  (a batch-N library's N; the last batch padded with copies of its last image, whose outputs
  are dropped), then one ``detect`` per concept on the whole batch, of whose outputs only the
  queries above the concept's score threshold are kept (only their mask rows leave the
  device); each concept's text is encoded once per job;
* ``finish`` (any thread): the masks of the queries ``infer`` kept, resized and thresholded
  (``masks``: ``Sam3.predict``'s results, fewer passes), NMS and the per-image cap, COCO RLE.

A record (one JSON line of a shard, ``store``) is ``{"key", "file", "status": "ok", "height",
"width", "objects": [{"concept": index, "score", "box": xyxy pixels, "area", "segmentation":
RLE}]}``, or ``{"key", "file", "status": "error", "error": message}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam3_nn.runtime import ffi, rle
from sam3_nn.runtime.api import Sam3, _input_role
from sam3_nn.runtime.engine import LibraryError
from sam3_nn.runtime.label.options import Exemplars, ImageItem, LabelError, LabelOptions
from sam3_nn.runtime.label.masks import Candidates, finish, select as select_queries
from sam3_nn.runtime.preprocess import (InputError, boxes_to_model, check_boxes, load_image, normalize,
                                        resize_uint8)


@dataclass
class Prepared:
    """An image ready for the library."""

    item: ImageItem
    size: Tuple[int, int]  # original (height, width)
    pixels: np.ndarray  # [3, S, S] in the library's input dtype
    prompts: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # concept -> boxes, labels


def error_record(item: ImageItem, message: str) -> Dict:
    return {"key": item.key, "file": item.path, "status": "error", "error": message}


def greedy_nms(scores: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS: highest score first (ties: lower index), dropping every
    later one whose IoU with a kept one is above ``threshold``."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep: List[int] = []
    for i in order:
        if all(iou[i, j] <= threshold for j in keep):
            keep.append(i)
    return np.asarray(sorted(keep), np.int64)


def select(scores: np.ndarray, concept: np.ndarray, boxes: np.ndarray, rles: Sequence[Dict],
           options: LabelOptions) -> np.ndarray:
    """The objects kept after NMS (within each concept, or across them) and the per-image cap;
    indices in their original order."""
    keep = np.arange(len(scores))
    if options.nms_iou is not None and len(scores) > 1:
        groups = [keep] if options.class_agnostic_nms else [keep[concept == c] for c in np.unique(concept)]
        kept = []
        for g in groups:
            if options.nms_kind == "mask":
                iou = rle.iou([rles[i] for i in g], [rles[i] for i in g])
            else:
                iou = rle.box_iou(boxes[g], boxes[g])
            kept.append(g[greedy_nms(scores[g], iou, options.nms_iou)])
        keep = np.sort(np.concatenate(kept))
    if options.max_detections and len(keep) > options.max_detections:
        top = sorted(keep.tolist(), key=lambda i: (-float(scores[i]), i))[:options.max_detections]
        keep = np.asarray(sorted(top), np.int64)
    return keep


class _Clock:
    """Adds the time since its last call to ``stages[name]``."""

    def __init__(self, stages: Dict[str, float]):
        self.stages, self.last = stages, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + now - self.last
        self.last = now


# Outputs of detect that labelling reads, and how many concepts' outputs are copied aside on
# the device before one wait for all of them (bounds the copies' memory: a batch-4 detect's
# mask logits are 133 MB).
KEPT_OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits")
CONCEPTS_IN_FLIGHT = 8


class BatchLabeler:
    """A loaded ``Sam3`` and a job's options: images in, records out (see the module doc)."""

    def __init__(self, model: Sam3, options: LabelOptions, batch: Optional[int] = None,
                 exemplars: Optional[Exemplars] = None):
        for fn in ("encode_image", "encode_text", "detect"):
            if not model.has(fn):
                raise LibraryError(f"labelling needs the library function {fn!r}, which this library lacks "
                                   f"(it has {', '.join(model.functions)})")
        fixed = int(model.manifest.get("batch") or 0)  # 0: the library takes any batch size
        if batch is not None and batch < 1:
            raise LabelError(f"--batch must be a positive integer, got {batch}")
        if fixed and batch is not None and batch != fixed:
            raise LabelError(f"--batch {batch}: this library was compiled for batch {fixed} only "
                             f"(sam3-nn compile --batch {batch}, or leave --batch out)")
        self.model = model
        self.options = options
        self.batch = fixed or batch or 1
        self.exemplars = exemplars or {}
        spec = model.functions["detect"]
        self._detect_inputs = [(inp, _input_role(inp["name"])) for inp in spec["inputs"]]
        self._detect_outputs = [o["name"] for o in spec["outputs"]]
        slots = {inp["name"]: inp for inp in spec["inputs"]}
        self.box_slots = int(slots["boxes"]["shape"][1]) if "boxes" in slots else 0
        self._pixel_dtype = model._input_dtype("encode_image", "pixel_values")
        self._text: Dict[str, Tuple] = {}
        self._positions: Optional[List] = None
        self._no_boxes: Optional[Dict[str, object]] = None
        self.device_seconds = 0.0  # time inside the library calls (encode_image + detect)
        # where that time goes (bench/label.py prints it): host stages and the wait for the device
        self.stages: Dict[str, float] = {}
        self._kept: Dict[Tuple[int, str], object] = {}  # (slot, output) -> our device copy
        self._pixels: Optional[Tuple[object, List]] = None  # the device input and its row views

    # -- any thread ----------------------------------------------------------
    def prepare(self, item: ImageItem):
        """-> ``Prepared``, or an error record (a bad image is reported, never raised)."""
        try:
            rgb = load_image(item.path)
            size = (int(rgb.shape[0]), int(rgb.shape[1]))
            pixels = normalize(resize_uint8(rgb, self.model.image_size), self._pixel_dtype)
            prompts = {}
            for concept, (boxes, labels) in self.exemplars.get(item.key, {}).items():
                b, lab = check_boxes(boxes, labels, size)
                prompts[concept] = (boxes_to_model(b, size), lab)
            return Prepared(item, size, pixels, prompts)
        except InputError as e:
            return error_record(item, str(e))
        except Exception as e:  # a decoder's own failure: still one bad image, not the job's end
            return error_record(item, f"image {item.path}: {type(e).__name__}: {e}")

    def finish(self, p: Prepared, raw: Dict[str, Candidates]) -> Dict:
        """Post-process one image's candidates (``{concept: Candidates}``) -> its record."""
        try:
            return self._finish(p, raw)
        except Exception as e:  # one image's failure is reported in its record
            return error_record(p.item, f"post-processing failed: {type(e).__name__}: {e}")

    def _finish(self, p: Prepared, raw) -> Dict:
        o = self.options
        scores, concept, boxes, masks = [], [], [], []
        for ci, c in enumerate(o.concepts):
            s, b, m = finish(raw[c], p.size, o.mask_threshold)
            scores.append(s)
            concept.append(np.full(len(s), ci, np.int64))
            boxes.append(b)
            masks.append(m)
        scores_a, concept_a = np.concatenate(scores), np.concatenate(concept)
        boxes_a, masks_a = np.concatenate(boxes), np.concatenate(masks)
        rles = rle.encode_many(masks_a)
        keep = select(scores_a, concept_a, boxes_a, rles, o)
        areas = masks_a.sum(axis=(1, 2))
        objects = [{"concept": int(concept_a[i]), "score": float(scores_a[i]),
                    "box": [float(v) for v in boxes_a[i]], "area": int(areas[i]), "segmentation": rles[i]}
                   for i in keep]
        return {"key": p.item.key, "file": p.item.path, "status": "ok", "height": p.size[0],
                "width": p.size[1], "objects": objects}

    # -- the library's thread ------------------------------------------------
    def text(self, concept: str) -> Tuple:
        """(text_features, text_mask), ``batch`` rows: encoded once per concept and kept in
        tensors of our own (a library's next call may reuse the memory of its own outputs), so
        no ``detect`` uploads them again."""
        if concept not in self._text:
            ids, mask = self.model.tokenize(concept)
            rows, engine = self.batch, self.model.model
            self._text[concept] = tuple(ffi.to_device(a, engine.device) for a in engine(
                "encode_text", np.repeat(ids, rows, 0), np.repeat(mask, rows, 0)))
        return self._text[concept]

    def no_boxes(self) -> Dict[str, object]:
        """The box slots of a concept no image of the batch has exemplars for (the usual case),
        uploaded once: ``{"boxes", "box_labels", "box_mask"}`` device tensors, all slots empty."""
        if self._no_boxes is None:
            dtypes = {_input_role(inp["name"])[0]: inp["dtype"] for inp, _ in self._detect_inputs}
            rows, dev = self.batch, self.model.model.device
            self._no_boxes = {
                role: ffi.to_device(np.zeros((rows, self.box_slots) + ((4,) if role == "boxes" else ()),
                                             dtypes[role]), dev)
                for role in ("boxes", "box_labels", "box_mask") if role in dtypes}
        return self._no_boxes

    def positions(self) -> List:
        """The FPN position encodings at ``batch`` rows (libraries whose detect takes them)."""
        if self._positions is None:
            self._positions = self.model.model.call_device("image_position_encoding", self.batch)
        return self._positions

    def infer(self, batch: Sequence[Prepared]) -> List[Dict[str, Candidates]]:
        """Up to ``self.batch`` images -> per image ``{concept: Candidates}`` (the queries above
        the concept's score threshold: only their masks are kept from the batch's outputs)."""
        n, rows = len(batch), self.batch
        if not 0 < n <= rows:
            raise ValueError(f"infer takes 1 to {rows} images, got {n}")
        t0 = time.perf_counter()
        clock = _Clock(self.stages)
        pixels = self._upload([p.pixels for p in batch] + [batch[-1].pixels] * (rows - n))
        clock("upload")
        features = self.model.model.call_device("encode_image", pixels)
        clock("launch")
        per_image: List[Dict[str, Candidates]] = [{} for _ in range(n)]
        # every concept's detect is queued behind the previous one with no wait between them:
        # its outputs are copied aside on the device, read after the last (or every
        # CONCEPTS_IN_FLIGHT-th) one; the device never idles while the host selects queries
        in_flight: List[Tuple[str, Dict[str, object]]] = []
        for concept in self.options.concepts:
            text_features, text_mask = self.text(concept)
            boxes = np.zeros((rows, self.box_slots, 4), np.float32)
            labels = np.zeros((rows, self.box_slots), np.int64)
            box_mask = np.zeros((rows, self.box_slots), np.int64)
            prompted = [(i, p.prompts[concept]) for i, p in enumerate(batch) if concept in p.prompts]
            for i, (b, lab) in prompted:
                boxes[i, :len(b)], labels[i, :len(b)], box_mask[i, :len(b)] = b, lab, 1
            empty = None if prompted else self.no_boxes()
            clock("prompts")
            args = []
            for inp, (role, level) in self._detect_inputs:
                if role == "feature":
                    args.append(features[level])
                elif role == "position":
                    args.append(self.positions()[level])
                elif role == "text":
                    args.append(text_features)
                elif role == "text_mask":
                    args.append(text_mask)
                elif empty is not None:
                    args.append(empty[role])
                elif role == "boxes":
                    args.append(boxes.astype(inp["dtype"]))
                elif role == "box_mask":
                    args.append(box_mask.astype(inp["dtype"]))
                else:
                    args.append(labels.astype(inp["dtype"]))
            engine = self.model.model
            with engine.lock:  # the outputs are copied aside before any later call can reuse their memory
                out = engine.call_device("detect", *args)
                if len(out) != len(self._detect_outputs):
                    raise LibraryError(f"detect returned {len(out)} outputs, manifest names "
                                       f"{len(self._detect_outputs)}")
                in_flight.append((concept, self._copy_aside(len(in_flight), out)))
            clock("launch")
            if len(in_flight) == CONCEPTS_IN_FLIGHT:
                self._collect(in_flight, per_image, n, clock)
        self._collect(in_flight, per_image, n, clock)
        self.device_seconds += time.perf_counter() - t0
        return per_image

    def _upload(self, images: Sequence[np.ndarray]):
        """The batch's pixels copied row by row into one device tensor of ours (no host-side
        stack of the batch first); the previous batch's work has been waited for."""
        if self._pixels is None:
            first = images[0]
            t = ffi.empty((len(images),) + first.shape, str(first.dtype), self.model.model.device)
            self._pixels = (t, [ffi.view(t, first.shape, i * first.nbytes) for i in range(len(images))])
        t, rows = self._pixels
        for view, image in zip(rows, images):
            ffi.copy_from_numpy(view, image)
        return t

    def _copy_aside(self, slot: int, out: Sequence) -> Dict[str, object]:
        """``detect``'s outputs that labelling reads, copied (device to device, queued) into
        tensors of ours for in-flight slot ``slot``."""
        kept = {}
        for name, o in zip(self._detect_outputs, out):
            if name not in KEPT_OUTPUTS:
                continue
            buf = self._kept.get((slot, name))
            if buf is None:
                buf = self._kept[(slot, name)] = ffi.empty(tuple(o.shape), str(o.dtype), self.model.model.device)
            ffi.copy(o, buf)
            kept[name] = buf
        return kept

    def _collect(self, in_flight: List, per_image: List[Dict[str, Candidates]], n: int, clock) -> None:
        """Wait for the queued detects, then each one's kept queries (only their mask rows leave
        the device); empties ``in_flight``."""
        if not in_flight:
            return
        ffi.sync(self.model.model.device)
        clock("device wait")
        for concept, kept in in_flight:
            raw = {name: o if name == "pred_masks" else ffi.to_numpy(o) for name, o in kept.items()}
            for i in range(n):
                per_image[i][concept] = select_queries(raw, i, self.options.threshold(concept))
        in_flight.clear()
        clock("outputs")
