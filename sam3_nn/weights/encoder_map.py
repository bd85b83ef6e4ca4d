"""Geometry encoder + DETR encoder parameter mapping (both formats).

Our names mirror the HF ``Sam3Model``: ``geometry_encoder.*`` and
``detr_encoder.*``, attention with separate ``q_proj/k_proj/v_proj/o_proj``.
The original ``sam3.pt`` keeps PyTorch ``nn.MultiheadAttention`` layouts (fused
``in_proj_weight``/``in_proj_bias``, rows q, k, v), split here with ``chunk``.
"""

from __future__ import annotations

from sam3_nn.config import Sam3Config
from sam3_nn.weights.mapping import ParamMapping, chunk

GEO = "geometry_encoder."
ENC = "detr_encoder."

# geometry encoder tensors outside the layers: ours (== HF) -> sam3.pt
_GEO_TOP = {
    "label_embed": "label_embed",
    "cls_embed": "cls_embed",
    "boxes_direct_project": "boxes_direct_project",
    "boxes_pool_project": "boxes_pool_project",
    "boxes_pos_enc_project": "boxes_pos_enc_project",
    "final_proj": "final_proj",
    "vision_layer_norm": "img_pre_norm",
    "prompt_layer_norm": "norm",
    "output_layer_norm": "encode_norm",
}
_EMBEDDINGS = ("label_embed", "cls_embed")  # weight only

# one encoder layer: ours (== HF) -> sam3.pt, attention blocks apart
_LAYER = {
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "layer_norm3": "norm3",
}
_ATTN = {"self_attn": "self_attn", "cross_attn": "cross_attn_image"}


def _add_layer(m: ParamMapping, ours: str, src: str) -> None:
    """One geometry/DETR encoder layer; ``ours``/``src`` end with a dot."""
    for t in ("weight", "bias"):
        for o, p in _LAYER.items():
            m.add(f"{ours}{o}.{t}", f"{src}{o if m.fmt == 'hf' else p}.{t}")
        for o, p in _ATTN.items():
            if m.fmt == "hf":
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    m.add(f"{ours}{o}.{proj}.{t}", f"{src}{o}.{proj}.{t}")
            else:
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    m.add(f"{ours}{o}.{proj}.{t}", f"{src}{p}.in_proj_{t}", chunk(i, 3))
                m.add(f"{ours}{o}.o_proj.{t}", f"{src}{p}.out_proj.{t}")


def add_encoder_parts(m: ParamMapping, cfg: Sam3Config, prefix: str) -> None:
    """Rules for the geometry encoder and the DETR encoder.

    ``prefix``: where the detector's tensors live ("" in an HF snapshot,
    "detector." in a ``sam3.pt``).
    """
    hf = m.fmt == "hf"
    geo_src = prefix + GEO
    for o, p in _GEO_TOP.items():
        for t in (("weight",) if o in _EMBEDDINGS else ("weight", "bias")):
            m.add(f"{GEO}{o}.{t}", f"{geo_src}{o if hf else p}.{t}")
    for i in range(cfg.geometry.num_layers):
        _add_layer(m, f"{GEO}layers.{i}.", f"{geo_src}{'layers' if hf else 'encode'}.{i}.")

    enc_src = prefix + (ENC if hf else "transformer.encoder.")
    for i in range(cfg.detr_encoder.num_layers):
        _add_layer(m, f"{ENC}layers.{i}.", f"{enc_src}layers.{i}.")

    if not hf:
        m.ignore(r"^" + geo_src.replace(".", r"\.") + r"points_(direct|pool|pos_enc)_project\.",
                 "point-prompt projections: the original never gives the concept detector "
                 "points at inference (Sam3Image.forward drops them), so they are not built")
