"""GEMM / conv kernels on llvm: the kernels alone (odd sizes, fp16/fp32, layouts)
and through the kernel pipeline on model-shaped modules (the rewrite must fire,
results must match PyTorch), plus the fallback for matmuls we do not take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from tests.refs import compile_ir
from sam3_nn.compiler.build import compile_module
from sam3_nn.compiler.export import export_library
from sam3_nn.compiler.options import BuildOptions
from sam3_nn.compiler.pipeline import routing_passes
from sam3_nn.compiler.presets import get_preset
from sam3_nn.kernels.cuda import source as cuda_source_mod
from sam3_nn.ops.attention import sdpa
from sam3_nn.kernels.cpu.gemm import conv2d_nhwc, gemm, tile_for
from sam3_nn.model.common import Conv1x1, Conv2d, ConvTranspose2x2

TARGET = get_preset("llvm").tvm_target()
MODE = {"param_mode": "packed", "effect_mode": "none"}
TOL = {"float32": 2e-4, "float16": 2e-2}


def _rel_err(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)


def _run_prim(func, args, out_shape, out_dtype):
    lib = tvm.compile(func, target=TARGET)
    dev = tvm.cpu()
    out = tvm.runtime.empty(out_shape, out_dtype, dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy()


# the register tiles tile_for gives: AVX-512, AVX2 / NEON, SSE2 (mr, bn, mb)
TILES = [(8, 32, 64), (6, 16, 128), (6, 8, 128)]


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("m,n,k", [(37, 50, 19), (8, 32, 64), (1, 3, 5), (131, 40, 24)])
def test_gemm_kernel_odd_sizes(dtype, layout, m, n, k, tile):
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((1, m, k)).astype(dtype)
    w = rng.standard_normal((1, n, k) if layout == "nk" else (1, k, n)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    mr, bn, mb = tile
    func = gemm(1, m, n, k, dtype, w_layout=layout, has_bias=True, mr=mr, bn=bn, mb=mb)
    got = _run_prim(func, [a, w, bias], (1, m, n), dtype)
    wf = w[0].astype("float32")
    ref = a[0].astype("float32") @ (wf.T if layout == "nk" else wf) + bias.astype("float32")
    assert _rel_err(got[0], ref) < TOL[dtype]


def test_gemm_kernel_batched_symbolic():
    bt, m = tirx.Var("bt", "int64"), tirx.Var("m", "int64")
    func = gemm(bt, m, 13, 16, "float32", w_batched=True, w_layout="nk")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 11, 16)).astype("float32")
    w = rng.standard_normal((6, 13, 16)).astype("float32")
    got = _run_prim(func, [a, w], (6, 11, 13), "float32")
    assert _rel_err(got, a @ w.transpose(0, 2, 1)) < 1e-5


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_conv_kernel(dtype, tile):
    rng = np.random.default_rng(1)
    h, w, cin, cout = 7, 9, 5, 33
    x = rng.standard_normal((2, h, w, cin)).astype(dtype)
    wt = (rng.standard_normal((cout, cin, 3, 3)) / 6).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    mr, bn, mb = tile
    func = conv2d_nhwc(2, h, w, cin, cout, 3, 1, dtype, mr=mr, bn=bn, mb=mb)
    got = _run_prim(func, [x, wt, b], (2, h * w, cout), dtype)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.astype("float32")).permute(0, 3, 1, 2),
                                     torch.from_numpy(wt.astype("float32")),
                                     torch.from_numpy(b.astype("float32")), padding=1)
    assert _rel_err(got, ref.permute(0, 2, 3, 1).reshape(2, h * w, cout).numpy()) < TOL[dtype]


@pytest.mark.parametrize("target,registers,lanes", [
    ({"kind": "llvm", "mcpu": "znver4"}, 32, 16),                         # AVX-512
    ({"kind": "llvm", "mcpu": "znver3"}, 16, 8),                          # AVX2, no AVX-512
    ({"kind": "llvm", "mcpu": "x86-64-v3"}, 16, 8),
    ({"kind": "llvm", "mcpu": "x86-64"}, 16, 4),                          # SSE2
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 32, 4),
], ids=["avx512", "avx2", "x86-64-v3", "sse2", "neon"])
def test_register_tile_fits_the_vector_registers(target, registers, lanes):
    """The tile's accumulators (mr * bn / lanes), its panel vectors (bn / lanes) and the
    broadcast of a must fit the register file: the 8 x 32 tile measured best with AVX-512
    needs 32 ymm accumulators on AVX2 and spilled (2.5x slower than PyTorch on a Zen 3)."""
    mr, bn, mb = tile_for(tvm.target.Target(target))
    assert bn % lanes == 0 and mb >= mr
    assert mr * bn // lanes + bn // lanes + 1 <= registers


class _Block(nn.Module):
    """Every GEMM/conv shape the model uses, on channel-last [B, H, W, C] tensors."""

    def __init__(self, c: int, heads: int):
        self.heads = heads
        self.fc = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c, bias=False)
        self.c1 = Conv1x1(c, c)
        self.up = ConvTranspose2x2(c, c // 2)
        self.conv = Conv2d(c // 2, c // 2, 3)
        self.w_kn = nn.Parameter((c, 7))

    def forward(self, x, bcast):
        b, h, w, c = x.shape
        y = self.fc(x)                                            # [B,H,W,C] x W^T + b
        q, k, v = op.split(op.reshape(y, [b, h * w, 3, self.heads, int(c) // self.heads]), 3, axis=2)
        q, k, v = [op.permute_dims(op.squeeze(t, [2]), [0, 2, 1, 3]) for t in (q, k, v)]
        a = sdpa(q, k, v)                                         # batched q k^T, p v
        a = op.reshape(op.permute_dims(a, [0, 2, 1, 3]), [b, h, w, c])
        z = self.c1(self.proj(a))
        u = self.conv(self.up(z))                                 # 2x2 up GEMM + 3x3 conv
        kn = op.matmul(z, self.w_kn)                              # x @ W, W [K, N]
        fb = op.matmul(bcast, op.permute_dims(z, [0, 1, 3, 2]))   # broadcast batch: fallback
        return u, kn, fb


def _torch_block(x, bcast, p, heads):
    fc_w, fc_b, proj_w, c1_w, c1_b, up_w, up_b, conv_w, conv_b, w_kn = p
    b, h, w, c = x.shape
    y = x @ fc_w.T + fc_b
    y = y.reshape(b, h * w, 3, heads, c // heads)
    q, k, v = [y[:, :, i].permute(0, 2, 1, 3) for i in range(3)]
    s = (q @ k.transpose(-1, -2)) * (c // heads) ** -0.5
    a = torch.softmax(s, -1) @ v
    a = a.permute(0, 2, 1, 3).reshape(b, h, w, c)
    z = (a @ proj_w.T) @ c1_w.reshape(c1_w.shape[0], -1).T + c1_b
    up = torch.nn.functional.conv_transpose2d(z.permute(0, 3, 1, 2), up_w, up_b, stride=2)
    u = torch.nn.functional.conv2d(up, conv_w, conv_b, padding=1).permute(0, 2, 3, 1)
    return u, z @ w_kn, bcast @ z.transpose(-1, -2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_pipeline_rewrites_and_matches_torch(dtype):
    c, heads, h, w = 24, 2, 5, 3
    blk = _Block(c, heads)
    blk.to(dtype)
    spec = {"forward": {"x": nn.spec.Tensor(["batch", h, w, c], dtype),
                        "bcast": nn.spec.Tensor([1, 1, 4, c], dtype), "$": MODE}}
    mod, params = blk.export_tvm(spec=spec)
    rewritten = tvm.transform.Sequential(routing_passes(TARGET))(mod)
    ours = [gv.name_hint for gv, f in rewritten.functions.items()
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("sam3_")]
    # fc, q k^T, p v, proj, c1, up, w_kn (gemm) and the 3x3 conv; the broadcast one falls back
    assert len(ours) == 8, ours
    assert any(n.startswith("sam3_conv3x3") for n in ours)
    vm = compile_ir(mod)
    rng = np.random.default_rng(2)
    ps = [(rng.standard_normal([int(s) for s in p.shape]) / 3).astype(dtype) for _, p in params]
    x = rng.standard_normal((2, h, w, c)).astype(dtype)
    bc = rng.standard_normal((1, 1, 4, c)).astype(dtype)
    outs = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(bc), [tvm.runtime.tensor(p) for p in ps])
    t = lambda a: torch.from_numpy(a.astype("float32"))  # noqa: E731
    refs = _torch_block(t(x), t(bc), [t(p) for p in ps], heads)
    for got, ref in zip(outs, refs):
        assert got.numpy().shape == tuple(ref.shape)
        assert _rel_err(got.numpy(), ref.numpy()) < 5 * TOL[dtype]


def test_no_gemm_kernels_for_other_targets():
    names = [p.info.name for p in routing_passes(tvm.target.Target({"kind": "opencl"}))]
    assert names == ["Sam3RouteOps"]  # the attention operators' portable routes only


# ---- CUDA: CUTLASS route (Hopper builds) --------------------------------------------------

class _Mlp(nn.Module):
    """Every CUDA route: bias+GELU, bias, no bias, [K, N] weight, 3x3 conv, K % 8 fallback."""

    def __init__(self):
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)
        self.proj = nn.Linear(64, 64, bias=False)
        self.odd = nn.Linear(64, 20)           # N % 8 != 0: TIR path
        self.ffn = nn.Linear(64, 128)          # + ReLU: the DETR feed-forward
        self.w_kn = nn.Parameter((64, 32))
        self.conv = Conv2d(64, 64, 3)

    def forward(self, x):
        y = self.proj(self.fc2(op.gelu(self.fc1(x))))
        return self.conv(y), op.matmul(y, self.w_kn), self.odd(y), op.relu(self.ffn(y))


def _cuda_sm90_preset():
    return get_preset("cuda", "sm_90a")


def _extern_calls(mod):
    calls = []
    for _, f in mod.functions.items():
        if isinstance(f, relax.Function):
            def visit(e):
                if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) \
                        and e.op.name == "relax.call_dps_packed":
                    calls.append(e)
            relax.analysis.post_order_visit(f, visit)
    return calls


def _extern_symbols(mod):
    return sorted(c.args[0].global_symbol for c in _extern_calls(mod))


def test_cuda_rewrite_routes_to_cutlass(monkeypatch):
    """Hopper presets: the fp16 GEMMs/conv become call_dps_packed of the CUTLASS symbols
    (no nvcc needed: the objects are stubbed); non-Hopper keeps every GEMM on TIR."""
    from sam3_nn.kernels.cuda import gemm as kcuda
    from sam3_nn.kernels.cuda import source as cuda_source

    monkeypatch.setattr(kcuda._GemmObjects, "get", lambda self, part: (f"/x/gemm{part}.o",))
    monkeypatch.setattr(kcuda._GemmObjects, "conv", lambda self: "/x/conv.o")
    attached = []
    monkeypatch.setattr(cuda_source, "attach", lambda mod, objs: attached.extend(objs) or mod)
    m = _Mlp()
    m.to("float16")
    mod, _ = m.export_tvm(spec={"forward": {"x": nn.spec.Tensor(["b", 9, 7, 64], "float16"), "$": MODE}})
    preset = _cuda_sm90_preset()
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=preset.cuda_arches))(mod)
    assert _extern_symbols(out) == sorted([
        "sam3_cutlass_gemm_nk_bias_gelu", "sam3_cutlass_gemm_nk_bias", "sam3_cutlass_gemm_nk",
        "sam3_cutlass_gemm_kn", "sam3_cutlass_conv2d_bias", "sam3_cutlass_gemm_nk_bias_relu"])
    assert sorted(set(attached)) == ["/x/conv.o", "/x/gemm0.o", "/x/gemm1.o", "/x/gemm2.o", "/x/gemm3.o"]
    tir = [gv.name_hint for gv, f in out.functions.items()
           if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("sam3_gemm")]
    assert len(tir) == 1, tir  # the N=20 linear
    # a library that also carries sm_80 SASS: TIR everywhere, nothing attached
    attached.clear()
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=("sm_80", "sm_90")))(mod)
    assert _extern_symbols(out) == [] and attached == []


class _Residual(nn.Module):
    """The ViT layer's residual adds (o_proj behind a reshape, fc2 with swapped operands, a
    bias-free one) and adds that must stay: broadcast, a linear with another use, y + y."""

    def __init__(self):
        self.o_proj = nn.Linear(64, 64)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)
        self.proj = nn.Linear(64, 64, bias=False)
        self.twice = nn.Linear(64, 64)
        self.bc = nn.Linear(64, 64)
        self.dbl = nn.Linear(64, 64)

    def forward(self, x, r1):
        b, h, w, c = x.shape
        y = op.reshape(self.o_proj(op.reshape(x, [b, h * w, c])), [b, h, w, c])
        x = x + y                                  # add(r, reshape(linear))
        x = self.fc2(op.gelu(self.fc1(x))) + x     # add(linear, r)
        x = x + self.proj(x)                       # no bias
        t = self.twice(x)
        u = x + t                                  # t has another use: stays
        v = r1 + self.bc(x)                        # r1 [1, ...] broadcasts over b: stays
        d = self.dbl(x)
        return u, t, v, d + d                      # y + y: stays


def test_cuda_rewrite_fuses_residual_adds(monkeypatch):
    """Hopper presets: x + linear(...) (through a reshape, either order, bias or not) is
    one call of the residual-epilogue GEMM whose output has the add's shape; broadcasting
    adds and linears with other uses are left alone. llvm: no residual fusion."""
    from sam3_nn.kernels.cuda import gemm as kcuda
    from sam3_nn.kernels.cuda import source as cuda_source

    monkeypatch.setattr(kcuda._GemmObjects, "get", lambda self, part: (f"/x/gemm{part}.o",))
    monkeypatch.setattr(kcuda._GemmObjects, "conv", lambda self: "/x/conv.o")
    monkeypatch.setattr(cuda_source, "attach", lambda mod, objs: mod)
    m = _Residual()
    m.to("float16")
    spec = {"forward": {"x": nn.spec.Tensor(["b", 9, 7, 64], "float16"),
                        "r1": nn.spec.Tensor([1, 9, 7, 64], "float16"), "$": MODE}}
    mod, _ = m.export_tvm(spec=spec)
    preset = _cuda_sm90_preset()
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=preset.cuda_arches))(mod)
    assert _extern_symbols(out) == sorted([
        "sam3_cutlass_gemm_nk_bias_residual", "sam3_cutlass_gemm_nk_bias_gelu",
        "sam3_cutlass_gemm_nk_bias_residual", "sam3_cutlass_gemm_nk_residual",
        "sam3_cutlass_gemm_nk_bias", "sam3_cutlass_gemm_nk_bias", "sam3_cutlass_gemm_nk_bias"])
    calls, adds, reshapes = [], [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.call_dps_packed":
                calls.append(e)
            elif e.op.name == "relax.add":
                adds.append(e)
            elif e.op.name == "relax.reshape":
                reshapes.append(e)
    relax.analysis.post_order_visit(out["forward"], visit)
    assert len(adds) == 3, adds  # u = x + t, the broadcast v, d + d
    for c in calls:
        if "residual" in c.args[0].global_symbol:
            # output in the add's (consumer's) shape: [b, 9, 7, 64], no reshape after it
            dims = [int(v) if isinstance(v, tirx.IntImm) else str(v) for v in c.ty.shape.values]
            assert dims == ["b", 9, 7, 64], c.ty
    assert len(reshapes) == 1  # the o_proj input's [b, 63, 64] view only
    # the llvm pipeline and non-Hopper CUDA keep every add
    for passes in (routing_passes(TARGET),
                   routing_passes(preset.tvm_target(), cuda_arches=("sm_80", "sm_90"))):
        o = tvm.transform.Sequential(passes)(mod)
        adds.clear()
        relax.analysis.post_order_visit(o["forward"], visit)
        assert len(adds) == 6, adds  # the residual/broadcast adds (bias adds: in the GEMMs)


def test_cuda_rewrite_fuses_the_qkv_rope(monkeypatch):
    """Hopper: a ViT block's qkv projection and the q/k rotation behind it (windowed and
    global RoPE) are one call of the RoPE-epilogue GEMM taking the rotation's scalars; the
    attention kernel reads its output without RoPE. A library that also carries sm_80 SASS
    rotates the keys in a standalone kernel instead (no CUTLASS there)."""
    from sam3_nn.config import ViTConfig
    from sam3_nn.kernels.cuda import gemm as kcuda
    from sam3_nn.kernels.cuda import source as cuda_source
    from sam3_nn.model.vision import ViTLayer

    monkeypatch.setattr(kcuda._GemmObjects, "get", lambda self, part: (f"/x/gemm{part}.o",))
    monkeypatch.setattr(cuda_source, "attach", lambda mod, objs: mod)
    cfg = ViTConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2, image_size=672)

    class Blocks(nn.Module):
        def __init__(self):
            self.windowed = ViTLayer(cfg, cfg.window_size)
            self.global_ = ViTLayer(cfg, 0)

        def forward(self, x):
            return self.global_(self.windowed(x))

    preset = _cuda_sm90_preset()
    m = Blocks()
    m.to("float16")
    mod, _ = m.export_tvm(spec={"forward": {"x": nn.spec.Tensor(["b", 48, 48, 128], "float16"),
                                            "$": MODE}})
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=preset.cuda_arches))(mod)
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_dps_packed":
            calls.append(e)
    relax.analysis.post_order_visit(out["forward"], visit)
    syms = [c.args[0].global_symbol for c in calls]
    assert "sam3_rope_qk_cuda" not in syms and "sam3_rope_keys_cuda" not in syms, syms
    rope = [c for c in calls if c.args[0].global_symbol == "sam3_cutlass_gemm_nk_bias_rope_qk"]
    assert len(rope) == 2, syms

    def scalars(c):
        return [v.value for v in c.args[1].fields[3:]]
    # heads, window, image grid (h, w), RoPE grid (h, w), scale, theta
    assert scalars(rope[0]) == [2, 24, 48, 48, 24, 24, 1.0, 10000.0]
    assert scalars(rope[1]) == [2, 0, 0, 0, 48, 48, pytest.approx(0.5), 10000.0]
    def dims(e):
        return [int(v) if isinstance(v, tirx.IntImm) else str(v) for v in e.ty.shape.values]
    for c in rope:
        x, w, b = c.args[1].fields[:3]
        assert dims(x) == ["b", 2304, 128] and dims(w) == [384, 128] and dims(b) == [384]
        assert dims(c) == ["b", 2304, 384]
    # the attention calls read q, k and v from the GEMM's output, RoPE off (RoPE grid 0 x 0,
    # keys not rotated)
    attn = [c for c in calls if c.args[0].global_symbol.startswith("sam3_attention_cuda")]
    assert len(attn) == 2
    bound = {bd.var: bd.value for blk in out["forward"].body.blocks for bd in blk.bindings}
    for a, r in zip(attn, rope):
        f = a.args[1].fields
        assert bound[f[0]].same_as(r) and f[0].same_as(f[1]) and f[0].same_as(f[2])
        assert [v.value for v in f[-5:-3]] == [0, 0] and f[-1].value == 0
    # the provider: a q/k/v projection of heads of 64 whose RoPE coordinates fit the epilogue's
    # cos/sin table, else the standalone rotation stays
    objs = kcuda._GemmObjects()
    ok = (16, 0, 0, 0, 72, 72, 1 / 3, 10000.0)
    take = lambda n, rope: kcuda.gemm_cutlass(objs, 1, 5184, n, 1024, "float16", "float16",
                                              has_bias=True, rope_qk=rope)
    assert take(3072, ok).symbol == "sam3_cutlass_gemm_nk_bias_rope_qk"
    assert take(3072, (16, 0, 0, 0, 72, kcuda.ROPE_TABLE_ROWS + 1, 1.0, 10000.0)) is None
    assert take(3072, (16, 24, 72, 72, 24, 24, 1.0, 10000.0)) is not None
    assert take(3 * 16 * 32, ok) is None  # head dim 32
    assert take(3 * 64, (1, 0, 0, 0, 72, 72, 1.0, 10000.0)) is None  # 64 q columns: tiles straddle
    # sm_80 SASS in the library: no CUTLASS, so the routing keeps RoPE in the attention kernel
    # (keys rotated once by the standalone kernel) instead of the projection
    o = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=("sm_80", "sm_90")))(mod)
    calls.clear()
    relax.analysis.post_order_visit(o["forward"], visit)
    syms = [c.args[0].global_symbol for c in calls]
    assert syms.count("sam3_rope_qk_cuda") == 0 and syms.count("sam3_rope_keys_cuda") == 2, syms


needs_cutlass = pytest.mark.skipif(
    not (__import__("sam3_nn.kernels.cuda.source", fromlist=["x"]).nvcc_available()
         and __import__("sam3_nn.kernels.cuda.source", fromlist=["x"]).cutlass_available()),
    reason="nvcc or the CUTLASS headers (pip install 'sam3_nn[cuda]') are missing")


@needs_cutlass
def test_cuda_cutlass_library_links_kernels(tmp_path):
    """Build for sm_90a here (first run compiles the CUTLASS objects: minutes; cached under
    build/cuda-objects): the entry points are exported from the library, cudart is static."""
    import subprocess

    m = _Mlp()
    m.to("float16")
    mod, _ = m.export_tvm(spec={"forward": {"x": nn.spec.Tensor(["b", 9, 7, 64], "float16"), "$": MODE}})
    preset = _cuda_sm90_preset()
    ex = compile_module(preset, BuildOptions(target="cuda", arch="sm_90a"), mod)
    kinds = [x.kind for x in ex.mod.imports]
    assert kinds.count("static_library") == 5, kinds
    path = str(tmp_path / "lib.so")
    export_library(preset, ex, path)
    syms = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True).stdout
    for s in ("sam3_cutlass_gemm_nk_bias_gelu", "sam3_cutlass_gemm_nk_bias", "sam3_cutlass_gemm_nk",
              "sam3_cutlass_gemm_kn", "sam3_cutlass_conv2d_bias", "sam3_cutlass_gemm_set_tile",
              "sam3_cutlass_gemm_set_split",
              "sam3_cutlass_gemm_nk_bias_residual", "sam3_cutlass_gemm_nk_residual",
              "sam3_cutlass_gemm_nk_bias_relu"):
        assert f"__tvm_ffi_{s}\n" in syms, s
    deps = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    assert "libcudart" not in deps and "libcuda.so" not in deps, deps


def test_cutlass_gelu_epilogue_constants_match_erf_gelu():
    """The CUTLASS GEMM's GELU epilogue (``GeluTanh`` in cuda/gemm_sm90.cu) is
    0.5 x (1 + tanh(x q(x^2))), q(s) = c0 + s * clamp(c1 + c2 s, 0, 1), with the three
    coefficients read from the source. Evaluate that formula in float32 (exact tanh: the
    GPU's tanh.approx adds 1e-5 relative) against the exact 0.5 x (1 + erf(x / sqrt 2)) in
    float64: within 4e-5 absolute everywhere (fp16 output rounding: 4.9e-4 relative), 1e-3
    relative where |GELU| > 0.03, and x or 0 where |x| is large (the clamp keeps q > 0)."""
    import re

    src = (cuda_source_mod.CUDA_DIR / "gemm_sm90.cu").read_text()
    body = src[src.index("struct GeluTanh {"):src.index("struct GeluTanh<")]
    m = re.search(r"kC0 = (-?[0-9.e+-]+)f, kC1 = (-?[0-9.e+-]+)f, kC2 = (-?[0-9.e+-]+)f;", body)
    assert m, "GeluTanh's coefficients changed shape; update this test"
    c0, c1, c2 = (np.float32(v) for v in m.groups())
    x = np.concatenate([np.linspace(-16, 16, 400001), [-6e4, -300, -12, 12, 300, 6e4]]).astype(np.float32)
    x2 = x * x
    q = c0 + x2 * np.clip(c2 * x2 + c1, np.float32(0), np.float32(1))
    h = np.float32(0.5) * x
    y = (h * np.tanh(x * q) + h).astype(np.float64)
    xt = torch.from_numpy(x.astype(np.float64))
    ref = (0.5 * xt * (1 + torch.erf(xt / np.sqrt(2.0)))).numpy()
    err = np.abs(y - ref)
    assert err.max() < 4e-5, err.max()
    big = np.abs(ref) > 0.03
    assert (err[big] / np.abs(ref[big])).max() < 1e-3
    assert (q > 0).all()  # tanh(x q) has x's sign: large |x| gives x or 0
    np.testing.assert_allclose(y[-6:], [0, 0, 0, 12, 300, 6e4], rtol=1e-6, atol=1e-6)


class _OddK(nn.Module):
    """A patch embedding's GEMM: K = 3 x 14 x 14 = 588 is not a multiple of 8."""

    def __init__(self):
        self.proj = nn.Linear(588, 64, bias=False)
        self.fc = nn.Linear(20, 64)

    def forward(self, x, y):
        return self.proj(x), self.fc(y)


def test_cuda_rewrite_pads_odd_k_for_cutlass(monkeypatch):
    """Hopper presets zero-pad K up to a multiple of 8 (x and w, along K) so that the GEMM
    still takes the CUTLASS kernel; the padded products equal the unpadded ones; other
    arches keep the TIR GEMM on the unpadded operands."""
    from sam3_nn.kernels.cuda import gemm as kcuda
    from sam3_nn.kernels.cuda import source as cuda_source

    monkeypatch.setattr(kcuda._GemmObjects, "get", lambda self, part: (f"/x/gemm{part}.o",))
    monkeypatch.setattr(cuda_source, "attach", lambda mod, objs: mod)
    m = _OddK()
    m.to("float16")
    mod, _ = m.export_tvm(spec={"forward": {"x": nn.spec.Tensor([2, 36, 588], "float16"),
                                            "y": nn.spec.Tensor([2, 36, 20], "float16"), "$": MODE}})
    preset = _cuda_sm90_preset()
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=preset.cuda_arches))(mod)
    assert _extern_symbols(out) == ["sam3_cutlass_gemm_nk", "sam3_cutlass_gemm_nk_bias"]
    widths = [[[int(v) for v in a.ty.shape.values] for a in c.args[1].fields[:2]] for c in _extern_calls(out)]
    assert sorted(widths) == sorted([[[2, 36, 592], [64, 592]], [[2, 36, 24], [64, 24]]])
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=("sm_80", "sm_90")))(mod)
    assert _extern_symbols(out) == []

    # numerics of the padding itself, on the CPU: pad(x) @ pad(w)^T == x @ w^T
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 588)), rng.standard_normal((7, 588))
    np.testing.assert_allclose(np.pad(x, [(0, 0), (0, 4)]) @ np.pad(w, [(0, 0), (0, 4)]).T, x @ w.T,
                               rtol=1e-12, atol=1e-12)


