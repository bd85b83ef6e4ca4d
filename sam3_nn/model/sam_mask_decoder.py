"""SAM 3's interactive mask decoder (the tracker's ``sam_mask_decoder``, SAM 2's): a two-way
transformer between prompt tokens and the image, mask / IoU / object-score heads.

Follows the original ``sam3/sam/mask_decoder.py`` and ``sam3/sam/transformer.py`` (release
options: high-resolution skip features, object-score token and MLP head, sigmoid IoU
head, dynamic multimask via stability); parameter names mirror ``transformers``'
``Sam3TrackerMaskDecoder``. Not to be confused with the detector's mask head
(``heads.MaskDecoder``).

Tokens are ``[obj_score, iou, mask_0..3]`` followed by the prompt tokens (the prompt
encoder's point slots and its padding point); ``token_mask [B, T]`` marks the prompt
tokens that exist (empty point slots are 0): they are masked out wherever tokens are
keys (self-attention, image-to-token attention), so they change nothing. LayerNorms of
the transformer: eps 1e-5 (``nn.LayerNorm``); of the upscaling: 1e-6 (``LayerNorm2d``).
Attention goes through ``sam3_nn.ops.attention.attention``; the cross attentions project
to ``C / attention_downsample_rate``.
"""

from __future__ import annotations

from typing import Tuple

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import Sam3Config, TrackerConfig
from sam3_nn.model.common import LN_EPS, Attention, ConvTranspose2x2, Conv1x1, EmbeddingTable
from sam3_nn.ops.attention import key_padding_bias

LN2D_EPS = 1e-6  # sam3/sam/common.py LayerNorm2d
NUM_OUTPUT_TOKENS = 6  # object score, IoU, 4 mask tokens


class FeedForward(nn.Module):
    """``Sam3TrackerFeedForward`` (the original's ``MLP``): ``proj_in``, ``layers``,
    ``proj_out`` with ReLU between; sigmoid on the output if asked."""

    def __init__(self, cin: int, hidden: int, cout: int, num_layers: int, sigmoid: bool = False):
        if num_layers < 2:
            raise ValueError(f"a feed-forward head needs at least 2 layers, got {num_layers}")
        self.proj_in = nn.Linear(cin, hidden)
        self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(num_layers - 2)])
        self.proj_out = nn.Linear(hidden, cout)
        self.sigmoid = sigmoid

    def forward(self, x: Tensor) -> Tensor:
        x = op.relu(self.proj_in(x))
        for layer in self.layers:
            x = op.relu(layer(x))
        x = self.proj_out(x)
        return op.sigmoid(x) if self.sigmoid else x


class TwoWayBlock(nn.Module):
    """``TwoWayAttentionBlock``: token self-attention, tokens -> image, MLP, image -> tokens."""

    def __init__(self, hidden: int, cfg: TrackerConfig, skip_first_layer_pe: bool):
        internal = hidden // cfg.attention_downsample_rate
        heads = cfg.num_attention_heads
        self.self_attn = Attention(hidden, heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.cross_attn_token_to_image = Attention(hidden, heads, internal)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.mlp = FeedForward(hidden, cfg.mlp_dim, hidden, 2)
        self.layer_norm3 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.layer_norm4 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.cross_attn_image_to_token = Attention(hidden, heads, internal)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor,
                token_bias: Tensor) -> Tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_bias)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_bias)
        queries = self.layer_norm1(queries)
        k = keys + key_pe
        queries = self.layer_norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.layer_norm3(queries + self.mlp(queries))
        keys = self.layer_norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries,
                                                                       token_bias))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``TwoWayTransformer``: the blocks, then a final tokens -> image attention."""

    def __init__(self, hidden: int, cfg: TrackerConfig):
        self.layers = nn.ModuleList([TwoWayBlock(hidden, cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_attn_token_to_image = Attention(hidden, cfg.num_attention_heads,
                                                   hidden // cfg.attention_downsample_rate)
        self.layer_norm_final_attn = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, tokens: Tensor, image: Tensor, image_pe: Tensor,
                token_bias: Tensor) -> Tuple[Tensor, Tensor]:
        """``tokens [B, T, C]`` (also their own position term), ``image [B, N, C]``,
        ``image_pe [1 or B, N, C]``, ``token_bias [B, 1, 1, T]``."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe, token_bias)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.layer_norm_final_attn(queries + attn), keys


