"""Building blocks shared by the model parts.

Every dense projection is an ``nn.Linear`` (a GEMM the target pipeline schedules);
1x1 convolutions, the patch embedding and the 2x2 stride-2 transposed
convolutions of the FPN are written as GEMMs on channel-last tensors for the same
reason. Parameters keep the shapes of the reference layers, so the weight mapping
stays a renaming.
"""

from __future__ import annotations

import math

from typing import Optional

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.ops.attention import attention

LN_EPS = 1e-5  # nn.LayerNorm's default: the reference's DETR, geometry and head layers use it


def linear_nd(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` over the last axis, for a weight of shape ``[out, in]``."""
    y = op.matmul(x, op.permute_dims(weight, [1, 0]))
    return y + bias if bias is not None else y


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (``Sam3MLP``, CLIP MLP)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "gelu"):
        if act not in ("gelu", "relu", "quick_gelu"):
            raise ValueError(f"unsupported activation {act!r}")
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.act == "gelu":
            h = op.gelu(h)
        elif self.act == "relu":
            h = op.relu(h)
        else:
            h = h * op.sigmoid(h * 1.702)
        return self.fc2(h)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens, as one GEMM (no bias).

    ``[B, C, H, W]`` pixels -> ``[B, H/p, W/p, hidden]`` tokens (channel last).
    """

    def __init__(self, channels: int, hidden: int, patch: int):
        self.patch = patch
        self.channels = channels
        self.hidden = hidden
        self.weight = nn.Parameter((hidden, channels, patch, patch))

    def forward(self, pixels: Tensor) -> Tensor:
        b, c, h, w = pixels.shape
        p = self.patch
        gh, gw = h // p, w // p
        x = op.reshape(pixels, [b, c, gh, p, gw, p])
        x = op.permute_dims(x, [0, 2, 4, 1, 3, 5])  # b, gh, gw, c, p, p
        x = op.reshape(x, [b, gh, gw, c * p * p])
        w2 = op.reshape(self.weight, [self.hidden, c * p * p])
        return linear_nd(x, w2, None)


class Conv1x1(nn.Module):
    """1x1 convolution on channel-last input, as a GEMM. Weight ``[out, in, 1, 1]``."""

    def __init__(self, cin: int, cout: int):
        self.cin, self.cout = cin, cout
        self.weight = nn.Parameter((cout, cin, 1, 1))
        self.bias = nn.Parameter((cout,))

    def forward(self, x: Tensor) -> Tensor:
        return linear_nd(x, op.reshape(self.weight, [self.cout, self.cin]), self.bias)


class ConvTranspose2x2(nn.Module):
    """``ConvTranspose2d(kernel 2, stride 2)`` on channel-last input, as one GEMM.

    Weight ``[in, out, 2, 2]`` (PyTorch layout). Each input pixel produces a 2x2
    block of output pixels: ``[B, H, W, in] -> [B, 2H, 2W, out]``.
    """

    def __init__(self, cin: int, cout: int):
        self.cin, self.cout = cin, cout
        self.weight = nn.Parameter((cin, cout, 2, 2))
        self.bias = nn.Parameter((cout,))

    def forward(self, x: Tensor, gelu: bool = False, then: "Conv1x1 | None" = None) -> Tensor:
        """``gelu``: GELU of the result (elementwise, so applied before the pixel shuffle,
        where it and the bias fuse into the GEMM's epilogue). ``then``: a 1x1 convolution
        applied to the result, folded into this one (both are linear, and the 1x1 acts on
        each output pixel alone): one GEMM with ``then``'s output width, no intermediate map.
        The folded weights are a small GEMM on the weights alone: a compiled library runs it
        once, when weights are bound (sam3_nn.compiler.passes.param_transform)."""
        b, h, w, _ = x.shape
        if then is None:
            cout = self.cout
            wt = op.permute_dims(self.weight, [2, 3, 1, 0])  # dy, dx, out, in
            wt = op.reshape(wt, [4 * cout, self.cin])
            bias = self.bias
        else:
            if gelu:
                raise ValueError("a 1x1 convolution cannot be folded through a GELU")
            cout = then.cout
            w1 = op.reshape(then.weight, [cout, self.cout])  # [c2, out]
            wt = op.reshape(op.permute_dims(self.weight, [1, 2, 3, 0]), [self.cout, 4 * self.cin])
            wt = op.reshape(op.matmul(w1, wt), [cout, 4, self.cin])  # c2, (dy dx), in
            wt = op.reshape(op.permute_dims(wt, [1, 0, 2]), [4 * cout, self.cin])
            # w1 @ bias as a product and a row sum in float32 (no GEMV kernel for one column)
            prod = op.astype(w1, "float32") * op.astype(op.reshape(self.bias, [1, self.cout]), "float32")
            bias = op.astype(op.sum(prod, axis=1), self.bias.dtype) + then.bias
        y = linear_nd(x, wt, op.concat([bias] * 4, dim=0))  # b, h, w, (dy dx out)
        if gelu:
            y = op.gelu(y)
        y = op.reshape(y, [b, h, w, 2, 2, cout])
        y = op.permute_dims(y, [0, 1, 3, 2, 4, 5])  # b, h, dy, w, dx, out
        return op.reshape(y, [b, 2 * h, 2 * w, cout])


class Conv2x2Stride2(nn.Module):
    """``Conv2d(kernel 2, stride 2)`` on channel-last input, as one GEMM over the 2x2
    patches: ``[B, H, W, in] -> [B, H/2, W/2, out]``. Weight ``[out, in, 2, 2]``."""

    def __init__(self, cin: int, cout: int):
        self.cin, self.cout = cin, cout
        self.weight = nn.Parameter((cout, cin, 2, 2))
        self.bias = nn.Parameter((cout,))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        h2, w2 = int(h) // 2, int(w) // 2
        x = op.reshape(x, [b, h2, 2, w2, 2, c])
        x = op.permute_dims(x, [0, 1, 3, 5, 2, 4])  # b, h2, w2, in, dy, dx (the weight's order)
        x = op.reshape(x, [b, h2, w2, 4 * self.cin])
        return linear_nd(x, op.reshape(self.weight, [self.cout, 4 * self.cin]), self.bias)


class Conv2d(nn.Module):
    """``k x k`` convolution with ``padding=k//2``; channel-last in, channel-last out.

    Weight ``[out, in, k, k]`` (PyTorch layout).
    """

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True):
        self.kernel = kernel
        self.weight = nn.Parameter((cout, cin, kernel, kernel))
        self.bias = nn.Parameter((cout,)) if bias else None

    def forward(self, x: Tensor, then: "Conv1x1 | None" = None) -> Tensor:
        """``then``: a 1x1 convolution applied to the result, folded into this one (both are
        linear): one convolution with ``then``'s output width, the wide map never stored. The
        folded weights depend on the weights alone (computed once, when weights are bound:
        sam3_nn.compiler.passes.param_transform)."""
        weight, bias = self.weight, self.bias
        if then is not None:
            if bias is None:
                raise ValueError("folding a 1x1 convolution needs this convolution's bias")
            cout, cin, k = then.cout, int(self.weight.shape[1]), self.kernel
            w1 = op.reshape(then.weight, [cout, then.cin])
            weight = op.matmul(w1, op.reshape(self.weight, [then.cin, cin * k * k]))
            weight = op.reshape(weight, [cout, cin, k, k])
            # w1 @ bias as a product and a row sum in float32 (no GEMV kernel for one column)
            prod = op.astype(w1, "float32") * op.astype(op.reshape(self.bias, [1, then.cin]), "float32")
            bias = op.astype(op.sum(prod, axis=1), self.bias.dtype) + then.bias
        xc = op.permute_dims(x, [0, 3, 1, 2])
        y = op.conv2d(xc, weight, bias, padding=self.kernel // 2)
        return op.permute_dims(y, [0, 2, 3, 1])


def max_pool_2x2(x: Tensor) -> Tensor:
    """2x2 stride-2 max pooling on channel-last input (odd sizes floor, as PyTorch)."""
    b, h, w, c = x.shape
    h2, w2 = int(h) // 2, int(w) // 2
    if int(h) != 2 * h2 or int(w) != 2 * w2:
        x = op.split(x, [2 * h2], axis=1)[0] if int(h) != 2 * h2 else x
        x = op.split(x, [2 * w2], axis=2)[0] if int(w) != 2 * w2 else x
    x = op.reshape(x, [b, h2, 2, w2, 2, c])
    return op.max(x, axis=[2, 4])


def nhwc_to_nchw(x: Tensor) -> Tensor:
    return op.permute_dims(x, [0, 3, 1, 2])


def sine_position_encoding(like: Tensor, num_feats: int, dtype: str,
                           temperature: float = 10000.0) -> Tensor:
    """Normalised 2D sine position encoding ``[B, 2 * num_feats, H, W]`` (DETR style)
    for a channel-last feature map ``like`` of shape ``[B, H, W, C]``.

    Channels ``[0, num_feats)`` encode the row (y), the rest the column (x); even
    channels are sines, odd ones cosines, of ``pos / temperature ** (2 (i // 2) / num_feats)``
    with ``pos = (index + 1) / (size + 1e-6) * 2 pi``. Matches the reference's
    ``normalize=True`` encoding without a mask. Depends on shapes only.
    """
    scale = 2.0 * math.pi
    height, width = int(like.shape[1]), int(like.shape[2])

    def compute(x):
        def f(b, c, y, xx):
            is_y = c < num_feats
            i = tirx.Select(is_y, c, c - num_feats)
            coord = tirx.Select(is_y, y, xx)
            size = tirx.Select(is_y, tirx.const(height, "float32"), tirx.const(width, "float32"))
            embed = (tirx.Cast("float32", coord) + 1.0) / (size + 1e-6) * scale
            expo = tirx.Cast("float32", (i // 2) * 2) / float(num_feats)
            dim_t = tirx.power(tirx.const(temperature, "float32"), expo)
            val = embed / dim_t
            out = tirx.Select(i % 2 == 0, tirx.sin(val), tirx.cos(val))
            return tirx.Cast(dtype, out)

        return te.compute((x.shape[0], 2 * num_feats, height, width), f, name="sine_pos")

    return op.tensor_expr_op(compute, "sine_position_encoding", args=[like])


class Attention(nn.Module):
    """``Sam3Attention``: separate q/k/v/o projections, multi-head softmax attention.

    ``query [B, Nq, C]``, ``key``/``value [B, Nk, C]``; ``key_bias`` broadcasts to
    ``[B, heads, Nq, Nk]`` (e.g. ``key_padding_bias``'s ``[B, 1, 1, Nk]``). ``internal``:
    the width q/k/v are projected to (SAM's downsampled attention; default ``hidden``).
    """

    def __init__(self, hidden: int, num_heads: int, internal: Optional[int] = None):
        internal = hidden if internal is None else internal
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, internal)
        self.k_proj = nn.Linear(hidden, internal)
        self.v_proj = nn.Linear(hidden, internal)
        self.o_proj = nn.Linear(internal, hidden)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_bias: Optional[Tensor] = None) -> Tensor:
        out = attention(self.q_proj(query), self.k_proj(key), self.v_proj(value),
                        self.num_heads, key_bias)
        return self.o_proj(out)


class EmbeddingTable(nn.Module):
    """``nn.Embedding`` whose table is used whole (learned tokens): ``weight [n, C]``."""

    def __init__(self, n: int, hidden: int):
        self.weight = nn.Parameter((n, hidden))


class DecoderMLP(nn.Module):
    """``Sam3DecoderMLP``: 2 or 3 linear layers (``layer1..3``) with ReLU between."""

    def __init__(self, cin: int, hidden: int, cout: int, num_layers: int):
        if num_layers not in (2, 3):
            raise ValueError(f"DecoderMLP supports 2 or 3 layers, got {num_layers}")
        self.layer1 = nn.Linear(cin, hidden)
        if num_layers == 2:
            self.layer2 = nn.Linear(hidden, cout)
            self.layer3 = None
        else:
            self.layer2 = nn.Linear(hidden, hidden)
            self.layer3 = nn.Linear(hidden, cout)

    def forward(self, x: Tensor) -> Tensor:
        x = op.relu(self.layer1(x))
        if self.layer3 is None:
            return self.layer2(x)
        return self.layer3(op.relu(self.layer2(x)))


def clamp(x: Tensor, lo: Optional[float], hi: Optional[float], name: str = "clamp") -> Tensor:
    """Elementwise ``min(max(x, lo), hi)`` (either bound may be None)."""

    def compute(t):
        def f(*idx):
            v = t(*idx)
            if lo is not None:
                v = tirx.max(v, tirx.const(lo, t.dtype))
            if hi is not None:
                v = tirx.min(v, tirx.const(hi, t.dtype))
            return v

        return te.compute(t.shape, f, name=name)

    return op.tensor_expr_op(compute, name, args=[x])


def flatten_tokens(x: Tensor, hidden: int, what: str) -> Tensor:
    """``[B, H, W, C]`` (channel last) or ``[B, H*W, C]`` -> ``[B, H*W, C]``."""
    if len(x.shape) == 4 and int(x.shape[-1]) == hidden:
        b, h, w, c = x.shape
        return op.reshape(x, [b, h * w, c])
    if len(x.shape) == 3 and int(x.shape[-1]) == hidden:
        return x
    raise ValueError(f"{what} must be [B, H, W, {hidden}] (channel last) or [B, H*W, {hidden}], "
                     f"got shape {list(x.shape)}")


class SelfCrossLayer(nn.Module):
    """Pre-norm self-attention, cross-attention and MLP blocks with their LayerNorms
    (the parameters of the DETR encoder's and the geometry encoder's layers; each
    subclass's ``forward`` wires them)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str):
        self.layer_norm1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.self_attn = Attention(hidden, heads)
        self.cross_attn = Attention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.mlp = MLP(hidden, intermediate, act)
        self.layer_norm3 = nn.LayerNorm(hidden, eps=LN_EPS)
