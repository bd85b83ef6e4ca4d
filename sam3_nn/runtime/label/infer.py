"""Label images in batches: each image encoded once, then queried with every concept.

``BatchLabeler`` splits the work so that a job can overlap it:

* ``prepare`` (any thread): decode, resize and normalise one image, check its exemplar boxes;
* ``stream`` (the one thread that calls the library): ``encode_image`` on N images at a time
  (a batch-N library's N; the last batch padded with copies of its last image, whose outputs
  are dropped), then one ``detect`` per concept on the whole batch, of whose outputs only the
  queries above the concept's score threshold are kept (only their mask rows leave the
  device); each concept's text is encoded once per job. Nothing waits for the device but the
  reading of outputs a few detects old: pixels go up and outputs come down through host
  buffers the device copies without the host waiting, and flags the device raises after them
  say when they have landed (a synchronous copy would wait for all the work queued since);
* ``finish`` (any thread): the masks of the queries ``stream`` kept, resized and thresholded
  (``masks``: ``Sam3.predict``'s results, fewer passes), NMS and the per-image cap, COCO RLE.

A record (one JSON line of a shard, ``store``) is ``{"key", "file", "status": "ok", "height",
"width", "objects": [{"concept": index, "score", "box": xyxy pixels, "area", "segmentation":
RLE}]}``, or ``{"key", "file", "status": "error", "error": message}``.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sam3_nn.runtime import ffi, rle
from sam3_nn.runtime.api import Sam3, _input_role, detect_arguments
from sam3_nn.runtime.engine import LibraryError
from sam3_nn.runtime.label.options import Exemplars, ImageItem, LabelError, LabelOptions
from sam3_nn.runtime.label.masks import Candidates, finish, kept_queries
from sam3_nn.runtime.preprocess import (InputError, boxes_to_model, check_boxes, load_image, normalize,
                                        resize_uint8)
from sam3_nn.runtime.transfer import HostRing


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


# Outputs of detect that labelling reads; the small ones cross to the host whole, of
# ``pred_masks`` only the kept queries' rows.
KEPT_OUTPUTS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits")
SMALL_OUTPUTS = ("pred_logits", "pred_boxes", "presence_logits")
# A unit is one detect (a batch and a concept; the batch's encode_image goes with its first
# one). Its scores are read ROWS_LAG units after it was queued and its kept mask rows
# DONE_LAG units after: the host waits only for work older than what the device runs.
ROWS_LAG, DONE_LAG = 2, 3


@dataclass
class _Unit:
    """One queued detect: where its outputs land, and the images' candidates once read."""

    seq: int
    concept: str
    entry: list  # the batch's [prepared, good, per_image, units left]
    aside: Dict[str, object]  # output name -> our device copy
    small: Dict[str, np.ndarray]  # SMALL_OUTPUTS in host buffers (filled when flag "scores" is up)
    rows: List[Tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    state: str = "queued"  # -> "rows" (its kept rows requested) -> read


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
        self._kept: Dict[Tuple[int, str], object] = {}  # (ring slot, output) -> our device copy
        self._pixels = None  # the device input
        self._ring: Optional[HostRing] = None
        self._seq = 0  # units queued so far
        self.rows_lag, self.done_lag = ROWS_LAG, DONE_LAG

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
        """Up to ``self.batch`` images -> per image ``{concept: Candidates}`` (``stream`` of one
        batch, waited for)."""
        if not 0 < len(batch) <= self.batch:
            raise ValueError(f"infer takes 1 to {self.batch} images, got {len(batch)}")
        for _, per_image in self.stream([list(batch)]):
            return per_image
        return []

    def stream(self, batches: Iterable[Sequence]) -> Iterator[Tuple[Sequence, List[Dict[str, Candidates]]]]:
        """``(batch, per image {concept: Candidates})`` for each batch (up to ``self.batch``
        items: ``Prepared``, or error records, which are passed through), in order. The queries
        above a concept's score threshold are kept: only their mask rows leave the device.

        Every detect is queued behind the previous one; a unit's outputs are read ``rows_lag``
        and ``done_lag`` units later, so the device runs newer work while the host reads them
        and a batch's results come out a few detects after its work was queued."""
        if self._ring is None:
            self._ring = HostRing(self.model.model.device, self.done_lag + 1)
        ffi.sync(self.model.model.device)  # a stream left early may have left copies queued
        entries: collections.deque = collections.deque()
        units: collections.deque = collections.deque()
        for items in batches:
            good = [p for p in items if isinstance(p, Prepared)]
            if len(good) > self.batch:
                raise ValueError(f"a batch holds 1 to {self.batch} images, got {len(good)}")
            entry = [items, good, [{} for _ in good], len(self.options.concepts) if good else 0]
            entries.append(entry)
            t0 = time.perf_counter()
            if good:
                features = self._encode(good)
                for concept in self.options.concepts:
                    units.append(self._launch(entry, concept, features))
                    self._advance(units, final=False)
                features = None
            self.device_seconds += time.perf_counter() - t0
            while entries and entries[0][3] == 0:
                done = entries.popleft()
                yield done[0], done[2]
        t0 = time.perf_counter()
        self._advance(units, final=True)
        self.device_seconds += time.perf_counter() - t0
        while entries:
            done = entries.popleft()
            yield done[0], done[2]

    def _encode(self, good: Sequence[Prepared]) -> List:
        rows = self.batch
        clock = _Clock(self.stages)
        pixels = self._upload([p.pixels for p in good] + [good[-1].pixels] * (rows - len(good)))
        clock("upload")
        features = self.model.model.call_device("encode_image", pixels)
        clock("launch")
        return features

    def _launch(self, entry: list, concept: str, features: List) -> _Unit:
        """Queue ``concept``'s detect on the batch, its outputs copied aside and the small ones
        on to the host, then the unit's "scores" flag."""
        clock = _Clock(self.stages)
        good, rows = entry[1], self.batch
        seq = self._seq
        self._seq += 1
        slot = seq % self._ring.slots
        text_features, text_mask = self.text(concept)
        prompted = [(i, p.prompts[concept]) for i, p in enumerate(good) if concept in p.prompts]
        empty = None if prompted else self.no_boxes()
        if prompted:
            boxes = np.zeros((rows, self.box_slots, 4), np.float32)
            labels = np.zeros((rows, self.box_slots), np.int64)
            box_mask = np.zeros((rows, self.box_slots), np.int64)
            for i, (b, lab) in prompted:
                boxes[i, :len(b)], labels[i, :len(b)], box_mask[i, :len(b)] = b, lab, 1
        clock("prompts")
        prompt = empty if empty is not None else {"boxes": boxes, "box_labels": labels, "box_mask": box_mask}
        args = detect_arguments(self._detect_inputs, features, self.positions, text_features, text_mask, prompt)
        engine = self.model.model
        with engine.lock:  # the outputs are copied aside before any later call can reuse their memory
            out = engine.call_device("detect", *args)
            if len(out) != len(self._detect_outputs):
                raise LibraryError(f"detect returned {len(out)} outputs, manifest names "
                                   f"{len(self._detect_outputs)}")
            aside = self._copy_aside(slot, out)
        small = {name: self._ring.download(t, (slot, name)) for name, t in aside.items() if name in SMALL_OUTPUTS}
        self._ring.signal(slot, 0)
        clock("launch")
        return _Unit(seq, concept, entry, aside, small)

    def _advance(self, units: collections.deque, final: bool) -> None:
        """Request the kept rows of units ``rows_lag`` old, read the units ``done_lag`` old (all
        of them when ``final``)."""
        for k, u in enumerate(units):
            if u.state == "queued" and (final or len(units) - k > self.rows_lag):
                self._request_rows(u)
        while units and (final or len(units) > self.done_lag):
            self._receive(units.popleft())

    def _request_rows(self, u: _Unit) -> None:
        """Wait for ``u``'s scores; queue the copies of its kept queries' mask rows, then its
        "rows" flag."""
        clock = _Clock(self.stages)
        slot = u.seq % self._ring.slots
        self._ring.wait(slot, 0)
        clock("device wait")
        masks = u.aside["pred_masks"]
        queries, inner = int(masks.shape[1]), tuple(int(d) for d in masks.shape[2:])
        dtype = np.dtype(str(masks.dtype))
        row_bytes = int(np.prod(inner)) * dtype.itemsize
        picks = [kept_queries(u.small, i, self.options.threshold(u.concept)) for i in range(len(u.entry[1]))]
        total = sum(len(keep) for _, keep in picks)
        buf, host = self._ring.buffer((slot, "rows"), total * row_bytes)
        at = 0
        for i, (scores, keep) in enumerate(picks):
            for start, end, first in ffi.row_runs(i * queries + keep):
                src = ffi.view(masks, (end - start,) + inner, first * row_bytes)
                ffi.copy(src, ffi.view(buf, (end - start,) + inner, (at + start) * row_bytes, dtype))
            rows = host[at * row_bytes:(at + len(keep)) * row_bytes].view(dtype).reshape((len(keep),) + inner)
            u.rows.append((i, scores, keep, rows))
            at += len(keep)
        self._ring.signal(slot, 1)
        u.state = "rows"
        clock("outputs")

    def _receive(self, u: _Unit) -> None:
        """Wait for ``u``'s mask rows; its images' candidates (copied out of the ring)."""
        clock = _Clock(self.stages)
        if u.state == "queued":
            self._request_rows(u)
        self._ring.wait(u.seq % self._ring.slots, 1)
        clock("device wait")
        boxes = u.small["pred_boxes"]
        for i, scores, keep, rows in u.rows:
            u.entry[2][i][u.concept] = Candidates(scores, np.asarray(boxes[i][keep], np.float32),
                                                  np.array(rows, np.float32))
        u.entry[3] -= 1
        clock("outputs")

    def _upload(self, images: Sequence[np.ndarray]):
        """The batch's pixels into one device tensor of ours, through a host buffer the device
        copies from without the host waiting (no host-side stack of the batch first)."""
        first = images[0]
        if self._pixels is None:
            self._pixels = ffi.empty((len(images),) + first.shape, str(first.dtype), self.model.model.device)
        slot = self._seq % self._ring.slots  # the slot of the batch's first unit: its last user is read
        buf, host = self._ring.buffer((slot, "pixels"), len(images) * first.nbytes)
        for i, image in enumerate(images):
            host[i * first.nbytes:(i + 1) * first.nbytes].view(first.dtype).reshape(first.shape)[...] = image
        ffi.copy(ffi.view(buf, tuple(self._pixels.shape), 0, first.dtype), self._pixels)
        return self._pixels

    def _copy_aside(self, slot: int, out: Sequence) -> Dict[str, object]:
        """``detect``'s outputs that labelling reads, copied (device to device, queued) into
        tensors of ours for ring slot ``slot``."""
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
