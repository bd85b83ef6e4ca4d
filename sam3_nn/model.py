"""The assembled SAM 3 image model and the functions a library exports.

SAM 3 is used as: encode an image once, then query it with many prompts. The
exported functions follow that:

* ``encode_image(pixel_values[B, 3, S, S]) -> FPN maps (highest resolution first)``
* ``image_position_encoding(batch) -> the sine position encodings of those maps``
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .config import Sam3Config
from .rope import RopeMode
from .vision import VisionModel

# which checkpoint parts (sam3_nn.weights.parts) the exported model holds
PARTS = ("vision",)


class Sam3Model(nn.Module):
    def __init__(self, cfg: Sam3Config, rope_mode: RopeMode = RopeMode.NORMAL):
        self.cfg = cfg
        self.vision_encoder = VisionModel(cfg.vision, rope_mode)

    def encode_image(self, pixel_values: Tensor) -> Tuple[Tensor, ...]:
        return self.vision_encoder(pixel_values)

    def image_position_encoding(self, batch) -> Tuple[Tensor, ...]:
        dtype = self.vision_encoder.neck.fpn_layers[0].proj1.weight.dtype
        sizes = self.cfg.vision.level_sizes()
        likes = [op.zeros([batch, s, s, 1], dtype) for s in sizes]
        return tuple(self.vision_encoder.neck.position_encodings(likes))

    def export_spec(self, dtype: str) -> Dict[str, Dict]:
        s = self.cfg.image_size
        c = self.cfg.vision.backbone.num_channels
        mode = {"param_mode": "packed", "effect_mode": "none"}
        return {
            "encode_image": {"pixel_values": nn.spec.Tensor(["batch", c, s, s], dtype), "$": mode},
            "image_position_encoding": {"batch": nn.spec.Int(), "$": mode},
        }

    def output_names(self) -> Dict[str, List[str]]:
        n = len(self.cfg.vision.scale_factors)
        return {
            "encode_image": [f"fpn_hidden_states.{i}" for i in range(n)],
            "image_position_encoding": [f"fpn_position_encoding.{i}" for i in range(n)],
        }
