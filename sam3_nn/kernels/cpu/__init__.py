"""CPU (llvm) kernels: register-blocked GEMM/conv TIR (``gemm``), the dlight rules and fast
math for the rest (``rules``), and the passes routing the model's operators to them."""

from __future__ import annotations

from typing import List

import tvm

from sam3_nn.compiler.options import KernelOptions
from sam3_nn.kernels import portable
from sam3_nn.kernels.cpu.gemm import conv2d_nhwc, gemm, tile_for
from sam3_nn.kernels.cpu.rules import cpu_rules, fast_math_pass
from sam3_nn.kernels.rewrite import make_gemm_pass, route_ops_pass


def providers(target: tvm.target.Target):
    """``(gemm_provider, conv_provider)`` for an llvm target (see ``kernels.rewrite``)."""
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


def routing_passes(target: tvm.target.Target, opts: KernelOptions) -> List[tvm.transform.Pass]:
    """Attention operators to their CPU routes (``kernels.portable``), then every GEMM and
    channel-last conv to the register-blocked kernels."""
    return [route_ops_pass(portable.attention_routes(target, opts)), make_gemm_pass(*providers(target))]


def math_passes() -> List[tvm.transform.Pass]:
    return [fast_math_pass()]


def schedule_rules() -> list:
    return cpu_rules()
