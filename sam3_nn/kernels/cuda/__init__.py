"""CUDA kernels: hand-written attention, LayerNorm, transpose and CUTLASS GEMMs (``csrc/``),
their Python emitters, and the passes routing the model's operators to them."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import tvm

from sam3_nn.compiler.options import KernelOptions, Toolchain
from sam3_nn.kernels.cuda import attention, layer_norm, ln_fold, source, transpose
from sam3_nn.kernels.cuda.gemm import cuda_providers
from sam3_nn.kernels.rewrite import make_gemm_pass, route_ops_pass


def routing_passes(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]],
                   opts: KernelOptions = KernelOptions(), toolchain: Toolchain = Toolchain(),
                   log: Callable[[str], None] = lambda s: None) -> List[tvm.transform.Pass]:
    """In order: attention operators to the kernel (or the portable GPU routes); GEMMs and
    convs to CUTLASS (Hopper-only libraries) or TVM's tensor-core schedule; float16
    LayerNorms to the kernel, folded into the GEMMs around them on the CUTLASS route; layout
    permutes to the copy kernels; then the passes linking the hand-written kernels' objects
    when the module calls them. ``cuda_arches``: the library's SASS arches (None: the
    target's own)."""
    gemm, conv = cuda_providers(target, cuda_arches, opts, toolchain)
    passes = [route_ops_pass(attention.attention_routes(target, cuda_arches, opts)),
              make_gemm_pass(gemm, conv, rotation=(attention.SYMBOL_ROPE_QK, attention.ROPE_QK_SCALARS),
                             attach=lambda mod, objs: source.attach(mod, objs))]
    if opts.cuda_layer_norm:
        passes.append(layer_norm.rewrite_pass())
    objects = getattr(gemm, "objects", None)
    if objects is not None and opts.ln_fold:  # CUTLASS kernels: LayerNorms fold into GEMMs
        passes.append(ln_fold.fold_pass(objects.for_symbol))
    if opts.cuda_transpose:
        passes += [transpose.inplace_pass(), transpose.rewrite_pass()]
    kw = dict(log=log, defines=opts.cuda_defines(), toolchain=toolchain)
    passes += [attention.attach_pass(target, cuda_arches, **kw),
               layer_norm.attach_pass(target, cuda_arches, **kw),
               transpose.attach_pass(target, cuda_arches, **kw)]
    return passes
