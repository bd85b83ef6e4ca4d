"""The CUDA attention path: the operators' CUDA routes, and a library that links the kernel.

No GPU is needed (the numerics are checked on the accelerator machine by
bench/attention_cuda_kernel.py and bench/attention_cuda.py). Building the library needs
nvcc (and sam3_nn.kernels.cuda.source); the test skips without them.
"""

import re
import subprocess

import numpy as np
import pytest
import tvm
from tvm.relax.frontend import nn

from tests.cuda_lib import build_library, cuda_device, exported_symbols
from tests.refs import assert_close
from sam3_nn.compiler.options import KernelOptions
from sam3_nn.config import ViTConfig
from sam3_nn.kernels import cpu as cpu_kernels
from sam3_nn.kernels import cuda as cuda_kernels
from sam3_nn.kernels import portable
from sam3_nn.kernels.cuda import attention as attention_cuda
from sam3_nn.kernels.rewrite import route_ops_pass
from sam3_nn.model.vision import ViTLayer
from sam3_nn.ops.attention import attention, qkv_self_attention
from sam3_nn.ops.rope import AxialRope

CUDA = {"kind": "cuda", "arch": "sm_90a"}


class Mod(nn.Module):
    def __init__(self, heads=16, rope=AxialRope(24, 24, 64, 10000.0, 1.0)):
        self.heads, self.rope = heads, rope

    def inline(self, qkv):
        return qkv_self_attention(qkv, self.heads, self.rope)

    def none(self, qkv):
        return qkv_self_attention(qkv, self.heads, None)

    def masked(self, q, k, v, bias):
        return attention(q, k, v, 8, bias)

    def full(self, q, k, v, bias):
        return attention(q, k, v, 8, bias)


def _spec(dtype, hidden=1024):
    t = lambda *s, d=dtype: nn.spec.Tensor(list(s), d)
    return {"inline": {"qkv": t("b", 576, 3 * hidden)},
            "none": {"qkv": t("b", 576, 3 * hidden)},
            "masked": {"q": t(1, "nq", 256), "k": t(1, "nk", 256), "v": t(1, "nk", 256),
                       "bias": t(1, 1, 1, "nk", d="float32")},
            "full": {"q": t(1, 201, 256), "k": t(1, 5184, 256), "v": t(1, 5184, 256),
                     "bias": t(1, 8, 201, 5184)}}


def route_attention(mod, target=CUDA, **opts):
    """``mod`` with its attention operators routed as ``target``'s pipeline routes them (the
    routing step's first pass: the GEMMs are left as they are, to read the calls)."""
    tgt = tvm.target.Target(target)
    kopts = KernelOptions(**opts)
    routes = (attention_cuda.attention_routes(tgt, None, kopts) if tgt.kind.name == "cuda"
              else portable.attention_routes(tgt, kopts))
    return route_ops_pass(routes)(mod)


def _export(dtype, module=None, hidden=1024, target=CUDA, route=True, rope_in_projection=False):
    mod, _ = (module or Mod()).export_tvm(spec=_spec(dtype, hidden))
    return route_attention(mod, target, cuda_attention=route, rope_in_projection=rope_in_projection,
                           rope_mode="inline")


def test_rope_in_projection_rotates_q_and_k_of_the_fused_qkv():
    """Hopper (the CUTLASS GEMM route) and long sequences: q and k rotated once in the qkv
    projection's output (the GEMM rewrite fuses that into the GEMM's epilogue), the kernel
    without RoPE; elsewhere the keys-rotated path."""
    inline = _export("float16", rope_in_projection=True)["inline"].script()
    assert ('call_dps_packed("sam3_rope_qk_cuda", (qkv, 16, 0, 0, 0, 24, 24, T.float64(1.0), '
            'T.float64(10000.0)), out_ty=R.Tensor((b, 576, 3072)') in inline
    assert ('call_dps_packed("sam3_attention_cuda", (sam3_rope_qk_cuda, sam3_rope_qk_cuda, '
            'sam3_rope_qk_cuda, 16, 0, 1024, 2048, 0, 0, T.float64(1.0), T.float64(10000.0), 0)') in inline
    assert "sam3_rope_keys_cuda" not in inline
    for target in ({"kind": "cuda", "arch": "sm_80"}, {"kind": "cuda", "arch": "sm_89"}):
        other = _export("float16", target=target, rope_in_projection=True)["inline"].script()
        assert "sam3_rope_qk_cuda" not in other and "sam3_rope_keys_cuda" in other, target
    # head dim 32 (the rotation in the GEMM epilogue is for head dim 64)
    short = _export("float16", module=Mod(rope=AxialRope(24, 24, 32, 10000.0, 1.0), heads=32),
                    rope_in_projection=True)["inline"].script()
    assert "sam3_rope_qk_cuda" not in short and "sam3_rope_keys_cuda" in short


