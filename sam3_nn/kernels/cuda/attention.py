"""The fused attention on CUDA: a hand-written tensor-core kernel instead of the TIR one.

``sam3_nn/kernels/cuda/attention.cu`` (flash-attention style, mma.sync; wgmma on sm_90a
for head dim 64) computes exactly what ``sam3_nn.ops.attention_tir`` does (2D axial RoPE
applied to q/k tiles in shared memory, key bias, fused-qkv column offsets, heads merged in
the output). TIR has no practical route to tensor-core flash attention in TVM 0.27, so on
CUDA, for float16 and head dims 32/64/128/256, the attention operators are routed to a
``call_dps_packed`` of the kernel's tvm-ffi entry point (:func:`attention_routes`, :func:`emit`);
float32, other head dims and other GPU targets keep the TIR kernel, llvm the CPU one.

The kernel's object file must be linked into the library: :func:`attach_pass` (a Relax
module pass, cheap when the module does not call the kernel) compiles ``attention.cu``
with nvcc through ``sam3_nn.kernels.cuda.source`` (cached) and attaches it. It has to run
in the CUDA pipeline before the build (``relax.build``/``tvm.compile``);
``sam3_nn.kernels.cuda.routing_passes`` puts it there for every CUDA target.

Window mode (:func:`emit_window`, the route of ``qkv_window_attention`` with RoPE inline):
the kernel reads each window's rows straight from the
unpartitioned ``[B, H*W, 3C]`` projection and writes them back to ``[B, H*W, C]``, so the
partition/unpartition transposes around the attention disappear.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import tvm
from tvm.relax.frontend.nn import Tensor, op

from sam3_nn.compiler.options import KernelOptions, Toolchain
from sam3_nn.kernels import portable
from sam3_nn.kernels.cuda import source as cuda_source
from sam3_nn.kernels.cuda.gemm import cutlass_route
from sam3_nn.kernels.rewrite import Route
from sam3_nn.ops import attention as A
from sam3_nn.ops.rope import AxialRope

SYMBOL = "sam3_attention_cuda"
SYMBOL_BIAS = "sam3_attention_cuda_bias"
SYMBOL_WINDOW = "sam3_attention_cuda_window"
SYMBOL_FULL_BIAS = "sam3_attention_cuda_full_bias"
SYMBOL_ROPE_KEYS = "sam3_rope_keys_cuda"
SYMBOL_ROPE_QK = "sam3_rope_qk_cuda"
SYMBOL_V64 = "sam3_attention_cuda_v64"
ROPE_QK_SCALARS = 8  # heads, window, img_h, img_w, grid_h, grid_w, scale, theta
SYMBOLS = (SYMBOL, SYMBOL_BIAS, SYMBOL_WINDOW, SYMBOL_FULL_BIAS, SYMBOL_ROPE_KEYS, SYMBOL_ROPE_QK,
           SYMBOL_V64)
SOURCE = "attention"  # sam3_nn/kernels/cuda/attention.cu
# 128/256: one 16-row m-tile per warp, q fragments reloaded from shared memory at 256 (the
# video tracker's memory attention: one head of 256)
HEAD_DIMS = (32, 64, 128, 256)

def _static_multiple(x, m: int) -> bool:
    return isinstance(x, int) and x % m == 0


# With RoPE, the kernel rotates every k tile it reads, so each query tile of a sequence
# rotates all the keys again. From this many queries per sequence (static) on, a small kernel
# (``sam3_rope_keys_cuda``) rotates the keys once into a compact [B, Nk, heads * D] buffer
# and the attention kernel rotates only q, with the same arithmetic (bit-identical output);
# it pays from this length on (docs/attention_cuda.md).
ROTATE_KEYS_MIN_QUERIES = 512


def _rotate_keys_once(rope: Optional[AxialRope], nq) -> bool:
    return rope is not None and isinstance(nq, int) and nq >= ROTATE_KEYS_MIN_QUERIES


def emit_rope_keys(x: Tensor, k_off: int, num_heads: int, head_dim: int, rope: AxialRope,
                   window: int = 0, grid_h: int = 0, grid_w: int = 0) -> Tensor:
    """Columns ``[k_off, k_off + heads * head_dim)`` of ``x [B, N, W]`` rotated as the kernel
    rotates keys: ``[B, N, heads * head_dim]``. ``window`` > 0: in-window positions of the
    ``grid_h x grid_w`` token grid (window mode); 0: positions on ``rope``'s grid."""
    b, n = x.shape[0], x.shape[1]
    scalars = [int(k_off), int(num_heads), int(window), int(grid_h), int(grid_w),
               int(rope.grid_h), int(rope.grid_w), float(rope.scale), float(rope.theta)]
    return op.extern(SYMBOL_ROPE_KEYS, [x] + scalars,
                     out=Tensor.placeholder((b, n, num_heads * head_dim), x.dtype))


