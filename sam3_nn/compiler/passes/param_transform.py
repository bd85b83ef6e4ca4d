"""Weight preprocessing moved out of the calls: run once, when the weights are bound.

Much of what an exported function computes depends on the weights alone: the FPN neck's
folded deconvolution + 1x1 weights (a small GEMM), the ViT's position table tiled over the
image grid, the patch weight padded to a 16-byte row, the 3x3 convolutions' weights in the
kernel's layout, the detector's terms computed from weights alone. Computed per
call, that is ~25 kernel launches and ~0.1 ms of every ``encode_image`` on the H100.

:func:`lift_pass` runs TVM's ``LiftTransformParams`` on the functions that take the packed
weights: each ``fn`` gets a ``fn_transform_params`` (:func:`transform_name`) that takes the
weights the loader produces (the manifest's ``params``, in order, as one tuple) and returns
the tuple ``fn`` takes instead (weights it uses unchanged are passed through, not copied);
``BundleModelParams`` then packs ``fn``'s weights into one tuple again, so every call still
passes one packed argument. The pass runs after the hand-written kernels' rewrites, so what
is lifted is what those kernels still need done to the weights (the GEMM rewrite consumes
``matmul(x, permute_dims(w))`` itself, with no transpose). ``sam3_nn.runtime.engine.CompiledModel``
runs the transforms when weights are bound; the manifest's ``param_transforms`` names them.
"""

from __future__ import annotations

from typing import List, Sequence

import tvm
from tvm import relax

SUFFIX = "_transform_params"


def transform_name(function: str) -> str:
    """The name of ``function``'s weight transform in a library."""
    return function + SUFFIX


def is_transform(name: str) -> bool:
    return name.endswith(SUFFIX)


def packed_functions(mod: tvm.IRModule) -> List[str]:
    """The functions of an exported module that take packed weights: ``num_input`` inputs
    and one more parameter, the weight tuple."""
    return [gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, relax.Function) and f.attrs is not None and "num_input" in f.attrs
            and len(f.params) == int(f.attrs["num_input"]) + 1
            and isinstance(f.params[-1].ty, relax.TupleType)]


def lift_pass(functions: Sequence[str]) -> tvm.transform.Pass:
    """Module pass: lift the weight-only work of ``functions`` (each with ``num_input``
    inputs followed by one packed weight tuple) into ``transform_name(fn)`` functions, and
    pack each function's transformed weights into one tuple again. Other functions are left
    as they are (``LiftTransformParams`` acts on every function with ``num_input``, so theirs
    is hidden meanwhile)."""
    names = set(functions)

    @tvm.transform.module_pass(opt_level=0, name="sam3_lift_param_transforms")
    def _lift(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # a copy: the pass's input module must not change under its caller
        mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)
        hidden = {}
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
                continue
            if gv.name_hint in names:
                mod[gv] = _unpacked(func)
            else:
                hidden[gv.name_hint] = int(func.attrs["num_input"])
                mod[gv] = func.without_attr("num_input")
        mod = relax.transform.LiftTransformParams(shared_transform=False)(mod)
        lifted = {gv.name_hint for gv in mod.functions}
        for name in names:
            if transform_name(name) in lifted:
                _prune(mod, name)
        mod = relax.transform.BundleModelParams()(mod)
        for gv, func in list(mod.functions.items()):
            if gv.name_hint in hidden:
                mod[gv] = func.with_attr("num_input", hidden[gv.name_hint])
        return mod

    return _lift


def _unpacked(func: relax.Function) -> relax.Function:
    """``func`` taking its weights one by one (``LiftTransformParams`` lifts work on
    parameters, not on fields of a tuple parameter): ``packed[i]`` becomes the i-th weight."""
    n_in = int(func.attrs["num_input"])
    packed = func.params[n_in]
    weights = [relax.Var(f"w{i}", ty) for i, ty in enumerate(packed.ty.fields)]

    @relax.expr_functor.mutator
    class _Fields(relax.PyExprMutator):
        def visit_tuple_getitem_(self, op):
            if op.tuple_value.same_as(packed):
                return weights[int(op.index)]
            return super().visit_tuple_getitem_(op)

        def visit_var_(self, op):
            if op.same_as(packed):  # the tuple used whole: rebuild it
                return relax.Tuple(weights)
            return op

    body = _Fields().visit_expr(func.body)
    return relax.Function(list(func.params[:n_in]) + weights, body, func.ret_ty, func.is_pure,
                          func.attrs)


def _prune(mod: tvm.IRModule, name: str) -> None:
    """Drop the weights ``name`` does not use from its parameters and from its transform's
    outputs (``LiftTransformParams`` passes every weight through), so that a weight the
    transform replaced is referenced by nothing once bound and can be freed."""
    func, tf = mod[name], mod[transform_name(name)]
    n_in = int(func.attrs["num_input"])
    used = set(relax.analysis.free_vars(func.body))
    keep = [i for i, p in enumerate(func.params[n_in:]) if p in used]
    if len(keep) == len(func.params) - n_in:
        return
    mod[name] = relax.Function(list(func.params[:n_in]) + [func.params[n_in + i] for i in keep],
                               func.body, func.ret_ty, func.is_pure, func.attrs)
    body = tf.body
    out = body.body
    if not isinstance(out, relax.Tuple):
        raise ValueError(f"{transform_name(name)}: expected a tuple of weights as its result")
    out = relax.Tuple([out.fields[i] for i in keep])
    mod[transform_name(name)] = relax.Function(tf.params, relax.SeqExpr(body.blocks, out),
                                               relax.TupleType([f.ty for f in out.fields]),
                                               tf.is_pure, tf.attrs)
