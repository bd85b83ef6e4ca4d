"""Channel-last <-> channel-first copies on CUDA: a hand-written kernel instead of TIR's.

``encode_image`` returns the FPN maps channel first (``[B, 256, H, W]``, the reference's
layout) while the model computes them channel last, and ``detect`` turns them back.
TVM legalizes those ``permute_dims`` to a copy that dlight's fallback schedules one element
per thread, 152 us for the ``[1, 288, 288, 256]`` map on an H200 where its 85 MB of traffic
allow ~25 us. ``sam3_nn/kernels/cuda/transpose.cu`` moves 64 x 64 tiles through shared
memory with 16-byte accesses on both sides.

Two module passes, run by the CUDA pipeline (``sam3_nn.kernels.cuda.routing_passes``):

* :func:`rewrite_pass` (before legalization) replaces each supported ``permute_dims``:
  float16 and static shape, axes ``[0, 3, 1, 2]`` or ``[0, 2, 3, 1]`` (:func:`split_of`) by
  ``call_dps_packed("sam3_cuda_transpose", (x, split))``; a swap of two adjacent axes above
  an inner block of a multiple of 8 elements (:func:`swap_axis_of`: the 2x2 transposed
  convolutions' pixel shuffle, 33-82 us in TIR for the neck's maps) by
  ``call_dps_packed("sam3_cuda_swap_axes", (x, axis))``; anything else keeps TVM's copy.
  ``KernelOptions.cuda_transpose`` off leaves the passes out and them all to TVM;
* :func:`attach_pass` compiles ``transpose.cu`` with nvcc (cached,
  ``sam3_nn.kernels.cuda.source``) and attaches the object when the module calls it.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.script import tirx as T

from sam3_nn.compiler.options import Toolchain
from sam3_nn.kernels.cuda import source as cuda_source
from sam3_nn.kernels.rewrite import OPAQUE, Uses, rewrite_functions, shape_of, static_int

SYMBOL = "sam3_cuda_transpose"
SYMBOL_SWAP = "sam3_cuda_swap_axes"
SYMBOLS = (SYMBOL, SYMBOL_SWAP)
SOURCE = "transpose"  # sam3_nn/kernels/cuda/transpose.cu
# axes of a 4D permute_dims -> the kernel's split ([B, R, S] with R = dims 1..split-1)
SPLITS = {(0, 3, 1, 2): 3,  # NHWC -> NCHW: R = H * W, S = C
          (0, 2, 3, 1): 2}  # NCHW -> NHWC: R = C, S = H * W



def split_of(call: relax.Call) -> Optional[int]:
    """The kernel's ``split`` for ``call`` (a ``relax.permute_dims``), None when the kernel
    does not take it: float16, 4D, static shape, axes ``[0, 3, 1, 2]`` or ``[0, 2, 3, 1]``,
    both sides of the transpose (``R``, ``S``) multiples of 8 (16-byte rows)."""
    xs, dtype = shape_of(call.args[0])
    if xs is None or dtype != "float16" or len(xs) != 4 or call.attrs.axes is None:
        return None
    split = SPLITS.get(tuple(int(a) for a in call.attrs.axes))
    dims = [static_int(v) for v in xs]
    if split is None or any(d is None for d in dims):
        return None
    return split if math.prod(dims[1:split]) % 8 == 0 and math.prod(dims[split:]) % 8 == 0 else None


def swap_axis_of(call: relax.Call) -> Optional[int]:
    """The kernel's ``axis`` for ``call`` (a ``relax.permute_dims``) that swaps two adjacent
    axes ``axis``, ``axis + 1`` of a float16 static-shape tensor above an inner block of a
    multiple of 8 elements (the 2x2 transposed convolutions' pixel shuffle, the window
    partition); None otherwise."""
    xs, dtype = shape_of(call.args[0])
    if xs is None or dtype != "float16" or call.attrs.axes is None:
        return None
    axes = [int(a) for a in call.attrs.axes]
    moved = [i for i, a in enumerate(axes) if a != i]
    if len(moved) != 2 or moved[1] != moved[0] + 1 or axes[moved[0]] != moved[1]:
        return None
    dims = [static_int(v) for v in xs]
    if any(d is None for d in dims) or moved[1] + 1 >= len(dims):
        return None
    return moved[0] if math.prod(dims[moved[1] + 1:]) % 8 == 0 else None


# ---- the pixel shuffle in place -------------------------------------------------------

SMEM_BYTES = 48 * 1024   # shared memory of one in-place block (the default static limit)
INPLACE_THREADS = 256
# ops whose result is a fresh tensor (never a view of an input), for the in-place check
_FRESH = ("relax.call_dps_packed", "relax.call_tir")


def inplace_plan(call: relax.Call) -> Optional[tuple]:
    """``(A, P, Q, I, slice)`` when ``call`` (a ``relax.permute_dims``) is a swap of two
    adjacent axes ``[A, P, Q, I] -> [A, Q, P, I]`` (``A``, ``I``: the products of the axes
    before and after) that one block per ``(a, slice of I)`` can do in place: all ``P * Q``
    rows of the slice fit in ``SMEM_BYTES`` of shared memory, with slices of 8 to 64 halves;
    None otherwise."""
    axis = swap_axis_of(call)
    if axis is None:
        return None
    dims = [static_int(v) for v in shape_of(call.args[0])[0]]
    a_len, p_len, q_len = math.prod(dims[:axis]), dims[axis], dims[axis + 1]
    inner = math.prod(dims[axis + 2:])
    if a_len >= 65536:  # blockIdx.y
        return None
    for sl in (64, 32, 16, 8):
        if inner % sl == 0 and p_len * q_len * sl * 2 <= SMEM_BYTES:
            return a_len, p_len, q_len, inner, sl
    return None


def swap_inplace_func(a_len: int, p_len: int, q_len: int, inner: int, sl: int) -> tirx.PrimFunc:
    """In-place ``x [A, P * Q, I]`` (rows ``(p, q)``) -> rows ``(q, p)``: block ``(a, s)``
    reads the ``P * Q`` rows' slice ``s`` of 16-byte chunks into shared memory, waits for
    the whole block, and writes them back permuted. Blocks touch disjoint slices, so
    nothing is read after another block wrote it."""
    rows, v, threads = p_len * q_len, sl // 8, INPLACE_THREADS
    n_vec = rows * v
    iters = (n_vec + threads - 1) // threads

    @T.prim_func(private=True)
    def swap_inplace(x: T.Buffer((a_len, rows, inner), "float16")):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": OPAQUE})
        for a in T.thread_binding(a_len, thread="blockIdx.y"):
            for s in T.thread_binding(inner // sl, thread="blockIdx.x"):
                sh = T.decl_buffer((rows * sl,), "float16", scope="shared")
                for t in T.thread_binding(threads, thread="threadIdx.x"):
                    for i in range(iters):
                        if i * threads + t < n_vec:
                            for e in T.vectorized(8):
                                sh[(i * threads + t) // v * sl + (i * threads + t) % v * 8 + e] = \
                                    x[a, (i * threads + t) // v, s * sl + (i * threads + t) % v * 8 + e]
                    T.tvm_storage_sync("shared")
                    for i in range(iters):
                        if i * threads + t < n_vec:
                            for e in T.vectorized(8):
                                # output row r = q * P + p <- input row p * Q + q
                                x[a, (i * threads + t) // v, s * sl + (i * threads + t) % v * 8 + e] = \
                                    sh[((i * threads + t) // v % p_len * q_len + (i * threads + t) // v // p_len) * sl
                                       + (i * threads + t) % v * 8 + e]

    return swap_inplace


def _dead_after(x: relax.Var, defs: Dict[relax.Var, relax.Expr], uses: Dict[relax.Var, int]) -> bool:
    """``x`` is read once (by the permute) and is a fresh tensor or a chain of reshapes of
    one, each link read once: mutating it in place changes nothing anything else reads."""
    while True:
        if uses.get(x, 0) != 1 or x not in defs:
            return False
        value = defs[x]
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            if value.op.name == "relax.reshape" and isinstance(value.args[0], relax.Var):
                x = value.args[0]
                continue
            return value.op.name in _FRESH
        return False


def inplace_pass() -> tvm.transform.Pass:
    """Module pass (before ``rewrite_pass``): each swap permute (``inplace_plan``) whose
    input is dead after it (``_dead_after``) -> ``call_tir_inplace`` of
    ``swap_inplace_func`` on a 3D view of the input: no second map of the permute's size
    is allocated (the neck's 4x level: 42.5 MB)."""

    @tvm.transform.module_pass(opt_level=0, name="sam3_transpose_cuda_inplace")
    def _rewrite(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pat = is_op("relax.permute_dims")(wildcard())
        bb = relax.BlockBuilder(mod)
        funcs: Dict[tuple, tvm.ir.GlobalVar] = {}
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            defs = {b.var: b.value for block in func.body.blocks for b in block.bindings
                    if isinstance(b, relax.VarBinding)}
            uses = Uses(func).count  # reads of each variable (bindings and the result)

            def route(orig, _match, defs=defs, uses=uses):
                plan = inplace_plan(orig)
                if (plan is None or not isinstance(orig.args[0], relax.Var)
                        or not _dead_after(orig.args[0], defs, uses)):
                    return orig
                if plan not in funcs:
                    funcs[plan] = bb.add_func(swap_inplace_func(*plan), "sam3_swap_inplace")
                a_len, p_len, q_len, inner, _ = plan
                flat = [a_len, p_len * q_len, inner]
                x3 = relax.op.reshape(orig.args[0], flat)
                y3 = relax.op.call_tir_inplace(funcs[plan], [x3], [0],
                                               relax.TensorType(flat, "float16"))
                return relax.op.reshape(y3, orig.ty.shape)

            f = rewrite_call(pat, route, func)
            if not f.same_as(func):
                updates[gv] = f
        for gv, f in updates.items():
            bb.update_func(gv, f)
        return bb.get() if updates else mod

    return _rewrite


def rewrite_pass() -> tvm.transform.Pass:
    """Module pass (before ``LegalizeOps``): every supported permute -> the kernel."""

    @tvm.transform.module_pass(opt_level=0, name="sam3_transpose_cuda_rewrite")
    def _rewrite(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pat = is_op("relax.permute_dims")(wildcard())

        def route(orig, _match):
            split = split_of(orig)
            if split is not None:
                return relax.call_dps_packed(SYMBOL, [orig.args[0], relax.prim_value(split)], orig.ty)
            axis = swap_axis_of(orig)
            if axis is not None:
                return relax.call_dps_packed(SYMBOL_SWAP, [orig.args[0], relax.prim_value(axis)], orig.ty)
            return orig

        return rewrite_functions(mod, pat, route)

    return _rewrite


def attach_pass(target: Optional[tvm.target.Target] = None,
                cuda_arches: Optional[Sequence[str]] = None, log=lambda s: None,
                defines: Sequence[str] = (), toolchain: Toolchain = Toolchain()) -> tvm.transform.Pass:
    """Module pass: compile ``transpose.cu`` for ``cuda_arches`` (default: the target's arch)
    and attach the object when the module calls the kernel."""
    return cuda_source.attach_pass(SOURCE, SYMBOLS, "transpose", target, cuda_arches, log,
                                   defines, toolchain)
