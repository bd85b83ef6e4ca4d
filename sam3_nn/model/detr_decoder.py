"""SAM 3 DETR decoder: object queries + presence token, iterative box refinement.

Follows ``transformers``' ``Sam3DetrDecoder`` (parameter names mirror it):

* hidden states are ``[B, 1 + Q, C]``: the presence token at position 0, then the
  ``Q`` object queries;
* each layer: self-attention (q = k = x + query_pos, v = x), text cross-attention
  (key padding mask), image cross-attention (k = image + its position encoding,
  additive box relative position bias, "log" mode), ReLU FFN; every sub-block is
  post-norm (residual, then LayerNorm);
* after each layer the boxes are refined: ``sigmoid(inverse_sigmoid(ref) +
  box_head(norm(q)))`` with ``inverse_sigmoid``'s eps 1e-3, and the presence
  logit is read from the presence token, not clamped: the original's clamp
  (``decoder.py``) discards its result, ``transformers`` clamps to +-10
  (docs/fidelity.md).

LayerNorms use PyTorch's default eps 1e-5 (as the reference's ``nn.LayerNorm``).
Masks are finite (``attention.MASK_VALUE``) additive float32 biases.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import DetrDecoderConfig
from sam3_nn.model.common import LN_EPS, MLP, Attention, DecoderMLP
from sam3_nn.ops.attention import key_padding_bias

INVERSE_SIGMOID_EPS = 1e-3


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """The reference's ``inverse_sigmoid``: clamp to [0, 1], then
    ``log(max(x, eps) / max(1 - x, eps))``."""

    def compute(t):
        def f(*idx):
            one = tirx.const(1.0, t.dtype)
            e = tirx.const(eps, t.dtype)
            v = tirx.min(tirx.max(t(*idx), tirx.const(0.0, t.dtype)), one)
            return tirx.log(tirx.max(v, e) / tirx.max(one - v, e))

        return te.compute(t.shape, f, name="inverse_sigmoid")

    return op.tensor_expr_op(compute, "inverse_sigmoid", args=[x])


def stack(tensors, axis: int = 0) -> Tensor:
    return op.concat([op.unsqueeze(t, axis) for t in tensors], dim=axis)


# ----------------------------------------------------------------------------
# box encodings
# ----------------------------------------------------------------------------
def box_sine_encoding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """``Sam3SinePositionEmbedding.encode_boxes``: ``[B, Q, 4]`` (cx, cy, w, h) ->
    ``[B, Q, 4 * num_feats]`` in the order (cy, cx, w, h); within each block even
    channels are ``sin``, odd ones ``cos`` of ``v * 2 pi / temperature ** (2 (j // 2) / F)``."""
    scale = 2.0 * math.pi
    order = (1, 0, 2, 3)  # y first, then x, w, h

    def compute(bx):
        b, q, _ = bx.shape

        def f(i, k, c):
            blk = c // num_feats
            j = c % num_feats
            idx = tirx.Select(blk == 0, order[0], tirx.Select(blk == 1, order[1],
                              tirx.Select(blk == 2, order[2], order[3])))
            v = bx[i, k, idx] * tirx.const(scale, bx.dtype)
            expo = tirx.Cast(bx.dtype, (j // 2) * 2) / tirx.const(float(num_feats), bx.dtype)
            dim_t = tirx.power(tirx.const(temperature, bx.dtype), expo)
            val = v / dim_t
            return tirx.Select(j % 2 == 0, tirx.sin(val), tirx.cos(val))

        return te.compute((b, q, 4 * num_feats), f, name="box_sine")

    return op.tensor_expr_op(compute, "box_sine_encoding", args=[boxes])


def box_log_deltas(boxes: Tensor, size: int, axis: str) -> Tensor:
    """Log-scaled distances from a grid's coordinates to the box edges along one axis.

    ``boxes [B, Q, 4]`` (cx, cy, w, h) -> ``[B, Q, size, 2]``: for grid position
    ``i`` (coordinate ``i / size``) and the two edges (x1, x2 or y1, y2),
    ``d = 8 (i / size - edge)``, ``sign(d) log2(|d| + 1) / 3``.
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    center, extent = (0, 2) if axis == "x" else (1, 3)

    def compute(bx):
        b, q, _ = bx.shape
        dt = bx.dtype

        def f(n, k, i, e):
            c = bx[n, k, center]
            half = tirx.const(0.5, dt) * bx[n, k, extent]
            edge = tirx.Select(e == 0, c - half, c + half)
            coord = tirx.Cast(dt, i) / tirx.const(float(size), dt)
            d = (coord - edge) * tirx.const(8.0, dt)
            mag = tirx.log2(tirx.abs(d) + tirx.const(1.0, dt)) / tirx.const(3.0, dt)
            return tirx.Select(d > tirx.const(0.0, dt), mag,
                               tirx.Select(d < tirx.const(0.0, dt), -mag, tirx.const(0.0, dt)))

        return te.compute((b, q, size, 2), f, name=f"box_log_deltas_{axis}")

    return op.tensor_expr_op(compute, f"box_log_deltas_{axis}", args=[boxes])


# ----------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------
class DetrDecoderLayer(nn.Module):
    def __init__(self, cfg: DetrDecoderConfig):
        c, h = cfg.hidden_size, cfg.num_attention_heads
        self.self_attn = Attention(c, h)
        self.self_attn_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.text_cross_attn = Attention(c, h)
        self.text_cross_attn_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.vision_cross_attn = Attention(c, h)
        self.vision_cross_attn_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.mlp = MLP(c, cfg.intermediate_size, cfg.hidden_act)
        self.mlp_layer_norm = nn.LayerNorm(c, eps=LN_EPS)

    def forward(self, x: Tensor, query_pos: Tensor, text: Tensor, text_bias: Optional[Tensor],
                vision: Tensor, vision_key: Tensor, vision_bias: Tensor) -> Tensor:
        """``x [B, 1+Q, C]``, ``query_pos [B, 1+Q, C]`` (zeros for the presence token),
        ``text [B, T, C]``, ``text_bias [B, 1, 1, T]``, ``vision [B, HW, C]``,
        ``vision_key = vision + position [B, HW, C]``, ``vision_bias [B, heads, 1+Q, HW]``."""
        q = x + query_pos
        x = self.self_attn_layer_norm(x + self.self_attn(q, q, x))
        x = self.text_cross_attn_layer_norm(
            x + self.text_cross_attn(x + query_pos, text, text, text_bias))
        x = self.vision_cross_attn_layer_norm(
            x + self.vision_cross_attn(x + query_pos, vision_key, vision, vision_bias))
        return self.mlp_layer_norm(x + self.mlp(x))


class DetrDecoder(nn.Module):
    """``Sam3DetrDecoder``.

    ``forward(vision_features, vision_pos_encoding, text_features, text_mask, spatial_shape)``:

    * ``vision_features [B, H*W, C]``: DETR encoder output, row-major over the grid;
    * ``vision_pos_encoding [B, H*W, C]``: its position encoding (same layout);
    * ``text_features [B, T, C]``: prompt features from the DETR encoder;
    * ``text_mask [B, T]`` or None: nonzero = valid token, 0 = padding (any dtype);
    * ``spatial_shape``: ``(H, W)`` of the image grid, Python ints.

    Returns, per layer ``l = 0..L-1`` (as the reference stacks them):

    * ``hidden_states [L, B, Q, C]``: ``output_layer_norm`` of the object queries
      (``intermediate_hidden_states``);
    * ``reference_boxes [L, B, Q, 4]``: the boxes (cx, cy, w, h in [0, 1]) that
      entered layer ``l``;
    * ``pred_boxes [L, B, Q, 4]``: the refined boxes after layer ``l``
      (``sigmoid(inverse_sigmoid(reference_boxes) + box_head(hidden_states))``, cxcywh);
    * ``presence_logits [L, B, 1]``: unclamped, as the original's.
    """

    def __init__(self, cfg: DetrDecoderConfig):
        if cfg.hidden_size % 2:
            raise ValueError(f"DETR decoder hidden size must be even, got {cfg.hidden_size}")
        c = cfg.hidden_size
        self.cfg = cfg
        self.layers = nn.ModuleList([DetrDecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.output_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.box_head = DecoderMLP(c, c, 4, 3)
        self.query_embed = nn.Embedding(cfg.num_queries, c)
        self.reference_points = nn.Embedding(cfg.num_queries, 4)
        self.presence_token = nn.Embedding(1, c)
        self.presence_head = DecoderMLP(c, c, 1, 3)
        self.presence_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.ref_point_head = DecoderMLP(2 * c, c, c, 2)
        self.box_rpb_embed_x = DecoderMLP(2, c, cfg.num_attention_heads, 2)
        self.box_rpb_embed_y = DecoderMLP(2, c, cfg.num_attention_heads, 2)

    def box_rpb(self, boxes: Tensor, height: int, width: int) -> Tensor:
        """Box relative position bias ``[B, heads, Q, H*W]`` (the model's dtype) for boxes
        ``[B, Q, 4]``. Kept in that dtype: the fused CUDA attention reads it as fp16, the
        composed path casts it to float32 (its value is the same: computed in that dtype)."""
        b, q = boxes.shape[0], boxes.shape[1]
        heads = self.cfg.num_attention_heads
        dx = self.box_rpb_embed_x(box_log_deltas(boxes, width, "x"))  # b, q, w, heads
        dy = self.box_rpb_embed_y(box_log_deltas(boxes, height, "y"))  # b, q, h, heads
        # heads first on the small factors, so the [b, heads, q, h, w] sum is written in
        # order (no transpose of the 16 MB result)
        dx = op.permute_dims(dx, [0, 3, 1, 2])  # b, heads, q, w
        dy = op.permute_dims(dy, [0, 3, 1, 2])  # b, heads, q, h
        rpb = op.unsqueeze(dy, 4) + op.unsqueeze(dx, 3)  # b, heads, q, h, w
        return op.reshape(rpb, [b, heads, q, height * width])

    def forward(self, vision_features: Tensor, vision_pos_encoding: Tensor, text_features: Tensor,
                text_mask: Optional[Tensor], spatial_shape: Tuple[int, int]):
        cfg = self.cfg
        c, nq = cfg.hidden_size, cfg.num_queries
        height, width = (int(s) for s in spatial_shape)
        if len(vision_features.shape) != 3 or int(vision_features.shape[-1]) != c:
            raise ValueError(f"vision_features must be [B, H*W, {c}], got {list(vision_features.shape)}")
        if isinstance(vision_features.shape[1], (int, tirx.IntImm)) and \
                int(vision_features.shape[1]) != height * width:
            raise ValueError(f"vision_features hold {int(vision_features.shape[1])} tokens, "
                             f"spatial_shape {height}x{width} needs {height * width}")
        if len(text_features.shape) != 3 or int(text_features.shape[-1]) != c:
            raise ValueError(f"text_features must be [B, T, {c}], got {list(text_features.shape)}")
        b = vision_features.shape[0]
        dtype = vision_features.dtype

        queries = op.broadcast_to(op.unsqueeze(self.query_embed.weight, 0), [b, nq, c])
        presence = op.broadcast_to(op.unsqueeze(self.presence_token.weight, 0), [b, 1, c])
        x = op.concat([presence, queries], dim=1)
        boxes = op.sigmoid(op.broadcast_to(op.unsqueeze(self.reference_points.weight, 0), [b, nq, 4]))

        text_bias = key_padding_bias(text_mask) if text_mask is not None else None
        vision_key = vision_features + vision_pos_encoding
        zero_pos = op.zeros([b, 1, c], dtype)
        zero_rpb = op.zeros([b, cfg.num_attention_heads, 1, height * width], dtype)

        hidden, refs, preds, presence_logits = [], [], [], []
        for layer in self.layers:
            query_pos = self.ref_point_head(box_sine_encoding(boxes, c // 2))
            query_pos = op.concat([zero_pos, query_pos], dim=1)
            vision_bias = op.concat([zero_rpb, self.box_rpb(boxes, height, width)], dim=2)
            x = layer(x, query_pos, text_features, text_bias, vision_features, vision_key, vision_bias)

            presence_x, query_x = op.split(x, [1], axis=1)
            normed = self.output_layer_norm(query_x)
            new_boxes = op.sigmoid(self.box_head(normed) + inverse_sigmoid(boxes))
            logit = self.presence_head(self.presence_layer_norm(presence_x))  # b, 1, 1
            logit = op.reshape(logit, [b, 1])

            hidden.append(normed)
            refs.append(boxes)
            preds.append(new_boxes)
            presence_logits.append(logit)
            boxes = new_boxes
        return stack(hidden), stack(refs), stack(preds), stack(presence_logits)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = op.split(boxes, 4, axis=-1)
    return op.concat([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
