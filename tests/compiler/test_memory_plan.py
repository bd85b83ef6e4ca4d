"""The arena planner (sam3_nn.compiler.passes.memory_plan): offsets that never let two live tensors overlap,
one storage per function, and compiled results unchanged (llvm, static shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sam3_nn.compiler.passes.memory_plan import (ALIGN, LARGE, _Tensor, alignment, arena_pass,
                                                  place, planned_storage_bytes)
from sam3_nn.compiler.pipeline import ARENA_TARGETS, finalize_passes

MODE = {"param_mode": "packed", "effect_mode": "none"}


def _overlap(a, b) -> bool:
    live = a.index <= b.last and b.index <= a.last
    ra = (a.offset, a.offset + -(-a.nbytes // ALIGN) * ALIGN)
    rb = (b.offset, b.offset + -(-b.nbytes // ALIGN) * ALIGN)
    return live and ra[0] < rb[1] and rb[0] < ra[1]


def test_place_never_overlaps_live_tensors():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 25))
        ts = []
        for i in range(n):
            start = int(rng.integers(0, 40))
            ts.append(_Tensor(None, start, int(rng.integers(1, 5000)), last=start + int(rng.integers(0, 10))))
        size = place(ts)
        assert all(t.offset % ALIGN == 0 and t.offset + t.nbytes <= size for t in ts)
        assert not any(_overlap(a, b) for i, a in enumerate(ts) for b in ts[i + 1:])
        # never more than the tensors laid end to end, never less than the most live at once
        assert size <= sum(-(-t.nbytes // ALIGN) * ALIGN for t in ts)
        peak = max(sum(t.nbytes for t in ts if t.index <= k <= t.last) for k in range(60))
        assert size >= peak


def test_large_tensors_start_on_large_boundaries():
    ts = [_Tensor(None, 0, 300, last=3), _Tensor(None, 1, LARGE + 4096, last=2),
          _Tensor(None, 1, 3 * LARGE, last=4), _Tensor(None, 2, 1000, last=2)]
    place(ts)
    assert all(t.offset % alignment(t.nbytes) == 0 for t in ts)
    assert alignment(LARGE) > ALIGN and alignment(LARGE - 1) == ALIGN
    assert not any(_overlap(a, b) for i, a in enumerate(ts) for b in ts[i + 1:])


def test_place_reuses_the_space_of_dead_tensors():
    # a chain: each tensor read only by the next; two live at a time
    ts = [_Tensor(None, i, 1024 * (i % 2 + 1), last=i + 1) for i in range(6)]
    assert place(ts) == 3 * 1024


class _Chain(nn.Module):
    """A function whose intermediates TVM plans in several storages of different sizes."""

    def f(self, x):
        y = op.matmul(x, op.permute_dims(x))            # [n, n]
        z = op.matmul(y, x)                              # [n, k]
        w = op.concat([z, z, z, z], dim=1)               # [n, 4k]
        v = op.matmul(op.permute_dims(w), w)             # [4k, 4k]
        s = op.sum(v, axis=0, keepdims=True)             # [1, 4k]
        return op.matmul(w, op.permute_dims(s)) + op.sum(y)  # [n, 1]


def _lowered(n=24, k=16, dtype="float32", target="llvm"):
    mod, _ = _Chain().export_tvm(spec={"f": {"x": nn.spec.Tensor([n, k], dtype), "$": MODE}})
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory()])
    with tvm.target.Target(target):
        return seq(mod)


def _tensors(func):
    """(var, storage, offset, bytes, first, last) of every static alloc_tensor in ``func``,
    with the lifetime computed independently of the planner (any later mention of the
    tensor or of a variable bound to a value mentioning it)."""
    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    out, derived = [], {}
    for i, b in enumerate(bindings):
        v = b.value
        if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.memory.alloc_tensor":
            dt = tvm.runtime.DataType(str(v.args[3].value))
            nbytes = int(np.prod([int(s) for s in v.args[2].values])) * dt.bits // 8
            out.append([b.var, v.args[0], int(v.args[1].value), nbytes, i, i])
            derived[b.var] = {len(out) - 1}
            continue
        refs = []
        relax.analysis.post_order_visit(v, lambda e: refs.append(e) if isinstance(e, relax.Var) else None)
        hit = set().union(*[derived.get(r, set()) for r in refs]) if refs else set()
        for t in hit:
            out[t][5] = i
        if hit:
            derived[b.var] = hit
    return out


def test_arena_plan_one_storage_and_no_live_overlap():
    before = _lowered()
    theirs = planned_storage_bytes(before["f"])
    assert len(theirs) >= 2  # TVM planned several storages
    after = arena_pass(before)
    ours = planned_storage_bytes(after["f"])
    assert len(ours) == 1 and ours[0] <= sum(theirs)
    ts = _tensors(after["f"])
    assert len(ts) >= 3 and len({str(t[1]) for t in ts}) == 1
    assert any(t[2] > 0 for t in ts)  # some tensor sits at an offset
    for i, a in enumerate(ts):
        assert a[2] + a[3] <= ours[0]
        for b in ts[i + 1:]:
            live = a[4] <= b[5] and b[4] <= a[5]
            assert not (live and a[2] < b[2] + b[3] and b[2] < a[2] + a[3]), (a, b)


def test_arena_in_the_cuda_and_cpu_pipelines():
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    for backend, target in ((cuda, "cuda"), (cpu, "llvm")):
        names = [p.info.name for p in finalize_passes(backend, tvm.target.Target(target))]
        assert names.index("sam3_arena_plan") == names.index("StaticPlanBlockMemory") + 1
    assert set(ARENA_TARGETS) == {"cuda", "llvm"}


@pytest.mark.parametrize("dtype", ["float32"])
def test_compiled_results_unchanged(dtype):
    """The arena's tensors at offsets (zero-offset views) compute what numpy computes."""
    from tests.refs import compile_ir

    mod, _ = _Chain().export_tvm(spec={"f": {"x": nn.spec.Tensor([24, 16], dtype), "$": MODE}})
    vm = compile_ir(mod)
    x = np.random.default_rng(1).standard_normal((24, 16)).astype(dtype)
    got = vm["f"](tvm.runtime.tensor(x), []).numpy()
    x64 = x.astype(np.float64)
    y = x64 @ x64.T
    w = np.concatenate([y @ x64] * 4, axis=1)
    want = w @ (w.T @ w).sum(0, keepdims=True).T + y.sum()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