def emit_rope_qk(qkv: Tensor, num_heads: int, rope: AxialRope, window: int = 0, grid_h: int = 0,
                 grid_w: int = 0) -> Tensor:
    """``qkv [B, N, 3 * heads * D]`` with its q and k columns rotated as the kernel rotates keys
    (``window`` > 0: in-window positions of the ``grid_h x grid_w`` token grid; 0: positions on
    ``rope``'s grid), v copied: the same shape. The GEMM rewrite fuses it into the epilogue of
    the projection that produced ``qkv`` (``sam3_cutlass_gemm_nk_bias_rope_qk``, same scalars)."""
    scalars = [int(num_heads), int(window), int(grid_h), int(grid_w), int(rope.grid_h),
               int(rope.grid_w), float(rope.scale), float(rope.theta)]
    assert len(scalars) == ROPE_QK_SCALARS
    return op.extern(SYMBOL_ROPE_QK, [qkv] + scalars, out=Tensor.placeholder(qkv.shape, qkv.dtype))


def rope_in_projection(fusable: bool, head_dim: int, nq) -> bool:
    """Whether a RoPE self-attention of ``nq`` queries on a fused projection rotates q and k in
    the projection's output (``emit_rope_qk``, the qkv GEMM's epilogue after the GEMM rewrite;
    the kernel then runs without RoPE): ``fusable`` (the option is on and the library's GEMMs
    take the CUTLASS route, which fuses the rotation), long sequences (as
    ``_rotate_keys_once``) and head dim 64."""
    return fusable and head_dim == 64 and isinstance(nq, int) and nq >= ROTATE_KEYS_MIN_QUERIES


def supported(dtype: str, head_dim: int, widths, offsets) -> bool:
    """Whether the kernel takes this call: float16, head dim in ``HEAD_DIMS``, and 16-byte aligned rows
    and head columns (widths and offsets multiples of 8 elements)."""
    if dtype != "float16" or head_dim not in HEAD_DIMS:
        return False
    return all(_static_multiple(w, 8) for w in widths) and all(_static_multiple(o, 8) for o in offsets)


def emit(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int, offsets,
         rope: Optional[AxialRope], key_bias: Optional[Tensor], fuse_rope: bool = False) -> Tensor:
    """``call_dps_packed`` of the kernel; same arguments and result as ``fused_attention``.
    ``fuse_rope``: a fused-qkv RoPE self-attention may rotate in the projection
    (``rope_in_projection``; False: the keys-rotated path)."""
    b, nq = q.shape[0], q.shape[1]
    grid_h, grid_w = (rope.grid_h, rope.grid_w) if rope is not None else (0, 0)
    scale = float(rope.scale) if rope is not None else 1.0
    theta = float(rope.theta) if rope is not None else 10000.0
    offsets = [int(o) for o in offsets]
    hidden = num_heads * head_dim
    if (rope is not None and key_bias is None and q._expr.same_as(k._expr) and q._expr.same_as(v._expr)
            and offsets == [0, hidden, 2 * hidden] and int(q.shape[2]) == 3 * hidden
            and rope_in_projection(fuse_rope, head_dim, nq)):
        qkv = emit_rope_qk(q, num_heads, rope)
        return emit(qkv, qkv, qkv, num_heads, head_dim, offsets, None, None)
    keys_rotated = _rotate_keys_once(rope, nq)
    if keys_rotated:
        k = emit_rope_keys(k, offsets[1], num_heads, head_dim, rope)
        offsets[1] = 0
    tensors = [q, k, v] + ([op.astype(key_bias, "float32")] if key_bias is not None else [])
    scalars = [int(num_heads), offsets[0], offsets[1], offsets[2],
               int(grid_h), int(grid_w), scale, theta, int(keys_rotated)]
    return op.extern(SYMBOL_BIAS if key_bias is not None else SYMBOL, tensors + scalars,
                     out=Tensor.placeholder((b, nq, num_heads * head_dim), q.dtype))


