"""CUDA GEMMs.

On Hopper builds (every SASS arch of the library is sm_90/sm_90a) fp16 GEMMs with
8-aligned N (the rewrite zero-pads K to a multiple of 8, ``k_align``) go to CUTLASS 3.x
kernels (TMA + wgmma, warp-specialized;
``cuda/gemm_sm90.cu``, compiled for sm_90a and linked into the library, see
``cuda_source.py``), with bias, bias+GELU, bias+ReLU, (bias +) residual and bias + q/k
RoPE (a RoPE attention's qkv projection, ``rope_qk``) epilogues, and the LayerNorm fold's
(``sam3_nn.kernels.cuda.ln_fold``: row statistics, and the LayerNorm applied before RoPE or GELU). The choice
is made at build time from the preset's arches: a library that also carries sm_80 SASS
keeps the TIR path below for every GEMM. ``KernelOptions.cutlass`` off turns the CUTLASS
route off.

Elsewhere: TVM's own tensor-core schedule (dlight ``MatmulTensorization``),
applied to our GEMM definition; GEMMs with few output rows and a long K (the few-query
attention's P x V) get a schedule that splits K over threads instead (``gemm_schedule_kind``).

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
from typing import Optional, Sequence, Tuple

import tvm
from tvm import s_tir, te, tirx
from tvm.s_tir import dlight as dl

from sam3_nn.compiler.options import KernelOptions, Toolchain
from sam3_nn.kernels.cuda.source import compile_object, compile_objects
from sam3_nn.kernels.rewrite import Extern


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


def gemm_definition(bt, m, n: int, k: int, dtype: str, out_dtype: str, *, w_batched: bool = False,
                    w_layout: str = "nk", has_bias: bool = False) -> tirx.PrimFunc:
    """The unscheduled GEMM: ``out[b] = a[b] @ op(w[b or 0]) (+ bias)``, fp32 accumulation."""
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
    return te.create_prim_func(args, index_dtype_override="int64")


def gemm_cuda(target: tvm.target.Target, bt, m, n: int, k: int, dtype: str, out_dtype: str, *,
              w_batched: bool = False, w_layout: str = "nk", has_bias: bool = False
              ) -> Optional[tirx.PrimFunc]:
    if dtype != "float16":
        return None  # fp32 stays on the default (SIMT) schedule
    mod = tvm.IRModule({"main": gemm_definition(bt, m, n, k, dtype, out_dtype, w_batched=w_batched,
                                                w_layout=w_layout, has_bias=has_bias)})
    if gemm_schedule_kind(m, n, k) == FEW_ROWS:
        return schedule_few_rows(mod["main"], int(m), n, w_layout).with_attr(SCHEDULE_ATTR, FEW_ROWS)
    with _digits_arch(target):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(mod)
    func = mod["main"]
    if "tirx.is_scheduled" not in (func.attrs or {}):
        return None
    return func.with_attr(SCHEDULE_ATTR, MATMUL)


# ---- few output rows, long K: the reduction split over threads --------------------------

SCHEDULE_ATTR = "sam3.gemm_schedule"  # which schedule a TIR GEMM got (read by tests)
MATMUL, FEW_ROWS = "matmul", "few_rows"
# Rule: a static M with at most FEW_ROWS_MAX_OUTPUTS outputs (M x N) per batch entry and K of
# at least FEW_ROWS_MIN_K (the composed attention's P x V: [23, 5184] x [5184, 16] per head).
# dlight's Matmul tiles the outputs, so such a GEMM gets a handful of blocks per batch
# entry that each walk all of K serially (0.21 ms per call on an H100 for 15 M MACs).
FEW_ROWS_MAX_OUTPUTS = 1024
FEW_ROWS_MIN_K = 1024
FEW_ROWS_WARPS = 4  # warps splitting K per row: enough loads in flight per SM
FEW_ROWS_ROWS = 4  # rows per block (threadIdx.z); they share the weight rows through L1
FEW_ROWS_UNROLL = 4  # K steps unrolled per thread


def gemm_schedule_kind(m, n: int, k: int) -> str:
    """``FEW_ROWS`` or ``MATMUL``: the schedule :func:`gemm_cuda` gives this shape."""
    sm = _static_int(m)
    if sm is not None and sm * n <= FEW_ROWS_MAX_OUTPUTS and k >= FEW_ROWS_MIN_K:
        return FEW_ROWS
    return MATMUL


def schedule_few_rows(func: tirx.PrimFunc, m: int, n: int, w_layout: str, rows: int = FEW_ROWS_ROWS,
                      warps: int = FEW_ROWS_WARPS) -> tirx.PrimFunc:
    """``func`` (:func:`gemm_definition`) scheduled: block = (batch entry, up to ``rows``
    rows, up to 32 columns); threadIdx.z = the row, (threadIdx.y, threadIdx.x) = ``warps`` x
    32 threads that split K (k = step *
    threads + thread: consecutive threads read consecutive k, coalesced for a and for an nk
    weight; a kn weight row segment is read as 16-byte vectors). Each thread keeps partial
    sums of the block's columns in registers (rfactor); warp shuffles sum them per warp
    (TVM's cross-thread allreduce, no shared memory), then one shared-memory allreduce over
    the warps gives every output; the bias / cast epilogue reads them from shared memory.
    fp32 accumulation throughout. ``rows`` and ``warps``: for benchmarks (``bench/few_rows_gemm.py``)."""
    rows = min(rows, m)
    # a column tile of exactly 32 (threadIdx.x in the warp-sum stage) or all of N: either
    # way the stage's threads map onto whole columns of the tile, which keeps the epilogue's
    # region exact (the weight rows stay 16-byte aligned for N % 8 == 0)
    cols = n if n <= 32 else 32
    sch = s_tir.Schedule(func)
    c, out = sch.get_sblock("c"), sch.get_sblock("out")
    b, i, j, r = sch.get_loops(c)
    io, iz = sch.split(i, [None, rows])
    jo, jc = sch.split(j, [None, cols])
    ro, rt = sch.split(r, [None, warps * 32])
    sch.reorder(b, io, jo, iz, rt, ro, jc)
    rf = sch.rfactor(rt, factor_axis=0)  # per-thread partial sums c_rf[thread, b, i, j]
    b, io, jo, iz, rt, jc = sch.get_loops(c)
    sch.rfactor(sch.split(rt, [warps, 32])[0], factor_axis=0)  # per-warp sums
    rf2 = sch.get_producers(c)[0]

    b, io, jo, iz, rt, ro, jc = sch.get_loops(rf)
    bx = sch.fuse(b, io, jo)
    ry, rx = sch.split(rt, [warps, 32])
    sch.bind(bx, "blockIdx.x")
    sch.bind(iz, "threadIdx.z")
    sch.bind(ry, "threadIdx.y")
    sch.bind(rx, "threadIdx.x")
    ro, ru = sch.split(ro, [None, FEW_ROWS_UNROLL])
    sch.unroll(ru)  # independent loads in flight per thread
    if w_layout == "kn" and cols % 8 == 0 and n % cols == 0:
        wl = sch.cache_read(rf, 1, "local")
        sch.compute_at(wl, ru, preserve_unit_loops=True)
        sch.vectorize(sch.split(sch.get_loops(wl)[-1], [None, 8])[1])
    sch.decompose_reduction(rf, ro)
    sch.set_scope(rf, 0, "local")

    # per-warp sums: lanes reduced by shuffles, rows and warps are independent groups
    sch.reverse_compute_at(rf2, bx, preserve_unit_loops=True)
    ry, rx, _, iz, jc = sch.get_loops(rf2)[1:]
    sch.reorder(iz, ry, jc, rx)
    sch.bind(iz, "threadIdx.z")
    sch.bind(ry, "threadIdx.y")
    sch.bind(rx, "threadIdx.x")
    sch.set_scope(rf2, 0, "shared")

    # the sum over the warps: one allreduce over threadIdx.y, a column per threadIdx.x
    sch.reverse_compute_at(c, bx, preserve_unit_loops=True)
    ry, ub, iz, jc = sch.get_loops(c)[1:]
    sch.reorder(ub, iz, jc, ry)
    sch.bind(iz, "threadIdx.z")
    sch.bind(sch.split(jc, [None, 32])[1], "threadIdx.x")
    sch.bind(ry, "threadIdx.y")
    sch.set_scope(c, 0, "shared")

    sch.reverse_compute_at(out, bx, preserve_unit_loops=True)
    _, tz, ty, tx = sch.split(sch.fuse(*sch.get_loops(out)[1:]), [None, rows, warps, 32])
    sch.bind(tz, "threadIdx.z")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# ---- CUTLASS (sm_90a) --------------------------------------------------------------------

GEMM_PARTS = {"nk": 0, "nk_residual": 0, "nk_bias": 1, "nk_bias_residual": 1, "nk_bias_gelu": 2,
              "nk_bias_relu": 2,
              "kn": 3, "kn_bias": 3, "nk_bias_rope_qk": 4,
              # the LayerNorm fold (sam3_nn.kernels.cuda.ln_fold): row statistics, and the two consumers
              "nk_bias_residual_stats": 5, "nk_lnfold_rope_qk": 6, "nk_lnfold_gelu": 7}
GEMM_PREFIX = "sam3_cutlass_gemm_"
ROPE_TABLE_ROWS = 96  # kRopeTableRows of gemm_sm90.cu: coordinates per axis of the RoPE epilogue
# only the tvm-ffi entry points leave the library (CUTLASS's template instances stay local)
HIDDEN = ("-Xcompiler=-fvisibility=hidden",)


def arch_list(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if cuda_arches:
        return tuple(cuda_arches)
    arch = str(dict(target.export()).get("arch", "") or "")
    return (arch,) if arch else ()


def cutlass_route(arches: Sequence[str]) -> bool:
    """Whether the CUTLASS sm_90a kernels serve a library built for ``arches``: all of
    them Hopper (sm_90a SASS runs on every compute capability 9.0 device, nothing else)."""
    if not arches:
        return False
    return all(re.fullmatch(r"sm_90a?", a) for a in arches)


class _GemmObjects:
    """The compiled parts of ``cuda/gemm_sm90.cu`` (compiled together on first use;
    part 0 holds the shared state every part links against)."""

    def __init__(self, log=lambda s: None, defines=(), toolchain: Toolchain = Toolchain()):
        self.paths = None
        self.log = log
        self.defines = tuple(defines)
        self.toolchain = toolchain

    def get(self, part: int) -> Tuple[str, ...]:
        if self.paths is None:
            jobs = [dict(name="gemm_sm90", arches=("sm_90a",), cutlass=True, flags=HIDDEN,
                         defines=[f"SAM3_GEMM_PART={i}", "CUTLASS_ENABLE_GDC_FOR_SM90", *self.defines],
                         toolchain=self.toolchain)
                    # GDC: the kernels wait on the previous grid (pdl.cuh)
                    for i in range(max(GEMM_PARTS.values()) + 1)]
            self.paths = [str(p) for p in compile_objects(jobs, self.log)]
        return tuple(dict.fromkeys([self.paths[0], self.paths[part]]))

    def for_symbol(self, symbol: str) -> Tuple[str, ...]:
        """The objects holding the entry point ``symbol`` (``sam3_cutlass_gemm_<key>``)."""
        return self.get(GEMM_PARTS[symbol[len(GEMM_PREFIX):]])

    def conv(self) -> str:
        return str(compile_object("conv_sm90", ("sm_90a",), cutlass=True, flags=HIDDEN,
                                  defines=self.defines, log=self.log, toolchain=self.toolchain))


def gemm_cutlass(objs: _GemmObjects, bt, m, n: int, k: int, dtype: str, out_dtype: str, *,
                 w_batched: bool = False, w_layout: str = "nk", has_bias: bool = False,
                 activation: Optional[str] = None, residual: bool = False,
                 rope_qk: Optional[tuple] = None):
    """An ``Extern`` for this GEMM, or None where the CUTLASS kernels do not apply.
    ``residual``: out = x @ w^T (+ bias) + r, r read by the epilogue (``nk`` only).
    ``rope_qk``: ``sam3_rope_qk_cuda``'s scalars (heads, window, img_h, img_w, grid_h, grid_w,
    scale, theta): a qkv projection (``nk`` + bias) whose epilogue rotates q and k, taking
    the scalars after the bias."""
    if dtype != "float16" or out_dtype != "float16" or w_batched or n % 8 or k % 8:
        return None
    if rope_qk is not None:
        heads, window, _, _, grid_h, grid_w = rope_qk[:6]
        rows = window if window > 0 else max(grid_h, grid_w)  # the epilogue's cos/sin table
        if (activation or residual or not has_bias or w_layout != "nk" or n % (3 * 128)
                or n != 3 * heads * 64 or rows > ROPE_TABLE_ROWS):
            return None
        return Extern("sam3_cutlass_gemm_nk_bias_rope_qk", objs.get(GEMM_PARTS["nk_bias_rope_qk"]))
    if activation not in (None, "gelu", "relu") or (activation and (not has_bias or w_layout != "nk")):
        return None
    if residual and (activation or w_layout != "nk"):
        return None
    if _static_int(bt) != 1:  # shared weight: the rewrite passes bt = 1
        return None
    key = (w_layout + ("_bias" if has_bias else "") + (f"_{activation}" if activation else "")
           + ("_residual" if residual else ""))
    return Extern(f"sam3_cutlass_gemm_{key}", objs.get(GEMM_PARTS[key]))


def _static_int(v) -> Optional[int]:
    return int(v) if isinstance(v, (int, tirx.IntImm)) else None


def cuda_providers(target: tvm.target.Target, cuda_arches: Optional[Sequence[str]] = None,
                   opts: KernelOptions = KernelOptions(), toolchain: Toolchain = Toolchain()):
    """``(gemm_provider, conv_provider)`` for a CUDA target."""
    use_cutlass = opts.cutlass and cutlass_route(arch_list(target, cuda_arches))
    objs = _GemmObjects(defines=opts.cuda_defines(), toolchain=toolchain)

    def cuda_gemm(bt, m, n, k, dtype, out_dtype, activation=None, residual=False, rope_qk=None,
                  **kw):
        if use_cutlass:
            ext = gemm_cutlass(objs, bt, m, n, k, dtype, out_dtype, activation=activation,
                               residual=residual, rope_qk=rope_qk, **kw)
            if ext is not None:
                return ext
        if activation or residual or rope_qk is not None:  # fused epilogues: CUTLASS only
            return None
        return gemm_cuda(target, bt, m, n, k, dtype, out_dtype, **kw)

    if use_cutlass:
        cuda_gemm.k_align = 8  # the rewrite zero-pads K up to this (16-byte TMA rows)
        cuda_gemm.objects = objs  # the LayerNorm fold's kernels live in the same objects

    def cuda_conv(b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias):
        if not use_cutlass:
            return None
        return conv_cutlass(objs, b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias)

    return cuda_gemm, cuda_conv


def conv_cutlass(objs: _GemmObjects, b, h, w, cin, cout, ksize, pad, dtype, out_dtype, has_bias):
    """CUTLASS implicit-GEMM conv (``cuda/conv_sm90.cu``) for fp16 NHWC, channels % 8."""
    if dtype != "float16" or out_dtype != "float16" or cin % 8 or cout % 8:
        return None
    sym = "sam3_cutlass_conv2d" + ("_bias" if has_bias else "")
    return Extern(sym, (objs.conv(),), conv_weight_layout="OHWI")
