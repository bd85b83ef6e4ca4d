"""SAM 3's 2D axial rotary position embedding as TIR, in real arithmetic.

Layout of the rotation over a head of dimension ``D`` (what the released model's
complex ``freqs_cis`` encodes):

* the head is split into ``D/2`` pairs ``(x[2p], x[2p+1])`` (interleaved real/imag);
* pairs ``p < D/4`` rotate by ``pos_x * f[p]``, pairs ``p >= D/4`` by ``pos_y * f[p - D/4]``;
* ``f[i] = theta ** (-4 i / D)`` and positions are the token's column/row in its
  grid times ``scale`` (1 in 24x24 windows, 24/72 in the global 72x72 blocks).

cos/sin are computed from the token index inside the kernel; there is no complex
dtype and no precomputed table anywhere in the IR.

``RopeMode`` (NONE / NORMAL / INLINE) is the enum TVM's LLM kernels use: NORMAL is
the standalone kernel here; INLINE fuses the same rotation into the attention
kernel (``sam3_nn.ops.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import te, tirx
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm._kernel_common import RopeMode
from tvm.script import tirx as T

__all__ = ["RopeMode", "AxialRope", "rope_angle", "fused_qkv_rope", "rotate_tokens"]


@dataclass(frozen=True)
class AxialRope:
    """Where the tokens of a sequence sit: a ``grid_h x grid_w`` grid, row-major."""

    grid_h: int
    grid_w: int
    head_dim: int
    theta: float = 10000.0
    scale: float = 1.0

    def __post_init__(self):
        if self.head_dim % 4:
            raise ValueError(f"2D axial RoPE needs head_dim % 4 == 0, got {self.head_dim}")

    @property
    def seq_len(self) -> int:
        return self.grid_h * self.grid_w


def rope_angle(rope: AxialRope, token, pair):
    """Rotation angle (float32 TIR expression) for token index ``token`` and pair ``pair``.

    Computed in the same order as the PyTorch reference (position * scale first,
    then * inverse frequency) so float32 results agree to the last bits.
    """
    quarter = rope.head_dim // 4
    is_x = pair < quarter
    pos_i = T.if_then_else(is_x, tirx.floormod(token, rope.grid_w), tirx.floordiv(token, rope.grid_w))
    pos = T.Cast("float32", pos_i) * T.float32(rope.scale)
    freq_i = T.if_then_else(is_x, pair, pair - quarter)
    # theta ** -(2 i / (D/2)), written as the reference does: 1 / theta ** (2 i / (D/2))
    inv_freq = T.float32(1.0) / T.pow(
        T.float32(rope.theta), T.Cast("float32", freq_i * 2) / T.float32(rope.head_dim // 2)
    )
    return pos * inv_freq


def rotate_element(rope: AxialRope, load, token, d):
    """Rotated value of element ``d`` of a head, ``load(j)`` reading element ``j`` (as float32)."""
    angle = rope_angle(rope, token, tirx.floordiv(d, 2))
    even = tirx.floormod(d, 2) == 0
    partner = T.if_then_else(even, -load(d + 1), load(d - 1))
    return load(d) * T.cos(angle) + partner * T.sin(angle)


def fused_qkv_rope(qkv: Tensor, num_heads: int, rope: AxialRope | None) -> tuple:
    """Split a fused qkv projection, rotate q and k, lay all three out for attention.

    ``qkv``: ``[B, N, 3 * num_heads * D]`` (the output of one fused q/k/v GEMM).
    Returns ``q, k, v`` as ``[B, num_heads, N, D]``; q and k rotated when ``rope``
    is given (``RopeMode.NORMAL``), copied as they are when it is ``None``.
    One pass over the data: the rotation costs no extra memory round trip.
    """
    b, n, width = qkv.shape
    dtype = qkv.dtype
    head_dim = int(width) // (3 * num_heads)
    if head_dim * 3 * num_heads != int(width):
        raise ValueError(f"qkv width {width} is not 3 * {num_heads} heads * head_dim")
    if rope is not None and rope.head_dim != head_dim:
        raise ValueError(f"rope head_dim {rope.head_dim} != attention head_dim {head_dim}")
    if rope is not None and isinstance(n, int) and n != rope.seq_len:
        raise ValueError(f"sequence of {n} tokens does not fit a {rope.grid_h}x{rope.grid_w} grid")
    hidden = num_heads * head_dim

    quarter = head_dim // 4
    positions = max(rope.grid_h, rope.grid_w) if rope is not None else 1
    scale = float(rope.scale) if rope is not None else 1.0

    def inv_freq(i):
        # theta ** -(2 i / (D/2)), written as the reference does: 1 / theta ** (2 i / (D/2))
        return T.float32(1.0) / T.pow(T.float32(rope.theta if rope is not None else 1.0),
                                      T.Cast("float32", i * 2) / T.float32(head_dim // 2))

    def rotated(buf, cos_t, sin_t, bb, s, h, d, offset):
        """Element ``d`` of head ``h`` of the projection starting at ``offset`` (0: q, hidden: k).
        cos/sin come from per-call tables over the grid's coordinates (``positions x D/4``
        angles, the same float32 values as ``rope_angle``) instead of three transcendental
        calls per element."""
        base = offset + h * head_dim
        if rope is None:
            return buf[bb, s, base + d]
        pair = tirx.floordiv(d, 2)
        is_x = pair < quarter
        pos = T.if_then_else(is_x, tirx.floormod(s, rope.grid_w), tirx.floordiv(s, rope.grid_w))
        i = T.if_then_else(is_x, pair, pair - quarter)
        x = T.Cast("float32", buf[bb, s, base + d])
        partner = T.if_then_else(tirx.floormod(d, 2) == 0, -T.Cast("float32", buf[bb, s, base + d + 1]),
                                 T.Cast("float32", buf[bb, s, base + d - 1]))
        return T.Cast(dtype, x * cos_t[pos, i] + partner * sin_t[pos, i])

    @T.prim_func(private=True, s_tir=True)
    def sam3_qkv_rope(var_qkv: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        batch = T.int64()
        seq = T.int64()
        src = T.match_buffer(var_qkv, (batch, seq, 3 * hidden), dtype)
        q = T.match_buffer(var_q, (batch, num_heads, seq, head_dim), dtype)
        k = T.match_buffer(var_k, (batch, num_heads, seq, head_dim), dtype)
        v = T.match_buffer(var_v, (batch, num_heads, seq, head_dim), dtype)
        cos_t = T.sblock_alloc_buffer((positions, quarter), "float32")
        sin_t = T.sblock_alloc_buffer((positions, quarter), "float32")
        for p, i in T.grid(positions, quarter):
            with T.sblock("rope_table"):
                vp, vi = T.axis.remap("SS", [p, i])
                cos_t[vp, vi] = T.cos(T.Cast("float32", vp) * T.float32(scale) * inv_freq(vi))
                sin_t[vp, vi] = T.sin(T.Cast("float32", vp) * T.float32(scale) * inv_freq(vi))
        for iters in T.grid(batch, seq, num_heads, head_dim):
            with T.sblock("q_rope"):
                bb, s, h, d = T.axis.remap("SSSS", iters)
                q[bb, h, s, d] = rotated(src, cos_t, sin_t, bb, s, h, d, 0)
        for iters in T.grid(batch, seq, num_heads, head_dim):
            with T.sblock("k_rope"):
                bb, s, h, d = T.axis.remap("SSSS", iters)
                k[bb, h, s, d] = rotated(src, cos_t, sin_t, bb, s, h, d, hidden)
        for iters in T.grid(batch, seq, num_heads, head_dim):
            with T.sblock("v_copy"):
                bb, s, h, d = T.axis.remap("SSSS", iters)
                v[bb, h, s, d] = src[bb, s, 2 * hidden + h * head_dim + d]

    out_shape = (b, num_heads, n, head_dim)
    return op.tensor_ir_op(
        sam3_qkv_rope,
        "sam3_qkv_rope" if rope is not None else "sam3_qkv_split",
        args=[qkv],
        out=(
            Tensor.placeholder(out_shape, dtype),
            Tensor.placeholder(out_shape, dtype),
            Tensor.placeholder(out_shape, dtype),
        ),
    )


def rotate_tokens(x: Tensor, rope: AxialRope, num_heads: int, rotated=None) -> Tensor:
    """``x [B, N, num_heads * D]`` with every head rotated by ``rope``; token ``n`` sits at
    grid position ``n % (grid_h * grid_w)`` (the reference's repeat of the table over the
    memory frames of a cross attention's keys). Tokens from ``rotated`` on (an int; default
    all) pass unrotated (the memory's object-pointer tokens). Rotation in float32, as the
    reference upcasts."""
    b, n, width = x.shape
    head_dim = int(width) // num_heads
    if head_dim != rope.head_dim:
        raise ValueError(f"rope head_dim {rope.head_dim} != attention head_dim {head_dim}")
    limit = int(n) if rotated is None else int(rotated)
    seq = rope.seq_len
    dtype = x.dtype

    def compute(t):
        def f(bb, s, c):
            d = tirx.floormod(c, head_dim)
            base = c - d

            def load(j):
                return tirx.Cast("float32", t[bb, s, base + j])

            value = rotate_element(rope, load, tirx.floormod(s, seq), d)
            return tirx.Select(s < limit, tirx.Cast(dtype, value), t[bb, s, c])

        return te.compute(t.shape, f, name="rope_tokens")

    return op.tensor_expr_op(compute, "rope_tokens", args=[x])
