"""SAM 3's memory encoder (the video tracker's ``maskmem_backbone``, SAM 2's): a frame's
features and its predicted mask -> the 64-wide memory that later frames attend to.

Follows ``transformers``' ``Sam3TrackerVideoMemoryEncoder`` (parameter names mirror it):
the mask (``[B, 1, S, S]``, already scaled to the encoder's logit range) goes through the
mask downsampler (3x3 stride-2 convolutions, LayerNorm2d and GELU, ``log2(16)`` times,
channels x4 each, then a 1x1 convolution to the width), the pixel features through a 1x1
``feature_projection``; their sum through the fuser (ConvNeXt blocks: 7x7 depthwise
convolution, LayerNorm2d, pointwise MLP with GELU, layer scale, residual) and a 1x1
``projection`` to ``mem_dim``. The memory's sine position encoding depends on the grid
alone; the tracker computes it where it is used (``VideoTrackerModel``).

Channel-last throughout: the fuser's depthwise convolution is its taps summed per output
(``DepthwiseConv``), the downsampler's strided convolutions are GEMMs over their patches
(``PatchConv``), 1x1 convolutions and MLPs GEMMs. LayerNorm2d eps 1e-6 (the reference's ``channels_first``
LayerNorm).
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.config import VideoConfig
from sam3_nn.model.common import Conv1x1, linear_nd

LN2D_EPS = 1e-6


class StridedConv(nn.Module):
    """``nn.Conv2d(kernel k, stride s, padding p)`` on channel-first input (``op.conv2d``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, groups: int = 1):
        self.stride, self.padding, self.groups = stride, padding, groups
        self.weight = nn.Parameter((cout, cin // groups, kernel, kernel))
        self.bias = nn.Parameter((cout,))

    def forward(self, x: Tensor) -> Tensor:
        return op.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                         groups=self.groups)


class DepthwiseConv(nn.Module):
    """``nn.Conv2d(C, C, k, padding=k // 2, groups=C)`` on channel-last ``[B, H, W, C]``: each
    output the sum of its ``k * k`` taps written out (float32 sums), an elementwise op every
    target schedules with a thread per output, channels contiguous; TVM's grouped
    ``conv2d`` (channel first) took 1.2 ms per object on the H100 for the fuser's 7x7."""

    def __init__(self, channels: int, kernel: int):
        self.k = kernel
        self.weight = nn.Parameter((channels, 1, kernel, kernel))
        self.bias = nn.Parameter((channels,))

    def forward(self, x: Tensor) -> Tensor:
        k, p = self.k, self.k // 2

        def compute(t, wt, bias):
            def f(n, i, j, c):
                acc = bias[c].astype("float32")
                for dy in range(k):
                    for dx in range(k):
                        y, xx = i + dy - p, j + dx - p
                        inside = tirx.all(y >= 0, y < t.shape[1], xx >= 0, xx < t.shape[2])
                        yc = tirx.max(tirx.min(y, t.shape[1] - 1), 0)
                        xc = tirx.max(tirx.min(xx, t.shape[2] - 1), 0)
                        tap = t[n, yc, xc, c].astype("float32") * wt[c, 0, dy, dx].astype("float32")
                        acc = acc + tirx.Select(inside, tap, tirx.const(0, "float32"))
                return acc.astype(t.dtype)

            return te.compute(t.shape, f, name="depthwise")

        return op.tensor_expr_op(compute, "depthwise", args=[x, self.weight, self.bias])


class PatchConv(nn.Module):
    """``nn.Conv2d(kernel k, stride s, padding p)`` on channel-last input as one GEMM over its
    patches (im2col in the weight's ``(in, ky, kx)`` order, zero outside the image): the GEMM
    goes to the target's GEMM kernels, where a generic strided convolution would not."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int):
        self.cin, self.cout, self.k, self.stride, self.padding = cin, cout, kernel, stride, padding
        self.weight = nn.Parameter((cout, cin, kernel, kernel))
        self.bias = nn.Parameter((cout,))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        k, s, p = self.k, self.stride, self.padding
        ho, wo = (int(h) + 2 * p - k) // s + 1, (int(w) + 2 * p - k) // s + 1

        def compute(t):
            def f(n, i, j, q):
                ch, r = q // (k * k), q % (k * k)
                y, xx = i * s + r // k - p, j * s + r % k - p
                inside = tirx.all(y >= 0, y < t.shape[1], xx >= 0, xx < t.shape[2])
                yc = tirx.max(tirx.min(y, t.shape[1] - 1), 0)
                xc = tirx.max(tirx.min(xx, t.shape[2] - 1), 0)
                return tirx.Select(inside, t[n, yc, xc, ch], tirx.const(0, t.dtype))

            return te.compute((t.shape[0], ho, wo, c * k * k), f, name="patches")

        cols = op.tensor_expr_op(compute, "patches", args=[x])
        return linear_nd(cols, op.reshape(self.weight, [self.cout, self.cin * k * k]), self.bias)


class FewChannelLayerNorm(nn.Module):
    """``nn.LayerNorm(C)`` over the last axis for a few channels (the downsampler's first
    layers, 4 and 16 at 504 and 252 px): each output computes its pixel's mean and variance
    itself (float32), an elementwise op with a thread per output; TVM's row-reduction
    schedule for rows of 4 took 0.43 ms per object on the H100."""

    def __init__(self, channels: int, eps: float):
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter((channels,))
        self.bias = nn.Parameter((channels,))

    def forward(self, x: Tensor) -> Tensor:
        n_ch, eps = self.channels, self.eps

        def compute(t, w, b):
            def f(n, i, j, c):
                vals = [t[n, i, j, k].astype("float32") for k in range(n_ch)]
                mean = sum(vals[1:], vals[0]) / float(n_ch)
                var = sum([(v - mean) * (v - mean) for v in vals[1:]], (vals[0] - mean) * (vals[0] - mean)) / float(n_ch)
                y = (t[n, i, j, c].astype("float32") - mean) * tirx.rsqrt(var + eps)
                return (y * w[c].astype("float32") + b[c].astype("float32")).astype(t.dtype)

            return te.compute(t.shape, f, name="few_channel_layer_norm")

        return op.tensor_expr_op(compute, "few_channel_layer_norm", args=[x, self.weight, self.bias])


FEW_CHANNELS = 16  # LayerNorms over at most this many channels are computed per output


class MaskDownSamplerLayer(nn.Module):
    """``Sam3TrackerVideoMaskDownSamplerLayer``: 3x3 stride-2 conv, LayerNorm2d, GELU."""

    def __init__(self, cin: int, cout: int):
        self.conv = PatchConv(cin, cout, 3, 2, 1)
        self.layer_norm = FewChannelLayerNorm(cout, LN2D_EPS) if cout <= FEW_CHANNELS else \
            nn.LayerNorm(cout, eps=LN2D_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return op.gelu(self.layer_norm(self.conv(x)))


class MaskDownSampler(nn.Module):
    """``Sam3TrackerVideoMaskDownSampler``: ``[B, 1, S, S]`` -> ``[B, S/16, S/16, C]``
    (channel last)."""

    def __init__(self, hidden: int, total_stride: int):
        n = int(math.log2(total_stride))
        chans = [4 ** i for i in range(n + 1)]
        self.layers = nn.ModuleList([MaskDownSamplerLayer(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.final_conv = Conv1x1(chans[-1], hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = op.reshape(x, [b, h, w, 1])  # one channel: channel last is a free reshape
        for layer in self.layers:
            x = layer(x)
        return self.final_conv(x)


class MemoryFuserCXBlock(nn.Module):
    """``Sam3TrackerVideoMemoryFuserCXBlock`` on channel-last ``[B, g, g, C]``."""

    def __init__(self, hidden: int, intermediate: int, kernel: int):
        self.depthwise_conv = DepthwiseConv(hidden, kernel)
        self.layer_norm = nn.LayerNorm(hidden, eps=LN2D_EPS)
        self.pointwise_conv1 = nn.Linear(hidden, intermediate)
        self.pointwise_conv2 = nn.Linear(intermediate, hidden)
        self.scale = nn.Parameter((hidden,))

    def forward(self, x: Tensor) -> Tensor:
        y = self.depthwise_conv(x)
        y = self.pointwise_conv2(op.gelu(self.pointwise_conv1(self.layer_norm(y))))
        return x + y * self.scale


class MemoryFuser(nn.Module):
    def __init__(self, hidden: int, cfg: VideoConfig):
        self.layers = nn.ModuleList([MemoryFuserCXBlock(hidden, cfg.memory_fuser_intermediate_dim,
                                                        cfg.memory_fuser_kernel_size)
                                     for _ in range(cfg.memory_fuser_num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """``Sam3TrackerVideoMemoryEncoder``: ``features [B, g, g, C]`` (channel last), ``masks
    [B, 1, S, S]`` -> ``[B, g, g, mem_dim]``."""

    def __init__(self, hidden: int, cfg: VideoConfig):
        self.mask_downsampler = MaskDownSampler(hidden, cfg.mask_downsampler_total_stride)
        self.feature_projection = Conv1x1(hidden, hidden)
        self.memory_fuser = MemoryFuser(hidden, cfg)
        self.projection = Conv1x1(hidden, cfg.mem_dim)

    def forward(self, features: Tensor, masks: Tensor) -> Tensor:
        x = self.feature_projection(features) + self.mask_downsampler(masks)
        return self.projection(self.memory_fuser(x))
