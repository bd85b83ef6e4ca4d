"""Text encoder (CLIP-style transformer + resizer) parameter mapping for both formats.

Our names follow transformers' ``Sam3Model``: ``text_encoder.text_model.*`` and the
top-level ``text_projection.*`` (the resizer to the detector width), except the
fused attention projection ``self_attn.qkv`` (HF: q/k/v_proj, concatenated here;
sam3.pt: ``attn.in_proj_weight``/``in_proj_bias``, already fused in q, k, v order).

sam3.pt (``backbone.language_backbone.``) -> ours:

* ``encoder.token_embedding.weight`` -> ``embeddings.token_embedding.weight``
* ``encoder.positional_embedding`` (a bare ``[context, width]`` tensor) ->
  ``embeddings.position_embedding.weight``
* ``encoder.transformer.resblocks.{i}.``: ``attn.in_proj_*`` -> ``self_attn.qkv.*``,
  ``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_1``/``ln_2`` ->
  ``layer_norm1``/``layer_norm2``, ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``
* ``encoder.ln_final`` -> ``final_layer_norm``
* ``resizer`` -> ``text_projection`` (top level)

CLIP's pooled-embedding projection (sam3.pt ``encoder.text_projection`` stored
``[width, projection_dim]``, i.e. transposed; HF ``text_encoder.text_projection.weight``
``[projection_dim, width]``) is ignored with a reason: SAM 3 feeds every token's
feature through the resizer and never uses the pooled CLIP embedding.
"""

from __future__ import annotations

import re

from sam3_nn.config import TextConfig
from sam3_nn.weights.mapping import ParamMapping, concat0

OURS = "text_encoder.text_model."
RESIZER = "text_projection."
PT = "backbone.language_backbone."

_UNUSED_CLIP_PROJECTION = ("CLIP's pooled-embedding projection (text_projection to projection_dim): "
                           "SAM 3 uses per-token features through the resizer, never the pooled embedding")

# ours (under a layer) <- sam3.pt (under a resblock)
_PT_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def add_text(m: ParamMapping, cfg: TextConfig, src: str) -> None:
    """Add the text rules; ``src`` is the format's prefix of the model (``""`` for an HF
    snapshot, ``"detector."`` for sam3.pt)."""
    oe = OURS + "encoder.layers."
    if m.fmt == "hf":
        s0 = src + "text_encoder.text_model."
        for n in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                  "final_layer_norm.weight", "final_layer_norm.bias"):
            m.add(OURS + n, s0 + n)
        for i in range(cfg.num_hidden_layers):
            o, s = f"{oe}{i}.", f"{s0}encoder.layers.{i}."
            for t in ("weight", "bias"):
                m.add(f"{o}self_attn.qkv.{t}", [f"{s}self_attn.{p}_proj.{t}" for p in "qkv"], concat0)
                for n in ("self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                    m.add(f"{o}{n}.{t}", f"{s}{n}.{t}")
        for t in ("weight", "bias"):
            m.add(f"{RESIZER}{t}", f"{src}text_projection.{t}")
        m.ignore(r"^" + re.escape(src + "text_encoder.text_projection."), _UNUSED_CLIP_PROJECTION)
        m.ignore(r"^" + re.escape(s0 + "embeddings.position_ids") + "$",
                 "position index buffer (positions are 0..context-1)")
        return

    # original sam3.pt layout
    lb = src + PT
    e = lb + "encoder."
    m.add(OURS + "embeddings.token_embedding.weight", e + "token_embedding.weight")
    m.add(OURS + "embeddings.position_embedding.weight", e + "positional_embedding")
    for t in ("weight", "bias"):
        m.add(f"{OURS}final_layer_norm.{t}", f"{e}ln_final.{t}")
        m.add(f"{RESIZER}{t}", f"{lb}resizer.{t}")
    for i in range(cfg.num_hidden_layers):
        o, s = f"{oe}{i}.", f"{e}transformer.resblocks.{i}."
        m.add(f"{o}self_attn.qkv.weight", f"{s}attn.in_proj_weight")
        m.add(f"{o}self_attn.qkv.bias", f"{s}attn.in_proj_bias")
        for t in ("weight", "bias"):
            for ours, theirs in _PT_LAYER:
                m.add(f"{o}{ours}.{t}", f"{s}{theirs}.{t}")
    m.ignore(r"^" + re.escape(e + "text_projection") + "$", _UNUSED_CLIP_PROJECTION)