def supported_v64(dtype: str, num_heads: int, widths) -> bool:
    """Whether the kernel takes an attention with narrower values: float16, q/k heads of 256,
    v heads of 64 (the memory attention's cross-attention, its value projection applied after
    the attention), static widths."""
    q_w, k_w, v_w = widths
    return (dtype == "float16" and all(isinstance(w, int) for w in widths)
            and q_w == k_w == 256 * num_heads and v_w == 64 * num_heads)


def emit_v64(q: Tensor, k: Tensor, v: Tensor, num_heads: int, key_bias: Tensor) -> Tensor:
    """``call_dps_packed`` of the kernel for 256-wide q/k heads and 64-wide v heads, with a
    ``[B or 1, Nk]`` key bias: ``[B, Nq, num_heads * 64]``."""
    b, nq = q.shape[0], q.shape[1]
    scalars = [int(num_heads), 0, 0, 1.0, 10000.0, 0]
    return op.extern(SYMBOL_V64, [q, k, v, op.astype(key_bias, "float32")] + scalars,
                     out=Tensor.placeholder((b, nq, num_heads * 64), q.dtype))


def supported_full_bias(dtype: str, head_dim: int, widths, nk) -> bool:
    """Whether the kernel takes an attention with a full ``[B or 1, H, Nq, Nk]`` bias:
    as :func:`supported` (offsets 0), and ``Nk`` static and even (pairs of fp16 bias
    values are read as one aligned ``half2``)."""
    return supported(dtype, head_dim, widths, (0, 0, 0)) and _static_multiple(nk, 2)


def emit_full_bias(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int,
                   bias: Tensor) -> Tensor:
    """``call_dps_packed`` of the kernel with a full bias ``[B or 1, H, Nq, Nk]`` (read as
    fp16) added to the scores; ``q [B, Nq, H*D]``, ``k``/``v [B, Nk, H*D]``, no RoPE."""
    b, nq = q.shape[0], q.shape[1]
    bias = bias if bias.dtype == "float16" else op.astype(bias, "float16")
    scalars = [int(num_heads), 0, 0, 0]
    return op.extern(SYMBOL_FULL_BIAS, [q, k, v, bias] + scalars,
                     out=Tensor.placeholder((b, nq, num_heads * head_dim), q.dtype))


def emit_window(qkv: Tensor, num_heads: int, head_dim: int, window: int, grid_h: int, grid_w: int,
                rope: Optional[AxialRope], fuse_rope: bool = False) -> Tensor:
    """Windowed self-attention in window mode, on the unpartitioned fused projection.

    ``qkv``: ``[B, grid_h * grid_w, 3 * hidden]`` rows of a ``grid_h x grid_w`` token grid
    (multiples of ``window``); each ``window x window`` window attends within itself with
    ``rope`` over its in-window positions, exactly as ``qkv_self_attention`` on the
    partitioned ``[B * windows, window^2, 3 * hidden]`` would, and its output rows land at the
    same unpartitioned rows: ``[B, grid_h * grid_w, hidden]``, no transposes around it.
    """
    b, n = qkv.shape[0], qkv.shape[1]
    hidden = num_heads * head_dim
    rgh, rgw = (rope.grid_h, rope.grid_w) if rope is not None else (0, 0)
    scale = float(rope.scale) if rope is not None else 1.0
    theta = float(rope.theta) if rope is not None else 10000.0
    if rope is not None and rope_in_projection(fuse_rope, head_dim, window * window):
        qkv = emit_rope_qk(qkv, num_heads, rope, window, grid_h, grid_w)
        return emit_window(qkv, num_heads, head_dim, window, grid_h, grid_w, None)
    keys_rotated = _rotate_keys_once(rope, window * window)
    k, k_off = qkv, hidden
    if keys_rotated:
        k, k_off = emit_rope_keys(qkv, hidden, num_heads, head_dim, rope, window, grid_h, grid_w), 0
    scalars = [int(num_heads), 0, k_off, 2 * hidden, int(window), int(grid_h), int(grid_w),
               int(rgh), int(rgw), scale, theta, int(keys_rotated)]
    return op.extern(SYMBOL_WINDOW, [qkv, k, qkv] + scalars,
                     out=Tensor.placeholder((b, n, hidden), qkv.dtype))


