"""Hardware GEMM kernels and the passes that put them into the model.

``schedule_passes(target, cuda_arches)`` gives the passes to run on the Relax module
before the default pipeline (legalization + dlight); ``pipeline(target, cuda_arches=)``
is that plus the default pipeline, ready for ``tvm.compile(..., relax_pipeline=)``.
``cuda_arches``: the SASS arches the library is built for (a cuda preset's
``cuda_arches``); None: the target's own arch. See docs/kernels.md.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import tvm
from tvm import relax

from .rewrite import make_gemm_pass


def providers_for(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]] = None):
    """``(gemm_provider, conv_provider)`` for ``target``; ``(None, None)``: none of ours."""
    kind = target.kind.name
    if kind == "llvm":
        from .cpu import conv2d_nhwc, gemm, tile_for

        mr, bn, mb = tile_for(target)  # the register tile this CPU's vector registers hold

        def cpu_gemm(bt, m, n, k, dtype, out_dtype, activation=None, residual=False, **kw):
            if dtype not in ("float32", "float16") or activation or residual:
                return None
            return gemm(bt, m, n, k, dtype, out_dtype, mr=mr, bn=bn, mb=mb, **kw)

        def cpu_conv(b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias):
            if dtype not in ("float32", "float16"):
                return None
            return conv2d_nhwc(b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias,
                               mr=mr, bn=bn, mb=mb)

        return cpu_gemm, cpu_conv
    if kind == "cuda":
        from .cuda import cuda_providers

        return cuda_providers(target, cuda_arches)
    return None, None


def schedule_passes(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]] = None
                    ) -> List[tvm.transform.Pass]:
    """Passes to run on the Relax IRModule before the default pipeline (on CUDA also the
    float16 layer norms' and layout permutes' rewrites to the hand-written kernels, the
    LayerNorm fold into the GEMMs around it (CUTLASS route), and the
    passes linking the hand-written attention, layer norm and transpose kernels' objects
    when the model calls them)."""
    gemm, conv = providers_for(target, cuda_arches)
    passes = [] if gemm is None else [make_gemm_pass(gemm, conv)]
    if target.kind.name == "cuda":
        from sam3_nn import attention_cuda, layer_norm_cuda, transpose_cuda

        passes.append(layer_norm_cuda.rewrite_pass())
        objects = getattr(gemm, "objects", None)
        if objects is not None:  # CUTLASS kernels: LayerNorms fold into the GEMMs around them
            from sam3_nn import ln_fold

            passes.append(ln_fold.fold_pass(objects.for_symbol))
        passes += [transpose_cuda.inplace_pass(),
                   transpose_cuda.rewrite_pass(),
                   attention_cuda.attach_pass(target, cuda_arches),
                   layer_norm_cuda.attach_pass(target, cuda_arches),
                   transpose_cuda.attach_pass(target, cuda_arches)]
    return passes


def pipeline(target: tvm.target.Target, base: Optional[tvm.transform.Pass] = None,
             cuda_arches: Optional[Sequence[str]] = None):
    """``schedule_passes(target)`` followed by ``base`` (default: TVM's default pipeline)."""
    base = base or relax.get_default_pipeline(target)
    return tvm.transform.Sequential(schedule_passes(target, cuda_arches) + [base],
                                    name="sam3_kernels_pipeline")
