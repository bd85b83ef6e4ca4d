"""SAM 3's memory attention (the video tracker's ``transformer.encoder``, SAM 2's): the
current frame's features attend to themselves and to the memory bank of earlier frames.

Follows ``transformers``' ``Sam3TrackerVideoMemoryAttention`` (parameter names mirror it):
``num_layers`` pre-norm layers of self-attention with 2D axial RoPE, cross-attention to
the memory with RoPE, and a ReLU MLP; a final LayerNorm. The queries start as the
features plus 0.1 x their sine position encoding. Cross-attention keys and values come
from the 64-wide memory (``kv_in_dim`` 64): the spatial memory of ``M`` frames (``M x
g*g`` tokens, each frame's tokens rotated by the same grid positions: the reference's
repeat of its RoPE table over frames) followed by the object-pointer tokens, which are
not rotated (``num_k_exclude_rope``). A key mask (0: empty slot) lets one compiled
function serve any number of memory frames and pointers up to its static maximum; the
reference concatenates only the present ones, which is the same softmax.

The self-attention goes through the project's ``qkv_self_attention`` operator with the
grid's RoPE (routed per target: RoPE inline in the fused attention kernel, or the
standalone kernel); the cross-attention rotates q and the spatial keys with
``sam3_nn.ops.rope.rotate_tokens`` (the same axial-RoPE arithmetic, ``head_dim/4``
x-pairs then y-pairs, the grid repeated over the memory frames) and goes through
``sam3_nn.ops.attention.attention``. LayerNorm eps 1e-5 (``nn.LayerNorm``).

The cross-attention's value projection is applied after the attention: with one head,
``softmax(S) (M Wv^T + bv) = (softmax(S) M) Wv^T + bv`` (each row of probabilities sums to
1), so the attention reads the 64-wide memory as its values instead of 256-wide projected
ones: a quarter of the probabilities-times-values work and no projected value tensor over
every memory token (the reference projects first; the same result up to rounding).
"""

from __future__ import annotations

from typing import Optional

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.model.common import LN_EPS, linear_nd
from sam3_nn.ops.attention import attention, qkv_self_attention, same_dim
from sam3_nn.ops.rope import AxialRope, rotate_tokens

QUERY_POS_SCALE = 0.1  # output = features + 0.1 * position encoding (the reference's pos_enc_at_input)


class RopeAttention(nn.Module):
    """``Sam3TrackerVideoRoPEAttention``: q/k/v/o projections, q and k rotated."""

    def __init__(self, hidden: int, num_heads: int, kv_in: Optional[int] = None):
        kv_in = hidden if kv_in is None else kv_in
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(kv_in, hidden)
        self.v_proj = nn.Linear(kv_in, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def self_attention(self, x: Tensor, rope: AxialRope) -> Tensor:
        """Self-attention of a token grid: one q/k/v projection (the three weights joined; a
        compiled library joins them once, when weights are bound) into the project's
        ``qkv_self_attention`` operator, whose routes rotate q and k by ``rope`` (inline in
        the attention kernel where the target has one, else the standalone RoPE kernel)."""
        w = op.concat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], dim=0)
        b = op.concat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias], dim=0)
        return self.o_proj(qkv_self_attention(linear_nd(x, w, b), self.num_heads, rope))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, rope: AxialRope,
                rotated_keys=None, key_bias: Optional[Tensor] = None) -> Tensor:
        q = rotate_tokens(self.q_proj(query), rope, self.num_heads)
        k = rotate_tokens(self.k_proj(key), rope, self.num_heads, rotated_keys)
        if self.num_heads == 1 and int(value.shape[-1]) < int(q.shape[-1]):
            # one head, narrower values: project after the attention (module docstring)
            return self.o_proj(self.v_proj(attention(q, k, value, 1, key_bias)))
        out = attention(q, k, self.v_proj(value), self.num_heads, key_bias)
        return self.o_proj(out)


class MemoryAttentionLayer(nn.Module):
    """``Sam3TrackerVideoMemoryAttentionLayer``."""

    def __init__(self, hidden: int, num_heads: int, ffn: int, mem_dim: int):
        self.self_attn = RopeAttention(hidden, num_heads)
        self.cross_attn_image = RopeAttention(hidden, num_heads, mem_dim)
        self.linear1 = nn.Linear(hidden, ffn)
        self.linear2 = nn.Linear(ffn, hidden)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=LN_EPS)
        self.layer_norm3 = nn.LayerNorm(hidden, eps=LN_EPS)

    # the layer in two halves (MemoryAttention runs the first self-attention once per frame)
    def self_block(self, queries: Tensor, rope: AxialRope) -> Tensor:
        return queries + self.self_attn.self_attention(self.layer_norm1(queries), rope)

    def cross_and_mlp(self, queries: Tensor, memory: Tensor, memory_pos: Tensor, rope: AxialRope,
                      rotated_keys: int, key_bias: Tensor) -> Tensor:
        q = self.layer_norm2(queries)
        queries = queries + self.cross_attn_image(q, memory + memory_pos, memory, rope, rotated_keys, key_bias)
        q = self.layer_norm3(queries)
        return queries + self.linear2(op.relu(self.linear1(q)))


class MemoryAttention(nn.Module):
    """``Sam3TrackerVideoMemoryAttention``: ``features [1 or B, g*g, C]`` (row-major grid), their
    ``position [1 or B, g*g, C]``, ``memory [B, K, mem_dim]`` with ``memory_pos`` (same shape),
    the first ``rotated_keys`` of them spatial (``M * g*g``), ``key_bias [B, 1, 1, K]`` ->
    ``[B, g*g, C]``. Features of one frame shared by every object (batch 1) go through the
    first layer's self-attention once, before they meet each object's memory."""

    def __init__(self, hidden: int, num_layers: int, num_heads: int, ffn: int, mem_dim: int,
                 grid: int, theta: float):
        self.rope = AxialRope(grid, grid, hidden // num_heads, theta)
        self.layers = nn.ModuleList([MemoryAttentionLayer(hidden, num_heads, ffn, mem_dim)
                                     for _ in range(num_layers)])
        self.layer_norm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, features: Tensor, position: Tensor, memory: Tensor, memory_pos: Tensor,
                rotated_keys: int, key_bias: Tensor) -> Tensor:
        x = features + position * QUERY_POS_SCALE
        for i, layer in enumerate(self.layers):
            x = layer.self_block(x, self.rope)
            if i == 0 and not same_dim(x.shape[0], memory.shape[0]):
                x = op.broadcast_to(x, [memory.shape[0]] + list(x.shape[1:]))
            x = layer.cross_and_mlp(x, memory, memory_pos, self.rope, rotated_keys, key_bias)
        return self.layer_norm(x)
