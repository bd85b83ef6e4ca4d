"""SAM 3 geometry (prompt) encoder: box exemplars -> prompt tokens.

Follows ``transformers``' ``Sam3GeometryEncoder`` (parameter names mirror it,
``geometry_encoder.*``). Every box ``(cx, cy, w, h)`` (normalised to [0, 1]) with
a label (1 positive, 0 negative) becomes one token, the sum of

* ``label_embed[label]``;
* ``boxes_direct_project(box)``;
* ``boxes_pool_project(RoIAlign(vision_layer_norm(image), box))``: a 7x7 RoIAlign
  (``sam3_nn.ops.roi_align``, torchvision semantics: spatial_scale 1, adaptive
  sampling, not aligned) of the layer-normed image features inside the box in
  feature pixels, then the reference's ``7x7`` convolution without padding (a GEMM);
* ``boxes_pos_enc_project([sine(cy), sine(cx), h, w])``: the sine encoding of the
  box centre (``hidden/2`` features per axis, temperature 1e4, scale 2 pi).

A CLS token (``cls_embed``) goes right after the valid boxes, exactly as the
reference's ``concat_padded_sequences`` places it; then ``final_proj``,
``prompt_layer_norm``, the layers (pre-norm self-attention over the prompt
tokens with the padding mask, cross-attention to the image with ``k = image +
pos``, ``v = image``, ReLU FFN) and ``output_layer_norm``.

Prompts have a fixed maximum count ``N`` (the compiled shape): padded box slots
are marked 0 in ``box_mask``; they are masked in attention with the finite
``MASK_VALUE``. One library serves any number of boxes up to ``N``.

With no valid box the prompt is the CLS token alone, still valid: the original
SAM 3 encodes text-only queries so (``Sam3Image._get_dummy_prompt``).

Point prompts: the released checkpoint holds ``points_*`` projections, but the
original never gives the concept detector points at inference (``Sam3Image.forward``
drops them with a warning, its ``Sam3Processor`` takes none, the video model passes
zero points), so points are not built here (docs/fidelity.md).

LayerNorms use eps 1e-5 (the reference's plain ``nn.LayerNorm(hidden)``).
"""

from __future__ import annotations

import math
from typing import Tuple

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import GeometryEncoderConfig
from sam3_nn.model.common import LN_EPS, SelfCrossLayer, flatten_tokens, linear_nd
from sam3_nn.ops.attention import key_padding_bias
from sam3_nn.ops.roi_align import roi_align


