"""Channel-last <-> channel-first copies on CUDA: a hand-written kernel instead of TIR's.

``encode_image`` returns the FPN maps channel first (``[B, 256, H, W]``, the reference's
layout) while the model computes them channel last, and ``detect`` turns them back.
TVM legalizes those ``permute_dims`` to a copy that dlight's fallback schedules one element
per thread, 152 us for the ``[1, 288, 288, 256]`` map on an H200 where its 85 MB of traffic
allow ~25 us. ``sam3_nn/kernels/cuda/transpose.cu`` moves 64 x 64 tiles through shared
memory with 16-byte accesses on both sides.

Two module passes, run by the CUDA pipeline (``sam3_nn.kernels.schedule_passes``):

* :func:`rewrite_pass` (before legalization) replaces each supported ``permute_dims``:
  float16 and static shape, axes ``[0, 3, 1, 2]`` or ``[0, 2, 3, 1]`` (:func:`split_of`) by
  ``call_dps_packed("sam3_cuda_transpose", (x, split))``; a swap of two adjacent axes above
  an inner block of a multiple of 8 elements (:func:`swap_axis_of`: the 2x2 transposed
  convolutions' pixel shuffle, 33-82 us in TIR for the neck's maps) by
  ``call_dps_packed("sam3_cuda_swap_axes", (x, axis))``; anything else keeps TVM's copy.
  ``SAM3_CUDA_TRANSPOSE=0`` in the environment, or ``with transpose_cuda.disabled():``,
  leaves them all to TVM;
* :func:`attach_pass` compiles ``transpose.cu`` with nvcc (cached,
  ``sam3_nn.kernels.cuda_source``) and attaches the object when the module calls it.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from .kernels.rewrite import _shape, _static, rewrite_functions
from .kernels.switch import Switch

SYMBOL = "sam3_cuda_transpose"
SYMBOL_SWAP = "sam3_cuda_swap_axes"
SYMBOLS = (SYMBOL, SYMBOL_SWAP)
SOURCE = "transpose"  # sam3_nn/kernels/cuda/transpose.cu
# axes of a 4D permute_dims -> the kernel's split ([B, R, S] with R = dims 1..split-1)
SPLITS = {(0, 3, 1, 2): 3,  # NHWC -> NCHW: R = H * W, S = C
          (0, 2, 3, 1): 2}  # NCHW -> NHWC: R = C, S = H * W

# On unless SAM3_CUDA_TRANSPOSE=0.
SWITCH = Switch(os.environ.get("SAM3_CUDA_TRANSPOSE", "1") != "0")


def enabled():
    """Route the float16 layout permutes to the kernel meanwhile."""
    return SWITCH.enabled()


def disabled():
    """Leave every permute to TVM meanwhile."""
    return SWITCH.disabled()


def split_of(call: relax.Call) -> Optional[int]:
    """The kernel's ``split`` for ``call`` (a ``relax.permute_dims``), None when the kernel
    does not take it: float16, 4D, static shape, axes ``[0, 3, 1, 2]`` or ``[0, 2, 3, 1]``,
    both sides of the transpose (``R``, ``S``) multiples of 8 (16-byte rows)."""
    xs, dtype = _shape(call.args[0])
    if xs is None or dtype != "float16" or len(xs) != 4 or call.attrs.axes is None:
        return None
    split = SPLITS.get(tuple(int(a) for a in call.attrs.axes))
    dims = [_static(v) for v in xs]
    if split is None or any(d is None for d in dims):
        return None
    return split if math.prod(dims[1:split]) % 8 == 0 and math.prod(dims[split:]) % 8 == 0 else None


def swap_axis_of(call: relax.Call) -> Optional[int]:
    """The kernel's ``axis`` for ``call`` (a ``relax.permute_dims``) that swaps two adjacent
    axes ``axis``, ``axis + 1`` of a float16 static-shape tensor above an inner block of a
    multiple of 8 elements (the 2x2 transposed convolutions' pixel shuffle, the window
    partition); None otherwise."""
    xs, dtype = _shape(call.args[0])
    if xs is None or dtype != "float16" or call.attrs.axes is None:
        return None
    axes = [int(a) for a in call.attrs.axes]
    moved = [i for i, a in enumerate(axes) if a != i]
    if len(moved) != 2 or moved[1] != moved[0] + 1 or axes[moved[0]] != moved[1]:
        return None
    dims = [_static(v) for v in xs]
    if any(d is None for d in dims) or moved[1] + 1 >= len(dims):
        return None
    return moved[0] if math.prod(dims[moved[1] + 1:]) % 8 == 0 else None


def rewrite_pass() -> tvm.transform.Pass:
    """Module pass (before ``LegalizeOps``): every supported permute -> the kernel. A no-op
    while routing is off (``SWITCH``, read when the pass runs)."""

    @tvm.transform.module_pass(opt_level=0, name="sam3_transpose_cuda_rewrite")
    def _rewrite(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not SWITCH.on:
            return mod
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
                cuda_arches: Optional[Sequence[str]] = None,
                log=lambda s: None) -> tvm.transform.Pass:
    """Module pass: compile ``transpose.cu`` for ``cuda_arches`` (default: the target's arch)
    and attach the object when the module calls the kernel."""
    from .kernels import cuda_source

    return cuda_source.attach_pass(SOURCE, SYMBOLS, "transpose", target, cuda_arches, log)
