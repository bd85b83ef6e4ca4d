"""SAM 3 DETR encoder: image tokens fused with the prompt tokens.

Follows ``transformers``' ``Sam3DetrEncoder`` (parameter names mirror it,
``detr_encoder.layers.{i}.*``). SAM 3 feeds it one feature level (the FPN map at
scale 1, 72 x 72 at 1008 px) and its sine position encoding. Each layer is
pre-norm:

* self-attention of the image tokens, ``q = k = norm1(x) + pos``, ``v = norm1(x)``;
* cross-attention to the prompt tokens (text + geometry, concatenated by the
  caller) with a key padding mask;
* ReLU FFN.

There is no final norm. LayerNorms use PyTorch's default eps 1e-5: the
reference's layers are plain ``nn.LayerNorm(hidden)`` (the config's
``layer_norm_eps`` is not used by them).
"""

from __future__ import annotations

from typing import Optional

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from sam3_nn.config import DetrEncoderConfig
from sam3_nn.model.common import SelfCrossLayer, flatten_tokens
from sam3_nn.ops.attention import key_padding_bias



class DetrEncoderLayer(SelfCrossLayer):
    def __init__(self, cfg: DetrEncoderConfig):
        if cfg.hidden_act != "relu":
            raise ValueError(f"DETR encoder: unsupported hidden_act {cfg.hidden_act!r} (expected 'relu')")
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: Tensor, pos: Tensor, prompt: Tensor, prompt_bias: Optional[Tensor]) -> Tensor:
        h = self.layer_norm1(x)
        hp = h + pos
        x = self.self_attn(hp, hp, h) + x
        x = self.cross_attn(self.layer_norm2(x), prompt, prompt, prompt_bias) + x
        return self.mlp(self.layer_norm3(x)) + x


class DetrEncoder(nn.Module):
    """``Sam3DetrEncoder`` on one feature level.

    Inputs:
      * ``image_features``: ``[B, H, W, C]`` channel last (or ``[B, H*W, C]``), the FPN
        map at scale 1 (``fpn_hidden_states[-2]`` of the vision encoder, moved to
        channel last);
      * ``image_pos``: its sine position encoding, same layout;
      * ``prompt``: ``[B, L, C]`` prompt tokens (text features, then geometry tokens);
      * ``prompt_mask``: ``[B, L]``, nonzero = valid, 0 = padding (any dtype), or None.

    Returns the encoded image tokens ``[B, H*W, C]`` (row-major over ``H x W``, as
    the reference's ``last_hidden_state``).
    """

    def __init__(self, cfg: DetrEncoderConfig):
        self.cfg = cfg
        self.layers = nn.ModuleList([DetrEncoderLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, image_features: Tensor, image_pos: Tensor, prompt: Tensor,
                prompt_mask: Optional[Tensor] = None) -> Tensor:
        c = self.cfg.hidden_size
        x = flatten_tokens(image_features, c, "image_features")
        pos = flatten_tokens(image_pos, c, "image_pos")
        if len(prompt.shape) != 3 or int(prompt.shape[-1]) != c:
            raise ValueError(f"prompt must be [B, L, {c}], got shape {list(prompt.shape)}")
        if prompt_mask is not None and len(prompt_mask.shape) != 2:
            raise ValueError(f"prompt_mask must be [B, L], got shape {list(prompt_mask.shape)}")
        bias = key_padding_bias(prompt_mask) if prompt_mask is not None else None
        for layer in self.layers:
            x = layer(x, pos, prompt, bias)
        return x