def test_fp16_on_cuda_calls_the_cuda_kernel():
    mod = _export("float16")
    inline, none, masked = (mod[f].script() for f in ("inline", "none", "masked"))
    # 576 queries: the keys are rotated once (k columns at 1024, 16 heads, global positions on
    # the 24x24 grid), the kernel reads them from that buffer and rotates only q
    assert ('call_dps_packed("sam3_rope_keys_cuda", (qkv, 1024, 16, 0, 0, 0, 24, 24, T.float64(1.0), '
            'T.float64(10000.0)), out_ty=R.Tensor((b, 576, 1024)') in inline
    assert ('call_dps_packed("sam3_attention_cuda", (qkv, sam3_rope_keys_cuda, qkv, 16, 0, 0, 2048, 24, 24, '
            'T.float64(1.0), T.float64(10000.0), 1)') in inline
    assert ('call_dps_packed("sam3_attention_cuda", (qkv, qkv, qkv, 16, 0, 1024, 2048, 0, 0, T.float64(1.0), '
            'T.float64(10000.0), 0)') in none
    assert "sam3_rope_keys_cuda" not in none
    assert 'call_dps_packed("sam3_attention_cuda_bias"' in masked  # key bias, head dim 32
    for s in (inline, none, masked):
        assert "sam3_attention_rope" not in s and "softmax" not in s
    assert attention_cuda.calls_kernel(mod)


def test_short_sequences_rotate_keys_inline():
    """Below ROTATE_KEYS_MIN_QUERIES queries the kernel rotates the k tiles itself (few query
    tiles re-read them); dynamic sequence lengths do too."""
    t = lambda *s: nn.spec.Tensor(list(s), "float16")
    assert attention_cuda.ROTATE_KEYS_MIN_QUERIES > 21 * 24
    for n, (gh, gw) in ((21 * 24, (21, 24)), ("n", (24, 24))):
        mod, _ = Mod(rope=AxialRope(gh, gw, 64, 10000.0, 1.0)).export_tvm(
            spec={"inline": {"qkv": t(1, n, 3072)}})
        s = route_attention(mod, rope_in_projection=False)["inline"].script()
        assert "sam3_rope_keys_cuda" not in s, n
        assert f'call_dps_packed("sam3_attention_cuda", (qkv, qkv, qkv, 16, 0, 1024, 2048, {gh}, {gw}' in s, n
        assert "T.float64(10000.0), 0)" in s, n


def test_full_bias_takes_the_cuda_kernel_on_cuda_only():
    """A per-query, per-head bias (the DETR decoder's box RPB) goes to the kernel's full-bias
    entry on CUDA fp16 (read as fp16, no score matrix); elsewhere the composed path."""
    full = _export("float16")["full"].script()
    assert 'call_dps_packed("sam3_attention_cuda_full_bias", (q, k, v, bias, 8, 0, 0, 0)' in full
    assert "softmax" not in full and "matmul" not in full
    for dtype, target in (("float32", CUDA), ("float16", {"kind": "metal"}), ("float16", "llvm")):
        s = _export(dtype, target=target)["full"].script()
        assert "sam3_attention_cuda" not in s and "softmax" in s, (dtype, target)


