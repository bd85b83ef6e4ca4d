"""Relax pass: route every GEMM-shaped ``relax.matmul`` to a kernel of ours.

Runs before ``LegalizeOps``. Matches

* ``add(matmul(x, permute_dims(w)), bias)`` and ``matmul(x, permute_dims(w))``
  with a 2D ``w`` ``[N, K]``: ``nn.Linear``, ``linear_nd`` (patch embedding, 1x1
  and 2x2-transposed convolutions);
* ``matmul(x, w)`` with a 2D ``w`` ``[K, N]``;
* batched ``matmul(q, permute_dims(k, [..., -1, -2]))`` and ``matmul(p, v)`` with
  equal leading dims (attention scores and values),

* ``gelu(add(matmul(x, permute_dims(w)), bias))`` (the ViT and text MLPs' first layer)
  and ``relu(...)`` (the DETR feed-forward layers') when the provider takes
  ``activation="gelu"`` / ``"relu"`` (bias + activation epilogue),
* ``call_dps_packed("sam3_rope_qk_cuda", (add(matmul(x, permute_dims(w)), bias), ...))``
  (the q/k rotation of a RoPE attention's qkv projection) when the provider takes
  ``rope_qk=<the rotation's scalars>``: one GEMM rotating in its epilogue, the scalars
  passed on;
* ``add(r, [reshape](add(matmul(x, permute_dims(w)), bias)))`` (either operand order,
  bias optional: the ViT's residual adds after ``o_proj`` and ``fc2``) when the provider
  takes ``residual=True`` and ``r`` has exactly the add's shape and dtype (no broadcast:
  ``r`` flattened is the GEMM's row-major ``[M, N]``) and the linear's result has no
  other use; the extern's output is emitted in ``r``'s shape (no reshape, no copy),

flattens the leading dims with zero-copy reshapes and calls a scheduled PrimFunc
from the target's kernel provider (``provider(bt, m, n, k, dtype, out_dtype,
w_batched=, w_layout=, has_bias=, activation=, residual=)``, returning ``None`` for
"not mine"; ``activation``/``residual`` are passed only when set),
or, when the provider returns an :class:`Extern`, a ``call_dps_packed`` of a
hand-written kernel linked into the library (``kernels/cuda_source.py``; the objects
are attached to the module's ``external_mods``). Anything
else (broadcast batches, dynamic K/N) is left to the default legalization: that
is the fallback path. The new PrimFuncs carry ``tirx.is_scheduled`` (dlight skips
them) and ``op_pattern = kOpaque`` (FuseOps leaves them alone, so FuseTIR never
merges a scheduled function with unscheduled neighbours).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import ExternFuncPattern, TuplePattern, is_op, rewrite_call, wildcard
from tvm.relax.frontend import nn
from tvm.sym.analyzer import Analyzer

from sam3_nn.ops.attention import OP_PREFIX

OPAQUE = 8  # relay/relax OpPatternKind.kOpaque


@dataclass(frozen=True)
class Extern:
    """A provider's answer for a kernel linked in as an object: ``symbol`` (tvm-ffi
    exported, destination-passing) from ``objects``. GEMM externs take
    ``(x [..., K], w [N, K] | [K, N], (bias [N]), out [..., N])`` (the kernel treats
    the leading dims as rows), with a residual ``(x, w, (bias), r, out)``, ``r`` and
    ``out`` of one shape holding ``M * N`` elements; conv externs ``(x [B, H, W, Cin],
    w [Cout, Cin, kh, kw] (or [Cout, kh, kw, Cin] with ``conv_weight_layout="OHWI"``),
    (bias [Cout]), out [B, H, W, Cout])``. Inputs and outputs keep their shapes: a ``reshape`` of a
    ``call_dps_packed`` result would be lowered to a copy kernel."""

    symbol: str
    objects: Tuple[str, ...] = ()
    conv_weight_layout: str = "OIHW"  # "OHWI": the rewrite permutes the conv weight first


Provider = Callable[..., Union[None, tirx.PrimFunc, Extern]]
ConvProvider = Callable[..., Union[None, tirx.PrimFunc, Extern]]


def _sinfo(e: relax.Expr):
    ty = getattr(e, "ty", None)
    if ty is None or ty.is_missing():
        return None
    return ty


def shape_of(e: relax.Expr):
    si = _sinfo(e)
    if not isinstance(si, relax.TensorType) or not isinstance(si.shape, relax.ShapeExpr):
        return None, None
    return list(si.shape.values), si.dtype


def static_int(v) -> Optional[int]:
    return int(v) if isinstance(v, tirx.IntImm) else None


def _analyzer():
    return Analyzer()


def _prod(vals):
    out = tirx.const(1, "int64")
    for v in vals:
        out = out * v
    return _analyzer().simplify(out)


def _same(a, b) -> bool:
    return _analyzer().can_prove_equal(a, b)


def rewrite_functions(mod: tvm.IRModule, pattern, route) -> tvm.IRModule:
    """``rewrite_call(pattern, route, f)`` on every Relax function of ``mod``; ``mod``
    itself when nothing changed."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            f = rewrite_call(pattern, route, func)
            if not f.same_as(func):
                updates[gv] = f
    if not updates:
        return mod
    bb = relax.BlockBuilder(mod)
    for gv, f in updates.items():
        bb.update_func(gv, f)
    return bb.get()