# ---- CUDA: TIR GEMMs with few output rows and a long K (the few-rows schedule) -------------

# (bt, m, n, k, w_batched, w_layout): the interactive decoder's P x V (23 tokens against the
# 72 x 72 image tokens, 8 heads of 16), the same with an nk weight and K % 128 != 0, shared
# weights (one read as 16-byte vectors), one row, and row and column tiles that do not fill
# the block
FEW_ROWS_SHAPES = [(8, 23, 16, 5184, True, "kn"), (8, 23, 16, 5000, True, "nk"),
                   (3, 7, 20, 4100, False, "kn"), (2, 5, 64, 1500, False, "kn"),
                   (2, 1, 40, 2048, True, "kn"), (4, 9, 72, 2100, True, "nk"),
                   (4, 9, 72, 2100, True, "kn")]


def _thread_loops(func):
    """``{thread tag: extent}`` and the serial loops' extents of a scheduled PrimFunc."""
    tags, serial = {}, []

    def visit(s):
        if isinstance(s, tirx.For):
            if s.kind == tirx.ForKind.THREAD_BINDING:
                tags[s.thread_binding.thread_tag] = s.extent
            elif s.kind == tirx.ForKind.SERIAL and isinstance(s.extent, tirx.IntImm):
                serial.append(int(s.extent))
        for field in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(s, field, None)
            if isinstance(child, tirx.Stmt):
                visit(child)
        for child in getattr(s, "seq", None) or []:
            visit(child)
    visit(func.body)
    return tags, serial


