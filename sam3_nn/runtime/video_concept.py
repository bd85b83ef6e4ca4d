"""Find and follow every instance of a concept through a video (SAM 3's video task) with a
compiled library of parts ``vision,text,detector,interactive,video``: numpy + the TVM runtime.

    from sam3_nn.runtime import Sam3
    from sam3_nn.runtime.video_concept import ConceptSession
    model = Sam3.load("dist/sam3-video.so", "weights/sam3")     # tokenizer beside the weights
    session = ConceptSession(model, "clip.mp4", config="weights/sam3")  # thresholds: config.json
    session.add_text("person")
    for frame in session.propagate():
        frame.object_ids, frame.masks, frame.scores

What runs per frame is ``transformers``' ``Sam3VideoModel._det_track_one_frame`` (the original's
``Sam3VideoBase._det_track_one_frame``), built from the library's functions:

1. ``encode_image``: one ViT trunk pass feeding both necks (the detector's maps and the
   tracker's), on the tracker's device;
2. ``detect`` for each prompt (its text encoding cached), then the detections kept: score
   ``sigmoid(logit) * sigmoid(presence)`` above ``score_threshold_detection`` after a greedy
   mask NMS (``det_nms_thresh``);
3. ``track_step`` for every live object in one call (``VideoSession._compute`` without its
   memory step), the low-resolution masks hole-filled (``fill_hole_area``);
4. the planner (this module, numpy): detections matched to tracks by mask IoU, new objects
   for unmatched confident detections (``new_det_thresh``), the hot-start heuristics (tracks
   unmatched for ``hotstart_unmatch_thresh`` frames or duplicating an older track for
   ``hotstart_dup_thresh`` frames within ``hotstart_delay`` frames of their start are
   removed), keep-alive counters, periodic reconditioning on confident matched detections,
   suppression of overlapping tracks by their most recent occlusion;
5. ``encode_memory_low_res`` for every object in one call (the planned low-resolution masks
   after the pixel-wise non-overlap shrinkage check), and ``track_step`` + ``encode_memory``
   for the new objects (a detection's mask as their mask prompt).

Outputs are held back for ``hotstart_delay`` frames (objects removed by the hot start are
hidden from the frames already held), then post-processed as ``Sam3VideoProcessor``'s
``postprocess_outputs``: masks at the video's size, empty and hidden objects dropped, and
pixels claimed by several objects given to the one the tracker scores highest. That runs in a
thread while the next frame is computed, so a frame comes out one step later.

Several devices: ``detectors=[model_on_gpu1, ...]`` spreads the trunk + detector work of the
frames round-robin over those models, a few frames ahead of the tracker (the official
multi-GPU predictor's scheme); the tracker's maps come back through the host. With one model
(the default) everything stays on its device.

Bounded memory: the tracker's memory bank (on the device) is bounded as in ``VideoSession``;
reconditioned frames stay as conditioning frames (as in the reference); the planner keeps
per object a few counters and the frames it went unmatched (at most the video's length, a few
integers), and the per-frame scores of the current frame only.

Thresholds come from a ``Sam3VideoConfig`` (an HF snapshot's ``config.json``), else the
release's values (``ConceptConfig``).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sam3_nn.errors import InputError
from sam3_nn.runtime import ffi
from sam3_nn.runtime.api import ImageState, VISUAL_PROMPT, split_image_outputs
from sam3_nn.runtime.engine import LibraryError
from sam3_nn.runtime.postprocess import resize_bilinear, sigmoid
from sam3_nn.runtime.transfer import HostRing
from sam3_nn.runtime.video import FrameResult, VideoSession, resize_antialias

NO_OBJ_LOGIT = -10.0  # a suppressed mask's logits, as the reference's
NEVER_OCCLUDED, ALWAYS_OCCLUDED = -1, 100000
REMOVED_SCORE = -1e4


# ---- config ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptConfig:
    """The planner's thresholds: ``Sam3VideoConfig``'s fields, the release's values."""

    score_threshold_detection: float = 0.5
    det_nms_thresh: float = 0.1
    assoc_iou_thresh: float = 0.1
    trk_assoc_iou_thresh: float = 0.5
    new_det_thresh: float = 0.7
    recondition_on_trk_masks: bool = True
    hotstart_delay: int = 15
    hotstart_unmatch_thresh: int = 8
    hotstart_dup_thresh: int = 8
    suppress_unmatched_only_within_hotstart: bool = True
    init_trk_keep_alive: int = 30
    max_trk_keep_alive: int = 30
    min_trk_keep_alive: int = -1
    suppress_overlapping_based_on_recent_occlusion_threshold: float = 0.7
    decrease_trk_keep_alive_for_empty_masklets: bool = False
    fill_hole_area: int = 16
    max_num_objects: int = 10000
    recondition_every_nth_frame: int = 16
    high_conf_thresh: float = 0.8
    high_iou_thresh: float = 0.8

    @classmethod
    def from_hf(cls, d: Dict) -> "ConceptConfig":
        """From a ``Sam3VideoConfig`` dict (other keys ignored; missing ones: the release's)."""
        kw = {f.name: type(f.default)(d[f.name]) for f in fields(cls) if d.get(f.name) is not None}
        cfg = cls(**kw)
        if cfg.hotstart_delay > 0 and max(cfg.hotstart_unmatch_thresh, cfg.hotstart_dup_thresh) > cfg.hotstart_delay:
            raise InputError("concept tracker config: hotstart_unmatch_thresh and hotstart_dup_thresh must not "
                             f"exceed hotstart_delay ({cfg.hotstart_delay})")
        return cfg

    @classmethod
    def load(cls, source) -> "ConceptConfig":
        """``None`` (the release's), a ``ConceptConfig``, a dict, a ``config.json`` or an HF
        snapshot folder holding one (a ``sam3_video`` config: its thresholds; another SAM 3
        config, or converted weights: the release's)."""
        if source is None:
            return cls()
        if isinstance(source, cls):
            return source
        if isinstance(source, dict):
            return cls.from_hf(source)
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                return cls()
        elif not path.endswith(".json"):
            return cls()  # converted weights (.safetensors) carry no config: the release's thresholds
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"concept tracker config {path}: cannot be read ({e})") from None
        return cls.from_hf(d) if d.get("model_type") == "sam3_video" else cls()


