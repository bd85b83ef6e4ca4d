"""SAM 3 detector heads: dot-product scoring and the mask decoder.

Follows ``transformers``' ``Sam3DotProductScoring`` and ``Sam3MaskDecoder``
(parameter names mirror them). Spatial maps are channel-last ``[B, H, W, C]``;
token sequences ``[B, N, C]`` are row-major over their grid. The presence head
lives in the DETR decoder (``detr_decoder.DetrDecoder``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import DetrDecoderConfig, MaskDecoderConfig
from sam3_nn.model.common import LN_EPS, Attention, Conv1x1, Conv2d, DecoderMLP, clamp
from sam3_nn.ops.attention import key_padding_bias

SCORE_CLAMP = 12.0
GROUP_NORM_GROUPS = 8


class DotProductScoring(nn.Module):
    """``Sam3DotProductScoring``: query/prompt similarity logits.

    ``forward(decoder_hidden_states, text_features, text_mask)``:

    * ``decoder_hidden_states [L, B, Q, C]`` (the decoder's per-layer ``hidden_states``);
    * ``text_features [B, T, C]`` (prompt features from the DETR encoder);
    * ``text_mask [B, T]`` or None: nonzero = valid, 0 = padding (any dtype).

    The prompt goes through a residual MLP + LayerNorm, is mean-pooled over its
    valid tokens (at least one counted) and projected; returns logits ``[L, B, Q]``
    = ``<query_proj(q), text_proj(pooled)> / sqrt(C)`` clamped to +-12.
    """

    def __init__(self, cfg: DetrDecoderConfig):
        c = cfg.hidden_size
        self.hidden = c
        self.text_mlp = DecoderMLP(c, cfg.intermediate_size, c, 2)
        self.text_mlp_out_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.text_proj = nn.Linear(c, c)
        self.query_proj = nn.Linear(c, c)

    def pool(self, text: Tensor, text_mask: Optional[Tensor]) -> Tensor:
        """Mean over valid tokens: ``[B, T, C]`` -> ``[B, C]``."""
        if text_mask is None:
            return op.wrap_nested(relax.op.mean(text._expr, axis=1), "text_mean")
        if len(text_mask.shape) != 2:
            raise ValueError(f"text_mask must be [batch, tokens], got {list(text_mask.shape)}")
        valid = op.astype(op.not_equal(text_mask, op.zeros([1], text_mask.dtype)), text.dtype)
        valid = op.unsqueeze(valid, -1)  # b, t, 1
        count = clamp(op.sum(valid, axis=1), 1.0, None, "valid_count")  # b, 1
        return op.sum(text * valid, axis=1) / count

    def forward(self, decoder_hidden_states: Tensor, text_features: Tensor,
                text_mask: Optional[Tensor] = None) -> Tensor:
        if len(decoder_hidden_states.shape) != 4:
            raise ValueError("decoder_hidden_states must be [layers, B, Q, C], got "
                             f"{list(decoder_hidden_states.shape)}")
        text = self.text_mlp_out_norm(self.text_mlp(text_features) + text_features)
        pooled = self.text_proj(self.pool(text, text_mask))  # b, c
        queries = self.query_proj(decoder_hidden_states)  # l, b, q, c
        scores = op.matmul(queries, op.unsqueeze(pooled, -1))  # l, b, q, 1
        scores = scores * (float(self.hidden) ** -0.5)
        scores = clamp(scores, -SCORE_CLAMP, SCORE_CLAMP, "score_clamp")
        return op.squeeze(scores, -1)


class GroupNormNHWC(nn.Module):
    """``nn.GroupNorm`` on a channel-last map ``[B, H, W, C]``."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels not divisible into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter((channels,))
        self.bias = nn.Parameter((channels,))

    def forward(self, x: Tensor) -> Tensor:
        # Two passes (mean, then the centred variance), each summed in two levels (rows,
        # then over rows), in float32. The one-pass E[x^2] - E[x]^2 of ``op.group_norm``
        # summed 2.6M values per group in one running float32 sum at 288x288x256 and was
        # off by 8e-3 (absolute, unit-scale values) against PyTorch.
        # Each pass widens the fp16 input to float32 itself, so the cast fuses into that
        # pass's kernel and no float32 copy of the map is stored (at 288x288x256 two
        # such copies were 2 x 85 MB of planned memory). The three casts are written in
        # three different forms on purpose (the reshapes differ, and each reshape comes
        # before its cast so that it stays a view): identical casts are merged by common
        # subexpression elimination in the rewrite passes, and one cast with three
        # consumers is stored in full again.
        b, h, w, c = x.shape
        g, cg = self.groups, int(c) // self.groups
        dtype = x.dtype
        n = float(int(h) * int(w) * cg)
        wide_a = op.astype(op.reshape(x, [b, h, w, g, cg]), "float32")
        mean = op.sum(op.sum(wide_a, axis=[2, 4], keepdims=True), axis=1, keepdims=True) / n
        wide_b = op.astype(op.reshape(x, [b, h, w, g, 1, cg]), "float32")  # (a unit axis)
        d = wide_b - op.reshape(mean, [b, 1, 1, g, 1, 1])
        var = op.sum(op.sum(d * d, axis=[2, 4, 5], keepdims=True), axis=1, keepdims=True) / n
        var = op.reshape(var, [b, 1, 1, g, 1])
        # per-channel scale and shift: y = x * scale + shift
        scale = op.astype(op.reshape(self.weight, [g, cg]), "float32") / op.sqrt(var + self.eps)
        shift = op.astype(op.reshape(self.bias, [g, cg]), "float32") - mean * scale
        scale = op.reshape(scale, [b, 1, c])
        shift = op.reshape(shift, [b, 1, c])
        wide_c = op.astype(op.reshape(x, [b, int(h) * int(w), c]), "float32")
        y = wide_c * scale + shift
        return op.astype(op.reshape(y, [b, h, w, c]), dtype)


def upsample_nearest(x: Tensor, height: int, width: int) -> Tensor:
    """Nearest upsampling of ``[B, h, w, C]`` to ``[B, height, width, C]`` by an integer
    factor, as a broadcast (equals ``F.interpolate(mode="nearest")`` for such sizes)."""
    b, h, w, c = x.shape
    h, w = int(h), int(w)
    if height % h or width % w:
        raise ValueError(f"nearest upsampling {h}x{w} -> {height}x{width} needs integer factors")
    fh, fw = height // h, width // w
    if fh == 1 and fw == 1:
        return x
    x = op.reshape(x, [b, h, 1, w, 1, c])
    x = op.broadcast_to(x, [b, h, fh, w, fw, c])
    return op.reshape(x, [b, height, width, c])


class PixelDecoder(nn.Module):
    """``Sam3PixelDecoder``: top-down FPN, coarsest level first.

    ``forward(levels)``: channel-last maps ``[B, H_i, W_i, C]`` highest resolution
    first; for each finer level: nearest upsampling to its size, add, 3x3 conv,
    GroupNorm(8), ReLU. Returns ``[B, H_0, W_0, C]``.
    """

    def __init__(self, cfg: MaskDecoderConfig, stages: int):
        if stages > cfg.num_upsampling_stages:
            raise ValueError(f"pixel decoder: {stages} stages requested, "
                             f"{cfg.num_upsampling_stages} configured")
        c = cfg.hidden_size
        self.stages = stages
        self.conv_layers = nn.ModuleList([Conv2d(c, c, 3) for _ in range(stages)])
        self.norms = nn.ModuleList([GroupNormNHWC(GROUP_NORM_GROUPS, c) for _ in range(stages)])

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        if len(levels) != self.stages + 1:
            raise ValueError(f"pixel decoder built for {self.stages + 1} levels, got {len(levels)}")
        x = levels[-1]
        for i, feat in enumerate(reversed(levels[:-1])):
            x = upsample_nearest(x, int(feat.shape[1]), int(feat.shape[2])) + feat
            x = op.relu(self.norms[i](self.conv_layers[i](x)))
        return x


class MaskEmbedder(nn.Module):
    """``Sam3MaskEmbedder``: three linear layers with ReLU between."""

    def __init__(self, hidden: int):
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = op.relu(x)
        return x


class MaskDecoder(nn.Module):
    """``Sam3MaskDecoder``: instance masks and semantic segmentation.

    Built for ``num_levels`` FPN levels (the image model passes all but the
    coarsest: 3 levels, 2 upsampling stages).

    ``forward(decoder_queries, backbone_features, encoder_hidden_states, prompt_features, prompt_mask)``:

    * ``decoder_queries [B, Q, C]``: last decoder layer's ``hidden_states``;
    * ``backbone_features``: ``num_levels`` channel-last FPN maps ``[B, H_i, W_i, C]``,
      highest resolution first; the last one only gives the grid ``(H, W)``: the
      encoder output replaces it, as in the reference;
    * ``encoder_hidden_states [B, H*W, C]``: DETR encoder output, row-major;
    * ``prompt_features [B, P, C]`` or None; ``prompt_mask [B, P]`` or None
      (nonzero = valid, 0 = padding).

    Returns ``pred_masks [B, Q, H_0, W_0]`` (mask logits at the finest level) and
    ``semantic_seg [B, 1, H_0, W_0]``.
    """

    def __init__(self, cfg: MaskDecoderConfig, num_levels: int):
        if num_levels < 1:
            raise ValueError(f"mask decoder needs at least one FPN level, got {num_levels}")
        c = cfg.hidden_size
        self.hidden = c
        self.num_levels = num_levels
        self.pixel_decoder = PixelDecoder(cfg, num_levels - 1)
        self.mask_embedder = MaskEmbedder(c)
        self.instance_projection = Conv1x1(c, c)
        self.semantic_projection = Conv1x1(c, 1)
        self.prompt_cross_attn = Attention(c, cfg.num_attention_heads)
        self.prompt_cross_attn_norm = nn.LayerNorm(c, eps=LN_EPS)

    def forward(self, decoder_queries: Tensor, backbone_features: Sequence[Tensor],
                encoder_hidden_states: Tensor, prompt_features: Optional[Tensor] = None,
                prompt_mask: Optional[Tensor] = None):
        c = self.hidden
        levels: List[Tensor] = list(backbone_features)
        if len(levels) != self.num_levels:
            raise ValueError(f"mask decoder built for {self.num_levels} FPN levels, got {len(levels)}")
        for i, f in enumerate(levels):
            if len(f.shape) != 4 or int(f.shape[-1]) != c:
                raise ValueError(f"backbone_features[{i}] must be channel-last [B, H, W, {c}], "
                                 f"got {list(f.shape)}")
        if prompt_mask is not None and prompt_features is None:
            raise ValueError("prompt_mask given without prompt_features")

        enc = encoder_hidden_states
        if prompt_features is not None:
            normed = self.prompt_cross_attn_norm(enc)
            bias = key_padding_bias(prompt_mask) if prompt_mask is not None else None
            enc = enc + self.prompt_cross_attn(normed, prompt_features, prompt_features, bias)

        b, h, w, _ = levels[-1].shape
        h, w = int(h), int(w)
        n = enc.shape[1]
        if isinstance(n, int) or hasattr(n, "value"):
            if int(n) < h * w:
                raise ValueError(f"encoder_hidden_states hold {int(n)} tokens, the {h}x{w} grid needs {h * w}")
            if int(n) > h * w:
                enc = op.split(enc, [h * w], axis=1)[0]
        levels[-1] = op.reshape(enc, [b, h, w, c])
        pixels = self.pixel_decoder(levels)  # b, H0, W0, c

        h0, w0 = int(pixels.shape[1]), int(pixels.shape[2])
        instance = op.reshape(self.instance_projection(pixels), [b, h0 * w0, c])
        embeds = self.mask_embedder(decoder_queries)  # b, q, c
        masks = op.matmul(embeds, op.permute_dims(instance, [0, 2, 1]))  # b, q, H0*W0
        masks = op.reshape(masks, [b, decoder_queries.shape[1], h0, w0])
        semantic = op.reshape(self.semantic_projection(pixels), [b, 1, h0, w0])
        return masks, semantic
