"""SAM 3 vision backbone: Perception-Encoder ViT trunk + FPN neck.

Tokens stay channel-last (``[B, H, W, C]``) through the trunk; the neck returns
channel-first maps as the reference does. Parameter names follow the HF
``Sam3VisionModel`` except the attention's fused ``qkv`` projection (one GEMM
instead of three).
"""

from __future__ import annotations

from typing import List, Tuple

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import VisionConfig, ViTConfig
from sam3_nn.model.common import (MLP, Conv1x1, Conv2d, ConvTranspose2x2, PatchEmbed, max_pool_2x2,
                                  nhwc_to_nchw, sine_position_encoding)
from sam3_nn.ops.attention import qkv_self_attention, qkv_window_attention
from sam3_nn.ops.rope import AxialRope


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        self.patch_embeddings = PatchEmbed(cfg.num_channels, cfg.hidden_size, cfg.patch_size)
        self.position_embeddings = nn.Parameter((1, cfg.pretrain_grid ** 2, cfg.hidden_size))
        self.pretrain_grid = cfg.pretrain_grid
        self.hidden = cfg.hidden_size

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embeddings(pixels)  # b, gh, gw, c
        gh, gw = int(x.shape[1]), int(x.shape[2])
        return x + self._tiled_positions(gh, gw)

    def _tiled_positions(self, gh: int, gw: int) -> Tensor:
        """The pretrain grid's table tiled (not interpolated) over a ``gh x gw`` grid."""
        p = self.pretrain_grid
        pos = op.reshape(self.position_embeddings, [1, p, p, self.hidden])
        rh, rw = -(-gh // p), -(-gw // p)
        if rh > 1:
            pos = op.concat([pos] * rh, dim=1)
        if rw > 1:
            pos = op.concat([pos] * rw, dim=2)
        if rh * p != gh:
            pos = op.split(pos, [gh], axis=1)[0]
        if rw * p != gw:
            pos = op.split(pos, [gw], axis=2)[0]
        return pos


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig, rope: AxialRope):
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.num_heads = cfg.num_attention_heads
        self.rope = rope

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, N, C]`` token sequences (whole images)."""
        out = qkv_self_attention(self.qkv(x), self.num_heads, self.rope)
        return self.o_proj(out)

    def forward_windows(self, x: Tensor, window: int, grid_h: int, grid_w: int) -> Tensor:
        """``x``: unpartitioned ``[B, grid_h * grid_w, C]`` rows; windows of ``window`` tokens
        a side attend within themselves -> ``[B, grid_h * grid_w, C]``."""
        out = qkv_window_attention(self.qkv(x), self.num_heads, self.rope, window, grid_h, grid_w)
        return self.o_proj(out)


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig, window: int):
        self.window = window
        g = cfg.grid_size
        if window > 0:
            rope = AxialRope(window, window, cfg.head_dim, cfg.rope_theta, 1.0)
        else:
            # global blocks see the whole grid at positions scaled to the window's range
            rope = AxialRope(g, g, cfg.head_dim, cfg.rope_theta, cfg.window_size / g)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(cfg, rope)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        h, w = int(h), int(w)
        y = self.layer_norm1(x)
        if self.window > 0:
            y = self._windowed(y, b, h, w, c)
        else:
            y = op.reshape(self.attention(op.reshape(y, [b, h * w, c])), [b, h, w, c])
        x = x + y
        return x + self.mlp(self.layer_norm2(x))

    def _windowed(self, y: Tensor, b, h: int, w: int, c) -> Tensor:
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            # zero padding after the norm, attended to like real tokens (as the reference)
            y = op.pad(y, [0, 0, 0, ph, 0, pw, 0, 0])
        hh, ww = h + ph, w + pw
        y = self.attention.forward_windows(op.reshape(y, [b, hh * ww, c]), ws, hh, ww)
        y = op.reshape(y, [b, hh, ww, c])
        if ph:
            y = op.split(y, [h], axis=1)[0]
        if pw:
            y = op.split(y, [w], axis=2)[0]
        return y


class ViTBackbone(nn.Module):
    """Patch embedding, tiled absolute positions, ln_pre, windowed/global RoPE blocks."""

    def __init__(self, cfg: ViTConfig):
        self.embeddings = ViTEmbeddings(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList([
            ViTLayer(cfg, 0 if cfg.is_global(i) else cfg.window_size)
            for i in range(cfg.num_hidden_layers)
        ])

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.layer_norm(self.embeddings(pixels))
        for layer in self.layers:
            x = layer(x)
        return x  # b, gh, gw, c


class FPNLayer(nn.Module):
    """One neck level: rescale (2x2 deconvs / identity / max-pool), 1x1 then 3x3 conv."""

    def __init__(self, cin: int, dim: int, scale: float):
        self.scale = scale
        if scale == 4.0:
            # scale_layers.1 is the GELU between the two deconvs (no parameters)
            self.scale_layers = nn.ModuleList([ConvTranspose2x2(cin, cin // 2), nn.ModuleList([]),
                                               ConvTranspose2x2(cin // 2, cin // 4)])
            mid = cin // 4
        elif scale == 2.0:
            self.scale_layers = nn.ModuleList([ConvTranspose2x2(cin, cin // 2)])
            mid = cin // 2
        elif scale in (1.0, 0.5):
            self.scale_layers = nn.ModuleList([])
            mid = cin
        else:
            raise ValueError(f"unsupported FPN scale {scale}")
        self.proj1 = Conv1x1(mid, dim)
        self.proj2 = Conv2d(dim, dim, 3)

    def rescale(self, x: Tensor) -> Tensor:
        """Everything before ``proj2``."""
        # the last deconvolution and proj1 are one GEMM (ConvTranspose2x2's `then`)
        if self.scale == 4.0:
            return self.scale_layers[2](self.scale_layers[0](x, gelu=True), then=self.proj1)
        if self.scale == 2.0:
            return self.scale_layers[0](x, then=self.proj1)
        return self.proj1(max_pool_2x2(x) if self.scale == 0.5 else x)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.rescale(x))


class VisionNeck(nn.Module):
    """The FPN neck: one ``FPNLayer`` per scale factor (the first ``num_levels`` of them).
    SAM 3 has two of these on one trunk: the detector's (``convs``) and the tracker's
    (``sam2_convs``, a copy of the first's structure; its 0.5x level is dropped)."""

    def __init__(self, cfg: VisionConfig, num_levels: int | None = None):
        scales = cfg.scale_factors if num_levels is None else cfg.scale_factors[:num_levels]
        self.fpn_layers = nn.ModuleList([
            FPNLayer(cfg.backbone.hidden_size, cfg.fpn_hidden_size, s) for s in scales
        ])
        self.num_pos_feats = cfg.fpn_hidden_size // 2

    def forward(self, x: Tensor) -> List[Tensor]:
        """Channel-last trunk output -> channel-last FPN maps, highest resolution first.

        Every level is rescaled before any ``proj2``: the 3x3 convolutions write the maps
        the function returns, so they come last, after all the work that has no output of
        the call (on CUDA, one graph for that work, then the four convolutions)."""
        pre = [layer.rescale(x) for layer in self.fpn_layers]
        return [layer.proj2(p) for layer, p in zip(self.fpn_layers, pre)]

    def position_encodings(self, maps: List[Tensor]) -> List[Tensor]:
        return [sine_position_encoding(m, self.num_pos_feats, m.dtype) for m in maps]


class VisionModel(nn.Module):
    """``Sam3VisionModel``: pixels ``[B, 3, S, S]`` -> FPN maps ``[B, 256, s, s]``.
    ``neck=False``: the trunk alone (a model whose only neck is the tracker's)."""

    def __init__(self, cfg: VisionConfig, neck: bool = True):
        self.backbone = ViTBackbone(cfg.backbone)
        self.neck = VisionNeck(cfg) if neck else None

    def forward_nhwc(self, pixels: Tensor) -> List[Tensor]:
        return self.neck(self.backbone(pixels))

    def forward(self, pixels: Tensor) -> Tuple[Tensor, ...]:
        maps = self.forward_nhwc(pixels)
        return tuple(nhwc_to_nchw(m) for m in maps)

    def forward_with_positions(self, pixels: Tensor) -> Tuple[Tensor, ...]:
        maps = self.forward_nhwc(pixels)
        pos = self.neck.position_encodings(maps)
        return tuple(nhwc_to_nchw(m) for m in maps) + tuple(pos)
