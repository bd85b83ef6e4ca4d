"""DETR decoder, dot-product scoring and mask decoder parameter mapping (both formats).

Our names mirror the HF ``Sam3Model`` (``detr_decoder.*``, ``dot_product_scoring.*``,
``mask_decoder.*``), so the HF format is a pure renaming. The original ``sam3.pt``
keeps ``nn.MultiheadAttention``'s fused ``in_proj`` (rows q, k, v), split here
into q/k/v projections.

The pixel decoder runs one stage per FPN level it receives minus one (the image
model gives it 3 levels: 2 stages); the checkpoints hold ``num_upsampling_stages``
(3) conv/norm pairs, the extra ones are never used by the image model.
"""

from __future__ import annotations

import re

from sam3_nn.config import Sam3Config
from sam3_nn.weights.mapping import ParamMapping, chunk

OURS_DEC = "detr_decoder."
OURS_SCORE = "dot_product_scoring."
OURS_MASK = "mask_decoder."

PT_DEC = "transformer.decoder."
PT_SCORE = "dot_prod_scoring."
PT_MASK = "segmentation_head."

# our decoder layer names -> sam3.pt names (the reference conversion's table)
_PT_LAYER_ATTN = {"self_attn": "self_attn", "text_cross_attn": "ca_text",
                  "vision_cross_attn": "cross_attn"}
_PT_LAYER_OTHER = {"self_attn_layer_norm": "norm2", "text_cross_attn_layer_norm": "catext_norm",
                   "vision_cross_attn_layer_norm": "norm1", "mlp_layer_norm": "norm3",
                   "mlp.fc1": "linear1", "mlp.fc2": "linear2"}


def pixel_decoder_stages(cfg: Sam3Config) -> int:
    """Upsampling stages the pixel decoder runs (levels - 1)."""
    stages = cfg.mask_decoder_levels() - 1
    if stages < 0 or stages > cfg.mask_decoder.num_upsampling_stages:
        raise ValueError(
            f"the mask decoder gets {cfg.mask_decoder_levels()} FPN levels but has "
            f"{cfg.mask_decoder.num_upsampling_stages} upsampling stages")
    return stages


def _attn(m: ParamMapping, ours: str, theirs: str) -> None:
    """q/k/v/o projections ``ours`` <- ``nn.MultiheadAttention`` ``theirs`` (sam3.pt)."""
    for i, p in enumerate("qkv"):
        m.add(f"{ours}{p}_proj.weight", f"{theirs}in_proj_weight", chunk(i, 3))
        m.add(f"{ours}{p}_proj.bias", f"{theirs}in_proj_bias", chunk(i, 3))
    for t in ("weight", "bias"):
        m.add(f"{ours}o_proj.{t}", f"{theirs}out_proj.{t}")


def _pairs(m: ParamMapping, ours: str, theirs: str) -> None:
    for t in ("weight", "bias"):
        m.add(f"{ours}.{t}", f"{theirs}.{t}")


def _mlp(m: ParamMapping, ours: str, theirs: str, n: int) -> None:
    """``Sam3DecoderMLP`` ``layer1..n`` <- original ``layers.0..n-1``."""
    for i in range(n):
        _pairs(m, f"{ours}layer{i + 1}", f"{theirs}layers.{i}")


def _hf_names(cfg: Sam3Config):
    """Every parameter name of the three parts (the HF names, which are ours)."""
    dc = cfg.detr_decoder
    names = []
    for i in range(dc.num_layers):
        o = f"{OURS_DEC}layers.{i}."
        for a in _PT_LAYER_ATTN:
            names += [f"{o}{a}.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")]
        names += [f"{o}{n}.{t}" for n in _PT_LAYER_OTHER for t in ("weight", "bias")]
    names += [OURS_DEC + n for n in ("query_embed.weight", "reference_points.weight",
                                     "presence_token.weight")]
    for mod, n in (("box_head", 3), ("presence_head", 3), ("ref_point_head", 2),
                   ("box_rpb_embed_x", 2), ("box_rpb_embed_y", 2)):
        names += [f"{OURS_DEC}{mod}.layer{i + 1}.{t}" for i in range(n) for t in ("weight", "bias")]
    names += [f"{OURS_DEC}{n}.{t}" for n in ("output_layer_norm", "presence_layer_norm")
              for t in ("weight", "bias")]

    names += [f"{OURS_SCORE}{n}.{t}" for n in ("text_mlp.layer1", "text_mlp.layer2",
                                              "text_mlp_out_norm", "text_proj", "query_proj")
              for t in ("weight", "bias")]

    for k in range(pixel_decoder_stages(cfg)):
        names += [f"{OURS_MASK}pixel_decoder.{n}.{k}.{t}" for n in ("conv_layers", "norms")
                  for t in ("weight", "bias")]
    names += [f"{OURS_MASK}mask_embedder.layers.{i}.{t}" for i in range(3) for t in ("weight", "bias")]
    names += [f"{OURS_MASK}{n}.{t}" for n in ("instance_projection", "semantic_projection",
                                             "prompt_cross_attn_norm") for t in ("weight", "bias")]
    names += [f"{OURS_MASK}prompt_cross_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")]
    return names


