"""CUDA-graph storages per group of functions (sam3_nn.compiler.passes.cuda_graph), checked on the IR.

The pass runs in every CUDA build (sam3_nn.compiler.presets); here on a module of three functions
whose planned buffers differ in size, lowered up to StaticPlanBlockMemory (no GPU, no
code generation): the two large functions share one allocation function, as TVM's own
pass makes them, the small one gets its own, sized to its own buffers, and every cache
index stays distinct."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sam3_nn.compiler.passes.cuda_graph import GET_CACHED_ALLOC as GET
from sam3_nn.compiler.passes.cuda_graph import RUN_OR_CAPTURE as RUN
from sam3_nn.compiler.passes.cuda_graph import (_rewrite, plan_groups, planned_bytes,
                                                rewrite_cuda_graph)
from sam3_nn.compiler.pipeline import finalize_passes

MODE = {"param_mode": "packed", "effect_mode": "none"}  # the exported functions' calling mode


class _Three(nn.Module):
    def _f(self, x):  # x @ x^T, then two more products: planned intermediates
        y = op.matmul(x, op.permute_dims(x))
        z = op.matmul(y, x)
        return op.matmul(op.permute_dims(z), z)

    def big(self, x):
        return self._f(x)

    def mid(self, x):
        return self._f(x)

    def small(self, x):
        return self._f(x)


def _planned(shapes):
    mod, _ = _Three().export_tvm(spec={n: {"x": nn.spec.Tensor(s, "float16"), "$": MODE}
                                       for n, s in shapes.items()})
    return _lower(mod)


def _lower(mod):
    """Up to StaticPlanBlockMemory, as the CUDA pipeline lowers before RewriteCUDAGraph."""
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory()])
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}):
        return seq(mod)


def _cache_calls(func):
    """(builtin name, the call's tuple fields) of each CUDA-graph cache call in func."""
    calls = []
    with_ctx = tvm.ir.Op.get("relax.call_builtin_with_ctx")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(with_ctx) and isinstance(e.args[0], relax.ExternFunc):
            name = str(e.args[0].global_symbol)
            if name in (GET, RUN):
                calls.append((name, list(e.args[1].fields)))

    relax.analysis.post_order_visit(func, visit)
    return calls


@pytest.fixture(scope="module")
def planned():
    return _planned({"big": [256, 1024], "mid": [128, 1024], "small": [8, 64]})


def test_groups_share_large_functions_and_isolate_small_ones(planned):
    sizes = {n: planned_bytes(planned[n]) for n in ("big", "mid", "small")}
    assert sizes["big"] > sizes["mid"] > sizes["small"] > 0
    assert plan_groups(planned) == [["big", "mid"], ["small"]]


def test_small_function_gets_its_own_storages(planned):
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        ours = rewrite_cuda_graph(planned)
        theirs = relax.transform.RewriteCUDAGraph()(planned)
    # TVM's pass: one allocation function, sized by the largest user of each storage
    assert [gv.name_hint for gv in theirs.get_global_vars() if gv.name_hint.startswith("cuda_graph_alloc")] \
        == ["cuda_graph_alloc"]
    names = {gv.name_hint for gv in ours.get_global_vars()}
    assert {"cuda_graph_alloc", "cuda_graph_alloc_1"} <= names
    shared, own = ours["cuda_graph_alloc"], ours["cuda_graph_alloc_1"]
    # the shared storages are what TVM's pass allocates; the small function's are its own
    assert planned_bytes(shared) == planned_bytes(theirs["cuda_graph_alloc"])
    assert planned_bytes(own) == planned_bytes(planned["small"])
    assert planned_bytes(own) * 8 < planned_bytes(shared)

    allocs, captures = {}, {}
    for name in ("big", "mid", "small"):
        for builtin, fields in _cache_calls(ours[name]):
            if builtin == GET:
                allocs[name] = (fields[0].name_hint, int(fields[1]))
            else:
                captures.setdefault(name, []).append(int(fields[2]))
    assert allocs == {"big": ("cuda_graph_alloc", 0), "mid": ("cuda_graph_alloc", 0),
                      "small": ("cuda_graph_alloc_1", 1)}
    flat = [i for v in captures.values() for i in v]
    assert sorted(flat) == list(range(len(flat))) and set(captures) == {"big", "mid", "small"}


def test_capture_indices_stay_distinct_when_regions_share_a_capture_function():
    """TVM's pass gives structurally equal regions one capture function (here: two equal
    functions in one group) but an index each; the next group's indices start after the
    last index, not after the number of capture functions."""
    mod = _planned({"big": [256, 1024], "mid": [256, 1024], "small": [8, 64]})
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        ours = rewrite_cuda_graph(mod)
    runs = {n: [(f[0].name_hint, int(f[2])) for b, f in _cache_calls(ours[n]) if b == RUN]
            for n in ("big", "mid", "small")}
    assert runs["big"][0][0] == runs["mid"][0][0]  # one capture function for both
    flat = sorted(i for calls in runs.values() for _, i in calls)
    assert flat == list(range(len(flat)))


def test_one_group_is_tvms_pass():
    mod = _planned({"big": [256, 1024], "mid": [192, 1024]})
    assert plan_groups(mod) == [["big", "mid"]]
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        ours, theirs = rewrite_cuda_graph(mod), relax.transform.RewriteCUDAGraph()(mod)
    tvm.ir.assert_structural_equal(ours, theirs)


def test_off_without_cuda_graph_and_in_the_cuda_pipeline(planned):
    assert rewrite_cuda_graph(planned).same_as(planned)  # config unset: nothing to do
    from tvm.relax.backend.cuda import pipeline as backend

    names = [p.info.name for p in finalize_passes(backend, tvm.target.Target("cuda"))]
    assert "sam3_rewrite_cuda_graph" in names and "RewriteCUDAGraph" not in names


class _Weights(nn.Module):
    def __init__(self):
        self.a = nn.Linear(64, 64, bias=False, dtype="float16")
        self.b = nn.Linear(64, 64, bias=False, dtype="float16")

    def f(self, x):
        return self.b(op.relu(self.a(x)))


def test_replay_passes_packed_weights_unpacked_in_capture():
    """The weights a graph reads are unpacked inside its capture function (run only while
    capturing), so a replay passes the packed tuple instead of one argument per weight."""
    mod, _ = _Weights().export_tvm(spec={"f": {"x": nn.spec.Tensor([256, 64], "float16"), "$": MODE}})
    mod = _lower(mod)
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        ours = rewrite_cuda_graph(mod)
        theirs = relax.transform.RewriteCUDAGraph()(mod)
    relax.analysis.well_formed(ours)  # raises on the first violation

    def unpacked(func):  # indices unpacked from func's last parameter
        last, out = func.params[-1], []
        relax.analysis.post_order_visit(func, lambda e: out.append(int(e.index)) if isinstance(
            e, relax.TupleGetItem) and e.tuple_value.same_as(last) else None)
        return sorted(out)

    runs = [fields for name, fields in _cache_calls(theirs["f"]) if name == RUN]
    assert unpacked(theirs["f"]) == [0, 1] and runs  # TVM: the caller unpacks, passes each weight
    runs = [fields for name, fields in _cache_calls(ours["f"]) if name == RUN]
    assert unpacked(ours["f"]) == [] and runs
    seen = []
    for fields in runs:
        args, capture = list(fields[1].fields), ours[fields[0]]
        assert args[-1].same_as(ours["f"].params[-1]) and len(capture.params) == len(args)
        tvm.ir.assert_structural_equal(capture.params[-1].ty, ours["f"].params[-1].ty)
        seen += unpacked(capture)
    assert sorted(seen) == [0, 1]


class _TwoPairs(nn.Module):
    def __init__(self):
        self.a, self.b, self.c, self.d = (nn.Linear(64, 64, bias=False, dtype="float16") for _ in range(4))

    def f(self, x):
        return self.b(op.relu(self.a(x)))

    def g(self, x):
        return self.d(op.relu(self.c(x)))


def test_shared_capture_function_unpacks_each_callers_weights():
    """f and g are structurally equal on different weights: TVM's pass gives their regions
    one capture function; unpacking the weights inside it needs one copy per weight set."""
    spec = {n: {"x": nn.spec.Tensor([256, 64], "float16"), "$": MODE} for n in ("f", "g")}
    mod, named = _TwoPairs().export_tvm(spec=spec)
    mod = _lower(mod)
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}):
        regions = _rewrite(mod)  # TVM's pass on the group, before the weights move
        ours = rewrite_cuda_graph(mod)
    relax.analysis.well_formed(ours)
    used = {n: [f[0].name_hint for b, f in _cache_calls(regions[n]) if b == RUN] for n in ("f", "g")}
    assert used["f"] == used["g"] and used["f"]  # the same capture functions for both
    weights = {}
    for n in ("f", "g"):
        idx = []
        for fields in [f for b, f in _cache_calls(ours[n]) if b == RUN]:
            capture = ours[fields[0]]
            assert len(capture.params) == len(fields[1].fields)
            last = capture.params[-1]
            relax.analysis.post_order_visit(capture, lambda e: idx.append(int(e.index)) if isinstance(
                e, relax.TupleGetItem) and e.tuple_value.same_as(last) else None)
        weights[n] = sorted(idx)
    names = [p for p, _ in named]
    assert [names[i] for i in weights["f"]] == ["a.weight", "b.weight"]
    assert [names[i] for i in weights["g"]] == ["c.weight", "d.weight"]
