"""The CUDA layer norm: which layer norms the rewrite routes to the kernel, the passes in the
CUDA pipeline, the kernel's object and library, and (on a GPU) its results.

Building the object and the library needs nvcc (those tests skip without it); running the
kernel needs a CUDA GPU (marked ``gpu``, skips where none is present). The timing and the
comparison with torch and TVM's own kernel are in bench/layer_norm_cuda.py.
"""

import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tests.cuda_lib import build_routed, cuda_device, exported_symbols
from sam3_nn.compiler.options import KernelOptions
from sam3_nn.compiler.pipeline import routing_passes
from sam3_nn.kernels.cuda import layer_norm as layer_norm_cuda
from sam3_nn.kernels.cuda import source as cuda_source

CUDA = {"kind": "cuda", "arch": "sm_90a"}
needs_nvcc = pytest.mark.skipif(not cuda_source.nvcc_available(), reason="nvcc not found")


def reference(x, gamma, beta, eps):
    """What the kernel computes, in float64: the biased variance of each row over the last
    axis, eps inside the square root (``torch.nn.functional.layer_norm``)."""
    x = np.asarray(x, "float64")
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(gamma, "float64") + np.asarray(beta, "float64")


class Norms(nn.Module):
    """Routed: float16 over C = 64, 8 and 4096. Not: C = 60 (not 16-byte rows), C = 4104
    (above MAX_C), float32, and a norm over the last two axes."""

    def __init__(self):
        self.c64 = nn.LayerNorm(64, eps=1e-6)
        self.c8 = nn.LayerNorm(8)
        self.c4096 = nn.LayerNorm(4096)
        self.c60 = nn.LayerNorm(60)
        self.c4104 = nn.LayerNorm(4104)
        self.f32 = nn.LayerNorm(64)
        self.two_weight = nn.Parameter((5, 64))
        self.two_bias = nn.Parameter((5, 64))

    def forward(self, x, a, b, c, d, y, z):
        two = op.layer_norm(z, [5, 64], self.two_weight, self.two_bias)
        return self.c64(x), self.c8(a), self.c4096(b), self.c60(c), self.c4104(d), self.f32(y), two


def _norms_module():
    m = Norms()
    m.to("float16")
    m.f32.to("float32")
    t = lambda *s, d="float16": nn.spec.Tensor(list(s), d)  # noqa: E731
    spec = {"forward": {"x": t("b", 5, 64), "a": t(3, 8), "b": t(2, 4096), "c": t(3, 60),
                        "d": t(2, 4104), "y": t(3, 64, d="float32"), "z": t(3, 5, 64)}}
    mod, _ = m.export_tvm(spec=spec)
    return mod


def _calls(mod):
    """(kernel calls, remaining relax.nn.layer_norm calls) in ``forward``."""
    kernel, tir = [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_dps_packed" and e.args[0].global_symbol == layer_norm_cuda.SYMBOL:
                kernel.append(e)
            elif e.op.name == "relax.nn.layer_norm":
                tir.append(e)

    relax.analysis.post_order_visit(mod["forward"], visit)
    return kernel, tir


def _dims(ty):
    return [int(v) if isinstance(v, tirx.IntImm) else str(v) for v in ty.shape.values]


def test_rewrite_routes_exactly_the_float16_last_axis_norms():
    mod = _norms_module()
    out = layer_norm_cuda.rewrite_pass()(mod)
    kernel, tir = _calls(out)
    routed = {tuple(_dims(c.ty)): c for c in kernel}
    assert set(routed) == {("b", 5, 64), (3, 8), (2, 4096)}
    for c in kernel:  # (x, gamma, beta, eps), the output in x's shape and dtype
        x, gamma, beta, eps = c.args[1].fields
        assert _dims(x.ty) == _dims(c.ty) and c.ty.dtype == "float16"
        assert _dims(gamma.ty) == _dims(beta.ty) == [_dims(x.ty)[-1]]
        assert str(eps.ty) == "float64"
    eps = {k: float(c.args[1].fields[3].value) for k, c in routed.items()}
    assert eps[("b", 5, 64)] == 1e-6 and eps[(3, 8)] == 1e-5
    assert sorted(_dims(c.args[0].ty) for c in tir) == [[2, 4104], [3, 5, 64], [3, 60], [3, 64]]
    assert layer_norm_cuda.calls_kernel(out) and not layer_norm_cuda.calls_kernel(mod)


def test_rewrite_off():
    """The build option leaves the rewrite out of the CUDA pipeline."""
    names = [p.info.name for p in routing_passes(tvm.target.Target(CUDA), KernelOptions(cuda_layer_norm=False))]
    assert "sam3_layer_norm_cuda_rewrite" not in names and "sam3_layer_norm_cuda_object" in names


def test_cuda_pipeline_rewrites_and_attaches(monkeypatch):
    names = [p.info.name for p in routing_passes(tvm.target.Target(CUDA))]
    assert "sam3_layer_norm_cuda_rewrite" in names and "sam3_layer_norm_cuda_object" in names
    llvm = [p.info.name for p in routing_passes(tvm.target.Target("llvm"))]
    assert not any("layer_norm" in n for n in llvm)
    built = []
    monkeypatch.setattr(cuda_source, "compile_object",
                        lambda name, arches, **kw: built.append((name, arches)) or "/x/ln.o")
    monkeypatch.setattr(cuda_source, "attach", lambda mod, objs: mod.with_attr("objs", list(objs)))
    out = tvm.transform.Sequential(routing_passes(tvm.target.Target(CUDA), cuda_arches=("sm_80", "sm_90a")))(
        _norms_module())
    assert len(_calls(out)[0]) == 3
    assert built == [("layer_norm", ("sm_80", "sm_90a"))] and list(out.attrs["objs"]) == ["/x/ln.o"]


def test_attach_pass_leaves_other_modules_alone():
    mod = _norms_module()
    assert layer_norm_cuda.attach_pass(tvm.target.Target(CUDA))(mod).same_as(mod)


def test_reference_is_relax_layer_norm():
    """The reference computes what relax.nn.layer_norm does (llvm, float32)."""
    class One(nn.Module):
        def __init__(self):
            self.ln = nn.LayerNorm(40, eps=1e-3)

        def forward(self, x):
            return self.ln(x)

    mod, _ = One().export_tvm(spec={"forward": {"x": nn.spec.Tensor([6, 40], "float32")}})
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((6, 40)) + 5).astype("float32")
    g, b = (1 + rng.standard_normal((2, 40)) / 4).astype("float32")
    got = vm["forward"](*[tvm.runtime.tensor(a) for a in (x, g, b)]).numpy()
    np.testing.assert_allclose(got, reference(x, g, b, 1e-3), rtol=1e-4, atol=1e-4)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_kernel_compiles(arch):
    obj = cuda_source.compile_object(layer_norm_cuda.SOURCE, (arch,))
    syms = subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout
    assert "__tvm_ffi_sam3_cuda_layer_norm" in syms