def test_other_cases_keep_the_tir_kernel():
    # float32 on CUDA, head dim 96 on CUDA, float16 on Metal, float16 on llvm
    cases = [("float32", None, 1024, CUDA),
             ("float16", Mod(8, AxialRope(24, 24, 96, 10000.0, 1.0)), 768, CUDA),
             ("float16", None, 1024, {"kind": "metal"}),
             ("float16", None, 1024, "llvm")]
    for dtype, module, hidden, target in cases:
        mod = _export(dtype, module, hidden, target)
        inline = mod["inline"].script()
        assert "sam3_attention_cuda" not in inline and "sam3_attention_rope" in inline, (dtype, target)
        if module is None:
            assert not attention_cuda.calls_kernel(mod), (dtype, target)
    assert not attention_cuda.calls_kernel(_export("float16", route=False))
    # on by default
    mod, _ = Mod().export_tvm(spec=_spec("float16"))
    assert KernelOptions().cuda_attention and attention_cuda.calls_kernel(route_attention(mod))


class Windowed(nn.Module):
    """One windowed ViT block (window 24, head dim 64) on a 48x48 grid (no padding) and on a
    30x30 one (padded to 48x48)."""

    def __init__(self):
        cfg = ViTConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2, image_size=672)
        self.layer = ViTLayer(cfg, cfg.window_size)

    def exact(self, x):
        return self.layer(x)

    def padded(self, x):
        return self.layer(x)


def _export_windowed(dtype, target=CUDA, rope_mode="inline", route=True,
                     rope_in_projection=False):
    t = lambda *s: nn.spec.Tensor(list(s), dtype)
    spec = {"exact": {"x": t("b", 48, 48, 128)}, "padded": {"x": t("b", 30, 30, 128)}}
    m = Windowed()
    m.to(dtype)
    mod, _ = m.export_tvm(spec=spec)
    return route_attention(mod, target, cuda_attention=route, rope_mode=rope_mode,
                           rope_in_projection=rope_in_projection)


PARTITION = "axes=[0, 1, 3, 2, 4, 5]"  # the window partition/unpartition transposes


def test_windowed_block_uses_window_mode_without_transposes():
    mod = _export_windowed("float16")
    exact, padded = mod["exact"].script(), mod["padded"].script()
    # no padding: qkv on the unpartitioned rows, window-mode kernel, o_proj on its output
    # keys rotated once at their in-window positions (k columns at 128, 2 heads, window 24 of
    # the 48x48 grid, RoPE grid the window's), then the window-mode kernel: heads, q/k/v
    # columns (k from the rotated buffer), window, image grid, RoPE grid, keys rotated
    assert ('call_dps_packed("sam3_rope_keys_cuda", (add, 128, 2, 24, 48, 48, 24, 24, T.float64(1.0), '
            'T.float64(10000.0)), out_ty=R.Tensor((b, 2304, 128)') in exact
    assert ('call_dps_packed("sam3_attention_cuda_window", (add, sam3_rope_keys_cuda, add, 2, 0, 0, 256, 24, '
            '48, 48, 24, 24, T.float64(1.0), T.float64(10000.0), 1)') in exact
    # the only transposes left are the weights' (Linear), none of activations
    perms = [ln for ln in exact.splitlines() if "R.permute_dims(" in ln]
    assert len(perms) == 4 and all("_weight, axes=None)" in ln for ln in perms), perms
    assert 'call_dps_packed("sam3_attention_cuda",' not in exact
    # padding: the padded grid (30 -> 48) in window mode too, then cropped
    assert exact.count(PARTITION) == 0 and padded.count(PARTITION) == 0
    assert re.search(r'call_dps_packed\("sam3_attention_cuda_window", \((add\d*), sam3_rope_keys_cuda\d*, \1, '
                     r'2, 0, 0, 256, 24, 48, 48, 24, 24, T.float64\(1.0\), T.float64\(10000.0\), 1\)', padded)
    assert attention_cuda.calls_kernel(mod)


