"""Attention for every part of the model.

Two entry points:

* ``qkv_self_attention``: self-attention straight from a fused q/k/v projection,
  with SAM 3's 2D axial RoPE applied as ``RopeMode`` says (NONE / NORMAL / INLINE).
* ``attention``: multi-head attention on already-projected q, k, v (cross
  attention, text, detector), with an optional additive key mask.

Self-attention in ``RopeMode.INLINE`` and ``NONE``, and ``attention`` with no bias or
a key-padding bias, run one fused flash-attention-style TIR kernel
(``sam3_nn.attention_kernels``) straight on the projections: no split copy, no
rotated q/k in memory, no ``Nq x Nk`` score matrix. ``NORMAL`` keeps the standalone
RoPE kernel + composed softmax attention (``sdpa``) as the reference path.

On CUDA, float16 with head dims 32/64 goes to a hand-written tensor-core kernel instead
(``sam3_nn.attention_cuda``, same semantics; its object is linked in by
``attention_cuda.attach_pass``, which every CUDA build pipeline runs); float32 and other
GPU targets keep the TIR kernel.

The TIR kernel comes in a GPU schedule and a CPU one; which is emitted follows the
target in scope at export time (``with tvm.target.Target(...):`` around
``export_tvm``, or ``kernel_target(...)``). With no target in scope, the
self-attention modes that need the kernel (INLINE / NONE) emit the CPU one.
``attention`` (DETR, text, geometry layers) takes the fused kernel on GPUs only; on
CPUs the composed path, which measured faster there.

Masks are finite large negatives (``MASK_VALUE``), never ``-inf``: a fully
masked row then gives a uniform (finite) softmax instead of NaNs, and no bool/inf
type inference is involved.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import tvm
import tvm_ffi
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from . import attention_cuda
from .attention_kernels import attention_kernel, is_gpu, kernel_name
from .rope import AxialRope, RopeMode, fused_qkv_rope

MASK_VALUE = -1.0e9  # large negative, finite in fp32; clamps to -65504 in fp16 math


_KERNEL_TARGET: list = []


@contextlib.contextmanager
def kernel_target(target):
    """Emit attention kernels for ``target`` (a ``tvm.target.Target``, dict or str) meanwhile."""
    _KERNEL_TARGET.append(tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target)
    try:
        yield
    finally:
        _KERNEL_TARGET.pop()


def current_kernel_target() -> Optional[tvm.target.Target]:
    if _KERNEL_TARGET:
        return _KERNEL_TARGET[-1]
    return tvm.target.Target.current(allow_none=True)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int,
                    offsets=(0, 0, 0), rope: AxialRope | None = None,
                    key_bias: Tensor | None = None) -> Tensor:
    """The fused kernel on ``[B, N, W]`` inputs whose heads start at column ``offsets``.

    ``key_bias``: ``[B or 1, Nk]`` additive bias. Returns ``[B, Nq, num_heads * head_dim]``.
    """
    dtype = q.dtype
    target = current_kernel_target()
    if attention_cuda.supported(target, dtype, head_dim, (q.shape[2], k.shape[2], v.shape[2]), offsets):
        return attention_cuda.emit(q, k, v, num_heads, head_dim, offsets, rope, key_bias, target)
    b, nq = q.shape[0], q.shape[1]
    bias_batched = key_bias is not None and not (isinstance(key_bias.shape[0], int) and key_bias.shape[0] == 1
                                                  and not (isinstance(b, int) and b == 1))
    func = attention_kernel(target, num_heads, head_dim, dtype, rope,
                            tuple(offsets), key_bias is not None, bias_batched)
    args = [q, k, v] + ([op.astype(key_bias, "float32")] if key_bias is not None else [])
    return op.tensor_ir_op(func, kernel_name(rope, key_bias is not None), args=args,
                           out=Tensor.placeholder((b, nq, num_heads * head_dim), dtype))


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return bool(tvm_ffi.structural_equal(a, b))


def _key_bias_2d(key_bias: Tensor, batch, nk):
    """``key_bias`` as ``[B or 1, Nk]`` if it only varies over batch and key, else None."""
    shape = list(key_bias.shape)
    if not 2 <= len(shape) <= 4:
        return None
    if not all(isinstance(s, int) and s == 1 for s in shape[1:-1]):
        return None
    if not _same_dim(shape[-1], nk):
        return None
    if not (_same_dim(shape[0], 1) or _same_dim(shape[0], batch)):
        return None
    return op.reshape(key_bias, [shape[0], shape[-1]])


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
    # the scale goes on q (N x D), not on the N x N scores: one pass less over the largest
    # tensor (1.1 s of the full-size CPU encoder)
    q = q * (d ** -0.5)
    scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2]), out_dtype="float32")
    if bias is not None:
        scores = scores + op.astype(bias, "float32")
    probs = op.softmax(scores, axis=-1)
    return op.matmul(op.astype(probs, dtype), v)


def qkv_self_attention(qkv: Tensor, num_heads: int, rope: AxialRope | None,
                       rope_mode: RopeMode = RopeMode.NORMAL) -> Tensor:
    """Self-attention from a fused projection ``[B, N, 3 * hidden]`` -> ``[B, N, hidden]``.

    ``rope_mode`` INLINE rotates q/k inside the fused attention kernel; NONE (or
    ``rope=None``) runs the same kernel without rotation; NORMAL rotates q/k in a
    standalone kernel and attends with the composed ``sdpa``.
    """
    if rope_mode == RopeMode.NORMAL:
        q, k, v = fused_qkv_rope(qkv, num_heads, rope)
        return _merge_heads(sdpa(q, k, v))
    if rope_mode not in (RopeMode.INLINE, RopeMode.NONE):
        raise ValueError(f"unknown RopeMode {rope_mode!r}")
    b, n, width = qkv.shape
    head_dim = int(width) // (3 * num_heads)
    if head_dim * 3 * num_heads != int(width):
        raise ValueError(f"qkv width {width} is not 3 * {num_heads} heads * head_dim")
    use = rope if rope_mode == RopeMode.INLINE else None
    if use is not None:
        if use.head_dim != head_dim:
            raise ValueError(f"rope head_dim {use.head_dim} != attention head_dim {head_dim}")
        if isinstance(n, int) and n != use.seq_len:
            raise ValueError(f"sequence of {n} tokens does not fit a {use.grid_h}x{use.grid_w} grid")
    hidden = num_heads * head_dim
    return fused_attention(qkv, qkv, qkv, num_heads, head_dim, (0, hidden, 2 * hidden), use)


def window_mode_supported(dtype: str, num_heads: int, hidden: int, rope: AxialRope | None,
                          rope_mode: RopeMode) -> bool:
    """Whether :func:`qkv_window_attention` can run: the CUDA kernel takes the call (CUDA
    target in scope, float16, head dim 32/64, routing on) and RoPE is INLINE."""
    if rope_mode != RopeMode.INLINE or rope is None or hidden % num_heads:
        return False
    head_dim = hidden // num_heads
    return rope.head_dim == head_dim and attention_cuda.supported(
        current_kernel_target(), dtype, head_dim, (3 * hidden,), (0, hidden, 2 * hidden))


def qkv_window_attention(qkv: Tensor, num_heads: int, rope: AxialRope, window: int,
                         grid_h: int, grid_w: int) -> Tensor:
    """Windowed self-attention on the unpartitioned fused projection ``[B, grid_h*grid_w, 3C]``
    -> ``[B, grid_h*grid_w, C]`` (CUDA window mode; check :func:`window_mode_supported`).

    Same result as partitioning the rows into ``window x window`` windows, running
    ``qkv_self_attention(..., RopeMode.INLINE)`` with ``rope`` (the window's grid) on them and
    unpartitioning, without the two transposes. ``grid_h``/``grid_w``: multiples of ``window``.
    """
    b, n, width = qkv.shape
    hidden = int(width) // 3
    if grid_h % window or grid_w % window:
        raise ValueError(f"a {grid_h}x{grid_w} grid is not a whole number of {window}x{window} windows")
    if isinstance(n, int) and n != grid_h * grid_w:
        raise ValueError(f"{n} tokens are not a {grid_h}x{grid_w} grid")
    if (rope.grid_h, rope.grid_w) != (window, window):
        raise ValueError(f"window RoPE grid must be {window}x{window}, got {rope.grid_h}x{rope.grid_w}")
    return attention_cuda.emit_window(qkv, num_heads, hidden // num_heads, window, grid_h, grid_w, rope,
                                      current_kernel_target())


def _is_full_bias(bias: Tensor, batch, heads: int, nq, nk) -> bool:
    """``bias`` is ``[B or 1, heads, Nq, Nk]`` (a per-query, per-head bias)."""
    s = list(bias.shape)
    return (len(s) == 4 and (_same_dim(s[0], 1) or _same_dim(s[0], batch)) and _same_dim(s[1], heads)
            and _same_dim(s[2], nq) and _same_dim(s[3], nk))


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
              key_bias: Tensor | None = None, fused: bool | None = None) -> Tensor:
    """Multi-head attention on projected ``[B, N, hidden]`` tensors -> ``[B, Nq, hidden]``.

    ``key_bias``: additive bias broadcasting to ``[B, H, Nq, Nk]`` (e.g. ``[B, 1, 1, Nk]``
    holding 0 for kept keys and ``MASK_VALUE`` for padded ones). ``fused``: run the fused
    kernel (needs a kernel target in scope and no bias or such a key-padding one);
    default: on GPU targets only. On CPUs the composed path (GEMM kernels + softmax) is
    faster: DETR encoder self-attention at full size (5184 tokens, 6 layers) took 4.6 s
    in the fused CPU kernel against ~1 s composed. A per-query, per-head bias
    ``[B or 1, H, Nq, Nk]`` takes the fused CUDA kernel where it applies (fp16, head dim
    32/64, even Nk), otherwise the composed path.
    """
    b, nq, c = q.shape
    head_dim = int(c) // num_heads
    bias2d = None
    if key_bias is not None:
        bias2d = _key_bias_2d(key_bias, b, k.shape[1])
    target = current_kernel_target()
    if fused is None:
        fused = is_gpu(target)
    if fused and target is not None and (key_bias is None or bias2d is not None):
        return fused_attention(q, k, v, num_heads, head_dim, (0, 0, 0), None, bias2d)
    if fused and key_bias is not None and _is_full_bias(key_bias, b, num_heads, nq, k.shape[1]) \
            and attention_cuda.supported_full_bias(target, q.dtype, head_dim, (c, k.shape[2], v.shape[2]),
                                                   k.shape[1]):
        return attention_cuda.emit_full_bias(q, k, v, num_heads, head_dim, key_bias)
    out = sdpa(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), key_bias)
    return _merge_heads(out)


class Attention(nn.Module):
    """``Sam3Attention``: separate q/k/v/o projections, multi-head softmax attention.

    ``query [B, Nq, C]``, ``key``/``value [B, Nk, C]``; ``key_bias`` broadcasts to
    ``[B, heads, Nq, Nk]`` (e.g. ``key_padding_bias``'s ``[B, 1, 1, Nk]``).
    """

    def __init__(self, hidden: int, num_heads: int):
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_bias: Optional[Tensor] = None) -> Tensor:
        out = attention(self.q_proj(query), self.k_proj(key), self.v_proj(value),
                        self.num_heads, key_bias)
        return self.o_proj(out)


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
