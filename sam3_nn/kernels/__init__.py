"""Hardware GEMM kernels and the passes that put them into the model.

``schedule_passes(target)`` gives the passes to run on the Relax module before the
default pipeline (legalization + dlight); ``pipeline(target)`` is that plus the
default pipeline, ready for ``tvm.compile(..., relax_pipeline=)``.
See docs/kernels.md.
"""

from __future__ import annotations

from typing import List, Optional

import tvm
from tvm import relax

from .rewrite import make_gemm_pass


def providers_for(target: tvm.target.Target):
    """``(gemm_provider, conv_provider)`` for ``target``; ``(None, None)``: none of ours."""
    kind = target.kind.name
    if kind == "llvm":
        from .cpu import conv2d_nhwc, gemm

        def cpu_gemm(bt, m, n, k, dtype, out_dtype, **kw):
            if dtype not in ("float32", "float16"):
                return None
            return gemm(bt, m, n, k, dtype, out_dtype, **kw)

        def cpu_conv(b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias):
            if dtype not in ("float32", "float16"):
                return None
            return conv2d_nhwc(b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias)

        return cpu_gemm, cpu_conv
    if kind == "cuda":
        from .cuda import gemm_cuda

        def cuda_gemm(bt, m, n, k, dtype, out_dtype, **kw):
            return gemm_cuda(target, bt, m, n, k, dtype, out_dtype, **kw)

        return cuda_gemm, None
    return None, None


def schedule_passes(target: tvm.target.Target) -> List[tvm.transform.Pass]:
    """Passes to run on the Relax IRModule before the default pipeline."""
    gemm, conv = providers_for(target)
    if gemm is None:
        return []
    return [make_gemm_pass(gemm, conv)]


def pipeline(target: tvm.target.Target, base: Optional[tvm.transform.Pass] = None):
    """``schedule_passes(target)`` followed by ``base`` (default: TVM's default pipeline)."""
    base = base or relax.get_default_pipeline(target)
    return tvm.transform.Sequential(schedule_passes(target) + [base], name="sam3_kernels_pipeline")
