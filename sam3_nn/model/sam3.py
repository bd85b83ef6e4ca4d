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
from sam3_nn.interface import RELEASE  # in every library, whatever its parts (see the module doc)
from sam3_nn.model.common import flatten_tokens, sine_position_encoding
from sam3_nn.model.detr_decoder import DetrDecoder, box_cxcywh_to_xyxy
from sam3_nn.model.detr_encoder import DetrEncoder
from sam3_nn.model.geometry import GeometryEncoder
from sam3_nn.model.heads import DotProductScoring, MaskDecoder
from sam3_nn.model.text_encoder import TextEncoder, encode_text
from sam3_nn.model.vision import VisionModel

MAX_BOXES = 8  # default box-prompt slots of a compiled detect()

# the checkpoint parts (sam3_nn.weights.parts) a model can hold, and the functions each exports
PARTS = ("vision", "text", "detector")
FUNCTIONS = {
    "vision": ("encode_image", "image_position_encoding"),
    "text": ("encode_text",),
    "detector": ("detect",),
}


def _last(x: Tensor) -> Tensor:
    """The last entry along axis 0 (the final decoder layer), axis dropped."""
    n = int(x.shape[0])
    tail = op.split(x, [n - 1], axis=0)[1] if n > 1 else x
    return op.reshape(tail, list(x.shape[1:]))


class Sam3Model(nn.Module):
    """The whole image model, or a subset of its parts (e.g. only the vision encoder)."""

    def __init__(self, cfg: Sam3Config, parts=PARTS, max_boxes: int = MAX_BOXES):
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; known: {list(PARTS)}")
        self.cfg = cfg
        self.parts = tuple(p for p in PARTS if p in parts)
        if "vision" in self.parts:
            self.vision_encoder = VisionModel(cfg.vision)
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

    def functions(self) -> List[str]:
        return [f for p in self.parts for f in FUNCTIONS[p]] + [RELEASE]

    def release_outputs(self, token: Tensor) -> Tensor:
        return token

    def encode_image(self, pixel_values: Tensor) -> Tuple[Tensor, ...]:
        """The FPN maps, highest resolution first, channel last (``[B, s, s, 256]``: the
        layout the model computes and ``detect`` reads; the reference's
        ``fpn_hidden_states`` are these maps channel first)."""
        return tuple(self.vision_encoder.forward_nhwc(pixel_values))

    def image_position_encoding(self, batch) -> Tuple[Tensor, ...]:
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
        names = {
            "encode_image": [f"fpn_hidden_states.{i}" for i in range(n)],
            "image_position_encoding": [f"fpn_position_encoding.{i}" for i in range(n)],
            "encode_text": ["text_features", "text_mask"],
            "detect": ["pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg"],
            RELEASE: ["token"],
        }
        return {f: names[f] for f in self.functions()}
