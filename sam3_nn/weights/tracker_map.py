"""Interactive part (tracker neck, prompt encoder, mask decoder) parameter mapping.

Our names mirror ``transformers``' ``Sam3VideoModel`` layout: ``tracker_neck.fpn_layers.*``
(the second FPN neck) and ``tracker_model.{prompt_encoder, mask_decoder,
shared_image_embedding, no_memory_embedding}``. Sources:

* HF ``Sam3VideoModel`` snapshot (``tracker_model.``, ``tracker_neck.``): a pure renaming;
* HF ``Sam3TrackerModel`` snapshot (no prefix; its ``vision_encoder.neck`` is the tracker's
  neck, its ``vision_encoder.backbone`` the shared trunk);
* the original ``sam3.pt``: ``<vision>sam2_convs.{0..2}`` (``dconv_2x2*`` / ``conv_1x1`` /
  ``conv_3x3`` as the detector's ``convs``), ``tracker.sam_prompt_encoder.*``,
  ``tracker.sam_mask_decoder.*`` (the original's module names: ``point_embeddings.{k}``
  one row each, ``mask_downscaling.{0,1,3,4,6}``, ``output_upscaling.{0,1,3}``,
  ``norm1..4``, ``mlp.lin1/lin2``, ``out_proj``, MLP ``layers.{i}``), ``tracker.no_mem_embed``.
  Its one ``pe_layer.positional_encoding_gaussian_matrix`` feeds both of our position
  encodings (the point encoding and the image's dense one: the same module in the original).

The video tracker (part ``video``, :func:`add_video`): memory attention
(``tracker.transformer.encoder.*``), memory encoder (``tracker.maskmem_backbone.*``), object
pointers (``obj_ptr_proj``, ``obj_ptr_tpos_proj``, ``no_obj_ptr``), the temporal encoding
(``maskmem_tpos_enc``), the occlusion embedding (``no_obj_embed_spatial``) and the mask
prompt's ``mask_downsample``; HF names as ``Sam3TrackerVideoModel``'s.

Left out, with the reason: the neck's 0.5x level (computed and dropped by the original,
``scalp=1``), ``no_mem_pos_enc`` / ``no_memory_positional_encoding`` (never read), and the
video tracker's tensors when that part is not built.
"""

from __future__ import annotations

import math
import re

from sam3_nn.config import Sam3Config
from sam3_nn.weights.mapping import ParamMapping, concat0

NECK = "tracker_neck."
OURS = "tracker_model."
PE = "prompt_encoder."
MD = "mask_decoder."
PT = "tracker."
LEVELS = 3

VIDEO_TRACKER = "video tracker (memory attention and encoder, object pointers): not part of the image model"
DROPPED_LEVEL = "tracker neck's 0.5x level: computed and dropped by the original (scalp=1)"


def _pairs(m: ParamMapping, ours: str, theirs: str) -> None:
    for t in ("weight", "bias"):
        m.add(f"{ours}.{t}", f"{theirs}.{t}")


def _neck(m: ParamMapping, cfg: Sam3Config, src: str, pt: bool) -> None:
    """Levels 0..2 of the tracker neck from ``src`` (``...sam2_convs.`` or ``...fpn_layers.``)."""
    for lvl, scale in enumerate(cfg.vision.scale_factors[:LEVELS]):
        names = {"scale_layers.0": "dconv_2x2_0" if scale == 4.0 else "dconv_2x2",
                 "scale_layers.2": "dconv_2x2_1", "proj1": "conv_1x1", "proj2": "conv_3x3"}
        layers = ["scale_layers.0", "scale_layers.2"] if scale == 4.0 else \
            ["scale_layers.0"] if scale == 2.0 else []
        for n in layers + ["proj1", "proj2"]:
            _pairs(m, f"{NECK}fpn_layers.{lvl}.{n}", f"{src}{lvl}.{names[n] if pt else n}")
    m.ignore(r"^" + re.escape(src) + r"[3-9]\.", DROPPED_LEVEL, first=True)


