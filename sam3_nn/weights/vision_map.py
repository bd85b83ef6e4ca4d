"""Vision backbone (ViT trunk + FPN neck) parameter mapping for both formats.

Our names follow the HF ``Sam3VisionModel`` (under ``vision_encoder.``), except
the fused attention projection ``attention.qkv`` (HF: q/k/v_proj; sam3.pt: qkv).
"""

from __future__ import annotations

import re

from sam3_nn.config import VisionConfig
from sam3_nn.weights.mapping import ParamMapping, concat0, drop_first_token

OURS = "vision_encoder."
PT = "backbone.vision_backbone."


NO_NECK = "detector FPN neck: not built in this model (interactive part without the detector)"


def add_vision(m: ParamMapping, cfg: VisionConfig, src: str, neck: bool = True) -> None:
    """Add the vision rules; ``src`` is the format's prefix of the vision tensors; ``neck``:
    whether the model has the detector's FPN neck (``interface.builds_detector_neck``)."""
    bb = cfg.backbone
    ob = OURS + "backbone."
    if m.fmt == "hf":
        sb = src + "backbone."
        for n in ("embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings",
                  "layer_norm.weight", "layer_norm.bias"):
            m.add(ob + n.replace("projection.weight", "weight"), sb + n)
        for i in range(bb.num_hidden_layers):
            o, s = f"{ob}layers.{i}.", f"{sb}layers.{i}."
            for t in ("weight", "bias"):
                m.add(f"{o}attention.qkv.{t}", [f"{s}attention.{p}_proj.{t}" for p in "qkv"], concat0)
                for n in ("attention.o_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                    m.add(f"{o}{n}.{t}", f"{s}{n}.{t}")
        m.ignore(r"rotary_emb\.", "RoPE buffers (computed in-kernel)")
        if not neck:
            m.ignore(r"^" + re.escape(src) + r"neck\.", NO_NECK)
            return
        for lvl, scale in enumerate(cfg.scale_factors):
            o, s = f"{OURS}neck.fpn_layers.{lvl}.", f"{src}neck.fpn_layers.{lvl}."
            for t in ("weight", "bias"):
                for n in _fpn_layers(scale):
                    m.add(f"{o}{n}.{t}", f"{s}{n}.{t}")
        return

    # original sam3.pt layout
    t0 = src + "trunk."
    m.add(ob + "embeddings.patch_embeddings.weight", t0 + "patch_embed.proj.weight")
    m.add(ob + "embeddings.position_embeddings", t0 + "pos_embed", drop_first_token)
    for t in ("weight", "bias"):
        m.add(f"{ob}layer_norm.{t}", f"{t0}ln_pre.{t}")
    for i in range(bb.num_hidden_layers):
        o, s = f"{ob}layers.{i}.", f"{t0}blocks.{i}."
        for t in ("weight", "bias"):
            for ours, theirs in (("attention.qkv", "attn.qkv"), ("attention.o_proj", "attn.proj"),
                                 ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                m.add(f"{o}{ours}.{t}", f"{s}{theirs}.{t}")
    m.ignore(r"\.freqs_cis$", "precomputed complex RoPE table (computed in-kernel)")
    if not neck:
        m.ignore(r"^" + re.escape(src) + r"convs\.", NO_NECK)
        return
    for lvl, scale in enumerate(cfg.scale_factors):
        o, s = f"{OURS}neck.fpn_layers.{lvl}.", f"{src}convs.{lvl}."
        names = {"scale_layers.0": "dconv_2x2_0" if scale == 4.0 else "dconv_2x2",
                 "scale_layers.2": "dconv_2x2_1", "proj1": "conv_1x1", "proj2": "conv_3x3"}
        for t in ("weight", "bias"):
            for n in _fpn_layers(scale):
                m.add(f"{o}{n}.{t}", f"{s}{names[n]}.{t}")


def _fpn_layers(scale: float):
    if scale == 4.0:
        return ("scale_layers.0", "scale_layers.2", "proj1", "proj2")
    if scale == 2.0:
        return ("scale_layers.0", "proj1", "proj2")
    return ("proj1", "proj2")
