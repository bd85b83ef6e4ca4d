"""The assembled SAM 3 image model and the functions a library exports.

SAM 3 is used as: encode an image once, then query it with many prompts. The
exported functions follow that:

* ``encode_image(pixel_values[B, 3, S, S]) -> FPN maps (highest resolution first)``
* ``image_position_encoding(batch) -> the sine position encodings of those maps``
* ``encode_text(input_ids[B, L], attention_mask[B, L]) -> (text_features[B, L, D], text_mask[B, L])``
  (``L`` = the text context length; encode a prompt once, reuse it for many images)
* ``detect(fpn_hidden_states_0..2, text_features, text_mask, boxes, box_labels, box_mask)
  -> (pred_logits, pred_boxes, pred_masks, presence_logits, semantic_seg)``, named as
  ``transformers``' ``Sam3ImageSegmentationOutput``. Box prompts come in a fixed
  number of slots (``max_boxes``) with a mask, valid boxes first, so one library
  serves any number of boxes up to it. The prompt is always the text followed by
  the geometry encoder's tokens, its CLS token included, also with no valid box:
  the original SAM 3 runs the geometry encoder on an empty prompt for text-only
  queries (``transformers`` skips it; docs/fidelity.md).
* with the ``interactive`` part (clicks, a box or a mask select one object: the SAM 1/2
  task, ``Sam3Image.predict_inst``), ``encode_image`` also returns the tracker neck's maps
  ``tracker_embeddings.0..2`` (``model.interactive``), and
  ``predict_masks(tracker_embeddings_0..2, points, point_labels, point_mask, mask_input,
  mask_valid) -> (pred_masks, iou_scores, object_score_logits)``: points in fixed slots with
  a mask (``max_points``, a box is two points), the four mask logits (slot 0 the single-mask
  output, 1..3 the multimask ones). One ViT trunk pass feeds both necks: an image queried
  with clicks and with concepts is encoded once. A library with ``interactive`` but no
  ``detector`` builds no detector neck: its ``encode_image`` returns the tracker's maps only.
* with the ``video`` part (follow objects through a video: the SAM 2 task,
  ``model.video_tracker``), ``track_step`` (one frame for all its objects: memory attention,
  prompt encoder, mask decoder, object pointer), ``encode_memory`` (a frame's memory for all
  its objects), ``encode_memory_low_res`` (the same from low-resolution mask logits, as the
  concept tracker encodes its masks) and ``mask_prompt`` (a mask prompt to the decoder's mask input). Objects are the
  batch (any number); memory frames and pointers come in static slots with masks (the
  config's ``memory_slots`` / ``pointer_slots``), so one library serves a whole session.
* ``release_outputs(token[1]) -> token``: does nothing; every library has it. TVM's
  virtual machine keeps the value of its last call until the next one, so a caller that
  drops its outputs would still hold them (``encode_image``'s FPN maps: 54 MiB at 1008 px)
  while the next call allocates new ones; ``sam3_nn.runtime.engine`` calls this after every call.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import Sam3Config
from sam3_nn.interface import RELEASE, builds_detector_neck  # RELEASE: in every library (module doc)
from sam3_nn.model.common import flatten_tokens, sine_position_encoding
from sam3_nn.model.detr_decoder import DetrDecoder, box_cxcywh_to_xyxy
from sam3_nn.model.detr_encoder import DetrEncoder
from sam3_nn.model.geometry import GeometryEncoder
from sam3_nn.model.heads import DotProductScoring, MaskDecoder
from sam3_nn.model.interactive import InteractiveModel
from sam3_nn.model.text_encoder import TextEncoder, encode_text
from sam3_nn.model.video_tracker import VideoTrackerModel
from sam3_nn.model.vision import VisionModel, VisionNeck

MAX_BOXES = 8  # default box-prompt slots of a compiled detect()
MAX_POINTS = 16  # default point slots of a compiled predict_masks() (a box takes two)

# the checkpoint parts (sam3_nn.weights.parts) a model can hold, and the functions each exports
PARTS = ("vision", "text", "detector", "interactive", "video")
DEFAULT_PARTS = ("vision", "text", "detector")
FUNCTIONS = {
    "vision": ("encode_image", "image_position_encoding"),
    "text": ("encode_text",),
    "detector": ("detect",),
    "interactive": ("predict_masks",),
    "video": ("track_step", "encode_memory", "encode_memory_low_res", "mask_prompt"),
}
TRACKER_LEVELS = 3  # the tracker neck's levels (its 0.5x level is dropped, scalp=1)


def _last(x: Tensor) -> Tensor:
    """The last entry along axis 0 (the final decoder layer), axis dropped."""
    n = int(x.shape[0])
    tail = op.split(x, [n - 1], axis=0)[1] if n > 1 else x
    return op.reshape(tail, list(x.shape[1:]))


class Sam3Model(nn.Module):
    """The whole image model, or a subset of its parts (e.g. only the vision encoder)."""

    def __init__(self, cfg: Sam3Config, parts=DEFAULT_PARTS, max_boxes: int = MAX_BOXES,
                 max_points: int = MAX_POINTS):
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; known: {list(PARTS)}")
        if "video" in parts and "interactive" not in parts:
            raise ValueError("the video part needs the interactive part (parts vision,interactive,video)")
        if "interactive" in parts and "vision" not in parts:
            raise ValueError("the interactive part needs the vision part (its image features come "
                             "from encode_image)")
        self.cfg = cfg
        self.parts = tuple(p for p in PARTS if p in parts)
        self.detector_neck = builds_detector_neck(self.parts)
        if "vision" in self.parts:
            self.vision_encoder = VisionModel(cfg.vision, neck=self.detector_neck)
        if "text" in self.parts:
            self.text_encoder = TextEncoder(cfg.text)
            # resizer from the text width to the detector width (HF ``Sam3Model.text_projection``)
            self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.detr_encoder.hidden_size)
        if "detector" in self.parts:
            if max_boxes < 1:
                raise ValueError(f"max_boxes must be at least 1, got {max_boxes}")
            self.max_boxes = max_boxes
            self.geometry_encoder = GeometryEncoder(cfg.geometry)
            self.detr_encoder = DetrEncoder(cfg.detr_encoder)
            self.detr_decoder = DetrDecoder(cfg.detr_decoder)
            self.dot_product_scoring = DotProductScoring(cfg.detr_decoder)
            self.mask_decoder = MaskDecoder(cfg.mask_decoder, cfg.mask_decoder_levels())
        if "interactive" in self.parts:
            if max_points < 1:
                raise ValueError(f"max_points must be at least 1, got {max_points}")
            self.max_points = max_points
            cfg.tracker_levels()  # checks the FPN scales the tracker neck needs
            self.tracker_neck = VisionNeck(cfg.vision, TRACKER_LEVELS)
            if "video" in self.parts:
                cfg.video.validate(cfg.vision.fpn_hidden_size)
                self.tracker_model = VideoTrackerModel(cfg)
            else:
                self.tracker_model = InteractiveModel(cfg)

    def functions(self) -> List[str]:
        fns = [f for p in self.parts for f in FUNCTIONS[p]
               if f != "image_position_encoding" or self.detector_neck]
        return fns + [RELEASE]

    def release_outputs(self, token: Tensor) -> Tensor:
        return token

    def encode_image(self, pixel_values: Tensor) -> Tuple[Tensor, ...]:
        """The detector's FPN maps, highest resolution first, channel last (``[B, s, s, 256]``:
        the layout the model computes and ``detect`` reads; the reference's
        ``fpn_hidden_states`` are these maps channel first), then, with the interactive part,
        the tracker's (``InteractiveModel.image_embeddings``), from the same trunk output.
        Every level of both necks is rescaled before any 3x3 convolution: those write the
        maps the function returns, so they come last (see ``VisionNeck.forward``)."""
        trunk = self.vision_encoder.backbone(pixel_values)
        necks = []
        if self.detector_neck:
            necks.append(self.vision_encoder.neck.fpn_layers)
        if "interactive" in self.parts:
            necks.append(self.tracker_neck.fpn_layers)
        rescaled = [[layer.rescale(trunk) for layer in layers] for layers in necks]
        out = []
        if self.detector_neck:
            out += [layer.proj2(p) for layer, p in zip(necks[0], rescaled[0])]
        if "interactive" in self.parts:
            out += self.tracker_model.image_embeddings(necks[-1], rescaled[-1])
        return tuple(out)

    def predict_masks(self, tracker_embeddings_0: Tensor, tracker_embeddings_1: Tensor,
                      tracker_embeddings_2: Tensor, points: Tensor, point_labels: Tensor,
                      point_mask: Tensor, mask_input: Tensor, mask_valid: Tensor) -> Tuple[Tensor, ...]:
        """Clicks / a box / a mask against encoded tracker features (``encode_image``'s
        ``tracker_embeddings``). ``points [B, P, 2]`` float32 pixels of the model input (``S x
        S``), ``point_labels [B, P]`` (1 positive, 0 negative, 2/3 box corners), ``point_mask
        [B, P]`` (1 valid, 0 empty slot; valid slots first), ``mask_input [B, 1, 4g, 4g]``
        low-resolution logits used where ``mask_valid [B]`` is 1. Returns ``pred_masks [B, 4,
        4g, 4g]`` (slot 0: single-mask output, 1..3: multimask), ``iou_scores [B, 4]``,
        ``object_score_logits [B, 1]``."""
        return self.tracker_model.predict_masks(tracker_embeddings_0, tracker_embeddings_1,
                                                tracker_embeddings_2, points, point_labels,
                                                point_mask, mask_input, mask_valid)

    def track_step(self, tracker_embeddings_0: Tensor, tracker_embeddings_1: Tensor,
                   tracker_embeddings_2: Tensor, memory: Tensor, memory_tpos: Tensor, memory_mask: Tensor,
                   pointers: Tensor, pointer_tpos: Tensor, pointer_mask: Tensor, mode: Tensor, points: Tensor,
                   point_labels: Tensor, point_mask: Tensor, mask_input: Tensor, mask_valid: Tensor,
                   multimask: Tensor, pointer_present: Tensor) -> Tuple[Tensor, ...]:
        """One video frame for ``N`` objects (``model.video_tracker``): the frame's tracker maps
        (``encode_image``, batch 1), each object's memory (``memory [N, M, g*g, 64]``,
        ``memory_tpos``/``memory_mask [N, M]``; ``pointers [N, P, C]``, ``pointer_tpos``
        float32 / ``pointer_mask [N, P]``), ``mode [N]`` (0 initial conditioning frame, 1
        tracked, 2 mask prompt), the prompt slots as ``predict_masks`` takes them and
        ``multimask [N]``, ``pointer_present [N]`` (-1: the object pointer blends by the score;
        0/1: by this, a mask prompt's presence). Returns ``low_res_masks [N, 1, 4g, 4g]``, ``high_res_masks [N, 1, S,
        S]``, ``iou_scores [N, 1]``, ``object_score_logits [N, 1]``, ``object_pointer [N, C]``."""
        return self.tracker_model.track_step(tracker_embeddings_0, tracker_embeddings_1, tracker_embeddings_2,
                                             memory, memory_tpos, memory_mask, pointers, pointer_tpos,
                                             pointer_mask, mode, points, point_labels, point_mask, mask_input,
                                             mask_valid, multimask, pointer_present)

    def encode_memory(self, tracker_embeddings_2: Tensor, high_res_masks: Tensor, object_score_logits: Tensor,
                      binarize: Tensor) -> Tensor:
        """The frame's memory for ``N`` objects: ``[N, g*g, 64]`` (``model.video_tracker``)."""
        return self.tracker_model.encode_memory(tracker_embeddings_2, high_res_masks, object_score_logits,
                                                binarize)

    def encode_memory_low_res(self, tracker_embeddings_2: Tensor, low_res_masks: Tensor,
                              object_score_logits: Tensor, binarize: Tensor) -> Tensor:
        """``encode_memory`` from low-resolution mask logits ``[N, 1, 4g, 4g]``: the concept tracker
        (``Sam3VideoModel._tracker_update_memories``) encodes those, resized once to the memory
        encoder's input, not through the ``S x S`` masks."""
        return self.tracker_model.encode_memory(tracker_embeddings_2, low_res_masks, object_score_logits,
                                                binarize)

    def mask_prompt(self, masks: Tensor) -> Tensor:
        """A 0/1 mask prompt ``[N, 1, S, S]`` -> ``track_step``'s ``mask_input`` ``[N, 1, 4g, 4g]``."""
        return self.tracker_model.mask_prompt(masks)

    def image_position_encoding(self, batch) -> Tuple[Tensor, ...]:
        """The sine position encodings of the detector's FPN maps (``detect``'s input)."""
        dtype = self.vision_encoder.neck.fpn_layers[0].proj1.weight.dtype
        sizes = self.cfg.vision.level_sizes()
        likes = [op.zeros([batch, s, s, 1], dtype) for s in sizes]
        return tuple(self.vision_encoder.neck.position_encodings(likes))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        return encode_text(self.text_encoder, self.text_projection, input_ids, attention_mask)

    def detect(self, fpn_hidden_states_0: Tensor, fpn_hidden_states_1: Tensor,
               fpn_hidden_states_2: Tensor, text_features: Tensor, text_mask: Tensor,
               boxes: Tensor, box_labels: Tensor, box_mask: Tensor) -> Tuple[Tensor, ...]:
        """One prompt against encoded image features (``encode_image``'s first three maps,
        channel last). ``boxes``: ``[B, N, 4]`` (cx, cy, w, h) normalised; ``box_labels``:
        1 positive / 0 negative; ``box_mask``: 1 valid / 0 empty slot, valid slots first."""
        c = self.cfg.detr_encoder.hidden_size
        levels = [fpn_hidden_states_0, fpn_hidden_states_1, fpn_hidden_states_2]
        image = levels[-1]  # the scale-1 map: the encoders' image tokens
        h, w = int(image.shape[1]), int(image.shape[2])
        pos = op.permute_dims(sine_position_encoding(image, c // 2, image.dtype), [0, 2, 3, 1])
        # the CLS token stays valid without boxes, as in the original (docs/fidelity.md)
        geo, geo_mask = self.geometry_encoder(boxes, box_labels, box_mask, image, pos)
        prompt = op.concat([text_features, geo], dim=1)
        mask = op.astype(text_mask, "int32") if text_mask.dtype != "int32" else text_mask
        prompt_mask = op.concat([mask, geo_mask], dim=1)
        memory = self.detr_encoder(image, pos, prompt, prompt_mask)
        hidden, _, boxes_all, presence_all = self.detr_decoder(
            memory, flatten_tokens(pos, c, "pos"), prompt, prompt_mask, (h, w))
        logits = self.dot_product_scoring(hidden, prompt, prompt_mask)
        masks, semantic = self.mask_decoder(_last(hidden), levels, memory, prompt, prompt_mask)
        return (_last(logits), box_cxcywh_to_xyxy(_last(boxes_all)), masks,
                _last(presence_all), semantic)

    def export_spec(self, dtype: str, batch: Optional[int] = None) -> Dict[str, Dict]:
        """Input specs of the exported functions. ``batch``: None, any batch size (a
        symbolic ``batch``); an int, that size only: every shape is then static, which lets
        TVM plan all intermediate memory ahead of time and, on CUDA, capture the calls as
        CUDA graphs."""
        if batch is not None and (not isinstance(batch, int) or batch < 1):
            raise ValueError(f"batch must be a positive int or None (any), got {batch!r}")
        b = "batch" if batch is None else batch
        s = self.cfg.image_size
        c = self.cfg.vision.backbone.num_channels
        ctx = self.cfg.text.max_position_embeddings
        mode = {"param_mode": "packed", "effect_mode": "none"}
        spec = {
            "encode_image": {"pixel_values": nn.spec.Tensor([b, c, s, s], dtype), "$": mode},
            "image_position_encoding": {"batch": nn.spec.Int(), "$": mode},
            "encode_text": {"input_ids": nn.spec.Tensor([b, ctx], "int32"),
                            "attention_mask": nn.spec.Tensor([b, ctx], "int32"), "$": mode},
            RELEASE: {"token": nn.spec.Tensor([1], "int32"),
                      "$": {"param_mode": "none", "effect_mode": "none"}},
        }
        if "interactive" in self.parts:
            c = self.cfg.vision.fpn_hidden_size
            s0, s1, s2 = self.cfg.tracker_levels()
            p = self.max_points
            spec["predict_masks"] = {
                "tracker_embeddings_0": nn.spec.Tensor([b, s0, s0, c // 8], dtype),
                "tracker_embeddings_1": nn.spec.Tensor([b, s1, s1, c // 4], dtype),
                "tracker_embeddings_2": nn.spec.Tensor([b, s2, s2, c], dtype),
                "points": nn.spec.Tensor([b, p, 2], "float32"),
                "point_labels": nn.spec.Tensor([b, p], "int32"),
                "point_mask": nn.spec.Tensor([b, p], "int32"),
                "mask_input": nn.spec.Tensor([b, 1, 4 * s2, 4 * s2], dtype),
                "mask_valid": nn.spec.Tensor([b], "int32"),
                "$": mode,
            }
        if "video" in self.parts:
            c = self.cfg.vision.fpn_hidden_size
            s0, s1, s2 = self.cfg.tracker_levels()
            v = self.cfg.video
            n, m, pp, p = "objects", v.memory_slots, v.pointer_slots, self.max_points
            image = self.cfg.image_size
            maps = {"tracker_embeddings_0": nn.spec.Tensor([1, s0, s0, c // 8], dtype),
                    "tracker_embeddings_1": nn.spec.Tensor([1, s1, s1, c // 4], dtype),
                    "tracker_embeddings_2": nn.spec.Tensor([1, s2, s2, c], dtype)}
            spec["track_step"] = {
                **maps,
                "memory": nn.spec.Tensor([n, m, s2 * s2, v.mem_dim], dtype),
                "memory_tpos": nn.spec.Tensor([n, m], "int32"),
                "memory_mask": nn.spec.Tensor([n, m], "int32"),
                "pointers": nn.spec.Tensor([n, pp, c], dtype),
                "pointer_tpos": nn.spec.Tensor([n, pp], "float32"),
                "pointer_mask": nn.spec.Tensor([n, pp], "int32"),
                "mode": nn.spec.Tensor([n], "int32"),
                "points": nn.spec.Tensor([n, p, 2], "float32"),
                "point_labels": nn.spec.Tensor([n, p], "int32"),
                "point_mask": nn.spec.Tensor([n, p], "int32"),
                "mask_input": nn.spec.Tensor([n, 1, 4 * s2, 4 * s2], dtype),
                "mask_valid": nn.spec.Tensor([n], "int32"),
                "multimask": nn.spec.Tensor([n], "int32"),
                "pointer_present": nn.spec.Tensor([n], "int32"),
                "$": mode,
            }
            spec["encode_memory"] = {
                "tracker_embeddings_2": maps["tracker_embeddings_2"],
                "high_res_masks": nn.spec.Tensor([n, 1, image, image], dtype),
                "object_score_logits": nn.spec.Tensor([n, 1], dtype),
                "binarize": nn.spec.Tensor([n], "int32"),
                "$": mode,
            }
            spec["encode_memory_low_res"] = {
                "tracker_embeddings_2": maps["tracker_embeddings_2"],
                "low_res_masks": nn.spec.Tensor([n, 1, 4 * s2, 4 * s2], dtype),
                "object_score_logits": nn.spec.Tensor([n, 1], dtype),
                "binarize": nn.spec.Tensor([n], "int32"),
                "$": mode,
            }
            spec["mask_prompt"] = {"masks": nn.spec.Tensor([n, 1, image, image], dtype), "$": mode}
        if "detector" in self.parts:
            c = self.cfg.detr_encoder.hidden_size
            n = self.max_boxes
            sizes = self.cfg.vision.level_sizes()[:3]
            spec["detect"] = {
                **{f"fpn_hidden_states_{i}": nn.spec.Tensor([b, sz, sz, c], dtype)
                   for i, sz in enumerate(sizes)},
                "text_features": nn.spec.Tensor([b, ctx, c], dtype),
                "text_mask": nn.spec.Tensor([b, ctx], "int32"),
                "boxes": nn.spec.Tensor([b, n, 4], "float32"),
                "box_labels": nn.spec.Tensor([b, n], "int32"),
                "box_mask": nn.spec.Tensor([b, n], "int32"),
                "$": mode,
            }
        return {f: spec[f] for f in self.functions()}

    def output_names(self) -> Dict[str, List[str]]:
        n = len(self.cfg.vision.scale_factors)
        image = [f"fpn_hidden_states.{i}" for i in range(n)] if self.detector_neck else []
        if "interactive" in self.parts:
            image += [f"tracker_embeddings.{i}" for i in range(TRACKER_LEVELS)]
        names = {
            "encode_image": image,
            "predict_masks": ["pred_masks", "iou_scores", "object_score_logits"],
            "track_step": ["low_res_masks", "high_res_masks", "iou_scores", "object_score_logits",
                           "object_pointer"],
            "encode_memory": ["memory_features"],
            "encode_memory_low_res": ["memory_features"],
            "mask_prompt": ["mask_input"],
            "image_position_encoding": [f"fpn_position_encoding.{i}" for i in range(n)],
            "encode_text": ["text_features", "text_mask"],
            "detect": ["pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg"],
            RELEASE: ["token"],
        }
        return {f: names[f] for f in self.functions()}

    def output_notes(self) -> Dict[str, Dict[str, Dict[str, str]]]:
        """What the manifest says of some outputs beyond name, shape and dtype: the frame memory
        holds bfloat16 values (the runtime keeps it on the device as it comes out)."""
        notes = {"encode_memory": {"memory_features": {"values": "bfloat16"}},
                 "encode_memory_low_res": {"memory_features": {"values": "bfloat16"}}}
        return {f: notes[f] for f in self.functions() if f in notes}
