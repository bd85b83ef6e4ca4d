"""Follow objects through a video (the SAM 2 task) with a compiled library of parts
``vision,interactive,video``: no PyTorch, numpy + the TVM runtime.

    from sam3_nn.runtime import Sam3
    from sam3_nn.runtime.video import VideoSession
    model = Sam3.load("dist/sam3-video.so", "weights/sam3.safetensors")
    session = VideoSession(model, "clip.mp4")            # a file, a folder of frames or an iterator
    session.add_points(0, obj_id=1, points=[(210, 350)], labels=[1])
    session.add_box(3, obj_id=2, box=(10, 20, 200, 300))
    for frame in session.propagate():                    # forward; reverse=True for backward
        frame.object_ids, frame.masks, frame.object_scores

What runs per frame is ``transformers``' ``Sam3TrackerVideoModel.forward`` (itself the
original's ``track_step``): every object of the frame goes through the library's
``track_step`` in one call (objects are the batch), then the ones computed on this frame
through ``encode_memory`` in one call. Per object the session keeps its conditioning frames
(the frames it was given a prompt on: memory, object pointer, and low-res mask) and its
recent tracked frames (memory and object pointer only); a frame attends to the
``max_cond_frame_num`` (4) conditioning frames closest to it, the ``num_maskmem - 1`` (6)
frames just before it (after it, backward) and up to ``max_object_pointers`` (16) object
pointers with their temporal distances, as the reference selects them.

Bounded memory: tracked frames further than ``max(num_maskmem, max_object_pointers) - 1``
(15) from the frame just processed are dropped, and only the current frame's features are
kept, so host and device memory stay flat however long the video. (The reference keeps every
frame's outputs; the two differ only when a propagation starts more than 15 frames away from
the frame processed last, where the reference would read tracked frames that the session has
dropped: docs/fidelity.md V3.) Each frame's memory is rounded to bfloat16, as the reference
stores it, and kept on the device: by ``encode_memory`` itself in libraries that say so in
the manifest (it never leaves the device), else on the host and uploaded back. Object
pointers and low-res masks are numpy on the host; frame features stay on the device.

Frames: a folder of images (sorted by name), a video file (decoded with PyAV, the ``video``
extra, frame by frame as needed; going back seeks to the nearest keyframe), or any iterable
of images (``HxWx3`` uint8 arrays, PIL images or paths), read as propagation reaches them
(a frame behind the last one read cannot be revisited from an iterator). Prompt
coordinates are pixels of the video frame; masks come back at the video's resolution.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sam3_nn.errors import InputError, UserError
from sam3_nn.runtime import ffi
from sam3_nn.runtime.engine import LibraryError
from sam3_nn.runtime.interactive import check_box, check_points, to_model_coords
from sam3_nn.runtime.postprocess import resize_bilinear
from sam3_nn.runtime.preprocess import load_image, normalize, resize_uint8
from sam3_nn.runtime.transfer import HostRing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MODE_INIT, MODE_MEMORY, MODE_RAW = 0, 1, 2  # track_step's per-object feature source
MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0  # a mask prompt used as the output: logits -10 / +10
NOT_A_POINT = -1
MASK_THREADS = min(4, os.cpu_count() or 1)


# ---- frames ----------------------------------------------------------------------------------
class FrameSource:
    """Frames by index, decoded when asked for. ``len`` is None when unknown (an iterator)."""

    def __len__(self) -> int:
        n = self.num_frames
        if n is None:
            raise TypeError("the number of frames of this source is not known ahead")
        return n

    num_frames: Optional[int] = None

    def get(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderFrames(FrameSource):
    """The image files of a folder, sorted by name."""

    def __init__(self, folder: str):
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise InputError(f"video folder {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = [os.path.join(folder, n) for n in names]
        self.num_frames = len(self.paths)

    def get(self, index: int) -> np.ndarray:
        return load_image(self.paths[index])


class IteratorFrames(FrameSource):
    """Frames from any iterable, read in order; the last ``keep`` read stay for revisits."""

    def __init__(self, frames: Iterable, keep: int = 2, num_frames: Optional[int] = None):
        self._it = iter(frames)
        self._next = 0
        self._kept: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._keep = keep
        self.num_frames = num_frames  # None until the iterator runs out, unless given
        self.exhausted = False

    def get(self, index: int) -> np.ndarray:
        if index in self._kept:
            return self._kept[index]
        if index < self._next:
            raise InputError(f"frame {index} was read from the frame iterator already and is gone "
                             "(an iterator cannot go back: give a folder or a video file)")
        while self._next <= index:
            try:
                frame = next(self._it)
            except StopIteration:
                self.exhausted = True
                self.num_frames = self._next
                raise IndexError(index) from None
            self._kept[self._next] = load_image(frame)
            self._next += 1
            while len(self._kept) > self._keep:
                self._kept.popitem(last=False)
        return self._kept[index]


class VideoFileFrames(FrameSource):
    """A video file decoded with PyAV (FFmpeg): sequential reads decode on; a jump back seeks
    to the keyframe before and decodes forward."""

    def __init__(self, path: str):
        try:
            import av  # the optional "video" extra
        except ImportError:
            raise UserError("reading a video file needs PyAV: pip install 'sam3_nn[video]' (or give a "
                            "folder of frames)") from None
        self._av = av
        self.path = path
        try:
            self._container = av.open(path)
            self._stream = self._container.streams.video[0]
        except (av.FFmpegError, IndexError, OSError) as e:
            raise InputError(f"video {path}: cannot be read as a video ({e})") from None
        self._frames = None
        self._pos = 0
        n = self._stream.frames
        if not n:
            n = sum(1 for _ in self._decode_from_start())
            self._frames = None
        self.num_frames = int(n)
        if self.num_frames == 0:
            raise InputError(f"video {path}: no frames")

    def _decode_from_start(self):
        self._container.seek(0)
        self._pos = 0
        return self._container.decode(self._stream)

    def get(self, index: int) -> np.ndarray:
        if self._frames is None or index < self._pos:
            self._frames = self._decode_from_start()
        for frame in self._frames:
            self._pos += 1
            if self._pos - 1 == index:
                return frame.to_ndarray(format="rgb24")
        raise IndexError(index)

    def close(self) -> None:
        self._container.close()


def open_frames(video) -> FrameSource:
    """A video file path, a folder of images, a ``FrameSource`` or an iterable of images."""
    if isinstance(video, FrameSource):
        return video
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if os.path.isdir(path):
            return FolderFrames(path)
        if not os.path.isfile(path):
            raise InputError(f"video {path}: no such file or folder")
        return VideoFileFrames(path)
    if isinstance(video, np.ndarray) and video.ndim == 4:
        return IteratorFrames(list(video), keep=len(video), num_frames=len(video))
    try:
        return IteratorFrames(iter(video))
    except TypeError:
        raise InputError(f"video must be a file, a folder of frames or an iterable of images, got "
                         f"{type(video).__name__}") from None


# ---- numerics --------------------------------------------------------------------------------
def round_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even), kept as float32: the
    reference stores the memory in bfloat16."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def round_bfloat16_as(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to bfloat16 as :func:`round_bfloat16` (through float32), returned as
    ``dtype``. float16 input and output: on the 16-bit patterns directly (a tenth of the time
    for a frame of 16 objects' memory): for normal numbers, rounding 10 mantissa bits to 7 is
    the same as rounding float32's 23 to 7; subnormals, infinities and NaNs take the float32 way."""
    if x.dtype != np.float16 or np.dtype(dtype) != np.float16:
        return round_bfloat16(np.asarray(x, np.float32)).astype(dtype)
    u = np.ascontiguousarray(x).view(np.uint16)
    r = u >> np.uint16(3)
    r &= np.uint16(1)
    r += np.uint16(3)
    r += u
    r &= np.uint16(0xFFF8)
    exponent = u & np.uint16(0x7C00)
    special = (exponent == 0) | (exponent == np.uint16(0x7C00))
    if special.any():
        r[special] = round_bfloat16(u[special].view(np.float16).astype(np.float32)).astype(np.float16).view(np.uint16)
    return r.view(np.float16)


