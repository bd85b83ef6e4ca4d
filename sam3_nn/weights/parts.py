"""The model parts a checkpoint holds, where each lives in either format, and who maps it.

A part built by this package has an ``add`` function; the loader calls it for
the parts the compiled model contains. Tensors of a part the model does not
contain are reported as such, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from sam3_nn.config import Sam3Config
from sam3_nn.interface import builds_detector_neck
from sam3_nn.weights.mapping import ParamMapping
from sam3_nn.weights.decoder_map import add_decoder_parts
from sam3_nn.weights.encoder_map import add_encoder_parts
from sam3_nn.weights.text_map import add_text
from sam3_nn.weights.tracker_map import VIDEO_PART, add_interactive, add_video
from sam3_nn.weights.vision_map import add_vision


@dataclass(frozen=True)
class Context:
    """What a part's rules may depend on besides its own prefix: the parts the model
    builds and where every part present in the checkpoint lives (None: absent)."""

    parts: Tuple[str, ...]
    prefixes: Dict[str, Optional[str]] = field(default_factory=dict)


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
    add: Callable[[ParamMapping, Sam3Config, str, Context], None]
    # what the part owns outside its prefix (absolute names), from the context
    owns_outside: Callable[[str, Context], Tuple[str, ...]] = lambda fmt, ctx: ()


def _tracker_neck(fmt: str, ctx: Context) -> Tuple[str, ...]:
    """Where the tracker's neck lives: beside the detector's in sam3.pt, ``tracker_neck.`` in
    an HF ``Sam3VideoModel``, the vision encoder's own neck in a ``Sam3TrackerModel``."""
    vision = ctx.prefixes.get("vision")
    if fmt == "pt":
        return (vision + "sam2_convs.",) if vision is not None else ()
    return ("tracker_neck.",) if ctx.prefixes.get("interactive") == "tracker_model." else ()


PARTS = [
    Part(
        "vision", "vision backbone (ViT + FPN neck)",
        {"hf": ("detector_model.vision_encoder.", "vision_encoder.", ""),
         "pt": ("detector.backbone.vision_backbone.", "backbone.vision_backbone.")},
        {"hf": "backbone.embeddings.", "pt": "trunk."},
        {"hf": ("",), "pt": ("",)},
        lambda m, cfg, prefix, ctx: add_vision(m, cfg.vision, prefix, builds_detector_neck(ctx.parts)),
    ),
    Part(
        "text", "text encoder",
        {"hf": ("detector_model.", ""), "pt": ("detector.", "")},
        {"hf": "text_encoder.", "pt": "backbone.language_backbone."},
        {"hf": ("text_encoder.", "text_projection."), "pt": ("backbone.language_backbone.",)},
        lambda m, cfg, prefix, ctx: add_text(m, cfg.text, prefix),
    ),
    Part(
        "detector", "detector (geometry encoder, DETR encoder/decoder, heads)",
        {"hf": ("detector_model.", ""), "pt": ("detector.", "")},
        {"hf": "detr_decoder.", "pt": "transformer.decoder."},
        {"hf": ("geometry_encoder.", "detr_encoder.", "detr_decoder.", "mask_decoder.",
                "dot_product_scoring."),
         "pt": ("geometry_encoder.", "transformer.", "segmentation_head.", "dot_prod_scoring.")},
        lambda m, cfg, prefix, ctx: (add_encoder_parts(m, cfg, prefix), add_decoder_parts(m, cfg, prefix)),
    ),
    Part(
        "interactive", "interactive segmentation (tracker neck, prompt encoder, mask decoder)",
        {"hf": ("tracker_model.", ""), "pt": ("",)},
        {"hf": "prompt_encoder.not_a_point_embed.weight",
         "pt": "tracker.sam_prompt_encoder.not_a_point_embed.weight"},
        {"hf": ("prompt_encoder.", "mask_decoder.", "shared_image_embedding.", "no_memory_embedding"),
         "pt": ("tracker.sam_prompt_encoder.", "tracker.sam_mask_decoder.", "tracker.no_mem_embed")},
        lambda m, cfg, prefix, ctx: add_interactive(m, cfg, prefix, ctx.prefixes.get("vision") or ""),
        _tracker_neck,
    ),
    Part(
        "video", VIDEO_PART,
        {"hf": ("tracker_model.", ""), "pt": ("",)},
        {"hf": "memory_attention.layer_norm.weight", "pt": "tracker.transformer.encoder.norm.weight"},
        {"hf": ("memory_attention.", "memory_encoder.", "memory_temporal_positional_encoding",
                "no_object_pointer", "mask_downsample.", "object_pointer_proj.",
                "temporal_positional_encoding_projection_layer.", "occlusion_spatial_embedding_parameter",
                "no_memory_positional_encoding"),
         "pt": ("tracker.transformer.", "tracker.maskmem_backbone.", "tracker.maskmem_tpos_enc",
                "tracker.no_obj_ptr", "tracker.no_obj_embed_spatial", "tracker.mask_downsample.",
                "tracker.obj_ptr_proj.", "tracker.obj_ptr_tpos_proj.", "tracker.no_mem_pos_enc")},
        lambda m, cfg, prefix, ctx: add_video(m, cfg, prefix),
    ),
]
