"""SAM 3's interactive prompt encoder (the tracker's ``sam_prompt_encoder``, SAM 2's).

Follows the original ``sam3/sam/prompt_encoder.py``; parameter names mirror
``transformers``' ``Sam3TrackerPromptEncoder`` (``shared_embedding``, ``mask_embed``,
``point_embed``, ``not_a_point_embed``, ``no_mask_embed``).

Points (clicks, and a box as its two corners) come in a fixed number of slots with a
mask, valid slots first: ``points [B, P, 2]`` float32 in pixels of the model's input
(``S x S``), ``labels [B, P]`` (0 negative, 1 positive, 2/3 a box's top-left/bottom-right
corner, -1 not-a-point), ``point_mask [B, P]`` (1 valid, 0 empty). Each point becomes
the random-Fourier encoding of its pixel centre (``(p + 0.5) / S``, ``2c - 1``,
``@ G [2, C/2]``, ``2 pi``, ``[sin, cos]``) plus ``point_embed[label]``; a -1 label gives
``not_a_point_embed`` alone. After the slots comes the padding point the original always
appends (the image predictor gives boxes as points, so ``boxes`` is None and it pads):
``not_a_point_embed``, valid when any slot is (a prompt of a mask alone has no sparse
token, as in the original). Empty slots are masked out of the decoder's attention by the
caller, so one library serves any number of points up to ``P``.

Masks: ``mask_input [B, 1, 4g, 4g]`` (low-resolution logits, ``g`` the ViT grid) through
``mask_embed`` (2x2 stride-2 conv, LayerNorm2d, GELU, twice, then a 1x1 conv) where
``mask_valid [B]`` is 1, else ``no_mask_embed`` at every position. LayerNorm2d eps 1e-6
(the original's ``LayerNorm2d`` default). Maps are channel-last ``[B, g, g, C]``.
"""

from __future__ import annotations

import math
from typing import Tuple

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import Sam3Config
from sam3_nn.model.common import Conv1x1, Conv2x2Stride2, EmbeddingTable

LN2D_EPS = 1e-6  # sam3/sam/common.py LayerNorm2d


