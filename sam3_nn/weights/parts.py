"""The model parts a checkpoint holds, where each lives in either format, and who maps it.

A part built by this package has an ``add`` function; the loader calls it for
the parts the compiled model contains. Tensors of a part the model does not
contain are reported as such, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from sam3_nn.config import Sam3Config
from sam3_nn.weights.mapping import ParamMapping
from sam3_nn.weights.decoder_map import add_decoder_parts
from sam3_nn.weights.encoder_map import add_encoder_parts
from sam3_nn.weights.text_map import add_text
from sam3_nn.weights.vision_map import add_vision


@dataclass(frozen=True)
class Part:
    name: str
    description: str
    # candidate prefixes of the part's tensors, per format (first match wins)
    prefixes: Dict[str, Tuple[str, ...]]
    # a name under the prefix that proves the part is present
    probe: Dict[str, str]
    # what, under the prefix, the part owns (for reporting unbuilt parts)
    owns: Dict[str, Tuple[str, ...]]
    add: Callable[[ParamMapping, Sam3Config, str], None]


def _not_built(m, cfg, prefix):  # pragma: no cover - placeholder until the part exists
    raise NotImplementedError


PARTS = [
    Part(
        "vision", "vision backbone (ViT + FPN neck)",
        {"hf": ("vision_encoder.", ""), "pt": ("detector.backbone.vision_backbone.", "backbone.vision_backbone.")},
        {"hf": "backbone.embeddings.", "pt": "trunk."},
        {"hf": ("",), "pt": ("",)},
        lambda m, cfg, prefix: add_vision(m, cfg.vision, prefix),
    ),
    Part(
        "text", "text encoder",
        {"hf": ("",), "pt": ("detector.", "")},
        {"hf": "text_encoder.", "pt": "backbone.language_backbone."},
        {"hf": ("text_encoder.", "text_projection."), "pt": ("backbone.language_backbone.",)},
        lambda m, cfg, prefix: add_text(m, cfg.text, prefix),
    ),
    Part(
        "detector", "detector (geometry encoder, DETR encoder/decoder, heads)",
        {"hf": ("",), "pt": ("detector.", "")},
        {"hf": "detr_decoder.", "pt": "transformer.decoder."},
        {"hf": ("geometry_encoder.", "detr_encoder.", "detr_decoder.", "mask_decoder.",
                "dot_product_scoring."),
         "pt": ("geometry_encoder.", "transformer.", "segmentation_head.", "dot_prod_scoring.")},
        lambda m, cfg, prefix: (add_encoder_parts(m, cfg, prefix), add_decoder_parts(m, cfg, prefix)),
    ),
]