def test_windowed_block_keeps_transposes_elsewhere():
    # float32 on CUDA, float16 with NORMAL RoPE, float16 on Metal and llvm, routing off
    for kw in ({"dtype": "float32"}, {"dtype": "float16", "rope_mode": "normal"},
               {"dtype": "float16", "target": {"kind": "metal"}}, {"dtype": "float16", "target": "llvm"},
               {"dtype": "float16", "route": False}):
        mod = _export_windowed(**kw)
        for f in ("exact", "padded"):
            s = mod[f].script()
            assert "sam3_attention_cuda_window" not in s and s.count(PARTITION) == 2, (kw, f)


def test_cuda_pipeline_attaches_the_kernel_object():
    names = [p.info.name for p in cuda_kernels.routing_passes(tvm.target.Target(CUDA), None)]
    assert "sam3_attention_cuda_object" in names
    cpu = [p.info.name for p in cpu_kernels.routing_passes(tvm.target.Target("llvm"), KernelOptions())]
    assert "sam3_attention_cuda_object" not in cpu


def test_attach_pass_leaves_other_modules_alone():
    mod = _export("float32")
    assert attention_cuda.attach_pass(tvm.target.Target(CUDA))(mod).same_as(mod)


def test_cuda_library_links_the_kernel(tmp_path):
    cuda_source = pytest.importorskip("sam3_nn.kernels.cuda.source")
    if not cuda_source.nvcc_available():
        pytest.skip("nvcc not found")
    target = tvm.target.Target(CUDA)
    mod = _export_windowed("float16")  # window mode ("exact") and the per-window kernel ("padded")
    lib = build_library(mod, [attention_cuda.attach_pass(target)], target, tmp_path / "attn.so")
    syms = exported_symbols(lib)
    for s in ("__tvm_ffi_sam3_attention_cuda", "__tvm_ffi_sam3_attention_cuda_bias",
              "__tvm_ffi_sam3_attention_cuda_window", "__tvm_ffi_sam3_attention_cuda_full_bias",
              "__tvm_ffi_sam3_rope_keys_cuda", "__tvm_ffi_sam3_rope_qk_cuda"):
        assert s in syms, s
    ldd = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    assert "libcudart" not in ldd  # the CUDA runtime is linked statically


def test_few_queries_against_many_keys_take_the_composed_path():
    """The interactive decoder's tokens against the image (head dim 16, which the CUDA kernel
    does not take): the GPU TIR kernel would run one block per head over all keys, so the
    composed path serves it; many queries, or few keys, keep the fused kernel."""

    class Cross(nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, 8)

    t = lambda *s: nn.spec.Tensor(list(s), "float16")
    for nq, nk, composed in ((7, 5184, True), (64, 1024, True), (65, 5184, False), (7, 1023, False)):
        mod, _ = Cross().export_tvm(spec={"forward": {"q": t(1, nq, 128), "k": t(1, nk, 128),
                                                      "v": t(1, nk, 128)}})
        for target in (CUDA, {"kind": "metal"}):
            s = route_attention(mod, target)["forward"].script()
            assert ("softmax" in s) == composed, (nq, nk, target)
            assert ("sam3_attention" not in s) == composed, (nq, nk, target)


# ---- head dims 128 and 256 (the video tracker's memory attention: one head of 256) --------


def _symbols(func):
    """The ``call_dps_packed`` targets of a Relax function, in order."""
    from tvm import relax

    out = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_dps_packed":
            out.append(e.args[0].global_symbol)

    relax.analysis.post_order_visit(func, visit)
    return out


class _Memory(nn.Module):
    """The memory attention of the video tracker, tiny: hidden 256 in one head (head dim 256 as
    released), an 8x8 grid, 2 memory frames and 4 pointer tokens behind a key mask."""

    def __init__(self, frames=2, grid=8):
        from sam3_nn.model.memory_attention import MemoryAttention

        self.frames, self.grid = frames, grid
        self.memory_attention = MemoryAttention(256, 1, 1, 64, 64, grid, 10000.0)

    def forward(self, features, position, memory, memory_pos, key_mask):
        from sam3_nn.ops.attention import key_padding_bias

        return self.memory_attention(features, position, memory, memory_pos,
                                     self.frames * self.grid * self.grid, key_padding_bias(key_mask))