class SamMaskDecoder(nn.Module):
    """Prompt tokens + image embedding -> 4 mask logits ``[B, 4, 4g, 4g]`` (token 0: the
    single-mask output, 1..3: the multimask outputs), IoU predictions ``[B, 4]`` and the
    object score logit ``[B, 1]`` (``predict_masks``; :func:`choose_single_mask` then
    applies the dynamic multimask choice to slot 0)."""

    def __init__(self, cfg: Sam3Config):
        c = cfg.vision.fpn_hidden_size
        t = cfg.tracker
        self.hidden = c
        self.cfg = t
        self.iou_token = EmbeddingTable(1, c)
        self.mask_tokens = EmbeddingTable(t.num_multimask_outputs + 1, c)
        self.obj_score_token = EmbeddingTable(1, c)
        self.transformer = TwoWayTransformer(c, t)
        self.upscale_conv1 = ConvTranspose2x2(c, c // 4)
        self.upscale_conv2 = ConvTranspose2x2(c // 4, c // 8)
        self.upscale_layer_norm = nn.LayerNorm(c // 4, eps=LN2D_EPS)
        self.output_hypernetworks_mlps = nn.ModuleList([
            FeedForward(c, c, c // 8, 3) for _ in range(t.num_multimask_outputs + 1)])
        self.iou_prediction_head = FeedForward(c, t.iou_head_hidden_dim, t.num_multimask_outputs + 1,
                                               t.iou_head_depth, sigmoid=True)
        # the skip features' 1x1 convolutions: applied when the image is encoded (as the
        # original's forward_image), folded into the tracker neck's last convolutions
        self.conv_s0 = Conv1x1(c, c // 8)
        self.conv_s1 = Conv1x1(c, c // 4)
        self.pred_obj_score_head = FeedForward(c, c, 1, 3)

    def forward(self, image_embed: Tensor, feat_s0: Tensor, feat_s1: Tensor, image_pe: Tensor,
                sparse: Tensor, token_mask: Tensor, dense: Tensor, with_tokens: bool = False) -> Tuple[Tensor, ...]:
        """``image_embed [B, g, g, C]``, ``feat_s0 [B, 4g, 4g, C/8]``, ``feat_s1 [B, 2g, 2g, C/4]``
        (channel last), ``image_pe [g*g, C]``, ``sparse [B, P, C]`` prompt tokens with their
        ``token_mask [B, P]``, ``dense [B, g, g, C]``. ``with_tokens``: the four mask tokens
        after the transformer ``[B, 4, C]`` are returned too (the video tracker's object
        pointers are made from them)."""
        b, g, _, c = image_embed.shape
        g = int(g)
        out_tokens = op.concat([self.obj_score_token.weight, self.iou_token.weight,
                                self.mask_tokens.weight], dim=0)  # 6, c
        out_tokens = op.broadcast_to(op.reshape(out_tokens, [1, NUM_OUTPUT_TOKENS, c]),
                                     [b, NUM_OUTPUT_TOKENS, c])
        tokens = op.concat([out_tokens, sparse], dim=1)
        mask = op.concat([op.ones([b, NUM_OUTPUT_TOKENS], token_mask.dtype), token_mask], dim=1)
        bias = key_padding_bias(mask)
        src = op.reshape(image_embed + dense, [b, g * g, c])
        pe = op.reshape(image_pe, [1, g * g, c])
        hs, src = self.transformer(tokens, src, pe, bias)

        parts = op.split(hs, [1, 2, NUM_OUTPUT_TOKENS], axis=1)
        obj_token, iou_token, mask_tokens = parts[0], parts[1], parts[2]

        x = op.reshape(src, [b, g, g, c])
        x = self.upscale_conv1(x) + feat_s1
        x = op.gelu(self.upscale_layer_norm(x))
        x = op.gelu(self.upscale_conv2(x) + feat_s0)  # b, 4g, 4g, c/8
        h4 = 4 * g
        n = NUM_OUTPUT_TOKENS - 2
        per_token = op.split(mask_tokens, n, axis=1)
        hyper = op.concat([mlp(t) for mlp, t in zip(self.output_hypernetworks_mlps, per_token)], dim=1)
        up = op.reshape(x, [b, h4 * h4, c // 8])
        masks = op.matmul(hyper, op.permute_dims(up, [0, 2, 1]))  # b, 4, (4g)^2
        masks = op.reshape(masks, [b, n, h4, h4])
        iou = op.reshape(self.iou_prediction_head(iou_token), [b, n])
        obj = op.reshape(self.pred_obj_score_head(obj_token), [b, 1])
        return (masks, iou, obj, mask_tokens) if with_tokens else (masks, iou, obj)


def choose_single_mask(masks: Tensor, iou: Tensor, cfg: TrackerConfig) -> Tuple[Tensor, Tensor]:
    """Slot 0 becomes the single-mask output the original returns with ``multimask_output=
    False``: token 0's mask when it is stable (``#(logit > delta) / #(logit > -delta) >=
    thresh``, 1 when nothing is above ``-delta``), else the multimask output (slots 1..3) with
    the highest predicted IoU (the first on ties, as ``argmax``); slots 1..3 stay. Without
    ``dynamic_multimask_via_stability`` slot 0 is token 0's mask as it is."""
    if not cfg.dynamic_multimask_via_stability:
        return masks, iou
    b, n, h, w = masks.shape
    first = op.reshape(op.split(masks, [1], axis=1)[0], [b, int(h) * int(w)])
    delta = cfg.dynamic_multimask_stability_delta
    inside = op.sum(_above(first, delta), axis=1)
    union = op.sum(_above(first, -delta), axis=1)
    thresh = float(cfg.dynamic_multimask_stability_thresh)

    def source(s, i_area, u_area):
        """The mask each output slot takes: ``[B, 4]`` int32 (slot 0 of an unstable token 0:
        the best multimask output; else the slot itself)."""

        def best(bi):
            i1, i2, i3 = s[bi, 1], s[bi, 2], s[bi, 3]
            return tirx.Select(tirx.all(i1 >= i2, i1 >= i3), 1, tirx.Select(i2 >= i3, 2, 3))

        def unstable(bi):
            score = tirx.Select(u_area[bi] > 0.0, i_area[bi] / u_area[bi], tirx.const(1.0, "float32"))
            return score < tirx.const(thresh, "float32")

        return te.compute(s.shape, lambda bi, k: tirx.Select(
            tirx.all(k == 0, unstable(bi)), tirx.Cast("int32", best(bi)), tirx.Cast("int32", k)),
            name="single_mask_source")

    src = op.tensor_expr_op(source, "single_mask_source", args=[iou, inside, union])

    # a gather by slot: no select inside the per-pixel loop (a vectorised boolean condition
    # is what Metal cannot print)
    def compute(m, s, idx):
        out_m = te.compute(m.shape, lambda bi, k, y, x: m[bi, idx[bi, k], y, x], name="single_mask")
        out_s = te.compute(s.shape, lambda bi, k: s[bi, idx[bi, k]], name="single_iou")
        return [out_m, out_s]

    out = op.tensor_expr_op(compute, "choose_single_mask", args=[masks, iou, src])
    return out[0], out[1]


def _above(x: Tensor, level: float) -> Tensor:
    """1.0 where ``x > level`` (compared in ``x``'s dtype, as the reference), else 0.0, float32;
    a select, so no boolean tensor is stored (Metal cannot vectorise one)."""

    def compute(t):
        return te.compute(t.shape, lambda *i: tirx.Select(t(*i) > tirx.const(level, t.dtype),
                                                           tirx.const(1.0, "float32"),
                                                           tirx.const(0.0, "float32")), name="above")

    return op.tensor_expr_op(compute, "above", args=[x])