# ---- mask helpers (numpy) --------------------------------------------------------------------
def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` and ``[M, H, W]`` bool -> ``[N, M]`` IoU (an empty union counts 1)."""
    fa = a.reshape(len(a), -1).astype(np.float32)
    fb = b.reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return (inter / np.maximum(union, 1.0)).astype(np.float32)


def nms_keep(probs: np.ndarray, masks: np.ndarray, prob_threshold: float, iou_threshold: float) -> np.ndarray:
    """Greedy mask NMS over the detections above ``prob_threshold`` (the original's
    ``nms_masks`` / ``generic_nms_cpu``): ``[Q]`` bool, True for the kept ones."""
    valid = probs > prob_threshold
    idx = np.nonzero(valid)[0]
    keep = np.zeros_like(valid)
    if len(idx) == 0:
        return keep
    ious = mask_iou(masks[idx] > 0, masks[idx] > 0)
    order = np.argsort(probs[idx], kind="stable")[::-1]
    while order.size:
        i = order[0]
        keep[idx[i]] = True
        order = order[1:][ious[i, order[1:]] <= iou_threshold]
    return keep


def _ragged(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``first[i], first[i] + 1, ..., first[i] + counts[i] - 1`` for every ``i``, concatenated."""
    total = int(counts.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(first, counts) + offsets


def _opencv():
    """OpenCV's module (the ``video`` extra), or None: its component labelling is C, about ten
    times the speed of the numpy fallback on a frame's masks."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def component_areas(mask: np.ndarray) -> np.ndarray:
    """``[..., H, W]`` bool -> the area of each pixel's 8-connected component (0 off the mask):
    OpenCV's ``connectedComponentsWithStats`` when it is installed, else :func:`component_areas_numpy`."""
    cv2 = _opencv()
    if cv2 is None:
        return component_areas_numpy(mask)
    shape = mask.shape
    m = np.ascontiguousarray(mask, bool).reshape((-1,) + shape[-2:]).view(np.uint8)
    out = np.empty(m.shape, np.int32)
    for i in range(len(m)):
        _, labels, stats, _ = cv2.connectedComponentsWithStats(m[i], connectivity=8, ltype=cv2.CV_32S)
        area = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
        area[0] = 0  # label 0: off the mask
        np.take(area, labels, out=out[i])
    return out.reshape(shape)


def component_areas_numpy(mask: np.ndarray) -> np.ndarray:
    """:func:`component_areas` in numpy. Union-find over the masks' horizontal runs (a few per
    row for blob-like masks, so far fewer elements than pixels): runs of neighbouring rows
    that touch (diagonally included) are joined, each round hooking every pair's larger root
    under the smaller one, then halving paths until every run points at its root."""
    shape = mask.shape
    h, w = shape[-2], shape[-1]
    m = np.ascontiguousarray(mask, bool).reshape(-1, w)  # every row of every mask
    padded = np.zeros((m.shape[0], w + 2), np.int8)
    padded[:, 1:-1] = m
    step = np.diff(padded, axis=1)
    row, start = np.nonzero(step == 1)  # row-major: runs sorted by row, then column
    _, stop = np.nonzero(step == -1)  # one past each run's last column
    out = np.zeros(m.size, np.int32)
    if len(row) == 0:
        return out.reshape(shape)
    end = stop - 1
    span = w + 2
    # the runs of the row above (same mask) that touch run b: end >= b.start - 1, start <= b.end + 1
    has_above = (row % h) != 0
    b = np.nonzero(has_above)[0]
    above = (row[b] - 1) * span
    lo = np.searchsorted(row * span + end, above + start[b] - 1, side="left")
    hi = np.searchsorted(row * span + start, above + end[b] + 1, side="right")
    counts = np.maximum(hi - lo, 0)
    src, dst = _ragged(lo, counts), np.repeat(b, counts)
    parent = np.arange(len(row), dtype=np.int64)
    while len(src):
        ra, rb = parent[src], parent[dst]
        diff = ra != rb
        if not diff.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[diff], np.minimum(ra, rb)[diff])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    length = end - start + 1
    area = np.bincount(parent, weights=length, minlength=len(row)).astype(np.int64)[parent]
    out[_ragged(row * w + start, length)] = np.repeat(area, length)
    return out.reshape(shape)


def fill_holes(mask: np.ndarray, max_area: int) -> np.ndarray:
    """``[N, H, W]`` logits: background components of at most ``max_area`` pixels become 0.1,
    then foreground components of at most ``min(area / 2, max_area)`` become -0.1 (the
    original's ``fill_holes_in_mask_scores``)."""
    if max_area <= 0 or mask.size == 0:
        return mask
    mask = mask.astype(np.float32).copy()
    bg = mask <= 0
    mask[bg & (component_areas(bg) <= max_area)] = np.float32(0.1)
    fg = mask > 0
    thresh = np.minimum(fg.sum(axis=(-1, -2)) // 2, max_area)[:, None, None]
    mask[fg & (component_areas(fg) <= thresh)] = np.float32(-0.1)
    return mask


def _shrinkage_check(masks: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` logits of one prompt's objects: an object that would keep less than 30% of
    its area where it is not the highest logit gets its logits clamped to -10 (the reference's
    ``_suppress_object_pw_area_shrinkage``)."""
    if len(masks) <= 1:
        return masks
    top = np.argmax(masks, axis=0)[None] == np.arange(len(masks))[:, None, None]
    after = np.where(top, masks, np.minimum(masks, NO_OBJ_LOGIT))
    before_area = np.maximum((masks > 0).sum(axis=(1, 2)), 1).astype(np.float32)
    ratio = (after > 0).sum(axis=(1, 2)).astype(np.float32) / before_area
    keep = ratio >= 0.3
    return np.where(keep[:, None, None], masks, np.minimum(masks, NO_OBJ_LOGIT)).astype(np.float32)


def _highest_score_wins(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` bool masks with a score each: every pixel kept only by the highest-scoring
    mask holding it (the first of equal ones; a score <= 0 keeps nothing), as the reference's
    ``argmax`` over the masks times their scores, painted in score order."""
    out = np.zeros_like(masks)
    taken = np.zeros(masks.shape[1:], bool)
    for i in np.argsort(-scores, kind="stable"):
        if not scores[i] > 0:
            break
        np.greater(masks[i], taken, out=out[i])  # masks[i] & ~taken
        taken |= masks[i]
    return out