def hf_names(cfg: Sam3Config):
    """Our (== HF ``tracker_model.``-relative) names of the prompt encoder, mask decoder and
    the two top-level tensors."""
    t = cfg.tracker
    n = t.num_multimask_outputs + 1
    names = [PE + "shared_embedding.positional_embedding", PE + "no_mask_embed.weight",
             PE + "point_embed.weight", PE + "not_a_point_embed.weight",
             "shared_image_embedding.positional_embedding", "no_memory_embedding"]
    wb = ("weight", "bias")
    names += [f"{PE}mask_embed.{c}.{x}" for c in ("conv1", "conv2", "conv3", "layer_norm1",
                                                  "layer_norm2") for x in wb]
    names += [f"{MD}{k}.weight" for k in ("iou_token", "mask_tokens", "obj_score_token")]
    attn = [f"{p}_proj" for p in "qkvo"]
    for i in range(t.num_layers):
        o = f"{MD}transformer.layers.{i}."
        for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            names += [f"{o}{a}.{p}.{x}" for p in attn for x in wb]
        names += [f"{o}{k}.{x}" for k in ("layer_norm1", "layer_norm2", "layer_norm3", "layer_norm4",
                                           "mlp.proj_in", "mlp.proj_out") for x in wb]
    names += [f"{MD}transformer.final_attn_token_to_image.{p}.{x}" for p in attn for x in wb]
    names += [f"{MD}{k}.{x}" for k in ("transformer.layer_norm_final_attn", "upscale_conv1",
                                       "upscale_conv2", "upscale_layer_norm", "conv_s0", "conv_s1")
              for x in wb]
    for head, depth in ([(f"output_hypernetworks_mlps.{i}", 3) for i in range(n)]
                        + [("iou_prediction_head", t.iou_head_depth), ("pred_obj_score_head", 3)]):
        names += [f"{MD}{head}.{k}.{x}" for k in ["proj_in", "proj_out"]
                  + [f"layers.{j}" for j in range(depth - 2)] for x in wb]
    return names


def _feed_forward(m: ParamMapping, ours: str, theirs: str, depth: int) -> None:
    """``Sam3TrackerFeedForward`` (proj_in, layers, proj_out) <- the original's MLP ``layers.{i}``."""
    _pairs(m, ours + "proj_in", f"{theirs}layers.0")
    for j in range(depth - 2):
        _pairs(m, f"{ours}layers.{j}", f"{theirs}layers.{j + 1}")
    _pairs(m, ours + "proj_out", f"{theirs}layers.{depth - 1}")


def add_interactive(m: ParamMapping, cfg: Sam3Config, prefix: str, vision_prefix: str) -> None:
    """Rules for ``tracker_neck.*`` and ``tracker_model.*``. ``prefix``: where the tracker's
    tensors live (HF: ``tracker_model.`` or "" for a ``Sam3TrackerModel``; sam3.pt: "");
    ``vision_prefix``: where the vision backbone's (the neck sits beside it in sam3.pt and
    inside it in a ``Sam3TrackerModel``)."""
    if m.fmt == "hf":
        for name in hf_names(cfg):
            m.add(OURS + name, prefix + name)
        neck = "tracker_neck.fpn_layers." if prefix == "tracker_model." else vision_prefix + "neck.fpn_layers."
        _neck(m, cfg, neck, pt=False)
        return
    if m.fmt != "pt":
        raise ValueError(f"unknown checkpoint format {m.fmt!r}")

    _neck(m, cfg, vision_prefix + "sam2_convs.", pt=True)
    t = cfg.tracker
    pe, md, o_pe, o_md = prefix + PT + "sam_prompt_encoder.", prefix + PT + "sam_mask_decoder.", \
        OURS + PE, OURS + MD
    gauss = pe + "pe_layer.positional_encoding_gaussian_matrix"
    m.add(o_pe + "shared_embedding.positional_embedding", gauss)
    m.add(OURS + "shared_image_embedding.positional_embedding", gauss)
    m.add(OURS + "no_memory_embedding", prefix + PT + "no_mem_embed")
    m.add(o_pe + "no_mask_embed.weight", pe + "no_mask_embed.weight")
    m.add(o_pe + "not_a_point_embed.weight", pe + "not_a_point_embed.weight")
    m.add(o_pe + "point_embed.weight", [f"{pe}point_embeddings.{k}.weight" for k in range(4)], concat0)
    for ours, theirs in (("conv1", 0), ("layer_norm1", 1), ("conv2", 3), ("layer_norm2", 4), ("conv3", 6)):
        _pairs(m, f"{o_pe}mask_embed.{ours}", f"{pe}mask_downscaling.{theirs}")

    for k in ("iou_token", "mask_tokens", "obj_score_token"):
        m.add(f"{o_md}{k}.weight", f"{md}{k}.weight")
    attn = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}
    for i in range(t.num_layers):
        o, s = f"{o_md}transformer.layers.{i}.", f"{md}transformer.layers.{i}."
        for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            for ours, theirs in attn.items():
                _pairs(m, f"{o}{a}.{ours}", f"{s}{a}.{theirs}")
        for j in range(1, 5):
            _pairs(m, f"{o}layer_norm{j}", f"{s}norm{j}")
        _pairs(m, o + "mlp.proj_in", s + "mlp.lin1")
        _pairs(m, o + "mlp.proj_out", s + "mlp.lin2")
    for ours, theirs in attn.items():
        _pairs(m, f"{o_md}transformer.final_attn_token_to_image.{ours}",
               f"{md}transformer.final_attn_token_to_image.{theirs}")
    _pairs(m, o_md + "transformer.layer_norm_final_attn", md + "transformer.norm_final_attn")
    for ours, theirs in (("upscale_conv1", 0), ("upscale_layer_norm", 1), ("upscale_conv2", 3)):
        _pairs(m, o_md + ours, f"{md}output_upscaling.{theirs}")
    _pairs(m, o_md + "conv_s0", md + "conv_s0")
    _pairs(m, o_md + "conv_s1", md + "conv_s1")
    for i in range(t.num_multimask_outputs + 1):
        _feed_forward(m, f"{o_md}output_hypernetworks_mlps.{i}.", f"{md}output_hypernetworks_mlps.{i}.", 3)
    _feed_forward(m, o_md + "iou_prediction_head.", md + "iou_prediction_head.", t.iou_head_depth)
    _feed_forward(m, o_md + "pred_obj_score_head.", md + "pred_obj_score_head.", 3)