class _Rewriter:
    def __init__(self, provider: Provider, bb: relax.BlockBuilder,
                 conv_provider: Optional[ConvProvider] = None):
        self.provider = provider
        self.conv_provider = conv_provider
        self.bb = bb
        self.funcs: Dict[Tuple, object] = {}
        self.count = 0
        self.objects: Dict[str, None] = {}  # extern objects to attach (ordered set)

    def _kernel(self, bt, m, n, k, dtype, out_dtype, w_batched, w_layout, has_bias,
                activation=None, residual=False, rope_qk=None):
        sb, sm = static_int(bt), static_int(m)
        key = (sb, sm, n, k, dtype, out_dtype, w_batched, w_layout, has_bias, activation, residual,
               rope_qk)
        if key not in self.funcs:
            vb = sb if sb is not None else tirx.Var("bt", "int64")
            vm = sm if sm is not None else tirx.Var("m", "int64")
            kw = {"activation": activation} if activation else {}
            if residual:
                kw["residual"] = True
            if rope_qk is not None:
                kw["rope_qk"] = rope_qk
            func = self.provider(vb, vm, n, k, dtype, out_dtype, w_batched=w_batched,
                                 w_layout=w_layout, has_bias=has_bias, **kw)
            name = f"sam3_gemm_{'b' if w_batched else ''}{w_layout}_{n}x{k}_{dtype}"
            self._register(key, func, name + ("_bias" if has_bias else ""))
        return self.funcs[key]

    def _register(self, key, func, name: str) -> None:
        """Remember a provider's answer: None (not ours), an ``Extern``, or a PrimFunc added
        to the module under ``name`` (made unique), opaque to FuseOps."""
        if func is None or isinstance(func, Extern):
            self.funcs[key] = func
            return
        name += f"_{len(self.funcs)}"
        func = func.with_attr("op_pattern", OPAQUE).with_attr("global_symbol", name)
        self.funcs[key] = (self.bb.add_func(func, name), func)

    def emit_conv(self, orig, x, w, bias, conv) -> relax.Expr:
        """``permute(conv2d(permute(x), w) (+ bias))``: NHWC in, NHWC out."""
        if self.conv_provider is None:
            return orig
        xs, dtype = shape_of(x)
        ws, wdtype = shape_of(w)
        if xs is None or ws is None or len(xs) != 4 or len(ws) != 4 or dtype != wdtype:
            return orig
        at = conv.attrs
        pads = [int(p) for p in at.padding]
        if (str(at.data_layout) != "NCHW" or str(at.kernel_layout) != "OIHW" or int(at.groups) != 1
                or any(int(v) != 1 for v in list(at.strides) + list(at.dilation))
                or len(set(pads)) != 1):
            return orig
        h, w_, cin = static_int(xs[1]), static_int(xs[2]), static_int(xs[3])
        cout, ci, kh, kw = [static_int(v) for v in ws]
        out_dtype = _sinfo(orig).dtype
        if None in (h, w_, cin, cout, kh) or ci != cin or kh != kw or out_dtype != dtype:
            return orig
        if bias is not None:
            bs, bdtype = shape_of(bias)
            if bs is None or bdtype != dtype or [static_int(v) for v in bs] not in ([1, cout, 1, 1], [cout]):
                return orig
            bias = relax.op.reshape(bias, relax.ShapeExpr([cout]))
        nb = xs[0]
        key = ("conv", static_int(nb), h, w_, cin, cout, kh, pads[0], dtype, bias is not None)
        if key not in self.funcs:
            vb = static_int(nb) if static_int(nb) is not None else tirx.Var("b", "int64")
            func = self.conv_provider(vb, h, w_, cin, cout, kh, pads[0], dtype, out_dtype,
                                      has_bias=bias is not None)
            self._register(key, func, f"sam3_conv{kh}x{kw}_{h}x{w_}x{cin}to{cout}_{dtype}")
        kern = self.funcs[key]
        if kern is None:
            return orig
        args = [x, w] + ([bias] if bias is not None else [])
        if isinstance(kern, Extern):
            # the output in its final shape: a reshape of a call_dps_packed result is
            # lowered to a copy kernel, not a view
            self.objects.update(dict.fromkeys(kern.objects))
            if kern.conv_weight_layout == "OHWI":
                args[1] = relax.op.permute_dims(w, [0, 2, 3, 1])
            self.count += 1
            return relax.call_dps_packed(kern.symbol, args,
                                         relax.TensorType([nb, h, w_, cout], out_dtype))
        y = relax.call_tir(kern[0], args, relax.TensorType([nb, h * w_, cout], out_dtype))
        self.count += 1
        return relax.op.reshape(y, relax.ShapeExpr([nb, h, w_, cout]))

    def emit(self, orig, x, w, bias, w_layout: str, activation: Optional[str] = None,
             residual: Optional[relax.Expr] = None, rope_qk: Optional[list] = None) -> relax.Expr:
        """``act(x @ op(w) (+ bias)) (+ residual)`` with ``op`` = transpose for 'nk'.
        ``residual`` (``orig`` is then the add): the caller checked that it has ``orig``'s
        shape and dtype; only an extern takes it (else ``orig`` stays). ``rope_qk``
        (``orig`` is then the q/k rotation of the linear's output): the rotation's scalar
        arguments, passed on to an extern whose epilogue rotates (3-D ``x`` only)."""
        xs, dtype = shape_of(x)
        ws, wdtype = shape_of(w)
        if xs is None or ws is None or dtype != wdtype or len(xs) < 2 or len(ws) < 2:
            return orig
        if rope_qk is not None and (len(xs) != 3 or bias is None or w_layout != "nk"):
            return orig
        out_dtype = _sinfo(orig).dtype
        if out_dtype not in ("float32", "float16"):
            return orig
        if residual is not None and shape_of(residual)[1] != out_dtype:
            return orig
        if w_layout == "nk":
            n, k = static_int(ws[-2]), static_int(ws[-1])
        else:
            k, n = static_int(ws[-2]), static_int(ws[-1])
        if n is None or k is None or static_int(xs[-1]) != k:
            return orig
        align = getattr(self.provider, "k_align", 0)
        if align and k % align and len(ws) == 2 and dtype == "float16":
            # the provider's kernels need K % align == 0 (CUTLASS: 16-byte TMA rows; the
            # patch embedding's 3 x 14 x 14 = 588): zero-pad x and w along K, which adds
            # nothing to the products
            kp = -(-k // align) * align
            x = relax.op.nn.pad(x, [0, 0] * (len(xs) - 1) + [0, kp - k])
            w = relax.op.nn.pad(w, [0, 0, 0, kp - k] if w_layout == "nk" else [0, kp - k, 0, 0])
            k = kp  # xs, ws keep their rows / N, which is all that is read of them below
        if len(ws) == 2:  # shared weight: all leading dims of x are rows
            m, bt, w_batched = _prod(xs[:-1]), tirx.const(1, "int64"), False
            out_shape = xs[:-1] + [n]
        else:
            if len(ws) != len(xs) or not all(_same(a, b) for a, b in zip(xs[:-2], ws[:-2])):
                return orig
            m, bt, w_batched = xs[-2], _prod(xs[:-2]), True
            out_shape = xs[:-1] + [n]
        if bias is not None:
            bs, bdtype = shape_of(bias)
            if (not bs or bdtype != out_dtype or static_int(bs[-1]) != n
                    or any(static_int(v) != 1 for v in bs[:-1]) or len(bs) > len(out_shape)):
                return orig
            if len(bs) != 1:
                bias = relax.op.reshape(bias, relax.ShapeExpr([n]))
        rope_values = None
        if rope_qk is not None:  # the rotation's scalars as Python values (the provider checks them)
            if not all(isinstance(v, (tirx.IntImm, tirx.FloatImm)) for v in rope_qk):
                return orig
            rope_values = tuple(v.value for v in rope_qk)
        kern = self._kernel(bt, m, n, k, dtype, out_dtype, w_batched, w_layout, bias is not None,
                            activation, residual is not None, rope_values)
        if kern is None:
            return orig
        if rope_qk is not None and not isinstance(kern, Extern):
            return orig
        if isinstance(kern, Extern):  # shared 2D weight only: rows = all leading dims
            if w_batched:
                return orig
            # x, the output in their own shapes (the kernel flattens the leading dims):
            # a reshape of a call_dps_packed result is lowered to a copy, not a view. With
            # a residual the output takes the residual's (= the add's) shape.
            self.objects.update(dict.fromkeys(kern.objects))
            args = [x, w] + ([bias] if bias is not None else [])
            if residual is not None:
                args.append(residual)
                out_shape = shape_of(residual)[0]
            if rope_qk is not None:
                args += list(rope_qk)
            self.count += 1
            return relax.call_dps_packed(kern.symbol, args, relax.TensorType(out_shape, out_dtype))
        if residual is not None:  # residual epilogues are extern-only
            return orig
        gv, _ = kern
        a = relax.op.reshape(x, relax.ShapeExpr([bt, m, k]))
        bw = bt if w_batched else tirx.const(1, "int64")
        w3 = relax.op.reshape(w, relax.ShapeExpr([bw, n, k] if w_layout == "nk" else [bw, k, n]))
        args = [a, w3] + ([bias] if bias is not None else [])
        y = relax.call_tir(gv, args, relax.TensorType([bt, m, n], out_dtype))
        self.count += 1
        return relax.op.reshape(y, relax.ShapeExpr(out_shape))


def _is_last_two_swap(call: relax.Call, ndim: int) -> bool:
    axes = call.attrs.axes
    if axes is None:
        return ndim == 2
    axes = [int(a) for a in axes]
    return axes == list(range(ndim - 2)) + [ndim - 1, ndim - 2]


class Uses:
    """Per function: the var each bound value is bound to, and how often each var is
    used (a fused linear's result must have no other use, else its GEMM would run twice)."""

    def __init__(self, func: relax.Function):
        self.var_of: Dict[object, relax.Var] = {}
        self.count: Dict[relax.Var, int] = {}
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            return
        for block in body.blocks:
            for bd in block.bindings:
                if isinstance(bd, relax.VarBinding):
                    self.var_of[bd.value] = bd.var
                self._use(bd.value)
        self._use(body.body)

    def _use(self, expr):  # every occurrence counts: add(x, x) uses x twice
        counts = {}

        def visit(e):
            if isinstance(e, relax.Var):
                counts[e] = counts.get(e, 0) + 1

        relax.analysis.post_order_visit(expr, visit)
        for v, c in counts.items():
            self.count[v] = self.count.get(v, 0) + c

    def single_use(self, value) -> bool:
        """``value`` is bound to a dataflow var used exactly once."""
        var = self.var_of.get(value)
        return isinstance(var, relax.DataflowVar) and self.count.get(var, 0) == 1


def make_gemm_pass(provider: Provider, conv_provider: Optional[ConvProvider] = None,
                   name: str = "Sam3GemmRewrite", rotation: Optional[Tuple[str, int]] = None,
                   attach: Optional[Callable[[tvm.IRModule, List[str]], tvm.IRModule]] = None
                   ) -> tvm.transform.Pass:
    """Module pass rewriting matmuls (and channel-last convs) to our kernels. ``rotation``:
    ``(symbol, number of scalars)`` of an extern rotating a qkv projection's output that the
    provider can fuse into the GEMM's epilogue (``rope_qk``); ``attach(mod, objects)`` links
    the objects of the externs the provider answered with."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        bb = relax.BlockBuilder(mod)
        rw = _Rewriter(provider, bb, conv_provider)
        x, w, b = wildcard(), wildcard(), wildcard()
        wt = is_op("relax.permute_dims")(w)
        mm_t = is_op("relax.matmul")(x, wt)
        mm = is_op("relax.matmul")(x, w)

        def transposed(orig, mt, bias_pat=None):
            call = mt[wt]
            ws, _ = shape_of(mt[w])
            if ws is None or not _is_last_two_swap(call, len(ws)):
                return orig
            return rw.emit(orig, mt[x], mt[w], mt[bias_pat] if bias_pat else None, "nk")

        def plain(orig, mt):
            return rw.emit(orig, mt[x], mt[w], None, "kn")

        lin_b = is_op("relax.add")(mm_t, b)
        acts = {name: is_op(f"relax.nn.{name}")(lin_b) for name in ("gelu", "relu")}

        # residual: add(r, [reshape](linear)); the add matches either operand order
        r, rs = wildcard(), wildcard()
        res_pats = []
        for lin in (lin_b, mm_t):
            res_pats.append((is_op("relax.add")(r, lin), lin, None))
            lin_rs = is_op("relax.reshape")(lin, rs)
            res_pats.append((is_op("relax.add")(r, lin_rs), lin, lin_rs))
        uses = [None]  # the function being rewritten

        def residual_rewrite(orig, mt, lin, lin_rs):
            call = mt[wt]
            ws, _ = shape_of(mt[w])
            if ws is None or not _is_last_two_swap(call, len(ws)):
                return orig
            res, inner = mt[r], mt[lin_rs if lin_rs is not None else lin]
            rsh, rdt = shape_of(res)
            osh, odt = shape_of(orig)
            ish, _ = shape_of(inner)
            if (rsh is None or osh is None or ish is None or rdt != odt
                    or not (len(rsh) == len(osh) == len(ish))
                    or not all(_same(a, c) and _same(a, d) for a, c, d in zip(rsh, osh, ish))):
                return orig  # broadcasting add: not a residual of the GEMM's shape
            # every intermediate (linear [, reshape]) used only here
            chain = [mt[lin]] + ([inner] if lin_rs is not None else [])
            if lin is lin_b:
                chain.append(mt[mm_t])
            if uses[0] is None or not all(uses[0].single_use(e) for e in chain):
                return orig
            if any(uses[0].var_of[e].same_as(res) for e in chain):  # add(y, y)
                return orig
            return rw.emit(orig, mt[x], mt[w], mt[b] if lin is lin_b else None, "nk",
                           residual=res)

        def activation_rewrite(orig, mt, name):
            call = mt[wt]
            ws, _ = shape_of(mt[w])
            if ws is None or not _is_last_two_swap(call, len(ws)):
                return orig
            return rw.emit(orig, mt[x], mt[w], mt[b], "nk", activation=name)

        # q/k rotation of a qkv projection (``rotation``) on a linear's output: one GEMM whose
        # epilogue rotates (the extern's scalars are passed on)
        rope_scalars = [wildcard() for _ in range(rotation[1] if rotation else 0)]
        rope_pat = (is_op("relax.call_dps_packed")(ExternFuncPattern(rotation[0]),
                                                   TuplePattern([lin_b] + rope_scalars))
                    if rotation else None)

        def rope_rewrite(orig, mt):
            call = mt[wt]
            ws, _ = shape_of(mt[w])
            if ws is None or not _is_last_two_swap(call, len(ws)):
                return orig
            if uses[0] is None or not all(uses[0].single_use(e) for e in (mt[lin_b], mt[mm_t])):
                return orig
            osh, _ = shape_of(orig)
            lsh, _ = shape_of(mt[lin_b])
            if osh is None or lsh is None or not all(_same(a, c) for a, c in zip(osh, lsh)):
                return orig
            return rw.emit(orig, mt[x], mt[w], mt[b], "nk", rope_qk=[mt[p] for p in rope_scalars])

        # channel-last conv: permute(conv2d(permute(x), w) [+ bias]) (layers.Conv2d)
        cx, cw, cb = wildcard(), wildcard(), wildcard()
        perm_in = is_op("relax.permute_dims")(cx)
        conv = is_op("relax.nn.conv2d")(perm_in, cw)
        conv_b = is_op("relax.permute_dims")(is_op("relax.add")(conv, cb))
        conv_nb = is_op("relax.permute_dims")(conv)

        def conv_rewrite(orig, mt, bias_pat=None):
            axes_out = orig.attrs.axes
            axes_in = mt[perm_in].attrs.axes
            if (axes_out is None or [int(a) for a in axes_out] != [0, 2, 3, 1]
                    or axes_in is None or [int(a) for a in axes_in] != [0, 3, 1, 2]):
                return orig
            return rw.emit_conv(orig, mt[cx], mt[cw], mt[bias_pat] if bias_pat else None, mt[conv])

        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                continue
            f = func
            uses[0] = Uses(func)
            for pat, lin, lin_rs in res_pats:
                f = rewrite_call(pat, lambda o, mt, lin=lin, lin_rs=lin_rs:
                                 residual_rewrite(o, mt, lin, lin_rs), f)
                uses[0] = Uses(f)
            if rope_pat is not None:
                f = rewrite_call(rope_pat, rope_rewrite, f)
            if rw.conv_provider is not None:
                f = rewrite_call(conv_b, lambda o, mt: conv_rewrite(o, mt, cb), f)
                f = rewrite_call(conv_nb, conv_rewrite, f)
            for name, pat in acts.items():
                f = rewrite_call(pat, lambda o, mt, name=name: activation_rewrite(o, mt, name), f)
            f = rewrite_call(lin_b, lambda o, mt: transposed(o, mt, b), f)
            f = rewrite_call(mm_t, transposed, f)
            f = rewrite_call(mm, plain, f)
            if not f.same_as(func):
                updates[gv] = f
        if not updates:
            return mod
        for gv, f in updates.items():
            bb.update_func(gv, f)
        out = bb.get()
        if rw.objects:
            if attach is None:
                raise ValueError("the GEMM provider answered with linked objects but the pass "
                                 "was given no attach function")
            out = attach(out, list(rw.objects))
        return out

    return _pass


# ---------------------------------------------------------------------------------------
# operator routing: sam3.op.* calls -> the implementation a target's table chooses
# ---------------------------------------------------------------------------------------

Route = Callable[..., object]  # (*tensors as nn.Tensor, **params) -> nn.Tensor


def op_call(value: relax.Expr) -> Optional[Tuple[str, list, Dict]]:
    """``(name, tensor args, params)`` of a ``sam3.op.*`` call (``sam3_nn.ops``), else None."""
    if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_dps_packed"))):
        return None
    callee = value.args[0]
    if not (isinstance(callee, relax.ExternFunc) and callee.global_symbol.startswith(OP_PREFIX)):
        return None
    args = list(value.args[1].fields)
    return callee.global_symbol, args[:-1], json.loads(args[-1].value)


@relax.expr_functor.mutator
class _OpRouter(relax.PyExprMutator):
    """Replaces each routed operator call by what its route emits, traced into the
    caller's block with the ``nn`` frontend (the builder is made current meanwhile)."""

    def __init__(self, mod: tvm.IRModule, routes: Dict[str, Route]):
        super().__init__(mod)
        self.routes = routes

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = op_call(binding.value)
        if found is None or found[0] not in self.routes:
            return super().visit_var_binding_(binding)
        name, args, params = found
        tensors = [nn.Tensor(_expr=self.visit_expr(a)) for a in args]
        relax.BlockBuilder._stack.append(self.builder_)  # nn ops emit into BlockBuilder.current()
        try:
            out = self.routes[name](*tensors, **params)._expr
        finally:
            relax.BlockBuilder._stack.pop()
        if not isinstance(binding.var, relax.DataflowVar):
            out = self.builder_.emit_output(out, name_hint=binding.var.name_hint)
        self.set_var_remap(binding.var, out)


def route_ops_pass(routes: Dict[str, Route], name: str = "Sam3RouteOps") -> tvm.transform.Pass:
    """Module pass: every ``sam3.op.*`` call named in ``routes`` becomes the route's
    implementation (see ``sam3_nn.ops.attention``)."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        targets = [gv for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and _calls_op(f, routes)]
        if not targets:
            return mod
        router = _OpRouter(mod, routes)
        for gv in targets:
            router.builder_.update_func(gv, router.visit_expr(mod[gv]))
        return router.builder_.get()

    return _pass


def _calls_op(func: relax.Function, names) -> bool:
    found = []

    def visit(e):
        hit = op_call(e)
        if hit is not None and (names is None or hit[0] in names):
            found.append(hit[0])

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


def unrouted_ops(mod: tvm.IRModule) -> List[str]:
    """Names of the ``sam3.op.*`` calls left in ``mod``."""
    names = set()
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            def visit(e):
                hit = op_call(e)
                if hit is not None:
                    names.add(hit[0])

            relax.analysis.post_order_visit(f, visit)
    return sorted(names)


def check_routed_pass(target_name: str) -> tvm.transform.Pass:
    """Module pass raising a ``ValueError`` naming any ``sam3.op.*`` call no route replaced."""

    @tvm.transform.module_pass(opt_level=0, name="Sam3CheckRouted")
    def _pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        left = unrouted_ops(mod)
        if left:
            raise ValueError(f"no kernel route for {', '.join(left)} on target {target_name}")
        return mod

    return _pass