# ---- detectors -------------------------------------------------------------------------------
@dataclass
class Detections:
    """One frame's kept detections, all prompts merged (prompt order, then query order)."""

    masks: np.ndarray  # [D, 4g, 4g] low-resolution mask logits
    boxes: np.ndarray  # [D, 4] xyxy in [0, 1]
    scores: np.ndarray  # [D] probability (detection x presence)
    prompt_ids: np.ndarray  # [D]


@dataclass
class _Prompt:
    text: str
    boxes: Optional[List] = None
    box_labels: Optional[List[int]] = None


def _detect_frame(model, maps: List, prompts: Sequence[_Prompt], size: Tuple[int, int],
                  cfg: ConceptConfig) -> Detections:
    """``detect`` for every prompt on one frame's detector maps, kept as ``run_detection`` keeps them."""
    state = ImageState(size, np.zeros((0, 0, 3), np.uint8), maps, owner=model)
    return _keep_detections([model.detect(state, _prompt_text(p), p.boxes, p.box_labels) for p in prompts], cfg)


def _prompt_text(p: _Prompt) -> Optional[str]:
    return p.text if p.boxes is None or p.text != VISUAL_PROMPT else None


DETECT_READ = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits")


def _queue_detect(model, maps: List, prompts: Sequence[_Prompt], size: Tuple[int, int], ring: HostRing,
                  slot: int, uploaded: Dict) -> List[Dict[str, np.ndarray]]:
    """Queue ``detect`` for every prompt on one frame's detector maps, the outputs read copied
    into ``ring``'s buffers of ``slot`` (valid once its flag is up: signalled here). The
    prompts' box inputs are uploaded once (``uploaded``): an upload waits for the device."""
    state = ImageState(size, np.zeros((0, 0, 3), np.uint8), maps, owner=model)
    engine, names = model.model, model.output_names("detect")
    views = []
    for pid, p in enumerate(prompts):
        args = model.detect_args(state, _prompt_text(p), p.boxes, p.box_labels)
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                if (pid, i) not in uploaded:
                    uploaded[(pid, i)] = ffi.to_device(a, engine.device)
                args[i] = uploaded[(pid, i)]
        with engine.lock:  # the outputs are copied before a later call can reuse their memory
            out = engine.call_device("detect", *args)
            views.append({n: ring.download(o, (slot, pid, n)) for n, o in zip(names, out) if n in DETECT_READ})
    ring.signal(slot)
    return views


