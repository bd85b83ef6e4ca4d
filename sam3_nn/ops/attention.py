"""Attention: the operators the model writes, and the portable implementations their
routes are built from.

The operators (model code calls these and nothing else):

* :func:`attention`: multi-head attention on projected q, k, v (cross attention, text,
  detector), with an optional additive key mask;
* :func:`qkv_self_attention`: self-attention straight from a fused q/k/v projection, with
  SAM 3's 2D axial RoPE when ``rope`` is given;
* :func:`qkv_window_attention`: the same within ``window x window`` windows of a token grid,
  on the unpartitioned projection.

Each emits one call (``call_dps_packed`` of ``sam3.op.<name>``, its parameters as a JSON
string after the tensors) that stands for the operator in the traced module. The compiler
pipeline replaces every such call with an implementation chosen for the target
(:func:`sam3_nn.kernels.rewrite.route_ops_pass`; the tables are in ``sam3_nn.kernels``): the
fused TIR kernel below (GPU or CPU schedule), RoPE inline in it or as the standalone kernel
(``RopeMode`` INLINE / NORMAL, a build option), the composed path, or a hand-written kernel.
A call left without a route is a build error.

Portable implementations: :func:`sdpa` (composed softmax attention), :func:`fused_attention`
(the flash-style TIR kernel of ``sam3_nn.ops.attention_tir``), :func:`composed_qkv_attention`
(``fused_qkv_rope`` then ``sdpa``), :func:`partition_windows` / :func:`merge_windows`.

Masks are finite large negatives (``MASK_VALUE``), never ``-inf``: a fully masked row then
gives a uniform (finite) softmax instead of NaNs, and no bool/inf type inference is involved.
"""

from __future__ import annotations

import json
from typing import Dict, Optional

import tvm_ffi
from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.ops.attention_tir import attention_kernel_for, kernel_name
from sam3_nn.ops.rope import AxialRope, fused_qkv_rope

MASK_VALUE = -1.0e9  # large negative, finite in fp32; clamps to -65504 in fp16 math

OP_PREFIX = "sam3.op."
ATTENTION = OP_PREFIX + "attention"
QKV_ATTENTION = OP_PREFIX + "qkv_attention"
QKV_WINDOW_ATTENTION = OP_PREFIX + "qkv_window_attention"
OPS = (ATTENTION, QKV_ATTENTION, QKV_WINDOW_ATTENTION)


# ---------------------------------------------------------------------------------------
# the operators
# ---------------------------------------------------------------------------------------

def rope_params(rope: Optional[AxialRope]) -> Optional[Dict]:
    return None if rope is None else {"grid_h": rope.grid_h, "grid_w": rope.grid_w,
                                      "head_dim": rope.head_dim, "theta": float(rope.theta),
                                      "scale": float(rope.scale)}


def rope_from(params: Optional[Dict]) -> Optional[AxialRope]:
    return None if params is None else AxialRope(**params)


def _emit_op(name: str, tensors, params: Dict, shape, dtype: str) -> Tensor:
    return op.extern(name, list(tensors) + [json.dumps(params, sort_keys=True)],
                     out=Tensor.placeholder(shape, dtype))