def box_position_encoding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """``[B, N, 4]`` (cx, cy, w, h) -> ``[B, N, 2 * num_feats + 2]`` float32:
    ``[sine(cy), sine(cx), h, w]`` as the reference's ``_encode_box_coordinates``.

    ``sine(v)[i] = sin(v 2pi / t_i)`` for even ``i``, ``cos(...)`` for odd ``i``,
    ``t_i = temperature ** (2 (i // 2) / num_feats)``.
    """
    scale = 2.0 * math.pi

    def compute(bx):
        b, n, _ = bx.shape

        def f(i, j, k):
            is_y = k < num_feats
            idx = tirx.Select(is_y, k, k - num_feats)
            coord = tirx.Cast("float32", tirx.Select(is_y, bx[i, j, 1], bx[i, j, 0]))
            expo = tirx.Cast("float32", (idx // 2) * 2) / tirx.const(float(num_feats), "float32")
            dim_t = tirx.power(tirx.const(temperature, "float32"), expo)
            val = coord * tirx.const(scale, "float32") / dim_t
            sine = tirx.Select(idx % 2 == 0, tirx.sin(val), tirx.cos(val))
            h = tirx.Cast("float32", bx[i, j, 3])
            w = tirx.Cast("float32", bx[i, j, 2])
            return tirx.Select(k < 2 * num_feats, sine, tirx.Select(k == 2 * num_feats, h, w))

        return te.compute((b, n, 2 * num_feats + 2), f, name="box_position_encoding")

    return op.tensor_expr_op(compute, "box_position_encoding", args=[boxes])


def append_cls(tokens: Tensor, mask: Tensor, cls: Tensor) -> Tuple[Tensor, Tensor]:
    """The reference's ``concat_padded_sequences(tokens, mask, cls, ones)``.

    ``tokens [B, N, C]``, ``mask [B, N]`` (nonzero = valid), ``cls [1, C]`` ->
    ``[B, N + 1, C]`` and an int32 mask ``[B, N + 1]``. With ``n`` valid boxes the
    CLS token sits at position ``n`` (over the first padded slot), the remaining
    padded slots keep their tokens, a last extra slot is zero, and the new mask
    marks the first ``n + 1`` positions valid.
    """

    def count(m):
        b, n = m.shape
        r = te.reduce_axis((0, n), name="r")
        return te.compute((b,), lambda i: te.sum(
            tirx.Select(m[i, r] != tirx.const(0, m.dtype), 1, 0).astype("int32"), axis=r), name="num_valid")

    n_valid = op.tensor_expr_op(count, "num_valid", args=[mask])

    def merge(t, cl, nv):
        b, n, c = t.shape

        def f(i, j, k):
            last = tirx.min(j, n - 1)
            box = tirx.Select(j < n, t[i, last, k], tirx.const(0.0, t.dtype))
            return tirx.Select(j == nv[i], cl[0, k], box)

        return te.compute((b, n + 1, c), f, name="append_cls")

    def new_mask(t, nv):
        b, n, _ = t.shape
        return te.compute((b, n + 1), lambda i, j: tirx.Select(j < nv[i] + 1, 1, 0).astype("int32"),
                          name="append_cls_mask")

    out = op.tensor_expr_op(merge, "append_cls", args=[tokens, cls, n_valid])
    out_mask = op.tensor_expr_op(new_mask, "append_cls_mask", args=[tokens, n_valid])
    return out, out_mask


class PoolProject(nn.Module):
    """The reference's ``Conv2d(C, C, R)`` on an ``R x R`` pooled box (output 1x1), as a
    GEMM on channel-last ``[B, N, R, R, C]``. Weight ``[out, in, R, R]`` (PyTorch layout)."""

    def __init__(self, hidden: int, roi: int):
        self.hidden, self.roi = hidden, roi
        self.weight = nn.Parameter((hidden, hidden, roi, roi))
        self.bias = nn.Parameter((hidden,))

    def forward(self, pooled: Tensor) -> Tensor:
        b, n, r, _, c = pooled.shape
        x = op.reshape(pooled, [b, n, r * r * c])
        w = op.permute_dims(self.weight, [0, 2, 3, 1])  # out, ky, kx, in
        w = op.reshape(w, [self.hidden, self.roi * self.roi * self.hidden])
        return linear_nd(x, w, self.bias)


class GeometryEncoderLayer(SelfCrossLayer):
    def __init__(self, cfg: GeometryEncoderConfig):
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: Tensor, prompt_bias: Tensor, image: Tensor, image_key: Tensor) -> Tensor:
        h = self.layer_norm1(x)
        x = self.self_attn(h, h, h, prompt_bias) + x
        x = self.cross_attn(self.layer_norm2(x), image_key, image) + x
        return self.mlp(self.layer_norm3(x)) + x


class GeometryEncoder(nn.Module):
    """``Sam3GeometryEncoder`` for box prompts.

    Inputs (``N`` = the compiled maximum number of boxes):
      * ``boxes``: ``[B, N, 4]`` float, ``(cx, cy, w, h)`` normalised to the image;
      * ``box_labels``: ``[B, N]`` int, 1 positive, 0 negative (padded slots: any);
      * ``box_mask``: ``[B, N]`` int, 1 valid, 0 padded; valid boxes first (the
        reference's layout: its CLS token goes to position ``sum(box_mask)``);
      * ``image_features``: ``[B, H, W, C]`` channel last, the FPN map at scale 1
        (``fpn_hidden_states[-2]``);
      * ``image_pos``: its sine position encoding, ``[B, H, W, C]`` channel last.

    Returns ``(tokens [B, N + 1, C], mask [B, N + 1] int32)``, mask 1 = valid.
    """

    def __init__(self, cfg: GeometryEncoderConfig):
        c = cfg.hidden_size
        if c % cfg.num_attention_heads:
            raise ValueError(f"geometry encoder: hidden {c} is not a multiple of {cfg.num_attention_heads} heads")
        if c % 2:
            raise ValueError(f"geometry encoder: hidden size {c} must be even (sine box encoding)")
        if cfg.hidden_act != "relu":
            raise ValueError(f"geometry encoder: unsupported hidden_act {cfg.hidden_act!r} (expected 'relu')")
        self.cfg = cfg
        self.label_embed = nn.Embedding(2, c)
        self.cls_embed = nn.Embedding(1, c)
        self.boxes_direct_project = nn.Linear(4, c)
        self.boxes_pool_project = PoolProject(c, cfg.roi_size)
        self.boxes_pos_enc_project = nn.Linear(c + 2, c)
        self.vision_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.final_proj = nn.Linear(c, c)
        self.prompt_layer_norm = nn.LayerNorm(c, eps=LN_EPS)
        self.layers = nn.ModuleList([GeometryEncoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.output_layer_norm = nn.LayerNorm(c, eps=LN_EPS)

    def _check(self, boxes, box_labels, box_mask, image_features, image_pos):
        c = self.cfg.hidden_size
        if len(boxes.shape) != 3 or int(boxes.shape[-1]) != 4:
            raise ValueError(f"boxes must be [B, N, 4] (cx, cy, w, h), got shape {list(boxes.shape)}")
        for name, t in (("box_labels", box_labels), ("box_mask", box_mask)):
            if len(t.shape) != 2:
                raise ValueError(f"{name} must be [B, N], got shape {list(t.shape)}")
            if not str(t.dtype).startswith(("int", "uint", "bool")):
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        for name, t in (("image_features", image_features), ("image_pos", image_pos)):
            if len(t.shape) != 4 or int(t.shape[-1]) != c:
                raise ValueError(f"{name} must be [B, H, W, {c}] (channel last), got shape {list(t.shape)}")

    def encode_boxes(self, boxes: Tensor, box_labels: Tensor, normed: Tensor) -> Tensor:
        """Box tokens ``[B, N, C]`` before the CLS token and the layers."""
        c, roi = self.cfg.hidden_size, self.cfg.roi_size
        dtype = normed.dtype
        height, width = int(normed.shape[1]), int(normed.shape[2])
        boxes32 = op.astype(boxes, "float32") if boxes.dtype != "float32" else boxes
        embed = self.boxes_direct_project(op.astype(boxes, dtype) if boxes.dtype != dtype else boxes)
        cx, cy, w, h = op.split(boxes32, 4, axis=-1)
        xyxy = op.concat([(cx - 0.5 * w) * float(width), (cy - 0.5 * h) * float(height),
                          (cx + 0.5 * w) * float(width), (cy + 0.5 * h) * float(height)], dim=-1)
        pooled = roi_align(normed, xyxy, roi)  # b, n, roi, roi, c
        embed = embed + self.boxes_pool_project(pooled)
        pos = box_position_encoding(boxes32, c // 2)
        embed = embed + self.boxes_pos_enc_project(op.astype(pos, dtype) if dtype != "float32" else pos)
        labels = op.astype(box_labels, "int32") if box_labels.dtype != "int32" else box_labels
        return self.label_embed(labels) + embed

    def forward(self, boxes: Tensor, box_labels: Tensor, box_mask: Tensor,
                image_features: Tensor, image_pos: Tensor) -> Tuple[Tensor, Tensor]:
        self._check(boxes, box_labels, box_mask, image_features, image_pos)
        c = self.cfg.hidden_size
        image = flatten_tokens(image_features, c, "image_features")
        image_key = image + flatten_tokens(image_pos, c, "image_pos")
        normed = self.vision_layer_norm(image_features)
        tokens = self.encode_boxes(boxes, box_labels, normed)
        tokens, mask = append_cls(tokens, box_mask, self.cls_embed.weight)
        x = self.prompt_layer_norm(self.final_proj(tokens))
        bias = key_padding_bias(mask)
        for layer in self.layers:
            x = layer(x, bias, image, image_key)
        return self.output_layer_norm(x), mask

