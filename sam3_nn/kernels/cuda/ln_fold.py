"""LayerNorm folded into the GEMMs around it (CUDA, CUTLASS kernels).

Each ViT block normalizes its residual stream twice, and each time the rows come out of a
residual GEMM (``x = A W^T + b + r``: ``o_proj``, or the previous block's ``fc2``) and go
into a linear layer (the qkv projection with its RoPE epilogue, or ``fc1`` with GELU). The
LayerNorm kernel reads and writes the whole [rows, 1024] map (6.5 us a launch on the H100).
With ``W' = W diag(gamma)``, ``c[n] = sum_k W'[n, k]`` and ``b'[n] = b[n] + (W beta)[n]``:

    LayerNorm(x) W^T + b = rstd * (x W'^T - mean * c) + b'

so :func:`fold_pass` (after the GEMM and LayerNorm rewrites, before legalization) turns

    x = call_dps_packed("sam3_cutlass_gemm_nk_bias_residual", (a, w, b, r))
    y = call_dps_packed("sam3_cuda_layer_norm", (x, gamma, beta, eps)) [reshaped]
    z = call_dps_packed(<qkv + RoPE | linear + GELU>, (y, W, bias, ...))

into

    t = call_dps_packed("sam3_cutlass_gemm_nk_bias_residual_stats", (a, w, b, r))
    x, stats = t[0], t[1]                  # stats: [rows, N / 128, 2] float32 parts
    z = call_dps_packed(<..._lnfold_...>, (x, stats, W', c, b', eps, ...))

The residual GEMM's epilogue emits per-row partial sums and sums of squares of its fp16
output, the consumer's epilogue turns them into mean and rstd and applies the formula
(``kernels/cuda/ln_fold.cuh``). ``W'``, ``c`` and ``b'`` are Relax ops on the weights alone,
so the parameter lift (``sam3_nn.compiler.passes.param_transform``) computes them once when weights are
bound. A fold needs: the LayerNorm's output (and its reshape) read only by the consumer,
all of them and ``x`` dataflow values, static shapes with more than 256 rows (the ViT's;
the text encoder's 32-token rows keep their kernels), ``x``'s width a multiple of 256 and at
most 1024.
``KernelOptions.ln_fold`` off leaves the pass out.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tvm
from tvm import relax

from sam3_nn.kernels.cuda import layer_norm as layer_norm_cuda
from sam3_nn.kernels.cuda import source as cuda_source
from sam3_nn.kernels.rewrite import Uses, shape_of, static_int

PRODUCER = "sam3_cutlass_gemm_nk_bias_residual"
PRODUCER_STATS = "sam3_cutlass_gemm_nk_bias_residual_stats"
CONSUMERS = {"sam3_cutlass_gemm_nk_bias_rope_qk": "sam3_cutlass_gemm_nk_lnfold_rope_qk",
             "sam3_cutlass_gemm_nk_bias_gelu": "sam3_cutlass_gemm_nk_lnfold_gelu"}
STATS_TILE = 128  # columns per statistics part: the producer kernels' tile width
MAX_WIDTH = 1024  # the consumers read at most 8 parts per row (kMaxLnParts of ln_fold.cuh)
MIN_ROWS = 256  # folds only above this many rows (the consumers' kernels are tuned for the ViT)



def _extern(value) -> Tuple[Optional[str], List[relax.Expr]]:
    """``(symbol, args)`` of a ``call_dps_packed`` of an extern, else ``(None, [])``."""
    if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
            and value.op.name == "relax.call_dps_packed" and isinstance(value.args[0], relax.ExternFunc)):
        return str(value.args[0].global_symbol), list(value.args[1].fields)
    return None, []


class _Plan:
    """One fold: the consumer binding's var, the LayerNorm (and reshape) vars it drops, the
    producer's var, the LayerNorm's gamma / beta / eps."""

    def __init__(self, consumer, chain, x, gamma, beta, eps):
        self.consumer, self.chain, self.x = consumer, chain, x
        self.gamma, self.beta, self.eps = gamma, beta, eps


def plan_folds(func: relax.Function) -> List[_Plan]:
    """The folds :func:`fold_function` makes in ``func`` (see the module docstring)."""
    if not isinstance(func.body, relax.SeqExpr):
        return []
    defs = {b.var: b.value for block in func.body.blocks for b in block.bindings
            if isinstance(b, relax.VarBinding)}
    uses = Uses(func).count
    plans = []
    for block in func.body.blocks:
        for b in block.bindings:
            sym, args = _extern(b.value)
            if sym not in CONSUMERS or not isinstance(b.var, relax.DataflowVar) or not args:
                continue
            chain = []
            y = args[0]
            if isinstance(y, relax.Var) and isinstance(defs.get(y), relax.Call) \
                    and isinstance(defs[y].op, tvm.ir.Op) and defs[y].op.name == "relax.reshape":
                chain.append(y)
                y = defs[y].args[0]
            chain.append(y)
            if not all(isinstance(v, relax.DataflowVar) and uses.get(v, 0) == 1 for v in chain):
                continue
            ln_sym, ln_args = _extern(defs.get(y))
            if ln_sym != layer_norm_cuda.SYMBOL or len(ln_args) != 4:
                continue
            x, gamma, beta, eps = ln_args
            # dataflow vars are local to their block, so x, the LayerNorm (and reshape) and the
            # consumer share one block, where the statistics get bound beside x
            if not isinstance(x, relax.DataflowVar) or _extern(defs.get(x))[0] != PRODUCER:
                continue
            xs, xdt = shape_of(x)
            ws, _ = shape_of(args[1])
            as_, _ = shape_of(args[0])
            if xs is None or ws is None or as_ is None or xdt != "float16" or len(ws) != 2:
                continue
            dims = [static_int(v) for v in xs]
            if (any(d is None for d in dims) or dims[-1] % (2 * STATS_TILE) or dims[-1] > MAX_WIDTH
                    or static_int(ws[1]) != dims[-1]):
                continue
            if math.prod(dims[:-1]) <= MIN_ROWS or static_int(as_[0]) != dims[0]:
                continue  # few rows; or a batch dim the RoPE kernel would read differently
            plans.append(_Plan(b.var, chain, x, gamma, beta, eps))
    return plans


def _bind(bindings: list, name: str, expr: relax.Expr) -> relax.Var:
    expr = relax.BlockBuilder().normalize(expr)
    var = relax.DataflowVar(name, expr.ty)
    bindings.append(relax.VarBinding(var, expr))
    return var


def _weights(bindings: list, w, bias, gamma, beta, tag: str):
    """``W' = W diag(gamma)`` (float16), ``c = W' 1`` and ``b' = b + W beta`` (float32), as
    bindings on the weights alone (lifted to bind time)."""
    op = relax.op
    w32 = _bind(bindings, f"{tag}_w32", op.astype(w, "float32"))
    g32 = _bind(bindings, f"{tag}_g32", op.astype(gamma, "float32"))
    wg = _bind(bindings, f"{tag}_wg", op.multiply(w32, g32))
    wp = _bind(bindings, f"{tag}_w", op.astype(wg, "float16"))
    wp32 = _bind(bindings, f"{tag}_w16f", op.astype(wp, "float32"))
    c = _bind(bindings, f"{tag}_c", op.sum(wp32, axis=[1]))
    be32 = _bind(bindings, f"{tag}_beta32", op.astype(beta, "float32"))
    wb = _bind(bindings, f"{tag}_wbeta", op.matmul(w32, be32))
    b32 = _bind(bindings, f"{tag}_b32", op.astype(bias, "float32"))
    bp = _bind(bindings, f"{tag}_b", op.add(b32, wb))
    return wp, c, bp


def fold_function(func: relax.Function) -> Tuple[relax.Function, List[str]]:
    """``func`` with its LayerNorms folded, and the extern symbols it now calls."""
    plans = plan_folds(func)
    if not plans:
        return func, []
    by_consumer = {p.consumer: p for p in plans}
    producers = {p.x for p in plans}
    drop = {v for p in plans for v in p.chain}
    stats: Dict[relax.Var, relax.Var] = {}
    symbols = {PRODUCER_STATS}
    blocks = []
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            blocks.append(block)
            continue
        out = []
        for b in block.bindings:
            if b.var in drop:
                continue
            if b.var in producers:
                _, args = _extern(b.value)
                xs, _ = shape_of(b.var)
                rows = math.prod(static_int(v) for v in xs[:-1])
                parts = -(-static_int(xs[-1]) // STATS_TILE)
                call = relax.call_dps_packed(
                    PRODUCER_STATS, args,
                    [b.var.ty, relax.TensorType([rows, parts, 2], "float32")])
                t = _bind(out, f"{b.var.name}_stats_gemm", call)
                out.append(relax.VarBinding(b.var, relax.BlockBuilder().normalize(relax.TupleGetItem(t, 0))))
                stats[b.var] = _bind(out, f"{b.var.name}_stats", relax.TupleGetItem(t, 1))
                continue
            p = by_consumer.get(b.var)
            if p is None:
                out.append(b)
                continue
            sym, args = _extern(b.value)
            wp, c, bp = _weights(out, args[1], args[2], p.gamma, p.beta, f"{b.var.name}_lnfold")
            new_sym = CONSUMERS[sym]
            symbols.add(new_sym)
            call = relax.call_dps_packed(new_sym, [p.x, stats[p.x], wp, c, bp, p.eps] + args[3:],
                                         b.var.ty)
            out.append(relax.VarBinding(b.var, relax.BlockBuilder().normalize(call)))
        blocks.append(relax.DataflowBlock(out))
    body = relax.SeqExpr(blocks, func.body.body)
    new = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
    return new, sorted(symbols)


def fold_pass(objects: Callable[[str], Sequence[str]]) -> tvm.transform.Pass:
    """Module pass: :func:`fold_function` on every Relax function; ``objects(symbol)`` gives
    the compiled objects holding an extern the folds call (attached to the module)."""

    @tvm.transform.module_pass(opt_level=0, name="sam3_ln_fold")
    def _fold(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates, symbols = {}, set()
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                new, syms = fold_function(func)
                if syms:
                    updates[gv] = new
                    symbols.update(syms)
        if not updates:
            return mod
        bb = relax.BlockBuilder(mod)
        for gv, f in updates.items():
            bb.update_func(gv, f)
        out = bb.get()
        objs = [o for s in sorted(symbols) for o in objects(s)]
        return cuda_source.attach(out, list(dict.fromkeys(objs)))

    return _fold