def test_memory_attention_takes_the_cuda_kernel():
    """fp16 on cuda sm_90a: the self-attention (RoPE inline) and the masked cross-attention to
    the memory are calls of the kernel (head dim 256; the cross-attention's values the 64-wide
    memory, projected after it), no TIR attention kernel or softmax left; float32 keeps the
    portable routes."""
    hw, k = 64, 2 * 64 + 4

    def routed(dtype):
        m = _Memory()
        m.to(dtype)
        t = lambda *s, d=dtype: nn.spec.Tensor(list(s), d)  # noqa: E731
        spec = {"forward": {"features": t("b", hw, 256), "position": t(1, hw, 256), "memory": t("b", k, 64),
                            "memory_pos": t("b", k, 64), "key_mask": t("b", k, d="int32")}}
        mod, _ = m.export_tvm(spec=spec)
        return route_attention(mod)["forward"]

    fn = routed("float16")
    syms = _symbols(fn)
    assert syms.count(attention_cuda.SYMBOL) == 1 and syms.count(attention_cuda.SYMBOL_V64) == 1, syms
    assert not [s for s in syms if s.startswith("sam3.op.") or s.startswith("sam3_attention_rope")], syms
    script = fn.script()
    # self: fused qkv, 1 head, q/k/v columns 0/256/512, the 8x8 RoPE grid, keys rotated inline
    assert re.search(r'call_dps_packed\("sam3_attention_cuda", \((\w+), \1, \1, 1, 0, 256, 512, 8, 8, '
                     r'T.float64\(1.0\), T.float64\(10000.0\), 0\)', script), script
    # cross: the key bias of the memory's mask, no RoPE in the kernel (rotate_tokens did it),
    # values the memory itself (64 wide), the output 64 wide
    assert re.search(r'call_dps_packed\("sam3_attention_cuda_v64", \(\w+, \w+, memory, \w+, 1, 0, 0, '
                     r'T.float64\(1.0\), T.float64\(10000.0\), 0\), out_ty=R.Tensor\(\(b, 64, 64\)', script), script
    assert "softmax" not in script
    assert not any(s.startswith("sam3_attention_cuda") for s in _symbols(routed("float32")))


def test_head_dim_256_long_self_attention_rotates_keys_once():
    """576 queries of head dim 256: the keys rotated once (sam3_rope_keys_cuda), then the kernel."""
    s = _export("float16", Mod(1, AxialRope(24, 24, 256, 10000.0, 1.0)), 256)["inline"].script()
    assert ('call_dps_packed("sam3_rope_keys_cuda", (qkv, 256, 1, 0, 0, 0, 24, 24, T.float64(1.0), '
            'T.float64(10000.0)), out_ty=R.Tensor((b, 576, 256)') in s
    assert ('call_dps_packed("sam3_attention_cuda", (qkv, sam3_rope_keys_cuda, qkv, 1, 0, 0, 512, 24, 24, '
            'T.float64(1.0), T.float64(10000.0), 1)') in s
    for d, heads in ((128, 2), (256, 1)):
        assert attention_cuda.supported("float16", d, (256,), (0,))
        mod = _export("float16", Mod(heads, AxialRope(24, 24, d, 10000.0, 1.0)), 256)
        assert "sam3_attention_rope" not in mod["none"].script() and attention_cuda.calls_kernel(mod)