def _keep_detections(raws: Sequence[Dict[str, np.ndarray]], cfg: ConceptConfig) -> Detections:
    """Each prompt's ``detect`` outputs -> the detections ``run_detection`` keeps."""
    masks, boxes, scores, pids = [], [], [], []
    for pid, raw in enumerate(raws):
        probs = sigmoid(raw["pred_logits"][0])
        if "presence_logits" in raw:
            probs = (probs * sigmoid(raw["presence_logits"][0])).astype(np.float32)
        if cfg.det_nms_thresh > 0.0:
            probs = np.where(nms_keep(probs, raw["pred_masks"][0], cfg.score_threshold_detection,
                                      cfg.det_nms_thresh), probs, np.float32(0.0))
        keep = np.nonzero(probs > cfg.score_threshold_detection)[0]
        masks.append(raw["pred_masks"][0][keep])
        boxes.append(raw["pred_boxes"][0][keep])
        scores.append(probs[keep])
        pids.append(np.full(len(keep), pid, np.int64))
    return Detections(np.concatenate(masks).astype(np.float32), np.concatenate(boxes).astype(np.float32),
                      np.concatenate(scores).astype(np.float32), np.concatenate(pids))


# ---- session ---------------------------------------------------------------------------------
@dataclass
class ConceptFrame:
    """One frame's objects (``Sam3VideoProcessor.postprocess_outputs``): ids ascending."""

    frame_index: int
    object_ids: List[int]
    scores: np.ndarray  # [N] the detection score each object started with
    masks: np.ndarray  # [N, H, W] bool at the video's size
    boxes: np.ndarray  # [N, 4] xyxy pixels of the masks' extents
    # the frame's raw outputs before post-processing: every object's low-resolution logits
    low_res: Dict[int, np.ndarray] = field(default_factory=dict)
    tracker_scores: Dict[int, float] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)


