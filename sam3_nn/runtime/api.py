"""Segment images with a compiled SAM 3 library: no PyTorch, no TVM compiler.

    from sam3_nn.runtime import Sam3
    model = Sam3.load("dist/sam3-llvm.so", "weights/sam3-float32.safetensors")
    state = model.set_image("photo.jpg")          # encode once ...
    cats = model.predict(state, text="cat")       # ... query many times
    cats.boxes, cats.scores, cats.masks           # xyxy pixels, detection x presence, HxW bool

Depends on TVM's runtime library (through ``tvm_ffi``), numpy, safetensors and Pillow only
(and ``tokenizers`` + ``ftfy``, through ``sam3_nn.runtime.tokenizer``, for prompts). Nothing
here imports the ``tvm`` package, the compiler, the model definition or torch, so it runs
where TVM is installed runtime-only.

A ``Sam3`` may be shared by threads (its calls are serialised per model; see the class).
Bad input raises an error derived from ``sam3_nn.errors.UserError`` that says what was wrong,
before any expensive work where it can be known then (``Sam3.load`` checks the library, the
device, the tokenizer and the weights' metadata before reading the weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from safetensors import safe_open

from sam3_nn.config import Sam3Config
from sam3_nn.runtime import ffi
from sam3_nn.runtime.engine import CompiledModel, LibraryError, read_manifest
from sam3_nn.runtime.interactive import MAX_HOLE_AREA, InteractiveResult, make_prompt
from sam3_nn.runtime.interactive import post_process as post_process_interactive
from sam3_nn.runtime.postprocess import Detections, post_process_instances
from sam3_nn.runtime.preprocess import (ImageLike, InputError, boxes_to_model, check_boxes,
                                        load_image, normalize, resize_uint8)
from sam3_nn.runtime.io import check_fraction
from sam3_nn.runtime.tokenizer import CLIP_BPE, Sam3Tokenizer, TokenizerError
from sam3_nn.weights import CheckpointError, load_converted, load_params, open_checkpoint

__all__ = ["Sam3", "ImageState", "Detections", "InteractiveResult", "LibraryError", "InputError",
           "PromptTruncatedWarning", "config_fingerprint", "load_weights", "check_weights", "check_prompt",
           "load_tokenizer"]

# what ``Sam3Processor`` feeds as the text of a box-only prompt
VISUAL_PROMPT = "visual"
# the config keys that change no weight: a library compiled at another image size takes the same weights
_NOT_IN_WEIGHTS = (("vision", "backbone", "image_size"),)


# ----------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------
def weights_config(config: Dict) -> Dict:
    """The part of a library's config the weights depend on."""
    c = copy.deepcopy(config)
    for path in _NOT_IN_WEIGHTS:
        d = c
        for k in path[:-1]:
            d = d.get(k, {})
        d.pop(path[-1], None)
    return c


