"""CUDA graphs with storages per group of functions.

TVM's ``RewriteCUDAGraph`` lifts the statically planned storages of every function into one
allocation function shared by all of them (each storage as large as its largest user) and
allocates all of it at the first call of any function. So a library's small functions carry
the big ones' buffers: ``encode_text`` alone allocated the vision encoder's 138 MB.

``rewrite_cuda_graph`` runs TVM's pass once per group of functions instead: the large
functions (planned storages at least ``1 / SHARE_RATIO`` of the largest one's) share their
storages as before, since they run one after another in a pipeline; every smaller function
gets storages of its own, sized to what it needs. Each group has its own allocation function
(``cuda_graph_alloc``, ``cuda_graph_alloc_1``, ...) and its own cache entries, so calling
one function allocates only its group's storages. The runtime keys CUDA graphs and cached
allocations by an index, which the pass numbers per module; the groups' indices are shifted
so that they stay distinct.

Each call of a function that replays a graph used to unpack, on the host, every weight the
graph reads from the packed parameter tuple and pass them all to ``run_or_capture``
(``encode_image``: 422 VM instructions and a 420-field tuple, ~0.3 ms of host time before
the graph launch, the GPU idle meanwhile). ``unpack_params_in_capture`` moves that
unpacking into the capture functions, which the VM runs only while capturing: a replay
passes the packed tuple itself.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars

from sam3_nn.compiler.passes.memory_plan import planned_storage_bytes
from sam3_nn.compiler.passes.param_transform import is_transform

SHARE_RATIO = 8  # functions planning less than 1/8 of the largest function's bytes: own storages
GET_CACHED_ALLOC = "vm.builtin.cuda_graph.get_cached_alloc"
RUN_OR_CAPTURE = "vm.builtin.cuda_graph.run_or_capture"
ALLOC_NAME = "cuda_graph_alloc"


def planned_bytes(func: relax.Function) -> int:
    """Bytes of the static ``R.memory.alloc_storage`` calls in ``func``."""
    return sum(planned_storage_bytes(func))


def plan_groups(mod: tvm.IRModule) -> List[List[str]]:
    """The functions that share storages: all large ones together, each small one alone.
    Weight transforms (run once, at bind time) are in no group: they keep plain launches, and
    no storage of theirs stays cached after their one call."""
    sizes = {gv.name_hint: planned_bytes(f) for gv, f in mod.functions.items()
             if isinstance(f, relax.Function) and not is_transform(gv.name_hint)}
    if not sizes:
        return []
    largest = max(sizes.values())
    shared = [n for n, s in sizes.items() if s * SHARE_RATIO >= largest and s > 0]
    alone = [[n] for n, s in sizes.items() if n not in shared]
    return ([shared] if shared else []) + alone


def _builtin(call) -> Optional[str]:
    """The builtin a ``call_builtin_with_ctx`` call names (e.g. ``RUN_OR_CAPTURE``), else None."""
    if (isinstance(call, relax.Call) and call.op.same_as(tvm.ir.Op.get("relax.call_builtin_with_ctx"))
            and isinstance(call.args[0], relax.ExternFunc)):
        return str(call.args[0].global_symbol)
    return None


@relax.expr_functor.mutator
class _Renumber(relax.PyExprMutator):
    """Point the cache lookups at this group's allocation function and shift the indices."""

    def __init__(self, mod, alloc_gv, alloc_index: int, capture_offset: int):
        super().__init__(mod)
        self.alloc_gv, self.alloc_index, self.capture_offset = alloc_gv, alloc_index, capture_offset

    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = _builtin(call)
        if name is None:
            return call
        fields = list(call.args[1].fields)
        if name == GET_CACHED_ALLOC:
            fields[0], fields[1] = self.alloc_gv, tvm.tirx.IntImm("int64", self.alloc_index)
        elif name == RUN_OR_CAPTURE:
            fields[2] = tvm.tirx.IntImm("int64", int(fields[2].value) + self.capture_offset)
        else:
            return call
        return relax.Call(call.op, [call.args[0], relax.Tuple(fields)], call.attrs, call.ty_args)


def _rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    groups = plan_groups(mod)
    kept = {gv: f for gv, f in mod.functions.items() if is_transform(gv.name_hint)}
    if len(groups) <= 1 and not kept:
        return relax.transform.RewriteCUDAGraph()(mod)
    shared = {gv: f for gv, f in mod.functions.items() if not isinstance(f, relax.Function)}
    out: Dict[tvm.ir.GlobalVar, tvm.ir.BaseFunc] = {**shared, **kept}
    renames = []  # (group's functions, its alloc function, alloc index, capture offset)
    captures = 0
    for k, names in enumerate(groups):
        sub = tvm.IRModule({**shared, **{gv: f for gv, f in mod.functions.items()
                                          if isinstance(f, relax.Function) and gv.name_hint in names}},
                           attrs=mod.attrs, global_infos=mod.global_infos)
        sub = relax.transform.RewriteCUDAGraph()(sub)
        alloc = None
        group_funcs = {}
        for gv, f in sub.functions.items():
            if gv in shared:
                continue
            if gv.name_hint == ALLOC_NAME:
                alloc = f
            elif gv.name_hint in names:
                group_funcs[gv] = f
            else:  # a lifted capture function (named after its caller, so unique)
                out[gv] = f
        # the capture indices this group's calls use (0 ..): structurally equal regions share
        # one capture function but keep an index each, so count the indices, not the functions
        indices: List[int] = []
        for f in group_funcs.values():
            relax.analysis.post_order_visit(f, lambda e: indices.append(
                int(e.args[1].fields[2].value)) if _builtin(e) == RUN_OR_CAPTURE else None)
        n_capture = 1 + max(indices, default=-1)
        renames.append((group_funcs, alloc, k, captures))
        captures += n_capture
    base = tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)
    bb = relax.BlockBuilder(base)
    for group_funcs, alloc, k, offset in renames:
        alloc_gv = bb.add_func(alloc, ALLOC_NAME if k == 0 else f"{ALLOC_NAME}_{k}") if alloc else None
        for gv, f in group_funcs.items():
            if alloc_gv is not None or offset:
                f = _Renumber(bb.get(), alloc_gv, k, offset).visit_expr(f)
            bb.add_func(f, gv.name_hint)
    return bb.finalize()


