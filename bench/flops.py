"""Analytic FLOP counts of SAM 3's parts, from the model config.

Counted as PyTorch's ``torch.utils.flop_counter`` counts them: 2 x multiply-adds of every
matrix product (linear layers, attention scores and values, the mask einsum) and
convolution (patch embedding, FPN deconvolutions, 1x1 and 3x3 convolutions); element-wise
work (norms, activations, softmax, RoPE, position encodings) is not counted. The counts
are the work of the reference (``transformers`` ``Sam3Model``, text prompt only): the
same number divides both sides' times, so TFLOP/s are comparable ("effective"). Our
``detect`` also runs the geometry encoder over its empty box slots; that is not counted.

``tests/test_bench.py`` checks these against ``FlopCounterMode`` on ``Sam3Model``.
"""

from __future__ import annotations

from typing import Dict


def _linear(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _attention(nq: int, nk: int, c: int, proj_q: bool = True) -> int:
    """Multi-head attention with q/k/v/o projections of width ``c``: projections +
    scores (``QK^T``) + weighted values."""
    proj = _linear(nq, c, c) * (2 if proj_q else 1) + 2 * _linear(nk, c, c)
    return proj + 4 * nq * nk * c


def vit_trunk_flops(cfg, batch: int = 1) -> int:
    """Patch embedding + ViT blocks (windowed blocks: q/k/v/o on the padded windows)."""
    bb = cfg.vision.backbone
    g, c, f, ws = bb.grid_size, bb.hidden_size, bb.intermediate_size, bb.window_size
    n = g * g
    total = 2 * n * bb.num_channels * bb.patch_size ** 2 * c  # patch embedding (conv)
    padded = (-(-g // ws) * ws) ** 2
    for i in range(bb.num_hidden_layers):
        tokens, seq = (n, n) if bb.is_global(i) else (padded, ws * ws)
        total += _linear(tokens, c, 3 * c) + _linear(tokens, c, c)  # qkv, output projection
        total += 4 * tokens * seq * c  # scores + values, within each window (or globally)
        total += _linear(n, c, f) + _linear(n, f, c)  # MLP
    return batch * total


def fpn_neck_flops(cfg, batch: int = 1) -> int:
    """The FPN neck: per level 2x2 deconvolutions (scale 4, 2), 1x1 then 3x3 convolution."""
    g, cin, d = cfg.vision.backbone.grid_size, cfg.vision.backbone.hidden_size, cfg.vision.fpn_hidden_size
    total = 0
    for s in cfg.vision.scale_factors:
        if s == 4.0:
            total += 2 * g * g * 4 * cin * (cin // 2) + 2 * (2 * g) ** 2 * 4 * (cin // 2) * (cin // 4)
            side, mid = 4 * g, cin // 4
        elif s == 2.0:
            total += 2 * g * g * 4 * cin * (cin // 2)
            side, mid = 2 * g, cin // 2
        elif s == 1.0:
            side, mid = g, cin
        else:
            side, mid = g // 2, cin
        total += 2 * side * side * mid * d + 2 * side * side * d * d * 9
    return batch * total


def vision_flops(cfg, batch: int = 1) -> int:
    """``encode_image``: ViT trunk + FPN neck."""
    return vit_trunk_flops(cfg, batch) + fpn_neck_flops(cfg, batch)


def text_flops(cfg, batch: int = 1, length: int | None = None) -> int:
    """``encode_text``: the CLIP text transformer over the whole (padded) context and the
    resizer to the detector width (CLIP's own pooled projection, one row, is left out)."""
    t = cfg.text
    L = length or t.max_position_embeddings
    d, f = t.hidden_size, t.intermediate_size
    per_layer = _attention(L, L, d) + _linear(L, d, f) + _linear(L, f, d)
    resize = _linear(L, d, cfg.detr_encoder.hidden_size)
    return batch * (t.num_hidden_layers * per_layer + resize)


def detect_flops(cfg, batch: int = 1, prompt: int | None = None) -> Dict[str, int]:
    """``detect`` with a text prompt of ``prompt`` tokens (default: the text context):
    DETR encoder, DETR decoder (with box refinement, box relative position bias, presence
    head), dot-product scoring and the mask decoder. Returns the parts and their ``total``."""
    T = prompt or cfg.text.max_position_embeddings
    g = cfg.vision.backbone.grid_size
    n = g * g  # image tokens: the scale-1 FPN level
    enc = cfg.detr_encoder
    c = enc.hidden_size
    encoder = enc.num_layers * (_attention(n, n, c) + _attention(n, T, c)
                                + _linear(n, c, enc.intermediate_size) + _linear(n, enc.intermediate_size, c))
    dec = cfg.detr_decoder
    q, heads = dec.num_queries, dec.num_attention_heads
    q1 = q + 1  # the presence token rides with the queries
    per_layer = (
        _linear(q, 2 * c, c) + _linear(q, c, c)  # ref_point_head on the box sine encodings
        + 2 * q * g * (_linear(1, 2, c) + _linear(1, c, heads))  # box RPB, x and y MLPs
        + _attention(q1, q1, c) + _attention(q1, T, c) + _attention(q1, n, c)
        + _linear(q1, c, dec.intermediate_size) + _linear(q1, dec.intermediate_size, c)
        + 2 * _linear(q, c, c) + _linear(q, c, 4)  # box head
        + 2 * _linear(1, c, c) + _linear(1, c, 1)  # presence head
    )
    decoder = dec.num_layers * per_layer
    scoring = (_linear(T, c, dec.intermediate_size) + _linear(T, dec.intermediate_size, c)
               + _linear(1, c, c) + dec.num_layers * (_linear(q, c, c) + _linear(q, c, 1)))
    sizes = cfg.vision.level_sizes()[:3]  # the maps detect takes, highest resolution first
    h0 = sizes[0]
    pixel = sum(2 * s * s * c * c * 9 for s in sizes[:-1])  # 3x3 conv per upsampling stage
    mask = (_attention(n, T, c) + pixel
            + 2 * h0 * h0 * c * c  # instance projection (1x1)
            + 3 * _linear(q, c, c)  # mask embedder
            + 2 * q * c * h0 * h0  # query x pixel embedding
            + 2 * h0 * h0 * c)  # semantic projection (1x1 -> 1)
    parts = {"detr_encoder": encoder, "detr_decoder": decoder, "scoring": scoring, "mask_decoder": mask}
    parts = {k: batch * v for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def part_flops(cfg, batch: int = 1) -> Dict[str, int]:
    """FLOPs of each benchmarked part for ``batch`` images (one text prompt each)."""
    v, t, d = vision_flops(cfg, batch), text_flops(cfg, batch), detect_flops(cfg, batch)["total"]
    return {"vision": v, "text": t, "detect": d, "pipeline": v + t + d}