def _ptxas(tmp_path):
    """``nvcc -Xptxas -v`` of attention.cu for sm_90a: {demangled kernel: (registers, spill
    stores, spill loads)}."""
    cuda_source = pytest.importorskip("sam3_nn.kernels.cuda.source")
    if not cuda_source.nvcc_available():
        pytest.skip("nvcc not found")
    src = cuda_source.CUDA_DIR / "attention.cu"
    res = subprocess.run([cuda_source.nvcc_path(), "-c", "-O3", "-std=c++17", "-Xptxas", "-v",
                          *cuda_source.gencode(["sm_90a"]), "-o", str(tmp_path / "attention.o"), str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    out, name, spill = {}, None, None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None:
            dem = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
            out[re.sub(r"sam3_attn::\(anonymous namespace\)::", "", dem)] = (int(m.group(1)),) + spill
            name = None
    return out


def test_head_dim_256_kernels_compile_without_spills(tmp_path):
    """The head dim 256 instantiations (configs 10 and 11, with/without RoPE and key bias; config
    11 also with 64-wide values) and the 128 ones are built for sm_90a, and no head dim 256
    kernel spills registers."""
    kernels = _ptxas(tmp_path)
    d256 = {k: v for k, v in kernels.items() if "attention_kernel<256," in k}
    expect = {f"attention_kernel<256, {dv}, {nw}, 1, 32, {r}, {b}>" for dv, nw in ((256, 4), (256, 8), (64, 8))
              for r in ("false", "true") for b in ("false", "true")}
    assert {k.split("(")[0].replace("void ", "").strip() for k in d256} == expect, sorted(d256)
    for k, (regs, stores, loads) in d256.items():
        assert stores == 0 and loads == 0 and regs <= 255, (k, regs, stores, loads)
    assert any("attention_kernel<128, 128, 4, 1, 32" in k for k in kernels)
    assert any("rope_keys_kernel<256>" in k for k in kernels) and any("combine_splits<256>" in k for k in kernels)
    assert any("combine_splits<64>" in k for k in kernels)


class _Wide(nn.Module):
    """Head dims 256 and 128 through the kernel: cross attention without and with a key bias
    (key counts not multiples of the tiles; few blocks, so the keys are split), RoPE
    self-attention short (k tiles rotated inline) and long (keys rotated once)."""

    def __init__(self):
        self.rope_short = AxialRope(9, 11, 256, 10000.0, 1.0)
        self.rope_long = AxialRope(24, 24, 256, 10000.0, 0.5)
        self.rope_long128 = AxialRope(24, 24, 128, 10000.0, 1.0)

    def cross256(self, q, k, v):
        return attention(q, k, v, 1)

    def masked256(self, q, k, v, bias):
        return attention(q, k, v, 1, bias)

    def masked128(self, q, k, v, bias):
        return attention(q, k, v, 2, bias)

    def masked256v64(self, q, k, v, bias):
        return attention(q, k, v, 1, bias)

    def short256(self, qkv):
        return qkv_self_attention(qkv, 1, self.rope_short)

    def long256(self, qkv):
        return qkv_self_attention(qkv, 1, self.rope_long)

    def long128(self, qkv):
        return qkv_self_attention(qkv, 2, self.rope_long128)


WIDE = {"cross256": (2, 100, 2000), "masked256": (4, 70, 2000), "masked128": (3, 100, 337),
        "masked256v64": (4, 300, 2000)}  # b, nq, nk (v64: several query blocks, keys split)


@pytest.fixture(scope="module")
def wide_vm(tmp_path_factory):
    """The _Wide functions built for cuda sm_90a (the attention routed to the kernel), on the GPU."""
    from tvm import relax

    dev = cuda_device()
    if dev is None:
        pytest.skip("no CUDA GPU here")
    cuda_source = pytest.importorskip("sam3_nn.kernels.cuda.source")
    if not cuda_source.nvcc_available():
        pytest.skip("nvcc not found")
    t = lambda *s, d="float16": nn.spec.Tensor(list(s), d)  # noqa: E731
    spec = {name: {"q": t(b, nq, 256), "k": t(b, nk, 256), "v": t(b, nk, 256)} for name, (b, nq, nk) in WIDE.items()}
    for name in ("masked256", "masked128", "masked256v64"):
        b, _, nk = WIDE[name]
        spec[name]["bias"] = t(b, 1, 1, nk, d="float32")
    spec["masked256v64"]["v"] = t(*WIDE["masked256v64"][::2], 64)
    spec.update({"short256": {"qkv": t(2, 99, 768)}, "long256": {"qkv": t(1, 576, 768)},
                 "long128": {"qkv": t(1, 576, 768)}})
    mod, _ = _Wide().export_tvm(spec=spec)
    mod = route_attention(mod)
    for name in spec:
        assert "sam3_attention_cuda" in " ".join(_symbols(mod[name])), name
    target = tvm.target.Target(CUDA)
    lib = build_library(mod, [attention_cuda.attach_pass(target)], target, tmp_path_factory.mktemp("wide") / "w.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib), dev)

    def run(name, *arrays):
        return vm[name](*[tvm.runtime.tensor(a, dev) for a in arrays]).numpy()

    return run


def _ref_cross(q, k, v, h, bias=None):
    """float64 softmax attention of [B, N, C] arrays; bias [B, Nk] clamped at -1e30 as the kernels do."""
    import torch

    from tests.ops.test_attention import heads, merge, ref_attention

    Q, K, V = (heads(torch.from_numpy(x.astype(np.float64)), h) for x in (q, k, v))
    b = None if bias is None else torch.from_numpy(bias.astype(np.float64)).clamp(min=-1e30)[:, None, None, :]
    return merge(ref_attention(Q, K, V, b)).numpy()


def _masks(b, nk, kind):
    """Key biases [b, nk] (MASK_VALUE for masked keys, as key_padding_bias writes them)."""
    from sam3_nn.ops.attention import MASK_VALUE

    rng = np.random.default_rng(1)
    bias = np.zeros((b, nk), np.float32)
    if kind == 256:  # 64-key tiles wholly masked, a partly masked tile, a lone valid tail
        bias[0, 64:192] = bias[0, 1000:1100] = bias[0, 5] = MASK_VALUE
        bias[1, :1990] = MASK_VALUE  # only the last (partial) tile's 10 keys valid
        bias[2] = MASK_VALUE  # every key masked: a uniform softmax
        bias[3] = rng.standard_normal(nk) * 3  # finite biases, and keys below the floor
        bias[3, 500:800] = -1e35
    else:
        bias[0, :128] = bias[0, 300] = MASK_VALUE
        bias[1, 64:] = MASK_VALUE
        bias[2] = MASK_VALUE
    return bias


@pytest.mark.gpu
def test_head_dims_128_256_cross_attention_on_gpu(wide_vm):
    from tests.ops.test_attention import TOL

    rtol, atol = TOL["float16"]
    rng = np.random.default_rng(0)
    for name, (b, nq, nk) in WIDE.items():
        h = 2 if name.endswith("128") else 1
        dv = 64 if name.endswith("v64") else 256
        q, k = (rng.standard_normal((b, n, 256)).astype(np.float16) for n in (nq, nk))
        v = rng.standard_normal((b, nk, dv)).astype(np.float16)
        if name == "cross256":
            assert_close(wide_vm(name, q, k, v), _ref_cross(q, k, v, h), rtol, atol, name)
            continue
        bias = _masks(b, nk, 128 if name == "masked128" else 256)
        ours = wide_vm(name, q, k, v, bias[:, None, None, :])
        ref = _ref_cross(q, k, v, h, bias)
        keep = [i for i in range(b) if i != 2]
        assert_close(ours[keep], ref[keep], rtol, atol, name)
        # the all-masked entry (float32 scores of -1e9 + q.k are all alike): the mean of v over
        # every key, as the TIR kernels give (tests/ops/test_attention.py)
        assert_close(ours[2], np.broadcast_to(v[2].astype(np.float64).mean(0), (nq, dv)), rtol, atol,
                     f"{name} all masked")
        assert np.abs(ref[1] - _ref_cross(q, k, v, h)[1]).max() > 50 * atol  # the mask matters


@pytest.mark.gpu
def test_head_dims_128_256_rope_self_attention_on_gpu(wide_vm):
    from tests.ops.test_attention import TOL, ref_self_attention

    rtol, atol = TOL["float16"]
    rng = np.random.default_rng(2)
    m = _Wide()
    for name, rope, h, shape in (("short256", m.rope_short, 1, (2, 99, 768)), ("long256", m.rope_long, 1, (1, 576, 768)),
                                 ("long128", m.rope_long128, 2, (1, 576, 768))):
        qkv = rng.standard_normal(shape).astype(np.float16)
        ref = ref_self_attention(qkv, h, rope)
        assert_close(wide_vm(name, qkv), ref, rtol, atol, name)
        assert np.abs(ref - ref_self_attention(qkv, h, None)).max() > 50 * atol  # the rotation matters