# ---- the video tracker (part "video") -------------------------------------------------------
VIDEO_PART = "video tracker (memory attention and encoder, object pointers)"
NO_MEM_POS = "no_memory_positional_encoding: never read by the reference's forward (the original's no_mem_pos_enc is unused too)"

# ours (under tracker_model.) -> sam3.pt (under tracker.), one-to-one weight/bias pairs
_PT_SINGLE = {
    "memory_temporal_positional_encoding": "maskmem_tpos_enc",
    "no_object_pointer": "no_obj_ptr",
    "occlusion_spatial_embedding_parameter": "no_obj_embed_spatial",
}
_PT_PAIRS = {
    "mask_downsample": "mask_downsample",
    "temporal_positional_encoding_projection_layer": "obj_ptr_tpos_proj",
    "memory_attention.layer_norm": "transformer.encoder.norm",
    "memory_encoder.feature_projection": "maskmem_backbone.pix_feat_proj",
    "memory_encoder.projection": "maskmem_backbone.out_proj",
}


def video_names(cfg: Sam3Config):
    """Our (== HF ``Sam3TrackerVideoModel``) names of the video tracker's parameters, with
    their sam3.pt names (under ``tracker.``)."""
    v = cfg.video
    wb = ("weight", "bias")
    out = {k: t for k, t in _PT_SINGLE.items()}
    for ours, theirs in _PT_PAIRS.items():
        out.update({f"{ours}.{x}": f"{theirs}.{x}" for x in wb})
    attn = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}
    for i in range(v.memory_attention_num_layers):
        o, s = f"memory_attention.layers.{i}.", f"transformer.encoder.layers.{i}."
        for a in ("self_attn", "cross_attn_image"):
            out.update({f"{o}{a}.{p}.{x}": f"{s}{a}.{q}.{x}" for p, q in attn.items() for x in wb})
        for ours, theirs in (("linear1", "linear1"), ("linear2", "linear2"), ("layer_norm1", "norm1"),
                             ("layer_norm2", "norm2"), ("layer_norm3", "norm3")):
            out.update({f"{o}{ours}.{x}": f"{s}{theirs}.{x}" for x in wb})
    n = int(round(math.log2(v.mask_downsampler_total_stride)))
    md, mdp = "memory_encoder.mask_downsampler.", "maskmem_backbone.mask_downsampler.encoder."
    for i in range(n):
        out.update({f"{md}layers.{i}.conv.{x}": f"{mdp}{3 * i}.{x}" for x in wb})
        out.update({f"{md}layers.{i}.layer_norm.{x}": f"{mdp}{3 * i + 1}.{x}" for x in wb})
    out.update({f"{md}final_conv.{x}": f"{mdp}{3 * n}.{x}" for x in wb})
    for i in range(v.memory_fuser_num_layers):
        o, s = f"memory_encoder.memory_fuser.layers.{i}.", f"maskmem_backbone.fuser.layers.{i}."
        out[o + "scale"] = s + "gamma"
        for ours, theirs in (("depthwise_conv", "dwconv"), ("layer_norm", "norm"), ("pointwise_conv1", "pwconv1"),
                             ("pointwise_conv2", "pwconv2")):
            out.update({f"{o}{ours}.{x}": f"{s}{theirs}.{x}" for x in wb})
    for ours, j in (("proj_in", 0), ("layers.0", 1), ("proj_out", 2)):
        out.update({f"object_pointer_proj.{ours}.{x}": f"obj_ptr_proj.layers.{j}.{x}" for x in wb})
    return out


def add_video(m: ParamMapping, cfg: Sam3Config, prefix: str) -> None:
    """Rules for the video tracker's ``tracker_model.*`` parameters. ``prefix``: where they live
    (HF: ``tracker_model.`` in a ``Sam3VideoModel``, "" in a ``Sam3TrackerVideoModel``;
    sam3.pt: "", under ``tracker.``)."""
    names = video_names(cfg)
    if m.fmt == "hf":
        for ours in names:
            m.add(OURS + ours, prefix + ours)
        m.ignore(r"^" + re.escape(prefix + "no_memory_positional_encoding") + "$", NO_MEM_POS)
        return
    if m.fmt != "pt":
        raise ValueError(f"unknown checkpoint format {m.fmt!r}")
    for ours, theirs in names.items():
        m.add(OURS + ours, prefix + PT + theirs)
    m.ignore(r"^" + re.escape(prefix + PT + "no_mem_pos_enc") + "$", NO_MEM_POS)