# [rows..., C]: tail rows (M % 4 != 0), the smallest C, a C using part of the lanes
# (1000 = 125 chunks of 8), the ViT's, one between instantiations (2056: 257 chunks), MAX_C
GPU_CASES = [(3, 37, 1024), (5, 8), (7, 1000), (2, 9, 256), (3, 2056), (2, 4096)]
EPS = 1e-5


class _Cases(nn.Module):
    """``forward(x0, ..., x5, gamma0, beta0, ..., gamma5, beta5)``: one norm per case."""

    def __init__(self):
        self.norms = nn.ModuleList([nn.LayerNorm(s[-1], eps=EPS) for s in GPU_CASES])

    def forward(self, x0, x1, x2, x3, x4, x5):
        return tuple(ln(x) for ln, x in zip(self.norms, (x0, x1, x2, x3, x4, x5)))


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    """A library for target cuda (sm_90a) computing every GPU case, each layer norm routed
    to the kernel."""
    m = _Cases()
    m.to("float16")
    spec = {"forward": {f"x{i}": nn.spec.Tensor(list(s), "float16") for i, s in enumerate(GPU_CASES)}}
    mod, _ = m.export_tvm(spec=spec)
    assert len(GPU_CASES) == len(_calls(layer_norm_cuda.rewrite_pass()(mod))[0])
    return build_routed(layer_norm_cuda, mod, tmp_path_factory.mktemp("ln") / "ln.so", CUDA)


def test_cuda_library_links_the_kernel(cuda_library):
    assert "__tvm_ffi_sam3_cuda_layer_norm" in exported_symbols(cuda_library)
    assert "libcudart" not in subprocess.run(["ldd", cuda_library], capture_output=True, text=True).stdout


@pytest.mark.gpu
def test_kernel_matches_reference_on_gpu(cuda_library):
    """fp16 output within 1e-3 + 1e-3 |ref| of the float64 reference (about two fp16 ulps:
    the kernel's fp32 statistics are far more accurate than the output's rounding)."""
    dev = cuda_device()
    if dev is None:
        pytest.skip("no CUDA GPU here")
    vm = relax.VirtualMachine(tvm.runtime.load_module(cuda_library), dev)
    rng = np.random.default_rng(0)
    xs = [(4 * rng.standard_normal(s) + 3).astype("float16") for s in GPU_CASES]  # mean offset
    params = [((1 + rng.standard_normal(s[-1]) / 4).astype("float16"),
               (rng.standard_normal(s[-1]) / 4).astype("float16")) for s in GPU_CASES]
    outs = vm["forward"](*[tvm.runtime.tensor(a, dev) for a in xs + [a for gb in params for a in gb]])
    for x, (g, b), got in zip(xs, params, outs):
        got = got.numpy()
        ref = reference(x, g, b, EPS)
        err = np.abs(got.astype("float64") - ref)
        assert np.isfinite(got).all() and (err <= 1e-3 + 1e-3 * np.abs(ref)).all(), (x.shape, err.max())
