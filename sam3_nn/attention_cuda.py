"""The fused attention on CUDA: a hand-written tensor-core kernel instead of the TIR one.

``sam3_nn/kernels/cuda/attention.cu`` (flash-attention style, mma.sync; wgmma on sm_90a
for head dim 64) computes exactly what ``sam3_nn.attention_kernels`` does (2D axial RoPE
applied to q/k tiles in shared memory, key bias, fused-qkv column offsets, heads merged in
the output). TIR has no practical route to tensor-core flash attention in TVM 0.27, so on
CUDA, for float16 and head dims 32/64, :func:`sam3_nn.attention.fused_attention` emits a
``call_dps_packed`` to the kernel's tvm-ffi entry point (:func:`emit`); float32, other
head dims and other GPU targets keep the TIR kernel, llvm the CPU one.

The kernel's object file must be linked into the library: :func:`attach_pass` (a Relax
module pass, cheap when the module does not call the kernel) compiles ``attention.cu``
with nvcc through ``sam3_nn.kernels.cuda_source`` (cached) and attaches it. It has to run
in the CUDA pipeline before the build (``relax.build``/``tvm.compile``);
``sam3_nn.kernels.schedule_passes`` puts it there for every CUDA target.

Window mode (:func:`emit_window`, used by the ViT's windowed blocks when the grid is a
multiple of the window): the kernel reads each window's rows straight from the
unpartitioned ``[B, H*W, 3C]`` projection and writes them back to ``[B, H*W, C]``, so the
partition/unpartition transposes around the attention disappear.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tvm
from tvm.relax.frontend.nn import Tensor, op

from .kernels.switch import Switch
from .rope import AxialRope

SYMBOL = "sam3_attention_cuda"
SYMBOL_BIAS = "sam3_attention_cuda_bias"
SYMBOL_WINDOW = "sam3_attention_cuda_window"
SYMBOL_FULL_BIAS = "sam3_attention_cuda_full_bias"
SYMBOL_ROPE_KEYS = "sam3_rope_keys_cuda"
SYMBOL_ROPE_QK = "sam3_rope_qk_cuda"
ROPE_QK_SCALARS = 8  # heads, window, img_h, img_w, grid_h, grid_w, scale, theta
SYMBOLS = (SYMBOL, SYMBOL_BIAS, SYMBOL_WINDOW, SYMBOL_FULL_BIAS, SYMBOL_ROPE_KEYS, SYMBOL_ROPE_QK)
SOURCE = "attention"  # sam3_nn/kernels/cuda/attention.cu
HEAD_DIMS = (32, 64)

# On: where the GEMM rewrite can fuse it (Hopper CUTLASS route, head dim 64), a RoPE self-
# attention from a fused qkv projection rotates q and k in the projection's output
# (``emit_rope_qk``: the qkv GEMM's epilogue after the rewrite) and the kernel runs without
# RoPE. ``with attention_cuda.ROPE_IN_PROJECTION.disabled():`` keeps the keys-rotated path.
ROPE_IN_PROJECTION = Switch(True)

# On: the CUDA build pipeline (``sam3_nn.kernels.schedule_passes``) runs attach_pass.
# ``with attention_cuda.disabled():`` emits the TIR kernel instead (tests, benchmarks).
SWITCH = Switch(True)


def enabled():
    """Route float16 CUDA attention to the kernel meanwhile."""
    return SWITCH.enabled()


def disabled():
    """Emit the TIR kernel on CUDA too meanwhile."""
    return SWITCH.disabled()


def _static_multiple(x, m: int) -> bool:
    return isinstance(x, int) and x % m == 0


# With RoPE, the kernel rotates every k tile it reads, so each query tile of a sequence
# rotates all the keys again. From this many queries per sequence (static) on, a small kernel
# (``sam3_rope_keys_cuda``) rotates the keys once into a compact [B, Nk, heads * D] buffer
# and the attention kernel rotates only q, with the same arithmetic (bit-identical output).
# H200, fp16, 16 heads x 64: a global ViT block (5184 tokens) 412 -> 322 us, a windowed one
# (576 tokens per window) 68 -> 62 us; the rotation kernel itself is about 8 us.
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


def rope_in_projection(target: Optional[tvm.target.Target], head_dim: int, nq) -> bool:
    """Whether a RoPE self-attention of ``nq`` queries on a fused projection rotates q and k in
    the projection (see ``ROPE_IN_PROJECTION``): long sequences (as ``_rotate_keys_once``),
    head dim 64, and a library whose GEMMs take the CUTLASS route (which fuses the rotation)."""
    if not (ROPE_IN_PROJECTION.on and head_dim == 64 and isinstance(nq, int)
            and nq >= ROTATE_KEYS_MIN_QUERIES and target is not None):
        return False
    from .kernels import cuda as kernels_cuda

    return kernels_cuda.cutlass_route(kernels_cuda.arch_list(target, None))


def supported(target: Optional[tvm.target.Target], dtype: str, head_dim: int, widths, offsets) -> bool:
    """Whether the CUDA kernel takes this call: CUDA target, float16, head dim 32/64, and
    16-byte aligned rows and head columns (widths and offsets multiples of 8 elements)."""
    if not SWITCH.on or target is None or target.kind.name != "cuda":
        return False
    if dtype != "float16" or head_dim not in HEAD_DIMS:
        return False
    return all(_static_multiple(w, 8) for w in widths) and all(_static_multiple(o, 8) for o in offsets)


def emit(q: Tensor, k: Tensor, v: Tensor, num_heads: int, head_dim: int, offsets,
         rope: Optional[AxialRope], key_bias: Optional[Tensor],
         target: Optional[tvm.target.Target] = None) -> Tensor:
    """``call_dps_packed`` of the kernel; same arguments and result as ``fused_attention``.
    ``target``: the build's (decides ``rope_in_projection``; None: the keys-rotated path)."""
    b, nq = q.shape[0], q.shape[1]
    grid_h, grid_w = (rope.grid_h, rope.grid_w) if rope is not None else (0, 0)
    scale = float(rope.scale) if rope is not None else 1.0
    theta = float(rope.theta) if rope is not None else 10000.0
    offsets = [int(o) for o in offsets]
    hidden = num_heads * head_dim
    if (rope is not None and key_bias is None and q._expr.same_as(k._expr) and q._expr.same_as(v._expr)
            and offsets == [0, hidden, 2 * hidden] and int(q.shape[2]) == 3 * hidden
            and rope_in_projection(target, head_dim, nq)):
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


def supported_full_bias(target: Optional[tvm.target.Target], dtype: str, head_dim: int, widths,
                        nk) -> bool:
    """Whether the kernel takes an attention with a full ``[B or 1, H, Nq, Nk]`` bias:
    as :func:`supported` (offsets 0), and ``Nk`` static and even (pairs of fp16 bias
    values are read as one aligned ``half2``)."""
    return supported(target, dtype, head_dim, widths, (0, 0, 0)) and _static_multiple(nk, 2)


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
                rope: Optional[AxialRope], target: Optional[tvm.target.Target] = None) -> Tensor:
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
    if rope is not None and rope_in_projection(target, head_dim, window * window):
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
    from .kernels import cuda_source

    return cuda_source.calls_extern(mod, SYMBOLS)


def attach_pass(target: Optional[tvm.target.Target] = None,
                cuda_arches: Optional[Sequence[str]] = None,
                log=lambda s: None) -> tvm.transform.Pass:
    """Module pass: compile ``attention.cu`` for ``cuda_arches`` (default: the target's arch)
    and attach the object when the module calls the kernel."""
    from .kernels import cuda_source

    return cuda_source.attach_pass(SOURCE, SYMBOLS, "attention", target, cuda_arches, log)