def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch's antialiased bilinear resize
    (``interpolate(mode="bilinear", antialias=True, align_corners=False)``)."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        t = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * inv))
        w[i, lo:hi] = t / t.sum() if t.sum() > 0 else 0.0
    return w.astype(np.float32)


def resize_antialias(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``[..., H, W]`` float -> ``[..., h, w]`` (antialiased bilinear, as PyTorch's)."""
    wh = _aa_weights(x.shape[-2], size[0])
    ww = _aa_weights(x.shape[-1], size[1])
    y = np.einsum("...hw,vw->...hv", x.astype(np.float32), ww)
    return np.einsum("...hv,uh->...uv", y, wh).astype(np.float32)


# ---- session state ---------------------------------------------------------------------------
class _DeviceBank:
    """``track_step``'s ``memory`` input ``[N, M, g*g, mem_dim]`` kept on the device: each
    slot is copied device to device from the frame memory it now holds, and only when that
    changed, so a frame uploads no memory (a 1008 px bank is 6.6 MB per object). Empty
    slots keep earlier finite values (the key mask excludes them). One buffer per object
    count, the two most recent counts kept."""

    KEEP = 2

    def __init__(self, slots: int, tokens: int, dim: int, dtype: str, device):
        self.slots, self.tokens, self.dim, self.dtype, self.device = slots, tokens, dim, dtype, device
        self._buffers: "OrderedDict[int, list]" = OrderedDict()  # n -> [tensor, slot views, held]

    def frame_memory(self, rounded: np.ndarray, ring: Optional[HostRing] = None, key=None) -> List:
        """``[N, g*g, mem_dim]`` host memory of one frame -> a device tensor per object (copied
        through ``ring``'s buffer ``key`` without waiting for the device, when given)."""
        rounded = np.ascontiguousarray(rounded, self.dtype)
        if ring is None:
            t = ffi.to_device(rounded, self.device)
        else:
            t = ffi.empty(rounded.shape, self.dtype, self.device)
            ring.upload(rounded, t, key)
        return self._per_object(t)

    def frame_memory_on_device(self, memory) -> List:
        """``encode_memory``'s output, already rounded by the library -> a device tensor per
        object (a copy of ours, queued device to device: a later call may reuse the output's
        memory)."""
        t = ffi.empty(tuple(int(d) for d in memory.shape), self.dtype, self.device)
        ffi.copy(memory, t)
        return self._per_object(t)

    def _per_object(self, t) -> List:
        row = self.tokens * self.dim * np.dtype(self.dtype).itemsize
        return [ffi.view(t, (self.tokens, self.dim), i * row) for i in range(int(t.shape[0]))]

    def input(self, per_object: Sequence[Sequence]):
        """Per object, the device memories of its filled slots (in slot order) -> the input."""
        n = len(per_object)
        entry = self._buffers.pop(n, None)
        if entry is None:
            t = ffi.to_device(np.zeros((n, self.slots, self.tokens, self.dim), self.dtype), self.device)
            row = self.tokens * self.dim * np.dtype(self.dtype).itemsize
            entry = [t, [ffi.view(t, (self.tokens, self.dim), k * row) for k in range(n * self.slots)],
                     [None] * (n * self.slots)]
        self._buffers[n] = entry
        while len(self._buffers) > self.KEEP:
            self._buffers.popitem(last=False)
        t, views, held = entry
        for i, memories in enumerate(per_object):
            for j, mem in enumerate(memories[:self.slots]):
                k = i * self.slots + j
                if held[k] is not mem:
                    ffi.copy(mem, views[k])
                    held[k] = mem
        return t

    def clear(self) -> None:
        self._buffers.clear()


@dataclass
class _Output:
    """What a frame leaves for later frames of one object."""

    memory: object  # [g*g, mem_dim] device tensor in the library's dtype (bfloat16 values)
    pointer: np.ndarray  # [C]
    score: float
    low_res: Optional[np.ndarray] = None  # [4g, 4g]: kept for conditioning frames (reused as output)


@dataclass
class _Object:
    points: Dict[int, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # frame -> (xy [K,2], labels)
    masks: Dict[int, np.ndarray] = field(default_factory=dict)  # frame -> [S, S] 0/1 float32
    cond: Dict[int, _Output] = field(default_factory=dict)
    non_cond: Dict[int, _Output] = field(default_factory=dict)
    tracked: Dict[int, bool] = field(default_factory=dict)  # frame -> reverse; tracked (not prompted) frames


@dataclass
class FrameResult:
    """One frame: the objects in the session's order, their masks at the video's size."""

    frame_index: int
    object_ids: List[int]
    masks: np.ndarray  # [N, H, W] bool
    object_scores: np.ndarray  # [N] float32 object score logits (> 0: present)
    low_res_logits: np.ndarray  # [N, 4g, 4g] float32
    timings: Dict[str, float] = field(default_factory=dict)


class VideoSession:
    """Objects given on some frames, followed through the others (module docstring)."""

    def __init__(self, model, video, mask_threshold: float = 0.0):
        for f in ("encode_image", "track_step", "encode_memory", "mask_prompt"):
            if not model.has(f):
                raise LibraryError(f"video tracking needs the library function {f!r}; compile the library "
                                   "with parts vision,interactive,video")
        self.model = model
        self.frames = open_frames(video)
        # the length the object pointers' temporal encoding uses: known when the source opens
        # (a folder, a file, an array), else none (streaming) for the whole session; an
        # iterator's end found later by the read-ahead thread must not change it mid-way
        self._length = self.frames.num_frames
        cfg = model.manifest["config"]
        v = cfg.get("video", {})
        self.num_maskmem = int(v.get("num_maskmem", 7))
        self.max_cond = int(v.get("max_cond_frame_num", 4))
        self.max_pointers = int(v.get("max_object_pointers", 16))
        fns = model.functions["track_step"]["inputs"]
        spec = {i["name"]: i for i in fns}
        self.memory_slots = int(spec["memory"]["shape"][1])
        self.tokens = int(spec["memory"]["shape"][2])
        self.mem_dim = int(spec["memory"]["shape"][3])
        self.pointer_slots = int(spec["pointers"]["shape"][1])
        self.hidden = int(spec["pointers"]["shape"][2])
        self.point_slots = int(spec["points"]["shape"][1])
        self.mask_size = int(spec["mask_input"]["shape"][-1])
        self.dtype = spec["memory"]["dtype"]
        self.image_size = model.image_size
        self.mask_threshold = float(mask_threshold)
        self.window = max(self.num_maskmem, self.max_pointers) - 1
        self.video_size: Optional[Tuple[int, int]] = None
        self._objects: "OrderedDict[int, _Object]" = OrderedDict()
        self._new_inputs: List[int] = []
        self._features: Optional[Tuple[int, List]] = None
        self.detector_maps: List = []
        self._rgb: Optional[Tuple[int, np.ndarray]] = None
        self._pixel_dtype = model._input_dtype("encode_image", "pixel_values")
        # the next frame is decoded and pre-processed in a thread while the device runs this one
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sam3-frames")
        self._read_lock = threading.Lock()
        self._ahead: Optional[Tuple[int, Future]] = None
        self._post: Optional[ThreadPoolExecutor] = None
        self._bank = _DeviceBank(self.memory_slots, self.tokens, self.mem_dim, self.dtype,
                                 model.model.device)
        # propagation queues the next frame's trunk pass behind this frame's work, and reads
        # this frame's outputs through host buffers: the device runs the trunk meanwhile
        self._ring = HostRing(model.model.device, 2)
        # libraries that round the memory to bfloat16 themselves: it never leaves the device
        self.memory_on_device = all(
            any(o.get("values") == "bfloat16" for o in model.functions[f]["outputs"])
            for f in ("encode_memory", "encode_memory_low_res") if model.has(f))
        self._tick = 0  # frames computed: the ring slot alternates
        self._queued: Optional[Tuple[int, np.ndarray, np.ndarray, List]] = None  # index, rgb, pixels, outputs
        self._pixels_device = None
        self._constants: Dict[Tuple, object] = {}

    # -- frames ----------------------------------------------------------------------------
    @property
    def num_frames(self) -> Optional[int]:
        return self.frames.num_frames

    def frame(self, index: int) -> np.ndarray:
        """The RGB frame ``index`` (``HxWx3`` uint8)."""
        return self._frame(index, pixels=False)[0]

    def _frame(self, index: int, pixels: bool):
        """(rgb, pixels or None) of frame ``index``, checked against the video's size."""
        if self._rgb is not None and self._rgb[0] == index:
            _, rgb, px = self._rgb
            if pixels and px is None:
                px = normalize(resize_uint8(rgb, self.image_size), self._pixel_dtype)[None]
                self._rgb = (index, rgb, px)
            return rgb, px
        if index < 0 or (self.num_frames is not None and index >= self.num_frames):
            raise InputError(f"frame {index} is outside the video's {self.num_frames} frames")
        if self._queued is not None and self._queued[0] == index:
            rgb, px = self._queued[1], self._queued[2]
        else:
            rgb, px = self._read(index, pixels)
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        if self.video_size is None:
            self.video_size = size
        elif size != self.video_size:
            raise InputError(f"frame {index} is {size[1]}x{size[0]}, the video's first frame "
                             f"{self.video_size[1]}x{self.video_size[0]}: frames must share one size")
        self._rgb = (index, rgb, px)
        return rgb, px

    def _load(self, index: int, pixels: bool):
        """(rgb, pixels or None) of frame ``index``; runs in the reader thread or the caller's."""
        with self._read_lock:
            try:
                rgb = self.frames.get(index)
            except IndexError:
                raise InputError(f"frame {index} is outside the video ({self.num_frames} frames)") from None
        if not pixels:
            return rgb, None
        return rgb, normalize(resize_uint8(rgb, self.image_size), self._pixel_dtype)[None]

    def _read(self, index: int, pixels: bool):
        """Frame ``index`` (and its pixels): from the read-ahead when it is that frame's."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == index:
                return ahead[1].result()
            try:
                ahead[1].result()  # another frame's: let it finish before the source is read again
            except Exception:  # noqa: BLE001 - a frame nobody asked for; its error is not this one's
                pass
        return self._load(index, pixels)

    def _read_ahead(self, index: int) -> None:
        """Start decoding frame ``index`` in the reader thread (propagation's next frame)."""
        if self._ahead is None and index >= 0 and (self.num_frames is None or index < self.num_frames):
            self._ahead = (index, self._reader.submit(self._load, index, True))

    def _frame_features(self, index: int) -> List:
        if self._features is not None and self._features[0] == index:
            return self._features[1]
        if self._queued is not None and self._queued[0] == index:
            self._frame(index, pixels=True)
            out, self._queued = self._queued[3], None
        else:
            self._queued = None
            _, pixels = self._frame(index, pixels=True)
            out = self.model.model.call_device("encode_image", pixels)
        names = [o["name"] for o in self.model.functions["encode_image"]["outputs"]]
        tracker = [o for n, o in zip(names, out) if n.startswith("tracker_embeddings.")]
        self._features = None  # the previous frame's maps are released before the new ones are kept
        self._features = (index, tracker)
        # the detector's maps of the same trunk pass (libraries with the detector: the concept tracker)
        self.detector_maps = [o for n, o in zip(names, out) if not n.startswith("tracker_embeddings.")]
        return tracker

    def _queue_features(self, index: Optional[int]) -> None:
        """Queue ``encode_image`` of frame ``index`` (propagation's next frame) behind the work
        queued so far, its pixels uploaded without waiting for the device; a frame that cannot
        be read is left for ``_frame_features`` to report."""
        if index is None or self._queued is not None or (self._features is not None and self._features[0] == index):
            return
        if index < 0 or (self.num_frames is not None and index >= self.num_frames):
            return
        try:
            rgb, pixels = self._read(index, True)
        except InputError:
            return
        if self._pixels_device is None or tuple(self._pixels_device.shape) != pixels.shape:
            self._pixels_device = ffi.empty(pixels.shape, str(pixels.dtype), self.model.model.device)
        self._ring.upload(pixels, self._pixels_device, (self._tick % self._ring.slots, "pixels"))
        out = self.model.model.call_device("encode_image", self._pixels_device)
        self._queued = (index, rgb, pixels, out)

    def _constant(self, n: int, value: int):
        """A device ``int32 [n]`` of ``value`` (uploaded once: an upload waits for the device)."""
        t = self._constants.get((n, value))
        if t is None:
            t = self._constants[(n, value)] = ffi.to_device(np.full((n,), value, np.int32), self.model.model.device)
        return t

    # -- prompts ---------------------------------------------------------------------------
    @property
    def object_ids(self) -> List[int]:
        return list(self._objects)

    def _object(self, obj_id) -> _Object:
        if isinstance(obj_id, bool) or not isinstance(obj_id, (int, np.integer)):
            raise InputError(f"object ids are integers, got {obj_id!r}")
        return self._objects.setdefault(int(obj_id), _Object())

    def add_points(self, frame_index: int, obj_id: int, points: Sequence = (), labels=None, box=None,
                   clear: bool = True) -> FrameResult:
        """Clicks ``(x, y)`` (video pixels; ``labels`` 1 positive / 0 negative, default positive)
        and/or a box ``(x0, y0, x1, y1)`` for object ``obj_id`` on frame ``frame_index``; returns
        that frame's masks for all objects. ``clear=False`` adds the clicks to the frame's
        earlier ones (a box needs ``clear``: it must come before any click)."""
        self.frame(frame_index)
        size = self.video_size
        pts, lab = check_points(points if points is not None else [], labels, size)
        if box is not None:
            if not clear:
                raise InputError("a box must come before the clicks of a frame: add it with clear=True")
            b = check_box(box, size).reshape(2, 2)
            pts, lab = np.concatenate([b, pts]), np.concatenate([np.array([2, 3], np.int32), lab])
        if len(pts) == 0:
            raise InputError("give clicks or a box")
        model_pts = to_model_coords(pts, size, self.image_size)
        known = self._objects.get(int(obj_id)) if isinstance(obj_id, (int, np.integer)) else None
        if not clear and known is not None and frame_index in known.points:
            old_p, old_l = known.points[frame_index]
            model_pts, lab = np.concatenate([old_p, model_pts]), np.concatenate([old_l, lab])
        if len(lab) > self.point_slots:
            raise InputError(f"{len(lab)} points (a box counts two) on one frame; this library takes at most "
                             f"{self.point_slots} (compile with --max-points)")
        obj = self._object(obj_id)
        obj.points[frame_index] = (model_pts.astype(np.float32), lab.astype(np.int32))
        obj.masks.pop(frame_index, None)
        self._new_inputs = [int(obj_id)]
        return self._run_frame(frame_index, reverse=False)

    def add_box(self, frame_index: int, obj_id: int, box) -> FrameResult:
        return self.add_points(frame_index, obj_id, [], None, box=box)

    def add_mask(self, frame_index: int, obj_id: int, mask: np.ndarray) -> FrameResult:
        """A mask (``HxW``, nonzero = object, at the video's or any size) for object ``obj_id``."""
        self.frame(frame_index)
        m = np.asarray(mask)
        if m.ndim != 2 or m.size == 0:
            raise InputError(f"a mask prompt must be one HxW array, got shape {m.shape}")
        m = (m != 0).astype(np.float32) if m.dtype == bool or not np.issubdtype(m.dtype, np.floating) \
            else m.astype(np.float32)
        s = self.image_size
        if m.shape != (s, s):
            m = (resize_antialias(m, (s, s)) >= 0.5).astype(np.float32)
        obj = self._object(obj_id)
        obj.masks[frame_index] = m
        obj.points.pop(frame_index, None)
        self._new_inputs = [int(obj_id)]
        return self._run_frame(frame_index, reverse=False)

    def remove_object(self, obj_id: int) -> None:
        if int(obj_id) not in self._objects:
            raise InputError(f"no object {obj_id} in this session (objects: {self.object_ids})")
        del self._objects[int(obj_id)]
        self._new_inputs = [i for i in self._new_inputs if i != int(obj_id)]

    def reset(self) -> None:
        """Forget every object and prompt (the frames stay)."""
        self._objects.clear()
        self._new_inputs = []

    # -- propagation -----------------------------------------------------------------------
    def propagate(self, start: Optional[int] = None, max_frames: Optional[int] = None,
                  reverse: bool = False) -> Iterator[FrameResult]:
        """Frames from ``start`` (default: the earliest prompted frame) onward (``reverse``:
        backward to frame 0), each as a ``FrameResult``."""
        if not self._objects:
            raise InputError("no objects to follow: add points, a box or a mask first")
        if start is None:
            cond = [f for o in self._objects.values() for f in o.cond]
            if not cond:
                raise InputError("no prompted frame yet: add points, a box or a mask first")
            start = min(cond)
        n = self.num_frames
        limit = max_frames if max_frames is not None else (n if n is not None else 1 << 62)
        if reverse:
            end = max(start - limit, 0)
            order = range(start, end - 1, -1) if start > 0 else range(0)
        else:
            end = start + limit if n is None else min(start + limit, n - 1)
            order = range(start, end + 1) if n is not None else range(start, end)
        for f in order:
            if n is None:
                try:
                    self.frame(f)
                except InputError:
                    if getattr(self.frames, "exhausted", False):
                        return
                    raise
            self._frame_features(f)
            nxt = f - 1 if reverse else f + 1
            nxt = nxt if nxt in order else None
            if nxt is not None:
                self._read_ahead(nxt)
            yield self._run_frame(f, reverse, nxt)

    # -- one frame -------------------------------------------------------------------------
    def _select_cond(self, frame: int, cond: Dict[int, _Output]):
        """The reference's ``_select_closest_cond_frames``."""
        if self.max_cond == -1 or len(cond) <= self.max_cond:
            return dict(cond), {}
        selected = {}
        before = max((t for t in cond if t < frame), default=None)
        if before is not None:
            selected[before] = cond[before]
        after = min((t for t in cond if t >= frame), default=None)
        if after is not None:
            selected[after] = cond[after]
        rest = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame))
        for t in rest[:self.max_cond - len(selected)]:
            selected[t] = cond[t]
        return selected, {t: v for t, v in cond.items() if t not in selected}

    def _memory_inputs(self, obj: _Object, frame: int, reverse: bool):
        m, p = self.memory_slots, self.pointer_slots
        memory = []  # the filled slots' device memories, in slot order
        tpos = np.zeros((m,), np.int32)
        mask = np.zeros((m,), np.int32)
        pointers = np.zeros((p, self.hidden), np.float32)
        ptpos = np.zeros((p,), np.float32)
        pmask = np.zeros((p,), np.int32)
        selected, unselected = self._select_cond(frame, obj.cond)
        slots = [(self.num_maskmem - 1, out) for out in selected.values()]
        for t in range(self.num_maskmem - 1, 0, -1):
            prev = frame + t if reverse else frame - t
            out = obj.non_cond.get(prev, unselected.get(prev))
            if out is not None:
                slots.append((t - 1, out))
        for i, (k, out) in enumerate(slots[:m]):
            tpos[i], mask[i] = k, 1
            memory.append(out.memory)
        # object pointers: the selected conditioning frames not after this one (before, backward),
        # then the tracked frames up to max_object_pointers - 1 steps back
        length = self._length
        max_ptr = self.max_pointers if length is None else min(length, self.max_pointers)
        sign = -1 if reverse else 1
        ptrs = [((frame - t) * sign, out) for t, out in selected.items() if (t >= frame if reverse else t <= frame)]
        for d in range(1, max_ptr):
            ref = frame - d if not reverse else frame + d
            if ref < 0 or (length is not None and ref >= length):
                break
            out = obj.non_cond.get(ref)
            if out is not None:
                ptrs.append((d, out))
        denom = float(max_ptr - 1)
        for i, (d, out) in enumerate(ptrs[:p]):
            pointers[i], ptpos[i], pmask[i] = out.pointer, np.float32(d) / np.float32(denom), 1
        return memory, tpos, mask, pointers, ptpos, pmask

    def _run_frame(self, frame: int, reverse: bool, next_frame: Optional[int] = None) -> FrameResult:
        # dropping memories frees device memory, which waits for the device: before this frame's
        # work is queued, not while the next frame's trunk pass could run behind it
        self._prune(frame)
        feats = self._frame_features(frame)
        ids = self.object_ids
        results: Dict[int, Tuple[np.ndarray, float]] = {}
        batch = []  # (obj_id, is_init, points, mask, reverse) of the objects computed here
        for oid in ids:
            obj = self._objects[oid]
            new = oid in self._new_inputs
            if not new and frame in obj.cond:
                out = obj.cond[frame]
                results[oid] = (out.low_res, out.score)
                continue
            is_init, points, mask = False, None, None
            if new:
                is_init = frame not in obj.tracked
                if is_init:
                    reverse = False  # as the reference: it also holds for the objects after this one
                points, mask = obj.points.get(frame), obj.masks.get(frame)
                if points is not None or mask is not None:
                    self._new_inputs.remove(oid)
            batch.append((oid, is_init, points, mask, reverse))
        if batch:
            self._compute(frame, feats, batch, results, next_frame=next_frame)
        for oid, is_init, _, _, rev in batch:
            if not is_init:
                self._objects[oid].tracked[frame] = rev
        low = np.stack([results[o][0] for o in ids]).astype(np.float32) if ids else \
            np.zeros((0, self.mask_size, self.mask_size), np.float32)
        scores = np.array([results[o][1] for o in ids], np.float32)
        size = self.video_size
        masks = self._video_masks(low, size) if ids else np.zeros((0,) + size, bool)
        return FrameResult(frame, ids, masks, scores, low)

    def _compute(self, frame: int, feats: List, batch, results, encode: bool = True,
                 next_frame: Optional[int] = None) -> None:
        """``track_step`` for ``batch``, then (``encode``) ``encode_memory``; without ``encode``
        the outputs are kept without memory (the concept tracker encodes it after planning).
        ``next_frame``'s trunk pass is queued behind them before their outputs are read."""
        n = len(batch)
        m, p = self.memory_slots, self.pointer_slots
        memory = [[] for _ in range(n)]
        tpos = np.zeros((n, m), np.int32)
        mmask = np.zeros((n, m), np.int32)
        pointers = np.zeros((n, p, self.hidden), np.float32)
        ptpos = np.zeros((n, p), np.float32)
        pmask = np.zeros((n, p), np.int32)
        mode = np.zeros((n,), np.int32)
        pts = np.zeros((n, self.point_slots, 2), np.float32)
        labels = np.zeros((n, self.point_slots), np.int32)
        pvalid = np.zeros((n, self.point_slots), np.int32)
        mask_input = np.zeros((n, 1, self.mask_size, self.mask_size), self.dtype)
        mask_valid = np.zeros((n,), np.int32)
        multimask = np.zeros((n,), np.int32)
        present = np.full((n,), -1, np.int32)
        s = self.image_size
        prompts = np.zeros((n, 1, s, s), np.float32)
        for i, (oid, is_init, points, mask, rev) in enumerate(batch):
            obj = self._objects[oid]
            if mask is not None:
                mode[i] = MODE_RAW
                prompts[i, 0] = mask
                # the reference blends the decoder's pointer by its score, then by the mask's presence
                present[i] = -1 if (mask > 0).any() else 0
                multimask[i] = 1  # the reference's pointer for a mask: a multimask decode
            elif is_init:
                mode[i] = MODE_INIT
            else:
                mode[i] = MODE_MEMORY
                memory[i], tpos[i], mmask[i], pointers[i], ptpos[i], pmask[i] = self._memory_inputs(obj, frame, rev)
            if points is not None and mask is None:
                xy, lab = points
                k = len(lab)
                pts[i, :k], labels[i, :k], pvalid[i, :k] = xy, lab, 1
                multimask[i] = int(k <= 1)
            elif mask is None:
                multimask[i] = 1  # no clicks: multimask_min_pt_num 0 <= 0 <= 1
            if points is None:
                labels[i, 0], pvalid[i, 0] = NOT_A_POINT, 1  # the reference pads one not-a-point
        if (mode == MODE_RAW).any():
            mask_input = self.model.model("mask_prompt", prompts.astype(self.dtype))[0].astype(np.float32)
            if mask_input.shape[-1] != self.mask_size:  # S/4 -> 4g, as the reference resizes it
                mask_input = resize_antialias(mask_input, (self.mask_size, self.mask_size))
            mask_valid = (mode == MODE_RAW).astype(np.int32)
        dt = self.dtype
        engine = self.model.model
        raw = np.nonzero(mode == MODE_RAW)[0]
        ring, slot = self._ring, self._tick % self._ring.slots
        self._tick += 1
        from_prompt = any(b[2] is not None or b[3] is not None for b in batch)
        with engine.lock:  # track_step's outputs are used before any other call can reuse their memory
            out = engine.call_device("track_step", *feats, self._bank.input(memory), tpos, mmask,
                                     pointers.astype(dt), ptpos, pmask, mode, pts, labels, pvalid,
                                     mask_input.astype(dt, copy=False), mask_valid, multimask, present)
            low_d, high_d, _iou, score_d, pointer_d = out
            host = {k: ring.download(t, (slot, k)) for k, t in (("low", low_d), ("score", score_d),
                                                                 ("pointer", pointer_d))}
            ring.signal(slot, 0)
            mem_host = memories = None
            if encode and not len(raw):  # the memory needs nothing from the host: queued now
                mem_d = engine.call_device("encode_memory", feats[2], high_d, score_d,
                                           self._constant(n, int(from_prompt)))[0]
                if self.memory_on_device:
                    memories = self._bank.frame_memory_on_device(mem_d)
                else:
                    mem_host = ring.download(mem_d, (slot, "memory"))
                    ring.signal(slot, 1)
            self._queue_features(next_frame)
            ring.wait(slot, 0)
            low = host["low"][:, 0].astype(np.float32)
            score = host["score"][:, 0].astype(np.float32)
            pointer = host["pointer"].astype(np.float32)
            high = high_d  # stays on the device unless a mask prompt replaces some rows
            if len(raw):
                high = ffi.to_numpy(high_d).astype(np.float32)
            for i in raw:
                high[i, 0] = prompts[i, 0] * MASK_OUT_SCALE + MASK_OUT_BIAS
                low[i] = resize_antialias(high[i, 0], (self.mask_size, self.mask_size))
                score[i] = MASK_OUT_SCALE * float((prompts[i, 0] > 0).any()) + MASK_OUT_BIAS
            if len(raw):
                high = high.astype(dt)
            if not encode:
                for i, (oid, is_init, _, _, _) in enumerate(batch):
                    o = _Output(None, pointer[i].copy(), float(score[i]), low[i].copy() if is_init else None)
                    (self._objects[oid].cond if is_init else self._objects[oid].non_cond)[frame] = o
                    results[oid] = (low[i], float(score[i]))
                return
            if memories is None and mem_host is None:  # mask prompts replaced rows of the masks and scores
                binarize = np.full((n,), int(from_prompt), np.int32)
                memories = self._keep_memory(
                    engine.call_device("encode_memory", feats[2], high, score[:, None].astype(dt), binarize)[0])
            elif memories is None:
                ring.wait(slot, 1)
                memories = self._bank.frame_memory(round_bfloat16_as(mem_host, dt), ring, (slot, "memory up"))
        for i, (oid, is_init, _, _, _) in enumerate(batch):
            obj = self._objects[oid]
            o = _Output(memories[i], pointer[i].copy(), float(score[i]), low[i].copy() if is_init else None)
            (obj.cond if is_init else obj.non_cond)[frame] = o
            results[oid] = (low[i], float(score[i]))

    def _keep_memory(self, memory) -> List:
        """A frame's memory as ``encode_memory`` left it on the device -> a device tensor per
        object: copied as it is where the library rounds it, else rounded on the host and
        uploaded back (call under the engine's lock: a later call may reuse the output)."""
        if self.memory_on_device:
            return self._bank.frame_memory_on_device(memory)
        return self._bank.frame_memory(round_bfloat16_as(ffi.to_numpy(memory), self.dtype))

    def _video_masks(self, low: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
        """Low-resolution logits -> masks at the video's size; objects split over a few threads
        (numpy's resize work runs without the GIL: 16 objects at 480 x 640 take tens of ms)."""
        thr = np.float32(self.mask_threshold)
        parts = [p for p in np.array_split(np.arange(len(low)), min(len(low), MASK_THREADS)) if len(p)]
        if len(parts) < 2:
            return resize_bilinear(low, size) > thr
        if self._post is None:
            self._post = ThreadPoolExecutor(MASK_THREADS, thread_name_prefix="sam3-masks")
        return np.concatenate(list(self._post.map(lambda ix: resize_bilinear(low[ix], size) > thr, parts)))

    def _prune(self, frame: int) -> None:
        """Drop tracked frames no later frame near this one can attend to (module docstring)."""
        for obj in self._objects.values():
            for t in [t for t in obj.non_cond if abs(t - frame) > self.window]:
                del obj.non_cond[t]

    def close(self) -> None:
        self._features = None
        self._bank.clear()
        self._reader.shutdown(wait=True)
        if self._post is not None:
            self._post.shutdown(wait=True)
        self._ahead = None
        self.frames.close()


# ---- prompts on the command line ---------------------------------------------------------
@dataclass
class TrackPrompt:
    """One ``--point`` / ``--box`` of ``track``: an object id, a frame, the click or the box."""

    obj_id: int
    frame: int
    point: Optional[Tuple[float, float]] = None
    label: int = 1
    box: Optional[Tuple[float, float, float, float]] = None


def parse_track_prompt(text: str, kind: str) -> TrackPrompt:
    """``ID:x,y[:neg]@FRAME`` (kind ``point``) or ``ID:x0,y0,x1,y1@FRAME`` (kind ``box``)."""
    expected = "ID:x,y[:neg]@FRAME" if kind == "point" else "ID:x0,y0,x1,y1@FRAME"
    body, at, frame = text.rpartition("@")
    head, colon, rest = body.partition(":")
    if not at or not colon:
        raise InputError(f"{text!r}: expected {expected}")
    try:
        obj_id, frame_i = int(head.strip()), int(frame.strip())
    except ValueError:
        raise InputError(f"{text!r}: the object id and the frame must be integers ({expected})") from None
    if frame_i < 0:
        raise InputError(f"{text!r}: frame {frame_i} is negative")
    if kind == "point":
        spec, _, neg = rest.partition(":")
        neg = neg.strip().lower()
        if neg not in ("", "pos", "neg"):
            raise InputError(f"{text!r}: a click's label is ':pos' or ':neg', got {neg!r}")
        values = spec.split(",")
        count = 2
    else:
        values, neg, count = rest.split(","), "", 4
    try:
        nums = [float(v) for v in values]
    except ValueError:
        raise InputError(f"{text!r}: coordinates must be numbers ({expected})") from None
    if len(nums) != count or not all(math.isfinite(v) for v in nums):
        raise InputError(f"{text!r}: expected {count} finite coordinates ({expected})")
    if kind == "point":
        return TrackPrompt(obj_id, frame_i, point=(nums[0], nums[1]), label=0 if neg == "neg" else 1)
    return TrackPrompt(obj_id, frame_i, box=tuple(nums))


def group_prompts(prompts: Sequence[TrackPrompt]) -> Dict[Tuple[int, int], Dict]:
    """``(frame, obj_id)`` -> ``{"points": [...], "labels": [...], "box": ...}`` (one box each)."""
    out: Dict[Tuple[int, int], Dict] = {}
    for p in prompts:
        g = out.setdefault((p.frame, p.obj_id), {"points": [], "labels": [], "box": None})
        if p.box is not None:
            if g["box"] is not None:
                raise InputError(f"object {p.obj_id} has two boxes on frame {p.frame}: give one")
            g["box"] = p.box
        else:
            g["points"].append(p.point)
            g["labels"].append(p.label)
    return dict(sorted(out.items()))


class VideoWriter:
    """An H.264 (else MPEG-4) video through PyAV, frame by frame (``HxWx3`` uint8)."""

    def __init__(self, path: str, size: Tuple[int, int], fps: float):
        import av  # the optional "video" extra

        self._container = av.open(path, mode="w", format="mp4")
        h, w = size
        for codec in ("libx264", "h264", "mpeg4"):
            try:
                self._stream = self._container.add_stream(codec, rate=int(round(fps)))
                break
            except Exception:  # noqa: BLE001 - a codec FFmpeg was built without
                continue
        else:
            raise UserError("no H.264 or MPEG-4 encoder in this FFmpeg build: use --overlay png")
        # even sizes: the yuv420p encoders need them
        self._stream.width, self._stream.height = w + (w % 2), h + (h % 2)
        self._stream.pix_fmt = "yuv420p"
        self._av = av

    def write(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        frame = np.zeros((self._stream.height, self._stream.width, 3), np.uint8)
        frame[:h, :w] = rgb[..., :3]
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
