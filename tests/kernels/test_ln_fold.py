"""The LayerNorm fold (sam3_nn.kernels.cuda.ln_fold): which LayerNorms it folds, the IR it emits, and
that the folded weight terms reproduce LayerNorm + linear.

The CUDA kernels themselves (statistics from the residual GEMM's epilogue, the consumers'
epilogues) need an H100: ``bench/gemm.py --mode cuda`` checks them against PyTorch (its
"LN folded" cases), and ``bench/pipeline.py`` checks the whole model."""

import numpy as np
import pytest
import tvm
from tvm import relax

from sam3_nn.compiler.options import KernelOptions
from sam3_nn.compiler.pipeline import routing_passes
from sam3_nn.kernels.cuda import layer_norm as layer_norm_cuda

from sam3_nn.kernels.cuda import ln_fold

F16, F32 = "float16", "float32"


def _t(shape, dtype=F16):
    return relax.TensorType(list(shape), dtype)


def _block(rows=(1, 48, 48), width=1024, consumer="gelu", extra_ln_use=False, producer=ln_fold.PRODUCER,
           reshape=False):
    """``x = residual GEMM; y = LayerNorm(x) [reshaped]; z = consumer(y)``, as the rewrites
    before the fold leave a ViT block (externs named as the kernels'), returning ``z``
    (and ``y`` with ``extra_ln_use``)."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", _t(list(rows) + [width]))
    w = relax.Var("w", _t([width, width]))
    b = relax.Var("b", _t([width]))
    r = relax.Var("r", _t(list(rows) + [width]))
    gamma = relax.Var("gamma", _t([width]))
    beta = relax.Var("beta", _t([width]))
    n_out = 3 * 128 if consumer == "rope" else 512
    w2 = relax.Var("w2", _t([n_out, width]))
    b2 = relax.Var("b2", _t([n_out]))
    with bb.function("main", [a, w, b, r, gamma, beta, w2, b2]):
        with bb.dataflow():
            x = bb.emit(relax.call_dps_packed(producer, [a, w, b, r], _t(list(rows) + [width])))
            y = bb.emit(relax.call_dps_packed(layer_norm_cuda.SYMBOL,
                                              [x, gamma, beta, relax.prim_value(1e-6, "float64")], x.ty))
            tokens = int(np.prod(rows[1:]))
            if reshape or consumer == "rope":
                y_in = bb.emit(relax.op.reshape(y, [rows[0], tokens, width]))
            else:
                y_in = y
            if consumer == "rope":
                scalars = [relax.prim_value(v) for v in (2, 0, 0, 0, rows[1], rows[2])] + [
                    relax.prim_value(1.0, "float64"), relax.prim_value(10000.0, "float64")]
                z = bb.emit(relax.call_dps_packed("sam3_cutlass_gemm_nk_bias_rope_qk",
                                                  [y_in, w2, b2] + scalars, _t([rows[0], tokens, n_out])))
            else:
                z = bb.emit(relax.call_dps_packed("sam3_cutlass_gemm_nk_bias_gelu", [y_in, w2, b2],
                                                  _t(list(y_in.ty.shape.values[:-1]) + [n_out])))
            out = bb.emit_output(relax.Tuple([z, y]) if extra_ln_use else z)
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod):
    calls = []

    def visit(e):
        if (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
                and e.op.name == "relax.call_dps_packed"):
            calls.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    return {str(c.args[0].global_symbol): c for c in calls}


def _fold(mod):
    seen = []

    def objects(symbol):
        seen.append(symbol)
        return ()

    return ln_fold.fold_pass(objects)(mod), seen


@pytest.mark.parametrize("consumer", ["gelu", "rope"])
def test_fold_rewrites_producer_and_consumer(consumer):
    mod = _block(consumer=consumer)
    out, seen = _fold(mod)
    calls = _calls(out)
    new = ln_fold.CONSUMERS[{"gelu": "sam3_cutlass_gemm_nk_bias_gelu",
                             "rope": "sam3_cutlass_gemm_nk_bias_rope_qk"}[consumer]]
    assert set(calls) == {ln_fold.PRODUCER_STATS, new}  # no LayerNorm, no old GEMMs left
    assert sorted(seen) == sorted([ln_fold.PRODUCER_STATS, new])
    prod = calls[ln_fold.PRODUCER_STATS]
    x_ty, s_ty = prod.ty.fields  # the statistics GEMM returns (x, stats)
    assert [int(v) for v in s_ty.shape.values] == [48 * 48, 1024 // 128, 2] and s_ty.dtype == F32
    assert [int(v) for v in x_ty.shape.values] == [1, 48, 48, 1024]
    cons = calls[new]
    args = list(cons.args[1].fields)
    # (x: the producer's output itself, unreshaped; its stats; W'; c; b'; eps; RoPE scalars)
    assert isinstance(args[0], relax.Var) and [int(v) for v in args[0].ty.shape.values] == [1, 48, 48, 1024]
    assert [int(v) for v in args[1].ty.shape.values] == [48 * 48, 8, 2]
    assert args[2].ty.dtype == F16 and args[3].ty.dtype == F32 and args[4].ty.dtype == F32
    assert float(args[5].value) == pytest.approx(1e-6)
    assert len(args) == (6 + 8 if consumer == "rope" else 6)
    # the weight terms read weights only: the parameter lift can take them
    names = {p.name for p in out["main"].params}
    assert {"w2", "gamma", "beta", "b2"} <= names


def _two_blocks():
    """The producer in one dataflow block, LayerNorm and consumer in the next (x an output of
    the first): the statistics could not cross over."""
    bb = relax.BlockBuilder()
    rows, width = (1, 48, 48), 1024
    a, r = relax.Var("a", _t(list(rows) + [width])), relax.Var("r", _t(list(rows) + [width]))
    w, b = relax.Var("w", _t([width, width])), relax.Var("b", _t([width]))
    gamma, beta = relax.Var("gamma", _t([width])), relax.Var("beta", _t([width]))
    w2, b2 = relax.Var("w2", _t([512, width])), relax.Var("b2", _t([512]))
    with bb.function("main", [a, w, b, r, gamma, beta, w2, b2]):
        with bb.dataflow():
            x = bb.emit_output(relax.call_dps_packed(ln_fold.PRODUCER, [a, w, b, r], a.ty))
        with bb.dataflow():
            y = bb.emit(relax.call_dps_packed(layer_norm_cuda.SYMBOL,
                                              [x, gamma, beta, relax.prim_value(1e-6, "float64")], x.ty))
            z = bb.emit_output(relax.call_dps_packed("sam3_cutlass_gemm_nk_bias_gelu", [y, w2, b2],
                                                     _t(list(rows) + [512])))
        bb.emit_func_output(z)
    return bb.get()


@pytest.mark.parametrize("case", ["ln_output_reused", "producer_not_residual", "few_rows", "option_off",
                                  "two_blocks"])
def test_fold_leaves_what_it_cannot_take(case):
    if case == "ln_output_reused":
        mod = _block(extra_ln_use=True)
    elif case == "two_blocks":
        mod = _two_blocks()
    elif case == "producer_not_residual":
        mod = _block(producer="sam3_cutlass_gemm_nk_bias")
    elif case == "few_rows":
        mod = _block(rows=(1, 8, 8))
    else:
        mod = _block()
    if case == "option_off":  # the option leaves the pass out of the pipeline
        passes = [p for p in routing_passes(tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}),
                                            KernelOptions(ln_fold=False)) if "ln_fold" in p.info.name]
        assert passes == []
        out = mod
    else:
        out, _ = _fold(mod)
    calls = _calls(out)
    assert layer_norm_cuda.SYMBOL in calls
    assert ln_fold.PRODUCER_STATS not in calls
    assert not set(ln_fold.CONSUMERS.values()) & set(calls)


def test_folded_weight_terms_match_layer_norm_linear():
    """W', c and b' from the fold's Relax ops (compiled for the CPU), applied as the
    consumer's epilogue does with the statistics the producer's epilogue emits (sums and
    sums of squares of the fp16 rows over 128-column parts), match LayerNorm + linear in
    float64 on rows with a large mean (the cancellation the fold relies on)."""
    rng = np.random.default_rng(0)
    n, k, m, eps = 96, 256, 64, 1e-6
    w = relax.Var("w", _t([n, k]))
    b = relax.Var("b", _t([n]))
    gamma = relax.Var("gamma", _t([k]))
    beta = relax.Var("beta", _t([k]))
    bb = relax.BlockBuilder()
    with bb.function("terms", [w, b, gamma, beta]):
        with bb.dataflow():
            bindings = []
            wp, c, bp = ln_fold._weights(bindings, w, b, gamma, beta, "t")
            for bd in bindings:
                bb.emit_normalized(bd)
            out = bb.emit_output(relax.Tuple([wp, c, bp]))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    W = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
    B = rng.standard_normal(n).astype(np.float16)
    G = (1 + 0.5 * rng.standard_normal(k)).astype(np.float16)
    Be = rng.standard_normal(k).astype(np.float16)
    wp_, c_, bp_ = [t.numpy() for t in vm["terms"](*[tvm.runtime.tensor(a) for a in (W, B, G, Be)])]
    assert wp_.dtype == np.float16 and c_.dtype == np.float32 and bp_.dtype == np.float32
    # rows: mean 20, std 1, as fp16 (the residual GEMM's stored output)
    x = (20 + rng.standard_normal((m, k))).astype(np.float16)
    xf = x.astype(np.float32)
    parts = xf.reshape(m, k // 128, 128)
    s1 = parts.sum(-1).sum(-1)
    s2 = (parts * parts).sum(-1).sum(-1)
    mean = s1 / k
    rstd = 1 / np.sqrt(np.maximum(s2 / k - mean * mean, 0) + eps)
    acc = xf @ wp_.astype(np.float32).T  # the GEMM: fp16 operands, fp32 accumulation
    got = rstd[:, None] * acc + (-mean * rstd)[:, None] * c_[None, :] + bp_[None, :]
    x64 = x.astype(np.float64)
    xn = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
    ref = (xn * G.astype(np.float64) + Be.astype(np.float64)) @ W.astype(np.float64).T + B
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 3e-3, err  # W' rounded to fp16 (2^-11 relative per weight), fp32 sums
    # and the terms are what they should be: dropping gamma, c or beta's term fails
    assert np.abs(wp_.astype(np.float32) - W.astype(np.float32)).max() > 0.01
    no_c = rstd[:, None] * acc + bp_[None, :]
    assert np.abs(no_c - ref).max() / np.abs(ref).max() > 0.1