_normalize = relax.BlockBuilder().normalize  # fills in the types of the expressions built here


def _unpack_in_capture(capture: relax.Function, args, index, packed) -> relax.Function:
    """``capture`` taking ``packed``'s type in place of its parameters that receive weights
    unpacked from it (``index``: such an argument -> its index), unpacking them first."""
    p_new = relax.Var("packed_params", packed.ty)
    unpack = [relax.VarBinding(capture.params[j], _normalize(relax.TupleGetItem(p_new, index[a])))
              for j, a in enumerate(args) if a in index]
    keep = [capture.params[j] for j, a in enumerate(args) if a not in index]
    body = _normalize(relax.SeqExpr([relax.BindingBlock(unpack)] + list(capture.body.blocks),
                                    capture.body.body))
    return relax.Function(keep + [p_new], body, capture.ret_ty, capture.is_pure, capture.attrs)


def unpack_params_in_capture(mod: tvm.IRModule) -> tvm.IRModule:
    """In each function with packed parameters (the one parameter after ``num_input``),
    pass the packed tuple to its capture functions in place of the weights unpacked from it,
    and unpack them there; drop the caller's unpacking bindings that are left unused."""
    updates: Dict[tvm.ir.GlobalVar, relax.Function] = {}
    unpacked: Dict[tuple, tvm.ir.GlobalVar] = {}  # (capture function, weights unpacked) -> its function
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
            continue
        n_in = int(func.attrs["num_input"])
        if len(func.params) != n_in + 1 or not isinstance(func.body, relax.SeqExpr):
            continue
        packed = func.params[n_in]
        index = {b.var: int(b.value.index)  # var unpacked from the packed tuple -> its index
                 for block in func.body.blocks for b in block.bindings
                 if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.TupleGetItem)
                 and b.value.tuple_value.same_as(packed)}
        blocks, changed = [], False
        for block in func.body.blocks:
            bindings = []
            for b in block.bindings:
                v = b.value if isinstance(b, relax.VarBinding) else None
                if _builtin(v) == RUN_OR_CAPTURE:
                    fields = list(v.args[1].fields)
                    capture_gv, args = fields[0], list(fields[1].fields)
                    if any(a in index for a in args):
                        # RewriteCUDAGraph gives structurally equal regions one capture
                        # function; each weight layout unpacked gets a function of its own
                        layout = tuple((j, index[a]) for j, a in enumerate(args) if a in index)
                        key = (capture_gv, layout)
                        if key not in unpacked:
                            if capture_gv not in updates:
                                new_gv = capture_gv
                                fn = _unpack_in_capture(mod[capture_gv], args, index, packed)
                            else:  # a copy (fresh variables) as a new global, typed by a BlockBuilder
                                fn = _unpack_in_capture(copy_with_new_vars(mod[capture_gv]), args, index, packed)
                                n = sum(1 for k in unpacked if k[0].same_as(capture_gv))
                                new_gv = relax.BlockBuilder().add_func(fn, f"{capture_gv.name_hint}_w{n}")
                            updates[new_gv] = fn
                            unpacked[key] = new_gv
                        fields[0] = unpacked[key]
                        fields[1] = _normalize(relax.Tuple([a for a in args if a not in index] + [packed]))
                        call = relax.Call(v.op, [v.args[0], _normalize(relax.Tuple(fields))], v.attrs, v.ty_args)
                        b = relax.VarBinding(b.var, _normalize(call))
                        changed = True
                bindings.append(b)
            blocks.append(bindings)
        if not changed:
            continue
        used = set()  # what the bindings other than the unpacking ones, and the result, read
        relax.analysis.post_order_visit(
            relax.SeqExpr([relax.BindingBlock([b for bs in blocks for b in bs if b.var not in index])],
                          func.body.body),
            lambda e: used.add(e) if isinstance(e, relax.Var) else None)
        blocks = [relax.BindingBlock([b for b in bs if b.var not in index or b.var in used]) for bs in blocks]
        updates[gv] = relax.Function(func.params, _normalize(relax.SeqExpr(blocks, func.body.body)),
                                     func.ret_ty, func.is_pure, func.attrs)
    if not updates:
        return mod
    out = dict(mod.functions.items())
    out.update(updates)
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)


@tvm.transform.module_pass(opt_level=0, name="sam3_rewrite_cuda_graph")
def rewrite_cuda_graph(mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """``RewriteCUDAGraph`` per group of functions (see the module doc); a no-op unless
    ``relax.backend.use_cuda_graph`` is set, like TVM's pass."""
    if not bool(ctx.config.get("relax.backend.use_cuda_graph", False)):
        return mod
    return unpack_params_in_capture(_rewrite(mod))
