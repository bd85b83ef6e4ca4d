"""Arena planning: one statically planned storage per function, tensors at offsets in it.

TVM's ``StaticPlanBlockMemory`` plans with whole storages ("tokens"): a tensor either takes
a free storage at least as large, or grows the largest smaller one, and a storage holds one
live tensor at a time. In the vision encoder that keeps a 10 MB residual map in a 47 MB
storage while the next 47 MB MLP activation needs a second one, and the neck's 42.5 MB maps
add more: 118 MB of storages where the live tensors never need more than about 90 MB.

``arena_pass`` runs right after ``StaticPlanBlockMemory`` and re-plans the static storages
of each function by byte offsets: each tensor's lifetime runs from its allocation to the
last binding that reads it or anything derived from it (views, tuples, aliases), and the
tensors are placed, largest first, at the lowest offset where they overlap no tensor whose
lifetime meets theirs (the "greedy by size" offset planner). The function then allocates
one storage, as large as the highest end, and each tensor is a view at its offset. Only
the static storages of a flat function body are re-planned; anything else is left as TVM
planned it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import tvm
from tvm import relax

ALIGN = 256  # bytes: every tensor starts on a 256-byte boundary (TMA needs 16, CUTLASS 128)
# tensors of LARGE bytes or more start on LARGE_ALIGN boundaries: at 256-byte-aligned offsets
# the ViT's fc1 and qkv GEMMs ran 2-3% slower on the H100 (kernel profile: 2.61 against
# 2.55 ms for the 33 fc1 GEMMs; encode_image 0.08-0.13 ms), as fast as in storages of their
# own at 2 MiB
LARGE, LARGE_ALIGN = 1 << 20, 2 << 20

_ALLOC_STORAGE = "relax.memory.alloc_storage"
_ALLOC_TENSOR = "relax.memory.alloc_tensor"
_ZERO_OFFSET = relax.op.memory.ensure_zero_offset
_normalize = relax.BlockBuilder().normalize  # fills in the types of the calls built here


def _op_name(value) -> Optional[str]:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def _int(expr) -> Optional[int]:
    return int(expr.value) if isinstance(expr, tvm.tirx.IntImm) else None


def _static_shape(expr) -> Optional[List[int]]:
    if not isinstance(expr, relax.ShapeExpr):
        return None
    dims = [int(v.value) if isinstance(v, tvm.tirx.IntImm) else None for v in expr.values]
    return None if any(d is None for d in dims) else dims


def _var_refs(expr) -> List[relax.Var]:
    """The variables ``expr`` reads (with repeats)."""
    refs: List[relax.Var] = []
    relax.analysis.post_order_visit(expr, lambda e: refs.append(e) if isinstance(e, relax.Var) else None)
    return refs


@dataclass
class _Tensor:
    var: relax.Var      # the alloc_tensor binding's variable
    index: int          # its binding's position (first use)
    nbytes: int
    last: int = -1      # position of the last binding that reads it (or a value derived from it)
    offset: int = -1    # assigned offset in the arena


def alignment(nbytes: int) -> int:
    return LARGE_ALIGN if nbytes >= LARGE else ALIGN


def _round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def place(tensors: List[_Tensor]) -> int:
    """Assign each tensor an offset (largest first, lowest gap that fits among the tensors
    already placed whose lifetimes meet its own, on its ``alignment``); returns the arena
    size in bytes."""
    placed: List[_Tensor] = []
    for t in sorted(tensors, key=lambda t: (-t.nbytes, t.index)):
        align = alignment(t.nbytes)
        size = _round_up(t.nbytes)
        busy = sorted((p.offset, p.offset + _round_up(p.nbytes)) for p in placed
                      if p.index <= t.last and t.index <= p.last)
        offset = 0
        for lo, hi in busy:
            if offset + size <= lo:
                break
            offset = max(offset, _round_up(hi, align))
        t.offset = offset
        placed.append(t)
    return max((t.offset + _round_up(t.nbytes) for t in placed), default=0)


def plan_function(func: relax.Function) -> relax.Function:
    """``func`` with its static storages merged into one arena (unchanged when there is
    nothing to merge or the body is not a flat sequence of binding blocks)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func
    bindings = [b for block in body.blocks for b in block.bindings]
    if not all(isinstance(b, relax.VarBinding) for b in bindings):
        return func

    storages: Dict[relax.Var, int] = {}  # static storage var -> its binding position
    for i, b in enumerate(bindings):
        v = b.value
        if (_op_name(v) == _ALLOC_STORAGE and _static_shape(v.args[0]) is not None
                and _int(v.args[1]) == 0 and getattr(v.args[2], "value", None) == "global"):
            storages[b.var] = i
    if len(storages) < 2:
        return func

    tensors: Dict[relax.Var, _Tensor] = {}
    for i, b in enumerate(bindings):
        v = b.value
        if _op_name(v) == _ALLOC_TENSOR and isinstance(v.args[0], relax.Var) and v.args[0] in storages:
            shape = _static_shape(v.args[2])
            if shape is None or _int(v.args[1]) != 0:
                return func
            dtype = tvm.runtime.DataType(str(v.args[3].value))
            nbytes = math.prod(shape) * ((dtype.bits * dtype.lanes + 7) // 8)
            tensors[b.var] = _Tensor(b.var, i, nbytes, last=i)

    # lifetimes: a value computed from a planned tensor (a view, a tuple, an alias, any
    # call's result) keeps the tensor alive as long as itself is read
    roots: Dict[relax.Var, Set[relax.Var]] = {v: {v} for v in tensors}
    storage_uses: Set[relax.Var] = set()
    for i, b in enumerate(bindings):
        if b.var in tensors:
            continue
        reached: Set[relax.Var] = set()
        for r in _var_refs(b.value):
            if r in storages:
                storage_uses.add(r)  # a storage read other than by its planned tensors
            reached |= roots.get(r, set())
        for t in reached:
            tensors[t].last = max(tensors[t].last, i)
        if reached:
            roots[b.var] = reached
    if storage_uses:
        return func
    end = len(bindings)
    for r in _var_refs(body.body):
        for t in roots.get(r, set()):
            tensors[t].last = end

    size = place(list(tensors.values()))
    first = min(storages.values())
    arena = relax.Var("arena", bindings[first].var.ty)
    template = bindings[first].value
    size_expr = relax.ShapeExpr([tvm.tirx.IntImm("int64", size)])
    arena_value = _normalize(relax.Call(template.op, [size_expr] + list(template.args[1:]),
                                        template.attrs, template.ty_args))

    new_blocks = []
    for block in body.blocks:
        out = []
        for b in block.bindings:
            if b.var in storages:
                if storages[b.var] == first:
                    out.append(relax.VarBinding(arena, arena_value))
                continue
            if b.var in tensors:
                v = b.value
                t = tensors[b.var]
                args = [arena, tvm.tirx.IntImm("int64", t.offset)] + list(v.args[2:])
                call = _normalize(relax.Call(v.op, args, v.attrs, v.ty_args))
                if t.offset == 0:
                    out.append(relax.VarBinding(b.var, call))
                else:
                    # TVM's kernels take tensors with a zero byte offset: a view whose data
                    # pointer is moved instead (no copy on CUDA and the CPU)
                    view = relax.Var(b.var.name + "_at", b.var.ty)
                    out.append(relax.VarBinding(view, call))
                    out.append(relax.VarBinding(b.var, _normalize(_ZERO_OFFSET(view))))
                continue
            out.append(b)
        new_blocks.append(relax.BindingBlock(out) if not isinstance(block, relax.DataflowBlock)
                          else relax.DataflowBlock(out))
    new_body = relax.SeqExpr(new_blocks, body.body)
    return relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs)


def planned_storage_bytes(func: relax.Function) -> List[int]:
    """Sizes in bytes of ``func``'s static ``alloc_storage`` calls, in binding order."""
    sizes: List[int] = []

    def visit(e):
        if _op_name(e) == _ALLOC_STORAGE:
            shape = _static_shape(e.args[0])
            if shape is not None:
                sizes.append(math.prod(shape))

    relax.analysis.post_order_visit(func, visit)
    return sizes


@tvm.transform.module_pass(opt_level=0, name="sam3_arena_plan")
def arena_pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Module pass: :func:`plan_function` on every Relax function."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            new = plan_function(func)
            if not new.same_as(func):
                updates[gv] = new
    if not updates:
        return mod
    out = dict(mod.functions.items())
    out.update(updates)
    return tvm.IRModule(out, attrs=mod.attrs, global_infos=mod.global_infos)
