"""LayerNorm on CUDA: a hand-written kernel instead of the dlight-scheduled TIR one.

``relax.nn.layer_norm`` of float16 activations over the last axis (every ``nn.LayerNorm``
of the model) is legalized to a TIR reduction that dlight schedules at 11.6 us for the
ViT's [5184, 1024] on an H200, where its 21 MB of memory traffic allow ~6 us.
``sam3_nn/kernels/cuda/layer_norm.cu`` reads each row once into registers and writes it
once with 16-byte accesses (fp32 two-pass statistics, warp-shuffle reductions).

Two module passes, run by the CUDA pipeline (``sam3_nn.kernels.cuda.routing_passes``):

* :func:`rewrite_pass` (before legalization) replaces each supported ``layer_norm`` (see
  :func:`supported`) by ``call_dps_packed("sam3_cuda_layer_norm", (x, gamma, beta, eps))``
  with ``x``'s shape; anything else keeps the TIR kernel. ``KernelOptions.cuda_layer_norm``
  off leaves the pass out and every layer norm to TVM (benchmarks compare the two);
* :func:`attach_pass` compiles ``layer_norm.cu`` with nvcc (cached,
  ``sam3_nn.kernels.cuda.source``) for the library's SASS arches and attaches the object
  when the module calls the kernel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from sam3_nn.compiler.options import Toolchain
from sam3_nn.kernels.cuda import source as cuda_source
from sam3_nn.kernels.rewrite import rewrite_functions, shape_of, static_int

SYMBOL = "sam3_cuda_layer_norm"
SOURCE = "layer_norm"  # sam3_nn/kernels/cuda/layer_norm.cu
MAX_C = 4096  # the kernel's largest row (one warp per row, 16 chunks of 8 per lane)



def supported(call: relax.Call) -> bool:
    """Whether the kernel computes ``call`` (a ``relax.nn.layer_norm``): float16 x, gamma,
    beta, output; one axis, the last; centred and scaled; a static last dim C, a multiple of
    8 (16-byte rows) in [8, MAX_C]; gamma and beta ``[C]``."""
    x, gamma, beta = call.args
    xs, dtype = shape_of(x)
    if xs is None or dtype != "float16" or shape_of(call)[1] != "float16":
        return False
    at = call.attrs
    if [int(a) for a in at.axes] not in ([-1], [len(xs) - 1]) or not (at.center and at.scale):
        return False
    c = static_int(xs[-1])
    if c is None or c % 8 or not 8 <= c <= MAX_C:
        return False
    for p in (gamma, beta):
        ps, pdtype = shape_of(p)
        if pdtype != "float16" or [static_int(v) for v in ps] != [c]:
            return False
    return True


def emit(x: relax.Expr, gamma: relax.Expr, beta: relax.Expr, eps: float) -> relax.Call:
    """``call_dps_packed`` of the kernel: ``layer_norm(x, gamma, beta)`` over the last axis,
    the output in ``x``'s shape and dtype."""
    args = [x, gamma, beta, relax.prim_value(float(eps), "float64")]
    return relax.call_dps_packed(SYMBOL, args, x.ty)


def rewrite_pass() -> tvm.transform.Pass:
    """Module pass (before ``LegalizeOps``): every supported layer norm -> the kernel."""

    @tvm.transform.module_pass(opt_level=0, name="sam3_layer_norm_cuda_rewrite")
    def _rewrite(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        pat = is_op("relax.nn.layer_norm")(wildcard(), wildcard(), wildcard())

        def route(orig, _match):
            if not supported(orig):
                return orig
            return emit(*orig.args, float(orig.attrs.epsilon))

        return rewrite_functions(mod, pat, route)

    return _rewrite


def calls_kernel(mod: tvm.IRModule) -> bool:
    """Whether a Relax function of ``mod`` calls the kernel."""
    return cuda_source.calls_extern(mod, (SYMBOL,))


def attach_pass(target: Optional[tvm.target.Target] = None,
                cuda_arches: Optional[Sequence[str]] = None, log=lambda s: None,
                defines: Sequence[str] = (), toolchain: Toolchain = Toolchain()) -> tvm.transform.Pass:
    """Module pass: compile ``layer_norm.cu`` for ``cuda_arches`` (default: the target's
    arch) and attach the object when the module calls the kernel."""
    return cuda_source.attach_pass(SOURCE, (SYMBOL,), "layer norm", target, cuda_arches, log,
                                   defines, toolchain)