def config_fingerprint(config: Dict) -> str:
    """sha256 of the weights-relevant config (canonical JSON)."""
    blob = json.dumps(weights_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _flat(d: Dict, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(ours: Dict, theirs: Dict, limit: int = 6) -> str:
    a, b = _flat(weights_config(ours)), _flat(weights_config(theirs))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    s = "; ".join(f"{k}: {b.get(k)!r} (weights) vs {a.get(k)!r} (library)" for k in keys[:limit])
    return s + (f"; ... ({len(keys)} keys differ)" if len(keys) > limit else "")


def expected_params(manifest: Dict) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    return {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in manifest["params"]}


def converted_metadata(manifest: Dict, source: str) -> Dict[str, str]:
    """The metadata ``convert`` writes beside the parameters."""
    return {
        "format": "sam3_nn",
        "config_sha256": config_fingerprint(manifest["config"]),
        "config": json.dumps(weights_config(manifest["config"]), sort_keys=True),
        "dtype": manifest["dtype"],
        "parts": ",".join(manifest["parts"]),
        "source": os.path.basename(os.path.normpath(source)),
    }


def _read_converted_metadata(path: str) -> Optional[Dict[str, str]]:
    """The metadata of a converted weights file (header only), or None for another
    ``.safetensors`` (an HF checkpoint)."""
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise LibraryError(f"weights {path}: not a readable safetensors file ({e})") from e
    return meta if meta.get("format") == "sam3_nn" else None


def check_checkpoint_config(source_path: str, config: Optional[dict], manifest: Dict) -> None:
    """An HF snapshot's ``config.json`` describes the model the library was compiled for."""
    if config is None:
        return
    try:
        # sections the file does not describe (a tracker snapshot has no text encoder) are the
        # library's; sections the library does not record are not compared
        theirs = Sam3Config.from_hf(config, base=Sam3Config.from_dict(manifest["config"])).to_dict()
    except (ValueError, TypeError) as e:
        raise LibraryError(f"{source_path}/config.json: {e}") from e
    theirs = {k: v for k, v in theirs.items() if k in manifest["config"]}
    if config_fingerprint(theirs) != config_fingerprint(manifest["config"]):
        raise LibraryError(
            f"checkpoint {source_path} is a different model than the library was compiled for: "
            f"{config_diff(manifest['config'], theirs)}")


def convert_for_manifest(source_path: str, manifest: Dict, log: Callable[[str], None] = lambda s: None):
    """Read a released checkpoint (HF snapshot, .safetensors or sam3.pt) -> our parameters for
    the library described by ``manifest``; checks the snapshot's config against the library's."""
    cfg = Sam3Config.from_dict(manifest["config"])
    source = open_checkpoint(source_path)
    check_checkpoint_config(source_path, source.config, manifest)
    params, report = load_params(cfg, source, expected_params(manifest), manifest["parts"])
    log(report.summary())
    return params


def check_weights(weights: str, manifest: Dict) -> None:
    """What can be checked without reading any tensor: the weights exist, are of a kind the
    runtime reads, and were made for this library (converted file: its metadata; HF snapshot:
    its ``config.json``). Raises ``LibraryError``."""
    if not os.path.exists(weights):
        raise LibraryError(f"weights {weights} do not exist")
    if os.path.isfile(weights) and weights.endswith((".pt", ".pth")):
        raise LibraryError(
            f"weights {weights}: a PyTorch checkpoint cannot be read without torch; convert it once with "
            f"`python -m sam3_nn convert {weights} <library>.json <out>.safetensors`")
    if os.path.isfile(weights):
        meta = _read_converted_metadata(weights)
        if meta is not None:
            check_converted(weights, meta, manifest)
        return
    config = os.path.join(weights, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise LibraryError(f"{config}: not valid JSON ({e})") from e
        check_checkpoint_config(weights, data, manifest)


def load_weights(weights: str, manifest: Dict, log: Callable[[str], None] = lambda s: None
                 ) -> Dict[str, np.ndarray]:
    """Converted ``.safetensors`` (``python -m sam3_nn convert``) or an HF snapshot
    (directory or single ``.safetensors``, converted in memory) -> our parameters,
    checked against the library's manifest (config, dtype, parameter set) before any tensor
    is read (:func:`check_weights`)."""
    check_weights(weights, manifest)
    try:
        if os.path.isfile(weights) and _read_converted_metadata(weights) is not None:
            params, _ = load_converted(weights)
            return params
        return convert_for_manifest(weights, manifest, log)
    except CheckpointError as e:
        raise LibraryError(str(e)) from e


def check_converted(path: str, meta: Dict[str, str], manifest: Dict) -> None:
    if meta.get("dtype") != manifest["dtype"]:
        raise LibraryError(
            f"weights {path} are {meta.get('dtype')} but the library is compiled for {manifest['dtype']}; "
            f"convert again for this library (python -m sam3_nn convert SRC <library>.json OUT)")
    if meta.get("config_sha256") != config_fingerprint(manifest["config"]):
        detail = ""
        if meta.get("config"):
            try:
                detail = ": " + config_diff(manifest["config"], json.loads(meta["config"]))
            except ValueError:
                pass
        raise LibraryError(f"weights {path} were converted for a different model configuration than "
                           f"the library's{detail}")
    parts = [p for p in meta.get("parts", "").split(",") if p]
    if parts and parts != list(manifest["parts"]):
        raise LibraryError(f"weights {path} hold parts {parts} but the library has {list(manifest['parts'])}")


# ----------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


class PromptTruncatedWarning(UserWarning):
    """A text prompt longer than the library's text context: the model reads its first tokens
    only (as the original SAM 3, which cuts it without a word)."""


def find_tokenizer(weights: str, library: str) -> Optional[str]:
    """The folder holding tokenizer files beside the weights (an HF snapshot) or the library."""
    for folder in (weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights)),
                   os.path.dirname(os.path.abspath(library))):
        if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
            return folder
    return None


def text_context(manifest: Dict) -> int:
    """The token length ``encode_text`` takes."""
    ids = next(i for i in manifest["functions"]["encode_text"]["inputs"] if i["name"] == "input_ids")
    return int(ids["shape"][-1])


def load_tokenizer(manifest: Dict, path: Optional[str]) -> Sam3Tokenizer:
    """SAM 3's tokenizer for this library: from ``path`` (tokenizer files, a folder holding
    them, or CLIP's ``.gz`` vocabulary), else the CLIP vocabulary shipped with the package
    (``CLIP_BPE``, what the released SAM 3 uses). Raises ``LibraryError`` when the files do
    not exist, cannot be read or do not fit the model's vocabulary."""
    source = path or CLIP_BPE
    try:
        tok = Sam3Tokenizer.from_pretrained(source, text_context(manifest))
    except TokenizerError as e:  # its message names the file
        raise LibraryError(f"tokenizer: {e}") from e
    vocab = int(manifest["config"].get("text", {}).get("vocab_size", tok.vocab_size))
    if tok.vocab_size > vocab:
        where = (f"tokenizer {path}" if path else
                 "no tokenizer files were found beside the weights or the library, and the CLIP "
                 "vocabulary shipped with sam3_nn")
        raise LibraryError(f"{where} has {tok.vocab_size} tokens, more than this model's "
                           f"{vocab}: pass the model's own tokenizer (tokenizer=PATH, --tokenizer)")
    return tok


# ----------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------
def channel_first(maps) -> List[np.ndarray]:
    """``encode_image``'s FPN maps (channel last, ``[B, s, s, C]``; device tensors or arrays)
    in the reference's layout ``[B, C, s, s]``."""
    return [np.ascontiguousarray(np.transpose(ffi.to_numpy(m), (0, 3, 1, 2)))
            for m in maps]


@dataclass
class ImageState:
    """An encoded image: reusable for any number of prompts."""

    original_size: Tuple[int, int]  # (height, width)
    rgb: np.ndarray  # the original image, HxWx3 uint8 (for overlays)
    features: List  # FPN maps on the device (highest resolution first, channel last)
    timings: Dict[str, float] = field(default_factory=dict)
    # the Sam3 whose device memory holds the features (a state is used with that model only)
    owner: Optional[object] = field(default=None, repr=False, compare=False)
    # the tracker neck's maps (libraries with the interactive part): predict_points' input
    tracker_features: List = field(default_factory=list)


def detect_arguments(inputs, features, positions: Callable[[], List], text_features, text_mask,
                     prompt: Dict[str, object]) -> List:
    """``detect``'s arguments in the manifest's order. ``inputs``: ``[(input spec, (role,
    level))]``; ``positions`` gives the position encodings (called only if an input takes
    them); ``prompt``: ``boxes``, ``box_labels``, ``box_mask`` as numpy arrays (cast to the
    input's dtype) or device tensors."""
    args = []
    for inp, (role, level) in inputs:
        if role == "feature":
            args.append(features[level])
        elif role == "position":
            args.append(positions()[level])
        elif role == "text":
            args.append(text_features)
        elif role == "text_mask":
            args.append(text_mask)
        else:
            a = prompt[role]
            args.append(a.astype(inp["dtype"]) if isinstance(a, np.ndarray) else a)
    return args


def _input_role(name: str) -> Tuple[str, int]:
    """A ``detect`` input name -> (role, level)."""
    n = name.lower()
    m = re.fullmatch(r"(?:fpn_)?(?:hidden_states|features|vision_features|fpn)[._]?(\d+)", n)
    if m:
        return "feature", int(m.group(1))
    m = re.fullmatch(r"(?:fpn_)?(?:position_encoding|pos_encoding|pos_embeds?|pos)[._]?(\d+)", n)
    if m:
        return "position", int(m.group(1))
    roles = {"text_features": "text", "text_embeds": "text", "prompt_features": "text",
             "text_mask": "text_mask", "attention_mask": "text_mask", "prompt_mask": "text_mask",
             "input_boxes": "boxes", "boxes": "boxes", "box_embeddings": "boxes",
             "input_boxes_labels": "box_labels", "box_labels": "box_labels", "labels": "box_labels",
             "box_mask": "box_mask"}
    if n in roles:
        return roles[n], -1
    raise LibraryError(f"the library's detect function takes an input {name!r} this runtime does not know")


def box_slots(manifest: Dict) -> int:
    """Box prompts the library's ``detect`` takes at most (``compile --max-boxes``)."""
    spec = manifest["functions"].get("detect")
    if spec is None:
        return 0
    slots = {inp["name"]: inp for inp in spec["inputs"]}
    return int(slots["boxes"]["shape"][1]) if "boxes" in slots else 0


def check_prompt(manifest: Dict, text: Optional[str] = None,
                 boxes: Optional[Sequence[Sequence[float]]] = None,
                 box_labels: Optional[Sequence[int]] = None) -> Tuple[Optional[str], Optional[list]]:
    """See ``Sam3.check_prompt`` (here with the library's manifest, before it is loaded)."""
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise InputError(f"text prompt must be a non-empty string, got {text!r}")
    if boxes is not None and not isinstance(boxes, (list, tuple, np.ndarray)):
        raise InputError(f"boxes must be a list of [x0, y0, x1, y1], got {type(boxes).__name__}")
    if boxes is not None and len(boxes) == 0:
        boxes = None
    if boxes is None and box_labels is not None and len(box_labels):
        raise InputError(f"{len(box_labels)} box labels given but no boxes")
    if text is None and boxes is None:
        raise InputError("no prompt: give text, boxes (at least one), or both")
    if boxes is not None:
        flat = len(boxes) == 4 and all(isinstance(v, (int, float, np.number)) for v in boxes)
        n, slots = (1 if flat else len(boxes)), box_slots(manifest)  # one box may come unnested
        if n > slots:
            raise InputError(f"{n} boxes given; this library takes at most {slots}: compile it with "
                             f"--max-boxes {n} (or more)")
    return text, (list(boxes) if boxes is not None else None)


def _outside_this_module() -> int:
    """The ``stacklevel`` of a warning that names the first caller outside this module."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def truncation_message(text: str, dropped: int, context: int) -> str:
    short = text if len(text) <= 60 else text[:57] + "..."
    return (f"text prompt {short!r} is longer than the model's text context ({context} tokens with "
            f"the start and end tokens): its last {dropped} tokens are ignored, as the original "
            f"SAM 3 ignores them")


def split_image_outputs(spec: Dict, outputs: List) -> Tuple[List, List]:
    """``encode_image``'s outputs -> (the detector's FPN maps, the tracker's maps), by the
    manifest's output names (``tracker_embeddings.*``: the interactive part's)."""
    names = [o["name"] for o in spec["outputs"]]
    if len(names) != len(outputs):
        raise LibraryError(f"encode_image returned {len(outputs)} outputs, its manifest names {len(names)}")
    tracker = [o for n, o in zip(names, outputs) if n.startswith("tracker_embeddings.")]
    return [o for n, o in zip(names, outputs) if not n.startswith("tracker_embeddings.")], tracker


class Sam3:
    """A compiled library with its weights bound.

    Threads: one ``Sam3`` may be shared by any number of threads. Calls into the library run
    one at a time (a lock per model: TVM's virtual machine keeps each call's state in itself),
    the text-encoding cache is guarded by the same lock, and image decoding and
    post-processing run outside it, in parallel. An ``ImageState`` belongs to the model that
    made it (its features live in that model's device memory) and may be used from any
    thread; using it with another model is an ``InputError``. For calls that really run in
    parallel, load one ``Sam3`` per thread (each holds its own copy of the weights).
    """

    def __init__(self, model: CompiledModel, tokenizer=None,
                 tokenizer_path: Optional[str] = None):
        self.model = model
        self.manifest = model.manifest
        self.functions = self.manifest["functions"]
        self.image_size = int(self.manifest["config"]["vision"]["backbone"]["image_size"])
        self._tokenizer = tokenizer
        self._tokenizer_path = tokenizer_path
        self._tokenizer_error: Optional[str] = None
        self._text_cache: Dict[str, Tuple] = {}
        self._positions: Optional[List] = None
        self._lock = model.lock  # one lock per model: the library's and this object's state

    # -- loading -------------------------------------------------------------
    @classmethod
    def load(cls, library: str, weights: str, device: Optional[str] = None,
             tokenizer=None, log: Callable[[str], None] = lambda s: None) -> "Sam3":
        """``library``: compiled ``.so``/``.dylib`` with its ``.json`` manifest beside it;
        ``weights``: converted ``.safetensors`` or an HF snapshot directory;
        ``device``: ``"cpu"``, ``"cuda"``, ``"metal"``... (default: the library's target;
        another must suit it);
        ``tokenizer``: a ``Sam3Tokenizer``, a ``tokenizer.json``, a folder holding SAM 3's
        tokenizer files, or CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (default: the files
        beside the weights or the library, else the CLIP vocabulary shipped with sam3_nn).

        Cheap checks come first (manifest, library file, device, tokenizer, the weights'
        metadata or config), then the weights are read and bound."""
        model = CompiledModel(library, device)
        manifest = model.manifest
        sam3 = cls(model)
        if "encode_text" in manifest["functions"]:
            if isinstance(tokenizer, Sam3Tokenizer):
                sam3._tokenizer = tokenizer
            elif tokenizer is not None:
                sam3._tokenizer = load_tokenizer(manifest, os.fspath(tokenizer))
            else:
                found = find_tokenizer(weights, library)
                try:
                    sam3._tokenizer = load_tokenizer(manifest, found)
                except LibraryError as e:
                    if found:
                        raise
                    sam3._tokenizer_error = str(e)  # said when a prompt needs it
        check_weights(weights, manifest)
        model.bind(load_weights(weights, manifest, log))
        return sam3

    def has(self, function: str) -> bool:
        return function in self.functions

    def _require(self, function: str, what: str) -> None:
        if not self.has(function):
            raise LibraryError(f"{what} needs the library function {function!r}, which this library lacks "
                               f"(it has {', '.join(self.functions)}); compile it with a newer sam3_nn")

    def _input_dtype(self, function: str, name: str) -> str:
        for i in self.functions[function]["inputs"]:
            if i["name"] == name:
                return i["dtype"]
        raise LibraryError(f"library function {function!r} has no input {name!r}")

    # -- image ---------------------------------------------------------------
    def preprocess(self, image: ImageLike) -> Tuple[np.ndarray, np.ndarray]:
        """-> (pixel_values ``[1, 3, S, S]`` in the library's dtype, original RGB ``HxWx3`` uint8)."""
        rgb = load_image(image)
        pixels = normalize(resize_uint8(rgb, self.image_size), self._input_dtype("encode_image", "pixel_values"))
        return pixels[None], rgb

    def set_image(self, image: ImageLike) -> ImageState:
        """Encode an image (path, PIL image or ``HxWx3`` uint8 array) once for many prompts."""
        t0 = time.perf_counter()
        pixels, rgb = self.preprocess(image)
        t1 = time.perf_counter()
        features = self.model.call_device("encode_image", pixels)
        t2 = time.perf_counter()
        features, tracker = split_image_outputs(self.functions["encode_image"], features)
        return ImageState((int(rgb.shape[0]), int(rgb.shape[1])), rgb, features,
                          {"preprocess": t1 - t0, "encode_image": t2 - t1}, owner=self,
                          tracker_features=tracker)

    def _check_state(self, state: ImageState) -> None:
        if not isinstance(state, ImageState):
            raise InputError(f"expected the ImageState set_image returned, got {type(state).__name__}")
        if state.owner is not None and state.owner is not self:
            raise InputError("this ImageState was made by another Sam3 (its image features live in that "
                             "model's device memory): call set_image on this model")

    def image_features(self, state: ImageState) -> List[np.ndarray]:
        """The FPN maps channel first (``[1, 256, s, s]``, the reference's
        ``fpn_hidden_states``); the library keeps them channel last."""
        return channel_first(state.features)

    def position_encodings(self) -> List:
        with self._lock:
            if self._positions is None:
                self._positions = self.model.call_device("image_position_encoding", 1)
            return self._positions

    # -- text ----------------------------------------------------------------
    @property
    def tokenizer(self) -> Sam3Tokenizer:
        """SAM 3's tokenizer (``sam3_nn.runtime.tokenizer``), padded to the library's text length."""
        with self._lock:
            if self._tokenizer is None:
                if self._tokenizer_error:
                    raise LibraryError(f"text prompts (and box prompts, which the model reads with the "
                                       f"text {VISUAL_PROMPT!r}) need a tokenizer: {self._tokenizer_error}")
                self._tokenizer = load_tokenizer(self.manifest, self._tokenizer_path)
            return self._tokenizer

    def tokenize(self, text: str) -> Tuple[np.ndarray, np.ndarray]:
        self._require("encode_text", "a text prompt")
        batch = self.tokenizer(text)
        ids, mask = batch.input_ids, batch.attention_mask
        return (ids.astype(self._input_dtype("encode_text", "input_ids")),
                mask.astype(self._input_dtype("encode_text", "attention_mask")))

    def encode_text(self, text: str) -> Tuple:
        """-> device (text_features, text_mask); cached per prompt. A prompt longer than the
        library's text context is cut to it, as the original does, with a
        ``PromptTruncatedWarning``."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text prompt must be a non-empty string, got {text!r}")
        with self._lock:
            if text not in self._text_cache:
                self._require("encode_text", "a text prompt")
                batch = self.tokenizer(text)
                if batch.any_truncated:
                    warnings.warn(PromptTruncatedWarning(truncation_message(text, batch.dropped[0],
                                                                            self.tokenizer.context_length)),
                                  stacklevel=_outside_this_module())
                ids = batch.input_ids.astype(self._input_dtype("encode_text", "input_ids"))
                mask = batch.attention_mask.astype(self._input_dtype("encode_text", "attention_mask"))
                self._text_cache[text] = tuple(self.model.call_device("encode_text", ids, mask))
            return self._text_cache[text]

    # -- prompts -------------------------------------------------------------
    @property
    def max_boxes(self) -> int:
        """Box prompts ``detect`` takes at most (``compile --max-boxes``)."""
        return box_slots(self.manifest)

    def check_prompt(self, text: Optional[str] = None,
                     boxes: Optional[Sequence[Sequence[float]]] = None,
                     box_labels: Optional[Sequence[int]] = None) -> Tuple[Optional[str], Optional[list]]:
        """-> (text, boxes), ``boxes`` None when there are none; ``InputError`` for a prompt the
        model cannot take: none at all, an empty text, labels without boxes, more boxes than
        the library has slots for."""
        return check_prompt(self.manifest, text, boxes, box_labels)

    def detect(self, state: ImageState, text: Optional[str] = None,
               boxes: Optional[Sequence[Sequence[float]]] = None,
               box_labels: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
        """Raw outputs (``pred_logits``, ``pred_boxes``, ``pred_masks``, ``presence_logits``,
        ``semantic_seg``...) for one prompt: text, boxes (``xyxy`` pixels), or both. An empty
        ``boxes`` list counts as no boxes (then ``text`` is needed)."""
        out = self.model("detect", *self.detect_args(state, text, boxes, box_labels))
        names = self.output_names("detect")
        if len(names) != len(out):
            raise LibraryError(f"detect returned {len(out)} outputs, manifest names {len(names)}")
        return {n: o.astype(np.float32) if np.issubdtype(o.dtype, np.floating) else o
                for n, o in zip(names, out)}

    def output_names(self, function: str) -> List[str]:
        return [o["name"] for o in self.functions[function]["outputs"]]

    def detect_args(self, state: ImageState, text: Optional[str] = None,
                    boxes: Optional[Sequence[Sequence[float]]] = None,
                    box_labels: Optional[Sequence[int]] = None) -> List:
        """The library's ``detect`` inputs for one prompt (``detect``'s arguments checked)."""
        self._require("detect", "prediction")
        self._check_state(state)
        text, boxes = self.check_prompt(text, boxes, box_labels)
        n_slots = self.max_boxes
        model_boxes = np.zeros((1, n_slots, 4), np.float32)
        model_labels = np.zeros((1, n_slots), np.int64)
        model_mask = np.zeros((1, n_slots), np.int64)
        if boxes is not None:
            b, lab = check_boxes(boxes, box_labels, state.original_size)
            model_boxes[0, :len(b)] = boxes_to_model(b, state.original_size)
            model_labels[0, :len(b)] = lab
            model_mask[0, :len(b)] = 1
        # as Sam3Processor does for box-only prompts
        text_features, text_mask = self.encode_text(VISUAL_PROMPT if text is None else text)
        inputs = [(inp, _input_role(inp["name"])) for inp in self.functions["detect"]["inputs"]]
        return detect_arguments(inputs, state.features, self.position_encodings, text_features, text_mask,
                                {"boxes": model_boxes, "box_labels": model_labels, "box_mask": model_mask})

    def predict(self, state: ImageState, text: Optional[str] = None,
                boxes: Optional[Sequence[Sequence[float]]] = None,
                box_labels: Optional[Sequence[int]] = None,
                score_threshold: float = 0.5, mask_threshold: float = 0.5) -> Detections:
        """Objects for one prompt: boxes (``xyxy`` pixels of the original image), scores
        (detection x presence), masks at the original resolution, and the raw outputs.
        Thresholds are numbers in [0, 1]: objects scoring above ``score_threshold`` are kept,
        mask pixels whose probability is above ``mask_threshold``."""
        score_threshold = check_fraction("score_threshold", score_threshold)
        mask_threshold = check_fraction("mask_threshold", mask_threshold)
        raw = self.detect(state, text, boxes, box_labels)
        return post_process_instances(raw, state.original_size, score_threshold, mask_threshold)

    # -- interactive (clicks, a box, a mask) ---------------------------------
    def predict_points(self, state: ImageState, points: Optional[Sequence[Sequence[float]]] = None,
                       labels: Optional[Sequence[int]] = None,
                       box: Optional[Sequence[float]] = None, mask_input: Optional[np.ndarray] = None,
                       multimask: bool = True, mask_threshold: float = 0.0,
                       max_hole_area: float = MAX_HOLE_AREA) -> InteractiveResult:
        """One object selected by clicks ``(x, y)`` (pixels of the original image; ``labels``
        1 positive / 0 negative, default all positive), a ``box`` (``xyxy`` pixels), and/or a
        previous result's ``low_res_logits[k]`` as ``mask_input``, as the original SAM 3's
        ``predict_inst``: 3 candidate masks (``multimask``) or 1, at the original size (logits
        ``> mask_threshold`` after hole filling up to ``max_hole_area`` low-res pixels), their
        predicted IoU, the object score logit and the low-res logits for refinement. Reuses
        the image's encoding: any number of calls cost one ``encode_image``."""
        self._require("predict_masks", "interactive segmentation (points, a box or a mask)")
        self._check_state(state)
        if not state.tracker_features:
            raise LibraryError("this image state holds no tracker features (it was encoded by a library "
                               "without the interactive part)")
        spec = {i["name"]: i for i in self.functions["predict_masks"]["inputs"]}
        prompt = make_prompt(points, labels, box, mask_input, state.original_size, self.image_size,
                             int(spec["points"]["shape"][1]), int(spec["mask_input"]["shape"][-1]))
        out = self.model("predict_masks", *state.tracker_features, prompt.points, prompt.labels,
                         prompt.mask, prompt.mask_input.astype(spec["mask_input"]["dtype"]),
                         prompt.mask_valid)
        names = [o["name"] for o in self.functions["predict_masks"]["outputs"]]
        raw = {n: o.astype(np.float32) for n, o in zip(names, out)}
        return post_process_interactive(raw, multimask, state.original_size, mask_threshold, max_hole_area)