def _cuda_gemm_provider():
    from sam3_nn.kernels.cuda.gemm import cuda_providers

    preset = _cuda_sm90_preset()
    return preset.tvm_target(), cuda_providers(preset.tvm_target(), ("sm_80", "sm_90"))[0]


def test_cuda_few_rows_gemm_schedule():
    """The TIR GEMM of a few-row, long-K shape takes the few-rows schedule: blocks of 4 rows
    x up to 32 columns per batch entry, 128 threads splitting K per row, so no serial loop
    walks more than K / 512 steps (4 unrolled); big GEMMs keep dlight's Matmul. Code
    generation for sm_90a succeeds (nvcc, no GPU); the kernel reduces with warp shuffles."""
    from sam3_nn.kernels.cuda import gemm as kcuda
    from sam3_nn.kernels.cuda import source as cuda_source

    target, provider = _cuda_gemm_provider()
    bt = tirx.Var("bt", "int64")
    for b, m, n, k, batched, layout in FEW_ROWS_SHAPES + [(bt, 23, 16, 5184, True, "kn")]:
        assert kcuda.gemm_schedule_kind(m, n, k) == kcuda.FEW_ROWS
        for bias in (False, True):
            f = provider(b, m, n, k, "float16", "float16", w_batched=batched, w_layout=layout,
                         has_bias=bias)
            assert f.attrs["tirx.is_scheduled"] and f.attrs[kcuda.SCHEDULE_ATTR] == kcuda.FEW_ROWS
            tags, serial = _thread_loops(f)
            rows, cols = min(4, m), min(n, 32)
            blocks = b * (-(-m // rows) * -(-n // cols))
            assert {t: int(e) if isinstance(e, tirx.IntImm) else str(e) for t, e in tags.items()} == {
                "blockIdx.x": blocks if isinstance(b, int) else str(blocks),
                "threadIdx.z": rows, "threadIdx.y": 4, "threadIdx.x": 32}, tags
            assert max(serial) <= max(-(-k // (128 * 4)), cols), serial
    f = provider(8, 23, 16, 5184, "float16", "float16", w_batched=True, w_layout="kn")
    src = tvm.compile(f, target=target).mod.imports[0].inspect_source()
    assert "__shfl_down_sync" in src and "__launch_bounds__(512)" in src
    if cuda_source.nvcc_available():
        from sam3_nn.compiler.export import nvcc_fatbin

        assert len(nvcc_fatbin(src, ("sm_90a",), None)) > 0
    # the old schedule: big outputs, short K, a symbolic M, fp32
    for m, n, k in [(1296, 64, 1024), (23, 5184, 16), (64, 64, 1024), (23, 16, 1000)]:
        assert kcuda.gemm_schedule_kind(m, n, k) == kcuda.MATMUL
        f = provider(8, m, n, k, "float16", "float16", w_batched=True, w_layout="nk")
        assert f.attrs[kcuda.SCHEDULE_ATTR] == kcuda.MATMUL
    assert kcuda.gemm_schedule_kind(tirx.Var("m", "int64"), 16, 5184) == kcuda.MATMUL


class _FewQueries(nn.Module):
    """The interactive decoder's token-to-image attention, composed (``sdpa``)."""

    def forward(self, q, k, v):
        return sdpa(q, k, v)


def test_cuda_rewrite_gives_p_v_the_few_rows_schedule():
    """Through the GEMM rewrite (no CUTLASS: sm_80 + sm_90), a composed attention of 23
    queries against 5184 keys: P x V ([23, 5184] x [5184, 16] per head) takes the
    few-rows schedule, q k^T (K = 16) dlight's Matmul."""
    from sam3_nn.kernels.cuda import gemm as kcuda

    spec = {"forward": {"q": nn.spec.Tensor(["b", 8, 23, 16], "float16"),
                        "k": nn.spec.Tensor(["b", 8, 5184, 16], "float16"),
                        "v": nn.spec.Tensor(["b", 8, 5184, 16], "float16"), "$": MODE}}
    mod, _ = _FewQueries().export_tvm(spec=spec)
    preset = _cuda_sm90_preset()
    out = tvm.transform.Sequential(routing_passes(preset.tvm_target(), cuda_arches=("sm_80", "sm_90")))(mod)
    kinds = {gv.name_hint.rsplit("_", 1)[0]: f.attrs[kcuda.SCHEDULE_ATTR] for gv, f in out.functions.items()
             if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith("sam3_gemm")}
    assert kinds == {"sam3_gemm_bkn_16x5184_float16": kcuda.FEW_ROWS,
                     "sam3_gemm_bnk_5184x16_float16": kcuda.MATMUL}, kinds


@pytest.mark.gpu
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", FEW_ROWS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_few_rows_gemm_matches_numpy_on_gpu(shape, has_bias):
    """The few-rows schedule on the GPU against numpy (fp32 accumulation, fp16 output): every
    output written (the output starts as NaN), within 2e-3 of the largest |output|
    (fp16 rounding of the output: 4.9e-4)."""
    from tests.cuda_lib import cuda_device

    from sam3_nn.compiler.export import cuda_compile_callback
    from sam3_nn.kernels.cuda import gemm as kcuda

    dev = cuda_device()
    if dev is None:
        pytest.skip("no CUDA GPU here")
    bt, m, n, k, batched, layout = shape
    target, provider = _cuda_gemm_provider()
    f = provider(tirx.Var("bt", "int64"), m, n, k, "float16", "float16", w_batched=batched,
                 w_layout=layout, has_bias=has_bias)
    assert f.attrs[kcuda.SCHEDULE_ATTR] == kcuda.FEW_ROWS
    with cuda_compile_callback(("sm_90a",), None):  # nvcc, as the library build does
        lib = tvm.compile(f, target=target)
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((bt, m, k)).astype("float16")
    bw = bt if batched else 1
    w = rng.standard_normal((bw, n, k) if layout == "nk" else (bw, k, n)).astype("float16")
    bias = (4 * rng.standard_normal(n)).astype("float16")
    out = tvm.runtime.tensor(np.full((bt, m, n), np.nan, "float16"), dev)
    args = [a, w] + ([bias] if has_bias else [])
    lib(*[tvm.runtime.tensor(x, dev) for x in args], out)
    wf = w.astype("float32")
    ref = a.astype("float32") @ (wf.transpose(0, 2, 1) if layout == "nk" else wf)
    if has_bias:
        ref = ref + bias.astype("float32")
    got = out.numpy()
    assert np.isfinite(got).all()  # every output written
    assert _rel_err(got, ref) < 2e-3
