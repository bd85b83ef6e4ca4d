"""Tiled, vectorized, parallel GEMM for CPU (``llvm``) targets.

``gemm``: ``out[b, m, n] = sum_k a[b, m, k] * w[b', n, k] (+ bias[n])`` where
``w`` is either shared by all batches (``b' = 0``, the ``nn.Linear`` weight) or has
one matrix per batch (attention), and is stored ``[., N, K]`` ('nk', a transposed
operand) or ``[., K, N]`` ('kn'). Batch and ``M`` may be symbolic. The schedule is
the classic register-blocked one:

* ``w`` is packed once per call into panels ``wp[., N / bn, K, bn]`` (zero padded),
  so the inner loop reads ``bn`` contiguous floats per ``k``;
* each ``mr x bn`` output tile lives in registers (a ``local`` buffer that LLVM
  turns into ``mr * bn / lanes`` vector registers) for the whole ``k`` loop; the
  inner body is ``mr`` broadcasts of ``a`` and ``mr * bn / lanes`` FMAs;
* tiles are walked in blocks of ``mb`` rows per panel (one ``K x bn`` panel stays
  in L2 while the rows stream past it); the outer (batch, row block, panel) loop
  is parallel;
* rows past ``M`` (the last partial tile) read a clamped row of ``a`` and are
  never stored, so the hot loop carries no predicate.

Accumulation is float32 for float16 inputs; bias add and the cast to the output
dtype happen on the register tile, before it is stored.

The register tile depends on the target's vector registers (:func:`tile_for`): with
AVX-512 (32 zmm) 8 x 32 float32, 16 accumulators, picked by measurement on an AVX-512
x86; with AVX2 (16 ymm) 6 x 16, 12 accumulators + 2 panel vectors + the broadcast,
because 8 x 32 needs 32 ymm accumulators and spills (2.5x slower than PyTorch on a
Zen 3). See docs/kernels.md. Vectors only appear when the target names a CPU
(``mcpu``): a bare ``{"kind": "llvm"}`` target is generic x86-64 (SSE2).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import tvm
from tvm import s_tir, te, tirx
from tvm.target.codegen import llvm_cpu_has_features

MR = 8   # register tile rows (AVX-512)
BN = 32  # register tile columns (float32 lanes x vectors)
MB = 64  # rows per parallel task

Dim = Union[int, "tvm.tirx.PrimExpr"]


def tile_for(target: Optional["tvm.target.Target"]) -> Tuple[int, int, int]:
    """``(mr, bn, mb)`` for ``target``'s vector registers: the ``mr x bn`` float32
    accumulator tile, the ``mr * bn / lanes`` accumulators plus ``bn / lanes`` panel
    vectors plus one broadcast within the register file.

    * AVX-512 (32 x 512 bit): 8 x 32, 64-row blocks (measured, docs/kernels.md);
    * AVX / AVX2 (16 x 256 bit): 6 x 16 (12 + 2 + 1 = 15 registers), 128-row blocks
      (measured on a Zen 3: 8 x 32 spills there and ran 2.5x slower than PyTorch);
    * NEON (32 x 128 bit): 6 x 16 (24 + 4 + 1 = 29), not measured;
    * anything else (SSE2, 16 x 128 bit): 6 x 8 (12 + 2 + 1), not measured.

    ``llvm_get_vector_width`` is no guide here: TVM 0.27 reports 512 bits for every x86
    CPU, AVX2-only ones included, so the features are asked for by name."""
    if target is None or target.kind.name != "llvm":
        return MR, BN, MB

    def has(feature: str) -> bool:  # False for a feature of another architecture
        return bool(llvm_cpu_has_features([feature], target))

    if has("avx512f"):
        return MR, BN, MB
    if has("avx2") or has("avx") or has("neon"):
        return 6, 16, 128
    return 6, 8, 128


def _crop_epilogue(c, shape, bias, acc: str, out_dtype: str) -> list:
    """``[bias,] out``: the padded accumulator ``c`` cropped to ``shape`` (+ bias), cast."""
    if bias is None:
        return [te.compute(shape, lambda bb, i, j: c[bb, i, j].astype(out_dtype), name="out")]
    out = te.compute(shape, lambda bb, i, j: (c[bb, i, j] + bias[j].astype(acc)).astype(out_dtype),
                     name="out")
    return [bias, out]


def _ceil_to(x: Dim, f: int) -> Dim:
    if isinstance(x, int):
        return (x + f - 1) // f * f
    return tirx.floordiv(x + (f - 1), f) * f


def gemm_te(bt: Dim, m: Dim, n: int, k: int, dtype: str, out_dtype: str, *,
            w_batched: bool = False, w_layout: str = "nk", has_bias: bool = False,
            bn: int = BN, mr: int = MR):
    """TE tensors ``[a, w, (bias), out]`` of the GEMM (see the module docstring)."""
    acc = "float32"
    a = te.placeholder((bt, m, k), dtype, name="a")
    bw = bt if w_batched else 1
    w = te.placeholder((bw, n, k) if w_layout == "nk" else (bw, k, n), dtype, name="w")
    bias = te.placeholder((n,), dtype, name="bias") if has_bias else None
    no = (n + bn - 1) // bn

    def pack(bb, o, kk, i):
        col = o * bn + i
        src = w[bb, col, kk] if w_layout == "nk" else w[bb, kk, col]
        return tirx.if_then_else(col < n, src.astype(acc), tirx.const(0, acc))

    wp = te.compute((bw, no, k, bn), pack, name="wp")
    r = te.reduce_axis((0, k), name="k")

    def mm(bb, i, j):
        row = tirx.min(i, m - 1)
        wb = bb if w_batched else 0
        return te.sum(a[bb, row, r].astype(acc) * wp[wb, j // bn, r, j % bn], axis=r)

    c = te.compute((bt, _ceil_to(m, mr), no * bn), mm, name="c")
    return [a, w] + _crop_epilogue(c, (bt, m, n), bias if has_bias else None, acc, out_dtype)


def schedule_gemm(func: tirx.PrimFunc, n: int, mr: int = MR, bn: int = BN,
                  mb: int = MB) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    b_pack, b_mm, b_out = sch.get_sblock("wp"), sch.get_sblock("c"), sch.get_sblock("out")

    ploops = sch.get_loops(b_pack)
    sch.parallel(sch.fuse(*ploops[:2]))
    sch.vectorize(ploops[-1])
    try:
        b_pad = sch.get_sblock("xpad")
        sch.parallel(sch.fuse(*sch.get_loops(b_pad)[:2]))
    except Exception:  # noqa: BLE001 - only the conv has a padding stage
        pass

    b, i, j, *ks = sch.get_loops(b_mm)
    mo, mi = sch.split(i, [None, mr])
    mbo, mbi = sch.split(mo, [None, mb // mr])
    jo, ji = sch.split(j, [None, bn])
    sch.reorder(b, mbo, jo, mbi, *ks, mi, ji)
    sch.parallel(sch.fuse(b, mbo, jo))
    sch.reverse_compute_at(b_out, mbi)  # bias, cast and crop on the register tile
    sch.set_scope(b_mm, 0, "local")
    sch.unroll(mi)
    sch.vectorize(ji)
    sch.decompose_reduction(b_mm, ks[0])
    if n % bn == 0:
        sch.vectorize(sch.get_loops(b_out)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def gemm(bt: Dim, m: Dim, n: int, k: int, dtype: str = "float32",
         out_dtype: Optional[str] = None, *, w_batched: bool = False, w_layout: str = "nk",
         has_bias: bool = False, mr: int = MR, bn: int = BN, mb: int = MB) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(a[bt, m, k], w, [bias[n]], out[bt, m, n])`` for the CPU."""
    args = gemm_te(bt, m, n, k, dtype, out_dtype or dtype, w_batched=w_batched,
                   w_layout=w_layout, has_bias=has_bias, bn=bn, mr=mr)
    func = te.create_prim_func(args, index_dtype_override="int64")
    return schedule_gemm(func, n, mr, bn, mb)