def calls_kernel(mod: tvm.IRModule) -> bool:
    """Whether a Relax function of ``mod`` calls the kernel."""
    return cuda_source.calls_extern(mod, SYMBOLS)


def attach_pass(target: Optional[tvm.target.Target] = None,
                cuda_arches: Optional[Sequence[str]] = None, log=lambda s: None,
                defines: Sequence[str] = (), toolchain: Toolchain = Toolchain()) -> tvm.transform.Pass:
    """Module pass: compile ``attention.cu`` for ``cuda_arches`` (default: the target's arch)
    and attach the object when the module calls the kernel."""
    return cuda_source.attach_pass(SOURCE, SYMBOLS, "attention", target, cuda_arches, log,
                                   defines, toolchain)


def attention_routes(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]],
                     opts: KernelOptions) -> Dict[str, Route]:
    """The portable routes (``sam3_nn.kernels.portable``) with the kernel taking the calls it
    supports (``opts.cuda_attention``); RoPE inline (the default on CUDA) is what it runs."""
    routes = portable.attention_routes(target, opts)
    if not opts.cuda_attention:
        return routes
    rope_mode = opts.rope_mode or portable.default_rope_mode(target)
    fuse_rope = opts.rope_in_projection and opts.cutlass and cutlass_route(
        cuda_source.sass_arches(target, cuda_arches, "attention"))
    base_attention, base_qkv, base_window = (routes[A.ATTENTION], routes[A.QKV_ATTENTION],
                                             routes[A.QKV_WINDOW_ATTENTION])

    def attention(q, k, v, key_bias=None, *, num_heads):
        b, nq, c = q.shape
        head_dim = int(c) // num_heads
        widths = (c, k.shape[2], v.shape[2])
        bias2d = A.key_bias_2d(key_bias, b, k.shape[1]) if key_bias is not None else None
        if not A.same_dim(c, v.shape[2]):  # values narrower than q/k
            if bias2d is not None and supported_v64(q.dtype, num_heads, widths):
                return emit_v64(q, k, v, num_heads, bias2d)
            return base_attention(q, k, v, key_bias, num_heads=num_heads)
        if (key_bias is None or bias2d is not None) and supported(q.dtype, head_dim, widths, (0, 0, 0)):
            return emit(q, k, v, num_heads, head_dim, (0, 0, 0), None, bias2d)
        if (key_bias is not None and bias2d is None
                and A.is_full_bias(key_bias, b, num_heads, nq, k.shape[1])
                and supported_full_bias(q.dtype, head_dim, widths, k.shape[1])):
            return emit_full_bias(q, k, v, num_heads, head_dim, key_bias)
        return base_attention(q, k, v, key_bias, num_heads=num_heads)

    def qkv_attention(qkv, *, num_heads, rope):
        head_dim = int(qkv.shape[2]) // (3 * num_heads)
        offsets = A.qkv_offsets(num_heads, head_dim)
        if rope_mode == "normal" or not supported(qkv.dtype, head_dim, (qkv.shape[2],) * 3, offsets):
            return base_qkv(qkv, num_heads=num_heads, rope=rope)
        use = A.rope_from(rope) if rope_mode == "inline" else None
        return emit(qkv, qkv, qkv, num_heads, head_dim, offsets, use, None, fuse_rope)

    def qkv_window_attention(qkv, *, num_heads, rope, window, grid_h, grid_w):
        head_dim = int(qkv.shape[2]) // (3 * num_heads)
        offsets = A.qkv_offsets(num_heads, head_dim)
        if rope_mode != "inline" or rope is None or not supported(qkv.dtype, head_dim,
                                                                  (qkv.shape[2],), offsets):
            return base_window(qkv, num_heads=num_heads, rope=rope, window=window,
                               grid_h=grid_h, grid_w=grid_w)
        return emit_window(qkv, num_heads, head_dim, window, grid_h, grid_w, A.rope_from(rope),
                           fuse_rope)

    return {A.ATTENTION: attention, A.QKV_ATTENTION: qkv_attention,
            A.QKV_WINDOW_ATTENTION: qkv_window_attention}
