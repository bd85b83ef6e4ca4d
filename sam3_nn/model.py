"""The assembled SAM 3 image model and the functions a library exports.

SAM 3 is used as: encode an image once, then query it with many prompts. The
exported functions follow that:

* ``encode_image(pixel_values[B, 3, S, S]) -> FPN maps (highest resolution first)``
* ``image_position_encoding(batch) -> the sine position encodings of those maps``
* ``encode_text(input_ids[B, L], attention_mask[B, L]) -> (text_features[B, L, D], text_mask[B, L])``
  (``L`` = the text context length; encode a prompt once, reuse it for many images)
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .config import Sam3Config
from .rope import RopeMode
from .text_encoder import TextEncoder, encode_text
from .vision import VisionModel

# the checkpoint parts (sam3_nn.weights.parts) a model can hold, and the functions each exports
PARTS = ("vision", "text")
FUNCTIONS = {
    "vision": ("encode_image", "image_position_encoding"),
    "text": ("encode_text",),
}


class Sam3Model(nn.Module):
    """The whole image model, or a subset of its parts (e.g. only the vision encoder)."""

    def __init__(self, cfg: Sam3Config, rope_mode: RopeMode = RopeMode.NORMAL, parts=PARTS):
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown model parts {unknown}; known: {list(PARTS)}")
        self.cfg = cfg
        self.parts = tuple(p for p in PARTS if p in parts)
        if "vision" in self.parts:
            self.vision_encoder = VisionModel(cfg.vision, rope_mode)
        if "text" in self.parts:
            self.text_encoder = TextEncoder(cfg.text)
            # resizer from the text width to the detector width (HF ``Sam3Model.text_projection``)
            self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.detr_encoder.hidden_size)

    def functions(self) -> List[str]:
        return [f for p in self.parts for f in FUNCTIONS[p]]

    def encode_image(self, pixel_values: Tensor) -> Tuple[Tensor, ...]:
        return self.vision_encoder(pixel_values)

    def image_position_encoding(self, batch) -> Tuple[Tensor, ...]:
        dtype = self.vision_encoder.neck.fpn_layers[0].proj1.weight.dtype
        sizes = self.cfg.vision.level_sizes()
        likes = [op.zeros([batch, s, s, 1], dtype) for s in sizes]
        return tuple(self.vision_encoder.neck.position_encodings(likes))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor]:
        return encode_text(self.text_encoder, self.text_projection, input_ids, attention_mask)

    def export_spec(self, dtype: str) -> Dict[str, Dict]:
        s = self.cfg.image_size
        c = self.cfg.vision.backbone.num_channels
        ctx = self.cfg.text.max_position_embeddings
        mode = {"param_mode": "packed", "effect_mode": "none"}
        spec = {
            "encode_image": {"pixel_values": nn.spec.Tensor(["batch", c, s, s], dtype), "$": mode},
            "image_position_encoding": {"batch": nn.spec.Int(), "$": mode},
            "encode_text": {"input_ids": nn.spec.Tensor(["batch", ctx], "int32"),
                            "attention_mask": nn.spec.Tensor(["batch", ctx], "int32"), "$": mode},
        }
        return {f: spec[f] for f in self.functions()}

    def output_names(self) -> Dict[str, List[str]]:
        n = len(self.cfg.vision.scale_factors)
        names = {
            "encode_image": [f"fpn_hidden_states.{i}" for i in range(n)],
            "image_position_encoding": [f"fpn_position_encoding.{i}" for i in range(n)],
            "encode_text": ["text_features", "text_mask"],
        }
        return {f: names[f] for f in self.functions()}
