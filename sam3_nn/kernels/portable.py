"""Routes of the attention operators (``sam3_nn.ops.attention``) to the portable
implementations: the fused TIR kernel in its GPU or CPU schedule, the composed path, RoPE
inline or as the standalone kernel. GPU targets without kernels of their own (Metal, OpenCL)
take these tables as they are; the CPU and CUDA tables start from them.

* ``attention``: on GPUs the fused kernel when the bias is absent or a key mask and v is
  as wide as q, else (and for a few queries against many keys) the composed path; on CPUs
  the composed path (its GEMMs run on the register-blocked kernels: the DETR encoder's
  self-attention at full size took 4.6 s in the fused CPU kernel against ~1 s composed).
* ``qkv_attention``: RoPE mode ``normal``, the standalone RoPE kernel then composed attention
  (the CPU default: 672 px, 2 blocks, fp32, 2 threads, 1.85 s against 2.57 s for the fused
  kernel); ``inline``, the fused kernel rotating q/k as it loads them (the GPU default);
  ``none``, the fused kernel without rotation.
* ``qkv_window_attention``: windows partitioned out of the grid, ``qkv_attention`` on them,
  merged back.
"""

from __future__ import annotations

from typing import Dict, Optional

import tvm

from sam3_nn.compiler.options import KernelOptions
from sam3_nn.kernels.rewrite import Route
from sam3_nn.ops import attention as A


def is_gpu(target: Optional[tvm.target.Target]) -> bool:
    return target is not None and "gpu" in target.keys


# The GPU TIR kernel runs one block per (query tile, head) and walks the keys serially in
# it: a handful of queries against thousands of keys (the interactive decoder's tokens
# against the 72 x 72 image) gets a few blocks on a GPU of a hundred SMs, so there the
# composed path (matmul, softmax, matmul over all keys at once) is taken.
FEW_QUERIES = 64
MANY_KEYS = 1024


def few_queries_many_keys(q, k) -> bool:
    nq, nk = q.shape[1], k.shape[1]
    static = all(isinstance(x, (int, tvm.tirx.IntImm)) for x in (nq, nk))
    return static and int(nq) <= FEW_QUERIES and int(nk) >= MANY_KEYS


def default_rope_mode(target: tvm.target.Target) -> str:
    return "inline" if is_gpu(target) else "normal"


def attention_routes(target: tvm.target.Target, opts: KernelOptions) -> Dict[str, Route]:
    gpu = is_gpu(target)
    rope_mode = opts.rope_mode or default_rope_mode(target)
    tiles = opts.gpu_attention_tiles

    def attention(q, k, v, key_bias=None, *, num_heads):
        if gpu and not few_queries_many_keys(q, k) and A.same_dim(q.shape[2], v.shape[2]):
            bias2d = A.key_bias_2d(key_bias, q.shape[0], k.shape[1]) if key_bias is not None else None
            if key_bias is None or bias2d is not None:
                return A.fused_attention(q, k, v, num_heads, int(q.shape[2]) // num_heads,
                                         key_bias=bias2d, gpu=True, target=target, tiles=tiles)
        return A.composed_attention(q, k, v, num_heads, key_bias)

    def qkv_attention(qkv, *, num_heads, rope):
        rope = A.rope_from(rope)
        if rope_mode == "normal":
            return A.composed_qkv_attention(qkv, num_heads, rope)
        head_dim = int(qkv.shape[2]) // (3 * num_heads)
        return A.fused_attention(qkv, qkv, qkv, num_heads, head_dim, A.qkv_offsets(num_heads, head_dim),
                                 rope if rope_mode == "inline" else None, gpu=gpu, target=target,
                                 tiles=tiles)

    def qkv_window_attention(qkv, *, num_heads, rope, window, grid_h, grid_w):
        windows = A.partition_windows(qkv, window, grid_h, grid_w)
        out = qkv_attention(windows, num_heads=num_heads, rope=rope)
        return A.merge_windows(out, qkv.shape[0], window, grid_h, grid_w)

    return {A.ATTENTION: attention, A.QKV_ATTENTION: qkv_attention,
            A.QKV_WINDOW_ATTENTION: qkv_window_attention}
