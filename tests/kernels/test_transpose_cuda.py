"""The CUDA layout transpose: which permutes the rewrite routes to the kernel, the passes in
the CUDA pipeline, the kernel's library, and (on a GPU) its results against numpy.

Building the library needs nvcc (skips without it); running the kernel needs a CUDA GPU
(marked ``gpu``, skips where none is present).
"""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tests.cuda_lib import build_routed, cuda_device, exported_symbols
from sam3_nn.compiler.options import KernelOptions
from sam3_nn.compiler.pipeline import routing_passes
from sam3_nn.kernels.cuda import transpose as transpose_cuda
from sam3_nn.kernels.cuda import source as cuda_source

CUDA = {"kind": "cuda", "arch": "sm_90a"}

# (shape, axes): routed: NHWC -> NCHW with a tile-ragged H * W (36 * 36 = 1296), NCHW -> NHWC,
# batch 2 with sizes that are not multiples of the 64 x 64 tile
ROUTED = [((1, 36, 36, 256), (0, 3, 1, 2)), ((1, 256, 9, 8), (0, 2, 3, 1)), ((2, 5, 24, 40), (0, 3, 1, 2))]
# swaps of adjacent axes above a block of a multiple of 8: the pixel shuffle of a 2x2
# transposed convolution ([B, H, W, 2, 2, C]), a window partition, a 4D swap
SWAPS = [((1, 6, 10, 2, 2, 24), (0, 1, 3, 2, 4, 5)), ((2, 2, 3, 3, 3, 16), (0, 1, 3, 2, 4, 5)),
         ((3, 7, 5, 8), (0, 2, 1, 3))]


class Permutes(nn.Module):
    """``forward(a, b, c, d, e, f, g, h, i)``: the ROUTED cases, then ones left to TVM: C = 12
    (not a multiple of 8), a swap above 4 elements, float32, a dynamic batch, a swap of the
    last two axes (no inner block), a swap of two axes that are not adjacent."""

    def forward(self, a, b, c, d, e, f, g, h, i):
        routed = tuple(op.permute_dims(x, list(ax)) for x, (_, ax) in zip((a, b, c), ROUTED))
        return routed + (op.permute_dims(d, [0, 3, 1, 2]), op.permute_dims(e, [0, 2, 1, 3]),
                         op.permute_dims(f, [0, 3, 1, 2]), op.permute_dims(g, [0, 3, 1, 2]),
                         op.permute_dims(h, [0, 1, 3, 2]), op.permute_dims(i, [2, 1, 0, 3]))


def _module():
    t = lambda *s, d="float16": nn.spec.Tensor(list(s), d)  # noqa: E731
    spec = {"forward": {"a": t(*ROUTED[0][0]), "b": t(*ROUTED[1][0]), "c": t(*ROUTED[2][0]),
                        "d": t(1, 4, 4, 12), "e": t(1, 8, 8, 4), "f": t(1, 8, 8, 16, d="float32"),
                        "g": t("n", 8, 8, 16), "h": t(2, 3, 8, 16), "i": t(2, 3, 4, 2)}}
    mod, _ = Permutes().export_tvm(spec=spec)
    return mod


