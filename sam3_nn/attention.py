"""Attention for every part of the model.

Two entry points:

* ``qkv_self_attention``: self-attention straight from a fused q/k/v projection,
  with SAM 3's 2D axial RoPE applied as ``RopeMode`` says (NONE / NORMAL / INLINE).
* ``attention``: multi-head attention on already-projected q, k, v (cross
  attention, text, detector), with an optional additive key mask.

Masks are finite large negatives (``MASK_VALUE``), never ``-inf``: a fully
masked row then gives a uniform (finite) softmax instead of NaNs, and no bool/inf
type inference is involved.
"""

from __future__ import annotations

from tvm.relax.frontend.nn import Tensor, op

from .rope import AxialRope, RopeMode, fused_qkv_rope

MASK_VALUE = -1.0e9  # large negative, finite in fp32; clamps to -65504 in fp16 math


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    x = op.reshape(x, [b, n, num_heads, int(c) // num_heads])
    return op.permute_dims(x, [0, 2, 1, 3])


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    x = op.permute_dims(x, [0, 2, 1, 3])
    return op.reshape(x, [b, n, h * d])


def sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Softmax attention on ``[B, H, N, D]`` tensors, statistics in float32.

    ``bias`` is added to the scores and broadcasts against ``[B, H, Nq, Nk]``.
    """
    dtype = q.dtype
    d = int(q.shape[-1])
    scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2]), out_dtype="float32")
    scores = scores * (d ** -0.5)
    if bias is not None:
        scores = scores + op.astype(bias, "float32")
    probs = op.softmax(scores, axis=-1)
    return op.matmul(op.astype(probs, dtype), v)


def qkv_self_attention(qkv: Tensor, num_heads: int, rope: AxialRope | None,
                       rope_mode: RopeMode = RopeMode.NORMAL) -> Tensor:
    """Self-attention from a fused projection ``[B, N, 3 * hidden]`` -> ``[B, N, hidden]``.

    ``rope_mode`` NORMAL rotates q/k in a standalone kernel; NONE (or ``rope=None``)
    applies no rotation.
    """
    if rope is None or rope_mode == RopeMode.NONE:
        q, k, v = fused_qkv_rope(qkv, num_heads, None)
    elif rope_mode == RopeMode.NORMAL:
        q, k, v = fused_qkv_rope(qkv, num_heads, rope)
    else:
        raise NotImplementedError(f"RopeMode {rope_mode!r} is not available yet")
    return _merge_heads(sdpa(q, k, v))


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
              key_bias: Tensor | None = None) -> Tensor:
    """Multi-head attention on projected ``[B, N, hidden]`` tensors -> ``[B, Nq, hidden]``.

    ``key_bias``: additive bias broadcasting to ``[B, H, Nq, Nk]`` (e.g. ``[B, 1, 1, Nk]``
    holding 0 for kept keys and ``MASK_VALUE`` for padded ones).
    """
    out = sdpa(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), key_bias)
    return _merge_heads(out)