def _ignore_unused_stages(m: ParamMapping, cfg: Sam3Config, src_pixel_decoder: str) -> None:
    used = pixel_decoder_stages(cfg)
    if used < cfg.mask_decoder.num_upsampling_stages:
        unused = "|".join(str(k) for k in range(used, cfg.mask_decoder.num_upsampling_stages))
        m.ignore(rf"^{re.escape(src_pixel_decoder)}(conv_layers|norms)\.({unused})\.",
                 f"pixel decoder stages past the {used} the image model runs "
                 f"({cfg.mask_decoder_levels()} FPN levels)")


def add_decoder_parts(m: ParamMapping, cfg: Sam3Config, prefix: str) -> None:
    """Rules for ``detr_decoder.*``, ``dot_product_scoring.*``, ``mask_decoder.*``.

    ``prefix``: where the detector's tensors live in the checkpoint ("" for an HF
    snapshot, "detector." for ``sam3.pt``).
    """
    if m.fmt == "hf":
        for name in _hf_names(cfg):
            m.add(name, prefix + name)
        _ignore_unused_stages(m, cfg, prefix + OURS_MASK + "pixel_decoder.")
        return
    if m.fmt != "pt":
        raise ValueError(f"unknown checkpoint format {m.fmt!r}")

    dec, score, mask = prefix + PT_DEC, prefix + PT_SCORE, prefix + PT_MASK
    dc = cfg.detr_decoder
    for i in range(dc.num_layers):
        o, s = f"{OURS_DEC}layers.{i}.", f"{dec}layers.{i}."
        for ours, theirs in _PT_LAYER_ATTN.items():
            _attn(m, f"{o}{ours}.", f"{s}{theirs}.")
        for ours, theirs in _PT_LAYER_OTHER.items():
            _pairs(m, o + ours, s + theirs)
    for n in ("query_embed.weight", "reference_points.weight", "presence_token.weight"):
        m.add(OURS_DEC + n, dec + n)
    _mlp(m, OURS_DEC + "box_head.", dec + "bbox_embed.", 3)
    _mlp(m, OURS_DEC + "presence_head.", dec + "presence_token_head.", 3)
    _mlp(m, OURS_DEC + "ref_point_head.", dec + "ref_point_head.", 2)
    _mlp(m, OURS_DEC + "box_rpb_embed_x.", dec + "boxRPB_embed_x.", 2)
    _mlp(m, OURS_DEC + "box_rpb_embed_y.", dec + "boxRPB_embed_y.", 2)
    _pairs(m, OURS_DEC + "output_layer_norm", dec + "norm")
    _pairs(m, OURS_DEC + "presence_layer_norm", dec + "presence_token_out_norm")

    _mlp(m, OURS_SCORE + "text_mlp.", score + "prompt_mlp.", 2)
    _pairs(m, OURS_SCORE + "text_mlp_out_norm", score + "prompt_mlp.out_norm")
    _pairs(m, OURS_SCORE + "text_proj", score + "prompt_proj")
    _pairs(m, OURS_SCORE + "query_proj", score + "hs_proj")

    for k in range(pixel_decoder_stages(cfg)):
        _pairs(m, f"{OURS_MASK}pixel_decoder.conv_layers.{k}", f"{mask}pixel_decoder.conv_layers.{k}")
        _pairs(m, f"{OURS_MASK}pixel_decoder.norms.{k}", f"{mask}pixel_decoder.norms.{k}")
    _ignore_unused_stages(m, cfg, mask + "pixel_decoder.")
    for i in range(3):
        _pairs(m, f"{OURS_MASK}mask_embedder.layers.{i}", f"{mask}mask_predictor.mask_embed.layers.{i}")
    _pairs(m, OURS_MASK + "instance_projection", mask + "instance_seg_head")
    _pairs(m, OURS_MASK + "semantic_projection", mask + "semantic_seg_head")
    _pairs(m, OURS_MASK + "prompt_cross_attn_norm", mask + "cross_attn_norm")
    _attn(m, OURS_MASK + "prompt_cross_attn.", mask + "cross_attend_prompt.")