class RandomPositionEmbedding(nn.Module):
    """``PositionEmbeddingRandom``: a ``[2, C/2]`` Gaussian matrix (``positional_embedding``,
    the original's ``positional_encoding_gaussian_matrix``)."""

    def __init__(self, hidden: int):
        self.hidden = hidden
        self.positional_embedding = nn.Parameter((2, hidden // 2))

    def encode(self, x: Tensor, y: Tensor, dtype: str) -> Tensor:
        """Coordinates normalised to [0, 1] (float32, equal shapes ``[...]``) -> ``[..., C]``.
        The K=2 product is written as two multiply-adds (no GEMM kernel for it)."""
        g = op.astype(self.positional_embedding, "float32")
        g0, g1 = op.split(g, 2, axis=0)
        x = op.unsqueeze(x * 2.0 - 1.0, -1)
        y = op.unsqueeze(y * 2.0 - 1.0, -1)
        proj = (x * op.reshape(g0, [self.hidden // 2]) + y * op.reshape(g1, [self.hidden // 2]))
        proj = op.unsqueeze(proj * float(2.0 * math.pi), -2)
        # [sin | cos] joined on a new second-to-last axis, then merged: a concatenation on
        # the channel axis would select per channel inside vectorised loops (Metal cannot)
        both = op.concat([_sin(proj), _cos(proj)], dim=-2)
        return op.astype(op.reshape(both, list(both.shape[:-2]) + [self.hidden]), dtype)

    def grid(self, size: int, dtype: str) -> Tensor:
        """The encoding of every cell centre of a ``size x size`` grid: ``[size * size, C]``
        (row-major; ``get_dense_pe``). Depends on the weights alone."""

        def coords(axis):
            return te.compute((size * size,),
                              lambda i: (tirx.Cast("float32", (i % size) if axis == 0 else (i // size))
                                         + 0.5) / float(size), name=f"grid_{'xy'[axis]}")

        x = op.tensor_expr_op(lambda: coords(0), "grid_x", args=[])
        y = op.tensor_expr_op(lambda: coords(1), "grid_y", args=[])
        return self.encode(x, y, dtype)


def _unary(x: Tensor, fn, name: str) -> Tensor:
    return op.tensor_expr_op(lambda t: te.compute(t.shape, lambda *i: fn(t(*i)), name=name), name,
                             args=[x])


def _sin(x: Tensor) -> Tensor:
    return _unary(x, tirx.sin, "sin")


def _cos(x: Tensor) -> Tensor:
    return _unary(x, tirx.cos, "cos")


class MaskEmbedding(nn.Module):
    """``Sam3TrackerMaskEmbedding`` (the original's ``mask_downscaling``)."""

    def __init__(self, hidden: int, channels: int):
        self.conv1 = Conv2x2Stride2(1, channels // 4)
        self.layer_norm1 = nn.LayerNorm(channels // 4, eps=LN2D_EPS)
        self.conv2 = Conv2x2Stride2(channels // 4, channels)
        self.layer_norm2 = nn.LayerNorm(channels, eps=LN2D_EPS)
        self.conv3 = Conv1x1(channels, hidden)

    def forward(self, masks: Tensor) -> Tensor:
        """``[B, 1, H, W]`` -> ``[B, H/4, W/4, C]`` (channel last)."""
        b, _, h, w = masks.shape
        x = op.reshape(masks, [b, h, w, 1])  # one channel: channel last is a free reshape
        x = op.gelu(self.layer_norm1(self.conv1(x)))
        x = op.gelu(self.layer_norm2(self.conv2(x)))
        return self.conv3(x)


class PromptEncoder(nn.Module):
    """Points and a mask -> sparse tokens ``[B, P + 1, C]`` and a dense map ``[B, g, g, C]``."""

    def __init__(self, cfg: Sam3Config):
        c = cfg.vision.fpn_hidden_size
        self.hidden = c
        self.image_size = cfg.image_size
        self.shared_embedding = RandomPositionEmbedding(c)
        self.mask_embed = MaskEmbedding(c, cfg.tracker.mask_input_channels)
        self.no_mask_embed = EmbeddingTable(1, c)
        self.point_embed = EmbeddingTable(4, c)  # negative, positive, box top-left, box bottom-right
        self.not_a_point_embed = EmbeddingTable(1, c)

    def embed_points(self, points: Tensor, labels: Tensor) -> Tensor:
        """``[B, P, 2]`` float32 pixels, ``[B, P]`` labels -> ``[B, P + 1, C]`` (the padding
        point last)."""
        b, p = points.shape[0], points.shape[1]
        c = self.hidden
        dtype = self.point_embed.weight.dtype
        pts = points + 0.5  # the pixel's centre
        px, py = op.split(pts, 2, axis=2)
        s = float(self.image_size)
        pe = self.shared_embedding.encode(op.reshape(px, [b, p]) / s, op.reshape(py, [b, p]) / s, dtype)
        table = op.reshape(self.point_embed.weight, [1, 1, 4, c])
        per_label = op.sum(table * _one_hot4(labels, dtype), axis=2)  # point_embed[label] (0 if -1)
        emb = _label_select(labels, self.not_a_point_embed.weight, pe + per_label)
        pad = op.broadcast_to(op.reshape(self.not_a_point_embed.weight, [1, 1, c]), [b, 1, c])
        return op.concat([emb, pad], dim=1)

    def embed_mask(self, mask_input: Tensor, mask_valid: Tensor) -> Tensor:
        """``[B, 1, 4g, 4g]`` logits, ``[B]`` flags -> ``[B, g, g, C]``."""
        b, c = mask_input.shape[0], self.hidden
        dense = self.mask_embed(mask_input)
        dtype = self.no_mask_embed.weight.dtype

        def flags(m):
            return te.compute(m.shape, lambda i: tirx.Select(m[i] != tirx.const(0, m.dtype),
                                                             tirx.const(1, dtype), tirx.const(0, dtype)),
                              name="mask_flag")

        # a blend by a 0/1 factor (exact for finite maps): this fuses into the 1x1 convolution's
        # epilogue, where a per-image select would be a vector of booleans (Metal cannot)
        f = op.reshape(op.tensor_expr_op(flags, "mask_flag", args=[mask_valid]), [b, 1, 1, 1])
        none = op.reshape(self.no_mask_embed.weight, [1, 1, 1, c])
        return dense * f + none * (1.0 - f)

    def forward(self, points: Tensor, labels: Tensor, mask_input: Tensor,
                mask_valid: Tensor) -> Tuple[Tensor, Tensor]:
        return self.embed_points(points, labels), self.embed_mask(mask_input, mask_valid)


def _label_select(labels: Tensor, not_a_point: Tensor, emb: Tensor) -> Tensor:
    """``not_a_point [1, C]`` where the label is -1, else ``emb [B, P, C]`` (one select: no
    boolean tensor is stored, which Metal cannot vectorise)."""

    def compute(lab, nap, e):
        return te.compute(e.shape, lambda i, j, k: tirx.Select(
            lab[i, j] == tirx.const(-1, lab.dtype), nap[0, k], e[i, j, k]), name="point_embedding")

    return op.tensor_expr_op(compute, "point_embedding", args=[labels, not_a_point, emb])


def _one_hot4(labels: Tensor, dtype: str) -> Tensor:
    """``[B, P]`` labels -> ``[B, P, 4, 1]``: 1 where the label is 0..3 at its index, else 0."""

    def compute(lab):
        b, p = lab.shape
        return te.compute((b, p, 4, 1),
                          lambda i, j, k, _: tirx.Select(lab[i, j] == tirx.Cast(lab.dtype, k),
                                                         tirx.const(1, dtype), tirx.const(0, dtype)),
                          name="one_hot4")

    return op.tensor_expr_op(compute, "one_hot4", args=[labels])