def _calls(mod):
    """(kernel calls' splits, remaining relax.permute_dims calls) in ``forward``."""
    kernel, tir = [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_dps_packed" and e.args[0].global_symbol in transpose_cuda.SYMBOLS:
                kernel.append((e.args[0].global_symbol, int(e.args[1].fields[1].value)))
            elif e.op.name == "relax.permute_dims":
                tir.append(e)

    relax.analysis.post_order_visit(mod["forward"], visit)
    return kernel, tir


def test_rewrite_routes_exactly_the_float16_layout_permutes():
    mod = transpose_cuda.rewrite_pass()(_module())
    kernel, tir = _calls(mod)
    # NHWC -> NCHW splits after H, W; NCHW -> NHWC after C
    assert kernel == [(transpose_cuda.SYMBOL, 3), (transpose_cuda.SYMBOL, 2), (transpose_cuda.SYMBOL, 3)]
    assert len(tir) == 6
    # the kernel's output keeps the permute's shape
    assert "R.Tensor((1, 256, 36, 36)" in mod["forward"].script()


def test_rewrite_off():
    """The build option leaves the transpose passes out of the CUDA pipeline."""
    names = [p.info.name for p in routing_passes(tvm.target.Target(CUDA), KernelOptions(cuda_transpose=False))]
    assert not any(n in names for n in ("sam3_transpose_cuda_rewrite", "sam3_transpose_cuda_inplace"))


class Swaps(nn.Module):
    def forward(self, a, b, c):
        return tuple(op.permute_dims(x, list(ax)) for x, (_, ax) in zip((a, b, c), SWAPS))


def test_rewrite_routes_adjacent_swaps_above_a_block():
    spec = {"forward": {k: nn.spec.Tensor(list(s), "float16") for k, (s, _) in zip("abc", SWAPS)}}
    mod, _ = Swaps().export_tvm(spec=spec)
    kernel, tir = _calls(transpose_cuda.rewrite_pass()(mod))
    assert kernel == [(transpose_cuda.SYMBOL_SWAP, 2), (transpose_cuda.SYMBOL_SWAP, 2),
                      (transpose_cuda.SYMBOL_SWAP, 1)] and not tir


@pytest.mark.skipif(not cuda_source.cutlass_available(),
                    reason="CUTLASS headers not found (the GEMM rewrite's CUDA provider needs them)")
def test_neck_deconvolutions_fuse_bias_and_gelu_and_swap_on_cuda():
    """The 2x2 transposed convolutions: bias (and the GELU between the two of the 4x level)
    in the GEMM's epilogue, the pixel shuffle through the swap kernel; the second one and the
    1x1 convolution after it are one GEMM (its weights folded by a GEMM on the weights); no
    TIR permute of an activation is left."""
    from sam3_nn.model.vision import FPNLayer

    class Neck(nn.Module):
        def __init__(self):
            self.fpn = FPNLayer(64, 32, 4.0)

        def forward(self, x):
            return self.fpn(x)

    m = Neck()
    m.to("float16")
    target = tvm.target.Target(CUDA)
    mod, _ = m.export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, 6, 6, 64], "float16")}})
    # the operator routes, GEMM, LayerNorm (+ fold) and in-place swap rewrites
    mod = tvm.transform.Sequential(routing_passes(target)[:5])(mod)
    s = mod["forward"].script()
    assert s.count('call_dps_packed("sam3_cutlass_gemm_nk_bias_gelu"') == 1
    assert s.count('call_dps_packed("sam3_cutlass_gemm_nk_bias"') == 1  # second deconv + 1x1 conv
    assert s.count('call_dps_packed("sam3_cutlass_gemm_kn"') == 1  # their weights folded
    # two shuffles and the folded weights' shuffle, each of a GEMM's output used once: in place
    assert s.count("R.call_tir_inplace(sam3_swap_inplace") == 3
    assert 'call_dps_packed("sam3_cuda_swap_axes"' not in s
    perms = [ln for ln in s.splitlines() if "R.permute_dims(" in ln]
    assert all("weight" in ln for ln in perms), perms


def test_cuda_pipeline_rewrites_and_attaches():
    names = [p.info.name for p in routing_passes(tvm.target.Target(CUDA))]
    assert "sam3_transpose_cuda_rewrite" in names and "sam3_transpose_cuda_object" in names
    llvm = [p.info.name for p in routing_passes(tvm.target.Target("llvm"))]
    assert not any("transpose" in n for n in llvm)


def test_attach_pass_leaves_other_modules_alone():
    mod = _module()  # no kernel call before the rewrite
    assert transpose_cuda.attach_pass(tvm.target.Target(CUDA))(mod).same_as(mod)


class _Routed(nn.Module):
    def forward(self, a, b, c, d, e, f):
        return tuple(op.permute_dims(x, list(ax)) for x, (_, ax) in zip((a, b, c, d, e, f), ROUTED + SWAPS))


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    """A library for target cuda (sm_90a) computing the ROUTED cases with the kernel."""
    spec = {"forward": {k: nn.spec.Tensor(list(s), "float16") for k, (s, _) in zip("abcdef", ROUTED + SWAPS)}}
    mod, _ = _Routed().export_tvm(spec=spec)
    return build_routed(transpose_cuda, mod, tmp_path_factory.mktemp("tr") / "tr.so", CUDA)