def _check_qkv(qkv: Tensor, num_heads: int, rope: Optional[AxialRope]) -> int:
    width = int(qkv.shape[2])
    head_dim = width // (3 * num_heads)
    if head_dim * 3 * num_heads != width:
        raise ValueError(f"qkv width {width} is not 3 * {num_heads} heads * head_dim")
    if rope is not None and rope.head_dim != head_dim:
        raise ValueError(f"rope head_dim {rope.head_dim} != attention head_dim {head_dim}")
    return head_dim


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
              key_bias: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention on projected ``[B, Nq, hidden]`` q, ``[B, Nk, hidden]`` k and
    ``[B, Nk, hidden_v]`` v -> ``[B, Nq, hidden_v]`` (``hidden_v``: usually ``hidden``; narrower
    where the value projection is applied after the attention, as the memory attention does).

    ``key_bias``: additive bias broadcasting to ``[B, H, Nq, Nk]`` (e.g. ``[B, 1, 1, Nk]``
    holding 0 for kept keys and ``MASK_VALUE`` for padded ones, or a per-query, per-head
    ``[B or 1, H, Nq, Nk]``)."""
    b, nq, c = q.shape
    cv = v.shape[2]
    if int(c) % num_heads or int(cv) % num_heads:
        raise ValueError(f"q width {c} and v width {cv} must be multiples of {num_heads} heads")
    tensors = [q, k, v] + ([key_bias] if key_bias is not None else [])
    return _emit_op(ATTENTION, tensors, {"num_heads": num_heads}, (b, nq, cv), q.dtype)


def qkv_self_attention(qkv: Tensor, num_heads: int, rope: Optional[AxialRope] = None) -> Tensor:
    """Self-attention from a fused projection ``[B, N, 3 * hidden]`` -> ``[B, N, hidden]``,
    q and k rotated by ``rope`` (None: no rotation)."""
    b, n, _ = qkv.shape
    head_dim = _check_qkv(qkv, num_heads, rope)
    if rope is not None and isinstance(n, int) and n != rope.seq_len:
        raise ValueError(f"sequence of {n} tokens does not fit a {rope.grid_h}x{rope.grid_w} grid")
    return _emit_op(QKV_ATTENTION, [qkv], {"num_heads": num_heads, "rope": rope_params(rope)},
                    (b, n, num_heads * head_dim), qkv.dtype)


def qkv_window_attention(qkv: Tensor, num_heads: int, rope: Optional[AxialRope], window: int,
                         grid_h: int, grid_w: int) -> Tensor:
    """Windowed self-attention on the unpartitioned fused projection ``[B, grid_h*grid_w, 3C]``
    (rows of a row-major token grid) -> ``[B, grid_h*grid_w, C]``: each ``window x window``
    window attends within itself, ``rope`` (the window's grid) over in-window positions, and
    its output rows land at the input's rows. ``grid_h``/``grid_w``: multiples of ``window``."""
    b, n, _ = qkv.shape
    head_dim = _check_qkv(qkv, num_heads, rope)
    if grid_h % window or grid_w % window:
        raise ValueError(f"a {grid_h}x{grid_w} grid is not a whole number of {window}x{window} windows")
    if isinstance(n, int) and n != grid_h * grid_w:
        raise ValueError(f"{n} tokens are not a {grid_h}x{grid_w} grid")
    if rope is not None and (rope.grid_h, rope.grid_w) != (window, window):
        raise ValueError(f"window RoPE grid must be {window}x{window}, got {rope.grid_h}x{rope.grid_w}")
    params = {"num_heads": num_heads, "rope": rope_params(rope), "window": window,
              "grid_h": grid_h, "grid_w": grid_w}
    return _emit_op(QKV_WINDOW_ATTENTION, [qkv], params, (b, n, num_heads * head_dim), qkv.dtype)


def key_padding_bias(mask: Tensor) -> Tensor:
    """``[B, N]`` key mask (nonzero = valid, 0 = padding, any dtype) -> ``[B, 1, 1, N]``
    float32 additive bias: 0 for valid keys, ``MASK_VALUE`` (finite) for padded ones."""
    if len(mask.shape) != 2:
        raise ValueError(f"a key mask must be [batch, keys], got shape {list(mask.shape)}")

    def compute(m):
        b, n = m.shape
        return te.compute(
            (b, 1, 1, n),
            lambda i, _a, _b, j: tirx.Select(m[i, j] != tirx.const(0, m.dtype),
                                             tirx.const(0.0, "float32"),
                                             tirx.const(MASK_VALUE, "float32")),
            name="key_padding_bias")

    return op.tensor_expr_op(compute, "key_padding_bias", args=[mask])


# ---------------------------------------------------------------------------------------
# portable implementations (what the routes in sam3_nn.kernels are made of)
# ---------------------------------------------------------------------------------------

def same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return bool(tvm_ffi.structural_equal(a, b))


def key_bias_2d(key_bias: Tensor, batch, nk) -> Optional[Tensor]:
    """``key_bias`` as ``[B or 1, Nk]`` if it only varies over batch and key, else None."""
    shape = list(key_bias.shape)
    if not 2 <= len(shape) <= 4:
        return None
    if not all(isinstance(s, int) and s == 1 for s in shape[1:-1]):
        return None
    if not same_dim(shape[-1], nk):
        return None
    if not (same_dim(shape[0], 1) or same_dim(shape[0], batch)):
        return None
    return op.reshape(key_bias, [shape[0], shape[-1]])


def is_full_bias(bias: Tensor, batch, heads: int, nq, nk) -> bool:
    """``bias`` is ``[B or 1, heads, Nq, Nk]`` (a per-query, per-head bias)."""
    s = list(bias.shape)
    return (len(s) == 4 and (same_dim(s[0], 1) or same_dim(s[0], batch)) and same_dim(s[1], heads)
            and same_dim(s[2], nq) and same_dim(s[3], nk))


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    x = op.reshape(x, [b, n, num_heads, int(c) // num_heads])
    return op.permute_dims(x, [0, 2, 1, 3])


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    x = op.permute_dims(x, [0, 2, 1, 3])
    return op.reshape(x, [b, n, h * d])


def sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention on ``[B, H, N, D]`` tensors, statistics in float32.

    ``bias`` is added to the scores and broadcasts against ``[B, H, Nq, Nk]``.
    """
    dtype = q.dtype
    d = int(q.shape[-1])
    # the scale goes on q (N x D), not on the N x N scores: one pass less over the largest
    # tensor (1.1 s of the full-size CPU encoder)
    q = q * (d ** -0.5)
    scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2]), out_dtype="float32")
    if bias is not None:
        scores = scores + op.astype(bias, "float32")
    probs = op.softmax(scores, axis=-1)
    return op.matmul(op.astype(probs, dtype), v)


def composed_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                       key_bias: Optional[Tensor] = None) -> Tensor:
    """:func:`attention` as relax ops (GEMMs + softmax): heads split, ``sdpa``, merged."""
    out = sdpa(split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads),
               key_bias)
    return merge_heads(out)


def composed_qkv_attention(qkv: Tensor, num_heads: int, rope: Optional[AxialRope]) -> Tensor:
    """:func:`qkv_self_attention` with RoPE as the standalone kernel (``RopeMode.NORMAL``):
    split + rotate in one pass, then ``sdpa``."""
    q, k, v = fused_qkv_rope(qkv, num_heads, rope)
    return merge_heads(sdpa(q, k, v))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int,
                    offsets=(0, 0, 0), rope: Optional[AxialRope] = None,
                    key_bias: Optional[Tensor] = None, gpu: bool = False, target=None,
                    tiles: Optional[tuple] = None) -> Tensor:
    """The fused TIR kernel (GPU schedule if ``gpu``, ``tiles`` its block, else the CPU one) on ``[B, N, W]``
    inputs whose heads start at column ``offsets``; RoPE applied inline when ``rope`` is
    given. ``key_bias``: ``[B or 1, Nk]`` additive bias. Returns ``[B, Nq, num_heads *
    head_dim]``."""
    dtype = q.dtype
    b, nq = q.shape[0], q.shape[1]
    bias_batched = key_bias is not None and not (isinstance(key_bias.shape[0], int) and key_bias.shape[0] == 1
                                                  and not (isinstance(b, int) and b == 1))
    func = attention_kernel_for(gpu, target, num_heads, head_dim, dtype, rope, tuple(offsets),
                                key_bias is not None, bias_batched, tiles)
    args = [q, k, v] + ([op.astype(key_bias, "float32")] if key_bias is not None else [])
    return op.tensor_ir_op(func, kernel_name(rope, key_bias is not None), args=args,
                           out=Tensor.placeholder((b, nq, num_heads * head_dim), dtype))


def qkv_offsets(num_heads: int, head_dim: int):
    hidden = num_heads * head_dim
    return (0, hidden, 2 * hidden)


def partition_windows(x: Tensor, window: int, grid_h: int, grid_w: int) -> Tensor:
    """``[B, grid_h * grid_w, C]`` grid rows -> ``[B * windows, window^2, C]`` (row-major
    windows, row-major tokens inside each)."""
    b, _, c = x.shape
    nh, nw = grid_h // window, grid_w // window
    x = op.reshape(x, [b, nh, window, nw, window, c])
    x = op.permute_dims(x, [0, 1, 3, 2, 4, 5])
    return op.reshape(x, [b * nh * nw, window * window, c])


def merge_windows(x: Tensor, batch, window: int, grid_h: int, grid_w: int) -> Tensor:
    """Inverse of :func:`partition_windows`: ``[B * windows, window^2, C]`` -> ``[B, grid_h *
    grid_w, C]``."""
    c = x.shape[2]
    nh, nw = grid_h // window, grid_w // window
    x = op.reshape(x, [batch, nh, nw, window, window, c])
    x = op.permute_dims(x, [0, 1, 3, 2, 4, 5])
    return op.reshape(x, [batch, grid_h * grid_w, c])