def conv2d_nhwc_te(b: Dim, h: int, w: int, cin: int, cout: int, ksize: int, pad: int,
                   dtype: str, out_dtype: str, has_bias: bool, bn: int = BN, mr: int = MR):
    """Stride-1 ``ksize x ksize`` convolution, channel-last in and out, weight
    ``[cout, cin, k, k]`` (PyTorch layout), as an implicit GEMM: rows are output
    pixels ``y * W + x``, columns output channels, the reduction runs over
    ``(ky, kx, cin)``; output ``[b, h * w, cout]``."""
    acc = "float32"
    x = te.placeholder((b, h, w, cin), dtype, name="x")
    wt = te.placeholder((cout, cin, ksize, ksize), dtype, name="w")
    bias = te.placeholder((cout,), dtype, name="bias") if has_bias else None
    hp, wpd = h + 2 * pad, w + 2 * pad
    xpad = te.compute((b, hp, wpd, cin), lambda n, y, xx, c: tirx.if_then_else(
        tirx.all(y >= pad, y < h + pad, xx >= pad, xx < w + pad),
        x[n, y - pad, xx - pad, c].astype(acc), tirx.const(0, acc)), name="xpad")
    no = (cout + bn - 1) // bn

    def pack(o, ky, kx, c, i):
        col = o * bn + i
        return tirx.if_then_else(col < cout, wt[col, c, ky, kx].astype(acc), tirx.const(0, acc))

    wp = te.compute((no, ksize, ksize, cin, bn), pack, name="wp")
    ry = te.reduce_axis((0, ksize), name="ky")
    rx = te.reduce_axis((0, ksize), name="kx")
    rc = te.reduce_axis((0, cin), name="c")
    m = h * w

    def mm(n, i, j):
        row = tirx.min(i, m - 1)
        return te.sum(xpad[n, row // w + ry, row % w + rx, rc] * wp[j // bn, ry, rx, rc, j % bn],
                      axis=[ry, rx, rc])

    c = te.compute((b, _ceil_to(m, mr), no * bn), mm, name="c")
    return [x, wt] + _crop_epilogue(c, (b, m, cout), bias if has_bias else None, acc, out_dtype)


def conv2d_nhwc(b: Dim, h: int, w: int, cin: int, cout: int, ksize: int, pad: int,
                dtype: str = "float32", out_dtype: Optional[str] = None, has_bias: bool = True,
                mr: int = MR, bn: int = BN, mb: int = MB) -> tirx.PrimFunc:
    """Scheduled PrimFunc ``(x[b, h, w, cin], w[cout, cin, k, k], [bias], out[b, h*w, cout])``."""
    args = conv2d_nhwc_te(b, h, w, cin, cout, ksize, pad, dtype, out_dtype or dtype, has_bias,
                          bn=bn, mr=mr)
    func = te.create_prim_func(args, index_dtype_override="int64")
    return schedule_gemm(func, cout, mr, bn, mb)