def test_cuda_library_links_the_kernel(cuda_library):
    syms = exported_symbols(cuda_library)
    assert "__tvm_ffi_sam3_cuda_transpose" in syms and "__tvm_ffi_sam3_cuda_swap_axes" in syms


@pytest.mark.gpu
def test_kernel_matches_numpy_on_gpu(cuda_library):
    """A copy: bit-equal to numpy's transpose."""
    dev = cuda_device()
    if dev is None:
        pytest.skip("no CUDA GPU here")
    vm = relax.VirtualMachine(tvm.runtime.load_module(cuda_library), dev)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype("float16") for s, _ in ROUTED + SWAPS]
    outs = vm["forward"](*[tvm.runtime.tensor(x, dev) for x in xs])
    for x, (_, axes), got in zip(xs, ROUTED + SWAPS, outs):
        np.testing.assert_array_equal(got.numpy(), np.transpose(x, axes))


# ---- the pixel shuffle in place ------------------------------------------------------

SHUFFLE = (2, 5, 6, 2, 2, 24)  # [B, H, W, 2, 2, C]: the 2x2 transposed convolution's output
SHUFFLE_AXES = [0, 1, 3, 2, 4, 5]


def _doubled(x):
    """A fresh tensor (a ``call_tir``) computed from ``x``."""
    from tvm import te

    return op.tensor_expr_op(lambda t: te.compute(t.shape, lambda *i: t(*i) * tvm.tirx.const(2, t.dtype)),
                             "double", [x])


class Shuffles(nn.Module):
    """``a``: a fresh map used once (shuffled in place); ``b``: a fresh map also returned
    (copied); ``c``: the argument itself (copied)."""

    def forward(self, a, b, c):
        da, db = _doubled(a), _doubled(b)
        return (op.permute_dims(da, SHUFFLE_AXES), op.permute_dims(db, SHUFFLE_AXES), db,
                op.permute_dims(c, SHUFFLE_AXES))


def _shuffles():
    spec = {"forward": {k: nn.spec.Tensor(list(SHUFFLE), "float16") for k in "abc"}}
    mod, _ = Shuffles().export_tvm(spec=spec)
    return mod


def test_inplace_only_where_the_input_is_dead():
    mod = transpose_cuda.rewrite_pass()(transpose_cuda.inplace_pass()(_shuffles()))
    s = mod["forward"].script()
    assert s.count("R.call_tir_inplace(") == 1
    kernel, tir = _calls(mod)
    assert kernel == [(transpose_cuda.SYMBOL_SWAP, 2), (transpose_cuda.SYMBOL_SWAP, 2)] and not tir


def test_inplace_plan_fits_shared_memory():
    mod = _shuffles()
    perm = []
    relax.analysis.post_order_visit(mod["forward"], lambda e: perm.append(e) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.permute_dims" else None)
    a, p, q, inner, sl = transpose_cuda.inplace_plan(perm[0])
    assert (a, p, q, inner) == (2 * 5, 6, 2, 2 * 24) and inner % sl == 0
    assert p * q * sl * 2 <= transpose_cuda.SMEM_BYTES


@pytest.mark.gpu
def test_inplace_shuffle_matches_numpy_on_gpu(tmp_path):
    """The in-place kernel (a TIR kernel) against numpy, including a map whose rows do not
    fill the last pass of the block's threads."""
    from tests.cuda_lib import build_library

    dev = cuda_device()
    if dev is None:
        pytest.skip("no CUDA GPU here")
    target = tvm.target.Target(CUDA)
    path = build_library(_shuffles(), [transpose_cuda.inplace_pass(), transpose_cuda.rewrite_pass(),
                                       transpose_cuda.attach_pass(target)], target, tmp_path / "s.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), dev)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(SHUFFLE).astype("float16") for _ in range(3)]
    got = vm["forward"](*[tvm.runtime.tensor(x, dev) for x in xs])
    want = [np.transpose(xs[0] * 2, SHUFFLE_AXES), np.transpose(xs[1] * 2, SHUFFLE_AXES), xs[1] * 2,
            np.transpose(xs[2], SHUFFLE_AXES)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w)
