"""CUDA GEMMs: TVM's own tensor-core schedule (dlight ``MatmulTensorization``),
applied to our GEMM definition.

Two things keep the default pipeline from using tensor cores, and both are handled
here rather than in TVM: ``dlight.gpu.Matmul`` parses the arch as digits, so
``sm_90a`` yields -1 and the SIMT schedule (we schedule under the digits-only arch,
``sm_90``, while the module is still compiled for the real one); and
``sch.tensorize`` segfaults unless apache-tvm-ffi is 0.1.14.post1 (see
docs/kernels.md). The GEMM is the same TE definition as the CPU one minus the
packing stage (the weight is read in place).
"""

from __future__ import annotations

import re
from typing import Optional

import tvm
from tvm import te, tirx


def _digits_arch(target: tvm.target.Target) -> tvm.target.Target:
    cfg = dict(target.export())
    arch = str(cfg.get("arch", ""))
    m = re.match(r"sm_(\d+)", arch)
    if m:
        cfg["arch"] = f"sm_{m.group(1)}"
    cfg.pop("host", None)
    return tvm.target.Target({k: v for k, v in cfg.items() if k in ("kind", "arch", "max_threads_per_block",
                                                                   "max_shared_memory_per_block",
                                                                   "thread_warp_size")})


def gemm_cuda(target: tvm.target.Target, bt, m, n: int, k: int, dtype: str, out_dtype: str, *,
              w_batched: bool = False, w_layout: str = "nk", has_bias: bool = False
              ) -> Optional[tirx.PrimFunc]:
    if dtype != "float16":
        return None  # fp32 stays on the default (SIMT) schedule
    from tvm.s_tir import dlight as dl

    acc = "float32"
    a = te.placeholder((bt, m, k), dtype, name="a")
    bw = bt if w_batched else 1
    w = te.placeholder((bw, n, k) if w_layout == "nk" else (bw, k, n), dtype, name="w")
    r = te.reduce_axis((0, k), name="k")

    def mm(b, i, j):
        wb = b if w_batched else 0
        wv = w[wb, j, r] if w_layout == "nk" else w[wb, r, j]
        return te.sum(a[b, i, r].astype(acc) * wv.astype(acc), axis=r)

    c = te.compute((bt, m, n), mm, name="c")
    if has_bias:
        bias = te.placeholder((n,), dtype, name="bias")
        out = te.compute((bt, m, n), lambda b, i, j: (c[b, i, j] + bias[j].astype(acc)).astype(out_dtype),
                         name="out")
        args = [a, w, bias, out]
    else:
        out = te.compute((bt, m, n), lambda b, i, j: c[b, i, j].astype(out_dtype), name="out")
        args = [a, w, out]
    mod = tvm.IRModule({"main": te.create_prim_func(args, index_dtype_override="int64")})
    with _digits_arch(target):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
    func = mod["main"]
    if "tirx.is_scheduled" not in (func.attrs or {}):
        return None
    return func