class ConceptSession:
    """Every instance of a text (or exemplar-box) prompt, found and followed (module docstring).
    Click refinements of a tracked object: ``add_points`` / ``add_box`` with its id."""

    def __init__(self, model, video, config=None, detectors: Optional[Sequence] = None,
                 prefetch: Optional[int] = None):
        for f in ("encode_image", "encode_text", "detect", "track_step", "encode_memory_low_res"):
            if not model.has(f):
                raise LibraryError(f"concept tracking needs the library function {f!r}; compile the library with "
                                   "parts vision,text,detector,interactive,video")
        if not any(o["name"].startswith("fpn_hidden_states") for o in model.functions["encode_image"]["outputs"]):
            raise LibraryError("this library's encode_image gives no detector maps: compile it with the detector part")
        self.model = model
        self.tracker = VideoSession(model, video)
        self.cfg = ConceptConfig.load(config)
        self.detectors = list(detectors) if detectors else []
        self.prefetch = prefetch if prefetch is not None else max(len(self.detectors), 1)
        self._pool = ThreadPoolExecutor(len(self.detectors)) if self.detectors else None
        self._post_thread: Optional[ThreadPoolExecutor] = None
        self._ahead: Dict[int, object] = {}
        self._next: Optional[int] = None  # propagation's next frame (read ahead)
        # one model: the next frame's trunk pass and detects are queued while the host plans
        # this one; their outputs come through host buffers (``_queue_next``)
        self._ring = HostRing(model.model.device, 2)
        self._tick = 0
        self._queued_det: Optional[Tuple[int, int, int, List]] = None  # frame, prompts, slot, outputs
        self._uploaded: Dict = {}
        self.prompts: List[_Prompt] = []
        self._reset_planner()

    # -- state --------------------------------------------------------------------------------
    def _reset_planner(self) -> None:
        self.obj_ids: List[int] = []
        self.obj_prompt: Dict[int, int] = {}
        self.obj_score: Dict[int, float] = {}
        self.last_occluded: Dict[int, int] = {}
        self.max_obj_id = -1
        self.first_frame: Dict[int, int] = {}
        self.unmatched: Dict[int, List[int]] = defaultdict(list)
        self.overlaps: Dict[Tuple[int, int], List[int]] = defaultdict(list)
        self.keep_alive: Dict[int, int] = {}
        self.removed: set = set()
        self.hotstart_removed: set = set()
        self.tracker.reset()

    @property
    def num_frames(self) -> Optional[int]:
        return self.tracker.num_frames

    # -- prompts ------------------------------------------------------------------------------
    def add_text(self, text: str) -> int:
        """A concept to find on every frame; returns its prompt id (the same text: the same id)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text prompt must be a non-empty string, got {text!r}")
        for i, p in enumerate(self.prompts):
            if p.text == text and p.boxes is None:
                return i
        self.model.encode_text(text)  # tokenized and encoded once: detect reuses it every frame
        self.prompts.append(_Prompt(text))
        return len(self.prompts) - 1

    def add_boxes(self, boxes, box_labels=None, text: Optional[str] = None) -> int:
        """Exemplar boxes (``xyxy`` video pixels; labels 1 positive / 0 negative), with an
        optional text, as one detector prompt on every frame; returns its prompt id."""
        self.tracker.frame(0)
        _, boxes = self.model.check_prompt(text, boxes, box_labels)
        if boxes is None:
            raise InputError("give at least one exemplar box")
        self.prompts.append(_Prompt(text if text is not None else VISUAL_PROMPT, list(boxes),
                                    None if box_labels is None else [int(v) for v in box_labels]))
        return len(self.prompts) - 1

    def add_points(self, frame_index: int, obj_id: int, points=(), labels=None, box=None) -> FrameResult:
        """Clicks (and/or a box) refining tracked object ``obj_id`` on ``frame_index`` (the
        tracker's ``add_points``); later frames follow the refined mask."""
        if int(obj_id) not in self.obj_ids:
            raise InputError(f"no tracked object {obj_id} (objects: {self.obj_ids})")
        return self.tracker.add_points(frame_index, obj_id, points, labels, box=box)

    def add_box(self, frame_index: int, obj_id: int, box) -> FrameResult:
        return self.add_points(frame_index, obj_id, [], None, box=box)

    def add_object_mask(self, frame_index: int, mask: np.ndarray, prompt_id: int = 0, score: float = 1.0) -> int:
        """A new object from a mask (``HxW``, nonzero = object, any size) on ``frame_index``, as
        if the detector had found it there with ``score`` for prompt ``prompt_id``; returns its
        id. Propagate from the next frame."""
        if not 0 <= prompt_id < len(self.prompts):
            raise InputError(f"no prompt {prompt_id}: add a text or exemplar boxes first")
        m = np.asarray(mask)
        if m.ndim != 2 or m.size == 0:
            raise InputError(f"an object mask must be one HxW array, got shape {m.shape}")
        g4 = self.tracker.mask_size
        low = resize_antialias((m != 0).astype(np.float32), (g4, g4)) >= 0.5
        feats, _ = self._features(frame_index)
        oid = self.max_obj_id + 1
        self.max_obj_id = oid
        self.obj_prompt[oid], self.obj_score[oid] = int(prompt_id), float(score)
        self.first_frame[oid], self.keep_alive[oid] = frame_index, self.cfg.init_trk_keep_alive
        self._add_objects(frame_index, feats, [oid], np.where(low, 10.0, -10.0)[None].astype(np.float32), False)
        self.obj_ids.append(oid)
        return oid

    def reset(self) -> None:
        """Forget every object (the prompts stay)."""
        self._reset_planner()

    # -- frames -------------------------------------------------------------------------------
    def _features(self, frame: int) -> Tuple[List, Detections]:
        """The frame's tracker maps (on the tracker's device) and detections."""
        size = self.tracker.frame(frame).shape[:2]
        if not self.detectors:
            feats = self.tracker._frame_features(frame)
            if self._next is not None:  # the next frame is decoded while the device runs this one
                self.tracker._read_ahead(self._next)
            queued, self._queued_det = self._queued_det, None
            if queued is not None and queued[0] == frame and queued[1] == len(self.prompts):
                self._ring.wait(queued[2])
                # the mask logits stay float16 here: only the kept queries' are converted
                raws = [{n: v if n == "pred_masks" else v.astype(np.float32) for n, v in views.items()}
                        for views in queued[3]]
                return feats, _keep_detections(raws, self.cfg)
            return feats, _detect_frame(self.model, self.tracker.detector_maps, self.prompts, size, self.cfg)
        for f in range(frame, frame + self.prefetch):  # the next frames go out to the detectors
            if f not in self._ahead and (self.num_frames is None or f < self.num_frames):
                try:
                    rgb = self.tracker.frame(f)
                except InputError:
                    if f == frame:
                        raise
                    break  # an iterator's end
                det = self.detectors[f % len(self.detectors)]
                self._ahead[f] = self._pool.submit(self._remote, det, rgb, size)
        self.tracker.frame(frame)
        tracker_maps, dets = self._ahead.pop(frame).result()
        for f in [f for f in self._ahead if f < frame]:
            self._ahead.pop(f).cancel()
        self.tracker._features = (frame, tracker_maps)  # host arrays: the calls upload them
        return tracker_maps, dets

    def _queue_next(self) -> None:
        """Queue the next frame's trunk pass and detects behind this frame's work (one model)."""
        tr, nxt = self.tracker, self._next
        if nxt is None or self.detectors or self._queued_det is not None or tr.video_size is None:
            return
        tr._queue_features(nxt)
        if tr._queued is None or tr._queued[0] != nxt:
            return
        names = self.model.output_names("encode_image")
        maps = [o for n, o in zip(names, tr._queued[3]) if not n.startswith("tracker_embeddings.")]
        slot = self._tick % self._ring.slots
        self._tick += 1
        views = _queue_detect(self.model, maps, self.prompts, tr.video_size, self._ring, slot, self._uploaded)
        self._queued_det = (nxt, len(self.prompts), slot, views)

    def _remote(self, det, rgb, size):
        """Trunk + detector for one frame on a detector model; the tracker maps to the host."""
        state = det.set_image(rgb)
        maps = [ffi.to_numpy(m) for m in state.tracker_features]
        return maps, _detect_frame(det, state.features, self.prompts, size, self.cfg)

    def propagate(self, start: int = 0, max_frames: Optional[int] = None,
                  reverse: bool = False) -> Iterator[ConceptFrame]:
        """Frames from ``start`` on (``reverse``: backward), each a ``ConceptFrame``, held back
        ``hotstart_delay`` frames as the reference holds them. A frame's post-processing (masks
        at the video's size) runs in a thread while the next frame is computed, so a frame
        comes out once the next one's step is done (or the propagation's end)."""
        if not self.prompts:
            raise InputError("no prompt: add a text (add_text) or exemplar boxes (add_boxes) first")
        n = self.num_frames
        limit = max_frames if max_frames is not None else (n if n is not None else 1 << 62)
        if reverse:
            end = max(start - limit, 0)
            order = range(start - 1, end - 1, -1)
        else:
            end = start + limit if n is None else min(start + limit, n - 1)
            order = range(start, end + 1)
        held: deque = deque()
        posting: deque = deque()  # post-processing under way, in frame order
        if self._post_thread is None:
            self._post_thread = ThreadPoolExecutor(1, thread_name_prefix="sam3-concept-post")

        def post(raw: Dict) -> None:  # the objects hidden as of now, as an immediate call would see them
            posting.append(self._post_thread.submit(self._post, raw, raw["suppressed"] | self.hotstart_removed))

        for f in order:
            if n is None:
                try:
                    self.tracker.frame(f)
                except InputError:
                    if getattr(self.tracker.frames, "exhausted", False):
                        break
                    raise
            nxt = f - 1 if reverse else f + 1
            self._next = nxt if nxt in order else None
            raw = self.step(f, reverse)
            self._next = None
            while posting:
                yield posting.popleft().result()
            if self.cfg.hotstart_delay > 0:
                held.append(raw)
                if f == end:
                    while held:
                        post(held.popleft())
                elif len(held) >= self.cfg.hotstart_delay:
                    post(held.popleft())
            else:
                post(raw)
        while held:  # an iterator ran out before the expected end
            post(held.popleft())
        while posting:
            yield posting.popleft().result()

    # -- one frame ----------------------------------------------------------------------------
    def step(self, frame: int, reverse: bool = False) -> Dict:
        """Detect, track, plan and update on one frame; the raw outputs (``_post`` makes the
        frame's ``ConceptFrame`` of them)."""
        cfg = self.cfg
        feats, det = self._features(frame)
        tr = self.tracker
        # tracker propagation for every live object, memory deferred until after planning
        results: Dict[int, Tuple[np.ndarray, float]] = {}
        batch = []
        for oid in self.obj_ids:
            obj = tr._objects[oid]
            if frame in obj.cond:
                results[oid] = (obj.cond[frame].low_res, obj.cond[frame].score)
            else:
                batch.append((oid, False, None, None, reverse))
        if batch:
            tr._compute(frame, feats, batch, results, encode=False)
            for oid, *_ in batch:
                tr._objects[oid].tracked[frame] = reverse
        self._queue_next()  # the device runs the next frame's trunk and detects while the host plans
        prev_ids = list(self.obj_ids)
        g4 = tr.mask_size
        if prev_ids:
            trk = fill_holes(np.stack([results[o][0] for o in prev_ids]), cfg.fill_hole_area)
            trk_scores = np.array([results[o][1] for o in prev_ids], np.float32)
        else:
            trk = np.zeros((0, g4, g4), np.float32)
            trk_scores = np.zeros((0,), np.float32)

        # association
        new_inds, unmatched, det_to_trk, trk_to_det, empty = self._associate(det, trk, prev_ids)
        if len(prev_ids) + len(new_inds) > cfg.max_num_objects:
            k = cfg.max_num_objects - len(prev_ids)
            top = np.argsort(-det.scores[new_inds], kind="stable")[:max(k, 0)]
            new_inds = [new_inds[i] for i in top]
        new_ids = list(range(self.max_obj_id + 1, self.max_obj_id + 1 + len(new_inds)))
        for oid, d in zip(new_ids, new_inds):
            self.obj_prompt[oid] = int(det.prompt_ids[d])
        newly_removed, suppressed = self._hotstart(frame, reverse, det_to_trk, new_ids, empty, unmatched)

        # reconditioning on confident matched detections
        recond: Dict[int, np.ndarray] = {}
        if cfg.recondition_every_nth_frame > 0 and frame % cfg.recondition_every_nth_frame == 0 and trk_to_det:
            for oid, d in trk_to_det.items():
                i = prev_ids.index(oid)
                if trk_scores[i] <= cfg.high_conf_thresh:
                    continue
                recond[oid] = None if cfg.recondition_on_trk_masks else \
                    (det.masks[d] >= 0.5).astype(np.float32)

        # occlusion suppression, then the memory of every tracked object
        last_occ: Dict[int, int] = {}
        if prev_ids:
            trk, last_occ = self._suppress_occluded(frame, trk, prev_ids, newly_removed, reverse)
            self._update_memories(frame, feats, trk, prev_ids, recond)

        # new objects from their detections' masks; removed objects dropped
        if new_ids:
            self._add_objects(frame, feats, new_ids, det.masks[new_inds], reverse)
        # scores: new objects' detection scores, removed objects' -1e4, then this frame's tracker
        # scores (the reference's order: a removed object shows its tracker score on its last frame)
        new_scores = det.scores[new_inds].tolist() if new_ids else []
        self.obj_score.update(zip(new_ids, new_scores))
        tracker_scores: Dict[int, float] = dict(zip(new_ids, new_scores))
        self.max_obj_id = max([self.max_obj_id] + new_ids)
        for oid in newly_removed:
            self.obj_score[oid] = REMOVED_SCORE
            tracker_scores[oid] = REMOVED_SCORE
            last_occ.pop(oid, None)
        if prev_ids:
            tracker_scores.update(zip(prev_ids, sigmoid(trk_scores).tolist()))
        self.last_occluded = last_occ

        # outputs: tracked masks (as propagated and suppressed), new detections (hole-filled),
        # reconditioned objects (their detection's mask)
        low_res = {oid: trk[i] for i, oid in enumerate(prev_ids)}
        if new_ids:
            filled = fill_holes(det.masks[new_inds], cfg.fill_hole_area)
            low_res.update(zip(new_ids, filled))
        for oid in recond:
            low_res[oid] = det.masks[trk_to_det[oid]]
        for oid in newly_removed:
            if oid in tr._objects:
                tr.remove_object(oid)
        self.obj_ids = [o for o in prev_ids + new_ids if o not in newly_removed]
        if cfg.hotstart_delay > 0:  # the reference hides removed objects only with a hot start
            self.hotstart_removed.update(newly_removed)
        tr._prune(frame)
        return {"frame": frame, "low_res": low_res, "scores": dict(self.obj_score),
                "tracker_scores": tracker_scores, "suppressed": set(suppressed)}

    def _associate(self, det: Detections, trk: np.ndarray, ids: List[int]):
        """``Sam3VideoModel._associate_det_trk``."""
        cfg = self.cfg
        if len(trk) == 0:
            return list(range(len(det.scores))), [], {}, {}, []
        nonempty = (trk > 0).any(axis=(1, 2))
        if len(det.scores) == 0:
            return [], [o for o, e in zip(ids, nonempty) if e], {}, {}, [o for o, e in zip(ids, nonempty) if not e]
        ious = mask_iou(det.masks > 0, trk > 0)
        trk_prompts = np.array([self.obj_prompt[o] for o in ids])
        ious = np.where(det.prompt_ids[:, None] == trk_prompts[None, :], ious, np.float32(0.0))
        matched = (ious >= cfg.trk_assoc_iou_thresh).any(axis=0)
        unmatched = [o for o, e, m in zip(ids, nonempty, matched) if e and not m]
        empty = [o for o, e in zip(ids, nonempty) if not e]
        det_any = (ious >= cfg.assoc_iou_thresh).any(axis=1)
        is_new = (det.scores >= cfg.new_det_thresh) & ~det_any
        new_inds = np.nonzero(is_new)[0].tolist()
        best = ious.argmax(axis=1)
        high = (det.scores >= cfg.high_conf_thresh) & ~is_new & (ious.max(axis=1) >= cfg.high_iou_thresh)
        det_to_trk, trk_to_det = {}, {}
        for d in range(len(det.scores)):
            det_to_trk[d] = [o for o, m in zip(ids, ious[d] >= cfg.assoc_iou_thresh) if m]
            if high[d]:
                trk_to_det[ids[int(best[d])]] = d
        return new_inds, unmatched, det_to_trk, trk_to_det, empty

    def _hotstart(self, frame, reverse, det_to_trk, new_ids, empty, unmatched):
        """``Sam3VideoModel._process_hotstart``: -> (objects removed now, objects suppressed)."""
        cfg = self.cfg
        removed_now: set = set()
        suppressed: set = set()
        diff = frame - cfg.hotstart_delay if not reverse else frame + cfg.hotstart_delay
        for oid in new_ids:
            self.first_frame.setdefault(oid, frame)
            self.keep_alive[oid] = cfg.init_trk_keep_alive
        matched = {o for trks in det_to_trk.values() for o in trks}
        for oid in matched:
            self.keep_alive[oid] = min(cfg.max_trk_keep_alive, self.keep_alive[oid] + 1)
        for oid in unmatched:
            self.unmatched[oid].append(frame)
            self.keep_alive[oid] = max(cfg.min_trk_keep_alive, self.keep_alive[oid] - 1)
        if cfg.decrease_trk_keep_alive_for_empty_masklets:
            for oid in empty:
                self.keep_alive[oid] = max(cfg.min_trk_keep_alive, self.keep_alive[oid] - 1)

        def within(oid):
            first = self.first_frame[oid]
            return first > diff if not reverse else first < diff

        for oid, frames in self.unmatched.items():
            if oid in self.removed or oid in removed_now:
                continue
            if len(frames) >= cfg.hotstart_unmatch_thresh and within(oid):
                removed_now.add(oid)
            if (self.keep_alive[oid] <= 0 and not cfg.suppress_unmatched_only_within_hotstart
                    and oid not in self.removed and oid not in removed_now):
                suppressed.add(oid)
        for trks in det_to_trk.values():
            if len(trks) < 2:
                continue
            pick = min if not reverse else max
            first = pick(trks, key=lambda o: self.first_frame[o])
            for oid in trks:
                if oid != first:
                    self.overlaps[(first, oid)].append(frame)
        for (first, oid), frames in self.overlaps.items():
            if oid in self.removed or oid in removed_now:
                continue
            if within(oid) and len(frames) >= cfg.hotstart_dup_thresh:
                removed_now.add(oid)
        self.removed.update(removed_now)
        return removed_now, suppressed

    def _suppress_occluded(self, frame, trk, ids, newly_removed, reverse):
        """``_suppress_overlapping_based_on_recent_occlusion``: -> (masks, last occlusions)."""
        thr = self.cfg.suppress_overlapping_based_on_recent_occlusion_threshold
        last = np.array([self.last_occluded.get(o, ALWAYS_OCCLUDED if o in newly_removed else NEVER_OCCLUDED)
                         for o in ids], np.int64)
        binary = trk > 0
        if thr <= 0.0:
            return trk, {}
        suppress = np.zeros(len(ids), bool)
        prompts = np.array([self.obj_prompt[o] for o in ids])
        for pid in np.unique(prompts):
            idx = np.nonzero(prompts == pid)[0]
            if len(idx) <= 1:
                continue
            iou = mask_iou(binary[idx], binary[idx])
            pairs = np.triu(iou >= thr, k=1)
            li, lj = last[idx][:, None], last[idx][None, :]
            newer = (li > lj) if not reverse else (li < lj)
            older = (lj > li) if not reverse else (lj < li)
            si = pairs & newer & (lj > -1)
            sj = pairs & older & (li > -1)
            suppress[idx] = si.any(axis=1) | sj.any(axis=0)
        occluded = ~binary.any(axis=(1, 2))
        new_last = last.copy()
        new_last[occluded | suppress] = frame
        trk = trk.copy()
        trk[suppress] = np.float32(NO_OBJ_LOGIT)
        return trk, {o: int(v) for o, v in zip(ids, new_last)}

    def _update_memories(self, frame, feats, trk, ids, recond) -> None:
        """``_tracker_update_memories``: one ``encode_memory_low_res`` call for every object."""
        tr = self.tracker
        masks = trk.copy()
        for oid, m in recond.items():
            obj = tr._objects[oid]
            if m is not None:
                masks[ids.index(oid)] = m
            if frame in obj.non_cond:  # a reconditioned frame becomes a conditioning frame
                out = obj.non_cond.pop(frame)
                out.low_res = trk[ids.index(oid)].copy() if out.low_res is None else out.low_res
                obj.cond[frame] = out
        prompts = np.array([self.obj_prompt[o] for o in ids])
        for pid in np.unique(prompts):
            idx = np.nonzero(prompts == pid)[0]
            masks[idx] = _shrinkage_check(masks[idx])
        score = np.where((masks > 0).any(axis=(1, 2)), np.float32(10.0), np.float32(-10.0)).astype(np.float32)
        dt, engine = tr.dtype, self.model.model
        args = (feats[2], masks[:, None].astype(dt), score[:, None].astype(dt), np.zeros(len(ids), np.int32))
        with engine.lock:  # the output is kept before any later call can reuse its memory
            memories = tr._keep_memory(engine.call_device("encode_memory_low_res", *args)[0])
        for i, oid in enumerate(ids):
            obj = tr._objects[oid]
            for store in (obj.cond, obj.non_cond):
                if frame in store:
                    store[frame].memory = memories[i]

    def _add_objects(self, frame, feats, new_ids, det_masks, reverse) -> None:
        """New objects from their detections' masks (``>= 0.5``), resized to the model input
        as the reference's ``_use_mask_as_output`` resizes a mask prompt."""
        tr = self.tracker
        s = tr.image_size
        batch = []
        for oid, m in zip(new_ids, det_masks):
            soft = resize_antialias((m >= 0.5).astype(np.float32), (s, s))
            obj = tr._object(oid)
            obj.masks[frame] = soft
            batch.append((oid, True, None, soft, False))
        results: Dict = {}
        tr._compute(frame, feats, batch, results)
        for oid in new_ids:
            tr._objects[oid].masks.pop(frame, None)

    # -- outputs ------------------------------------------------------------------------------
    def _post(self, raw: Dict, hidden: set) -> ConceptFrame:
        """``Sam3VideoProcessor.postprocess_outputs`` on one frame's raw outputs, ``hidden``
        objects left out."""
        size = self.tracker.video_size
        h, w = size
        ids = sorted(raw["low_res"])
        shown = [oid for oid in ids if oid not in hidden]
        full = self.tracker._video_masks(np.stack([raw["low_res"][o] for o in shown]).astype(np.float32), size) \
            if shown else np.zeros((0, h, w), bool)  # > 0, objects over a few threads
        nonempty = full.any(axis=(1, 2))
        ids_kept = [o for o, e in zip(shown, nonempty) if e]
        masks = full[nonempty]
        scores = np.array([raw["scores"][o] for o in ids_kept], np.float32)
        tscores = np.array([raw["tracker_scores"].get(o, 0.0) for o in ids_kept], np.float32)
        if len(ids_kept) > 1:  # a pixel of several objects goes to the one the tracker scores highest
            prompts = np.array([self.obj_prompt[o] for o in ids_kept])
            out = masks.copy()
            for pid in np.unique(prompts):
                idx = np.nonzero(prompts == pid)[0]
                if len(idx) > 1:
                    out[idx] = _highest_score_wins(masks[idx], tscores[idx])
            masks = out
        boxes = np.zeros((len(ids_kept), 4), np.float32)
        for i, m in enumerate(masks):
            rows, cols = m.any(axis=1), m.any(axis=0)  # the extent from the projections
            if rows.any():
                ys, xs = np.nonzero(rows)[0], np.nonzero(cols)[0]
                boxes[i] = (xs[0], ys[0], xs[-1], ys[-1])
        return ConceptFrame(raw["frame"], ids_kept, scores, masks, boxes, raw["low_res"], raw["tracker_scores"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._post_thread is not None:
            self._post_thread.shutdown(wait=True)
        self.tracker.close()
