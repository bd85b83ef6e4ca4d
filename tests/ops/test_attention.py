"""The attention operators through their routes on llvm (RoPE mode inline / normal / none,
a build option), and the portable implementations those routes are made of.

The reference is written here in PyTorch: SAM 3's 2D axial RoPE with complex
``freqs_cis`` (``torch.polar`` / ``view_as_complex``, as the original package) and
plain softmax attention in float64. Tolerances: float32 atol/rtol 1e-5; float16
inputs 2e-3 (the output itself is rounded to float16, ~5e-4 relative).
Sequence lengths are chosen not to be multiples of the kernel tiles (32 query
rows, 64 keys on the CPU).
"""

import re

import numpy as np
import pytest
import torch
import tvm
from tvm.relax.frontend import nn

from tests.refs import TINY_HF, assert_close, compile_ir, randomize_, routed, save_hf_snapshot
from sam3_nn.ops import attention as A
from sam3_nn.ops.attention import MASK_VALUE, attention, qkv_self_attention
from sam3_nn.ops.rope import AxialRope

TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3)}


# ---------------------------------------------------------------- PyTorch reference


def freqs_cis(gh, gw, head_dim, theta, scale):
    """Complex [N, D/2] rotation factors of the original package (x pairs then y pairs)."""
    idx = torch.arange(gh * gw)
    px = (idx % gw).double() * scale
    py = (idx // gw).double() * scale
    f = 1.0 / theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].double() / head_dim)
    angles = torch.cat([torch.outer(px, f), torch.outer(py, f)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def rope_complex(x, fc):
    """x: [B, H, N, D] real; rotate interleaved pairs by the complex factors."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * fc).flatten(-2)


def ref_attention(q, k, v, bias=None):
    """q/k/v: [B, H, N, D] float64; bias broadcasting to [B, H, Nq, Nk]."""
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    return torch.softmax(s, dim=-1) @ v


def heads(x, h):
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).permute(0, 2, 1, 3)


def merge(x):
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def ref_self_attention(qkv, h, rope):
    b, n, w = qkv.shape
    t = torch.from_numpy(qkv.astype(np.float64))
    q, k, v = (heads(x, h) for x in t.split(w // 3, dim=-1))
    if rope is not None:
        fc = freqs_cis(rope.grid_h, rope.grid_w, rope.head_dim, rope.theta, rope.scale)
        q, k = rope_complex(q, fc), rope_complex(k, fc)
    return merge(ref_attention(q, k, v)).numpy()


# ---------------------------------------------------------------- our kernels, compiled


class SelfAttn(nn.Module):
    def __init__(self, h, rope):
        self.h, self.rope = h, rope

    def forward(self, qkv):
        return qkv_self_attention(qkv, self.h, self.rope)


class FusedCross(nn.Module):
    """The fused CPU kernel on cross attention (the llvm route takes the composed path for
    the ``attention`` operator; the kernel is tested here directly)."""

    def __init__(self, h):
        self.h = h

    def plain(self, q, k, v):
        return A.fused_attention(q, k, v, self.h, int(q.shape[2]) // self.h)

    def masked(self, q, k, v, bias):
        return A.fused_attention(q, k, v, self.h, int(q.shape[2]) // self.h,
                                 key_bias=A.key_bias_2d(bias, q.shape[0], k.shape[1]))

    def per_query(self, q, k, v, bias):
        return attention(q, k, v, self.h, bias)

    def narrow_v(self, q, k, v, bias):
        return attention(q, k, v, self.h, bias)


MODES = ("inline", "normal", "none")


def _compile(module, spec, **options):
    mod, _ = module.export_tvm(spec=spec)
    return routed(mod, **options), compile_ir(mod, **options)


def _run(vm, name, *arrays):
    out = vm[name](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    return out.numpy()


# grid 5x7 = 35 tokens (not a multiple of 32), scaled positions, head dim 32 and 64
SELF_CASES = [
    (2, AxialRope(5, 7, 32, 10000.0, 1.0)),
    (1, AxialRope(6, 6, 64, 10000.0, 24 / 72)),
]


@pytest.fixture(scope="module", params=["float32", "float16"])
def self_libs(request):
    dtype = request.param
    libs = []
    for h, rope in SELF_CASES:
        spec = {"forward": {"qkv": nn.spec.Tensor(["b", rope.seq_len, 3 * h * rope.head_dim], dtype)}}
        built = {m: _compile(SelfAttn(h, rope), spec, rope_mode=m) for m in MODES}
        libs.append((h, rope, {m: b[0] for m, b in built.items()}, {m: b[1] for m, b in built.items()}))
    return dtype, libs


def test_self_attention_matches_complex_rope_reference(self_libs):
    dtype, libs = self_libs
    rtol, atol = TOL[dtype]
    rng = np.random.default_rng(0)
    for h, rope, _, vms in libs:
        qkv = rng.standard_normal((3, rope.seq_len, 3 * h * rope.head_dim)).astype(dtype)
        ref = ref_self_attention(qkv, h, rope)
        ref_plain = ref_self_attention(qkv, h, None)
        for mode in ("inline", "normal"):
            assert_close(_run(vms[mode], "forward", qkv), ref, rtol, atol, f"{mode} {dtype} d{rope.head_dim}")
        assert_close(_run(vms["none"], "forward", qkv), ref_plain, rtol, atol, f"none {dtype} d{rope.head_dim}")
        # the rotation matters at these sizes: a kernel that skipped it would fail
        assert np.abs(ref - ref_plain).max() > 50 * atol


def test_inline_is_one_fused_kernel(self_libs):
    """INLINE reads the fused qkv once: no split/rotate kernel, no softmax, no matmul."""
    _, libs = self_libs
    mods = libs[0][2]
    inline = mods["inline"]["forward"].script()
    assert "sam3_attention_rope" in inline
    for absent in ("sam3_qkv", "softmax", "matmul", "sam3.op."):
        assert absent not in inline, absent
    normal = mods["normal"]["forward"].script()
    assert "sam3_qkv_rope" in normal and "softmax" in normal


@pytest.fixture(scope="module", params=["float32", "float16"])
def cross_lib(request):
    dtype = request.param
    t = lambda *s: nn.spec.Tensor(list(s), dtype)
    h, c = 2, 64  # head dim 32
    spec = {
        "plain": {"q": t("b", "nq", c), "k": t("b", "nk", c), "v": t("b", "nk", c)},
        "masked": {"q": t("b", "nq", c), "k": t("b", "nk", c), "v": t("b", "nk", c), "bias": t("b", 1, 1, "nk")},
        "per_query": {"q": t("b", "nq", c), "k": t("b", "nk", c), "v": t("b", "nk", c),
                      "bias": t("b", 1, "nq", "nk")},
        "narrow_v": {"q": t("b", "nq", c), "k": t("b", "nk", c), "v": t("b", "nk", c // 4),
                     "bias": t("b", 1, 1, "nk")},
    }
    mod, vm = _compile(FusedCross(h), spec)
    return dtype, h, c, mod, vm


def test_cross_attention_lengths_and_mask(cross_lib):
    dtype, h, c, mod, vm = cross_lib
    rtol, atol = TOL[dtype]
    rng = np.random.default_rng(1)
    b, nq, nk = 3, 7, 133  # keys: two full CPU tiles and a partial one
    q, k, v = (rng.standard_normal((b, n, c)).astype(dtype) for n in (nq, nk, nk))
    T = lambda a: heads(torch.from_numpy(a.astype(np.float64)), h)
    ref = merge(ref_attention(T(q), T(k), T(v))).numpy()
    assert_close(_run(vm, "plain", q, k, v), ref, rtol, atol, f"cross {dtype}")

    # key padding: batch 0 keeps 100 keys, batch 1 keeps 1, batch 2 none (uniform softmax)
    keep = np.zeros((b, nk), bool)
    keep[0, :100] = True
    keep[1, 57] = True
    # (float16 cannot hold MASK_VALUE: its most negative finite value stands in)
    mask_value = MASK_VALUE if dtype == "float32" else float(np.finfo(np.float16).min)
    bias = np.where(keep, 0.0, mask_value).astype(dtype)[:, None, None, :]
    ref_m = merge(ref_attention(T(q), T(k), T(v), torch.from_numpy(bias.astype(np.float64)))).numpy()
    ours = _run(vm, "masked", q, k, v, bias)
    assert np.isfinite(ours).all()
    assert_close(ours[:2], ref_m[:2], rtol, atol, f"masked {dtype}")
    if dtype == "float32":
        # fully masked: -1e9 swamps the scores in float32, the softmax is uniform: mean of v
        uniform = merge(T(v).mean(dim=2, keepdim=True).expand(-1, -1, nq, -1)).numpy()
        assert_close(ours[2], uniform[2], rtol, atol, f"fully masked {dtype}")
    else:
        # -65504 leaves the scores ~0.01 of float32 resolution: softmax of the scores, roughly
        assert_close(ours[2], ref_m[2], 2e-2, 2e-2, f"fully masked {dtype}")
    assert np.abs(ref_m[0] - ref[0]).max() > 50 * atol

    # a per-query bias (the attention operator, routed on llvm): composed path, same semantics
    # (sdpa rounds the probabilities to the input dtype before the second GEMM: 4x looser in fp16)
    pq = (rng.standard_normal((b, 1, nq, nk)) * 3).astype(dtype)
    ref_pq = merge(ref_attention(T(q), T(k), T(v), torch.from_numpy(pq.astype(np.float64)))).numpy()
    f = 1 if dtype == "float32" else 4
    assert_close(_run(vm, "per_query", q, k, v, pq), ref_pq, f * rtol, f * atol, f"per-query {dtype}")
    assert "sam3_attention_masked" in mod["masked"].script()
    assert "sam3_attention" not in mod["per_query"].script()


def test_values_narrower_than_queries(cross_lib):
    """v heads a quarter of q/k's (the memory attention's values, projected after the
    attention): ``[B, Nq, heads * dv]``, the softmax scale from q's head dim; masked keys."""
    dtype, h, c, _, vm = cross_lib
    rtol, atol = TOL[dtype]
    rng = np.random.default_rng(4)
    b, nq, nk = 2, 9, 133
    q, k = (rng.standard_normal((b, n, c)).astype(dtype) for n in (nq, nk))
    v = rng.standard_normal((b, nk, c // 4)).astype(dtype)
    keep = rng.random((b, nk)) < 0.6
    bias = np.where(keep, 0.0, -1e4).astype(dtype)[:, None, None, :]
    T = lambda a: heads(torch.from_numpy(a.astype(np.float64)), h)
    ref = merge(ref_attention(T(q), T(k), T(v), torch.from_numpy(bias.astype(np.float64)))).numpy()
    ours = _run(vm, "narrow_v", q, k, v, bias)
    assert ours.shape == (b, nq, c // 4)
    f = 1 if dtype == "float32" else 4  # composed: probabilities rounded to fp16 (as per_query)
    assert_close(ours, ref, f * rtol, f * atol, f"narrow v {dtype}")


class Cross(nn.Module):
    def forward(self, q, k, v, bias):
        return attention(q, k, v, 2, bias)


def test_attention_route_follows_the_target():
    """The model writes one operator; llvm routes it to the composed path, a GPU target to
    the fused kernel (a key mask), and a build without a route fails with the reason."""
    t = lambda *s: nn.spec.Tensor(list(s), "float32")
    mod, _ = Cross().export_tvm(spec={"forward": {"q": t(1, 5, 64), "k": t(1, 9, 64), "v": t(1, 9, 64),
                                                  "bias": t(1, 1, 1, 9)}})
    assert "sam3.op.attention" in mod["forward"].script()
    cpu, gpu = routed(mod, "llvm")["forward"].script(), routed(mod, "opencl")["forward"].script()
    assert "sam3_attention" not in cpu and "softmax" in cpu and "sam3.op." not in cpu
    assert "sam3_attention_masked" in gpu and "softmax" not in gpu and "sam3.op." not in gpu
    from sam3_nn.kernels.rewrite import check_routed_pass

    with pytest.raises(ValueError, match="no kernel route for sam3.op.attention on target x"):
        check_routed_pass("x")(mod)


def _all_modules(m):
    yield m
    for sub in m.imports:
        yield from _all_modules(sub)


def test_gpu_kernels_build_for_cuda():
    """The GPU schedule lowers and generates CUDA for every variant (no device needed).

    (float16 on CUDA normally goes to the hand-written kernel, tests/kernels/test_attention_cuda.py;
    the TIR kernel is forced here.)"""
    tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    lib = SelfAttn(16, AxialRope(24, 24, 64, 10000.0, 1.0))
    mod, _ = lib.export_tvm(spec={"forward": {"qkv": nn.spec.Tensor(["b", 576, 3 * 1024], "float16")}})
    t = lambda *s: nn.spec.Tensor(list(s), "float32")
    mod2, _ = Cross().export_tvm(spec={"forward": {"q": t(1, "nq", 64), "k": t(1, "nk", 64),
                                                   "v": t(1, "nk", 64), "bias": t(1, 1, 1, "nk")}})
    for m in (mod, mod2):
        m = routed(m, "cuda", cuda_attention=False)
        ex = tvm.compile(m, target=tgt)
        src = "".join(m.inspect_source() for m in _all_modules(ex.mod) if m.kind == "cuda")
        assert "__global__" in src and "__shared__" in src
        assert not re.search(r"\binf\b|INFINITY|0x[fF]f800000|0x7[fF]800000", src), "no -inf masks"


# ---------------------------------------------------------------- the vision backbone


class VisionOnly(nn.Module):
    def __init__(self, cfg):
        from sam3_nn.model.vision import VisionModel

        self.vision_encoder = VisionModel(cfg.vision)

    def encode_image(self, pixel_values):
        return self.vision_encoder(pixel_values)


def test_vision_backbone_inline_matches_normal_and_transformers(tmp_path):
    from transformers import Sam3VisionConfig, Sam3VisionModel

    from sam3_nn.config import Sam3Config
    from sam3_nn.weights import load_params, open_checkpoint

    hf_cfg = Sam3VisionConfig(**TINY_HF["vision_config"])
    model = randomize_(Sam3VisionModel(hf_cfg).eval(), seed=3)
    folder = save_hf_snapshot(model, str(tmp_path / "hf"))
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 168, 168)
    with torch.no_grad():
        ref = model(pixels).fpn_hidden_states
    cfg = Sam3Config.from_pretrained(folder)
    outs = {}
    for mode in ("inline", "normal"):
        spec = {"encode_image": {"pixel_values": nn.spec.Tensor([1, 3, 168, 168], "float32"),
                                 "$": {"param_mode": "packed", "effect_mode": "none"}}}
        mod, named = VisionOnly(cfg).export_tvm(spec=spec)
        expected = {n: (tuple(int(s) for s in p.shape), p.dtype) for n, p in named}
        params, _ = load_params(cfg, open_checkpoint(folder), expected, ["vision"])
        vm = compile_ir(mod, rope_mode=mode)
        out = vm["encode_image"](tvm.runtime.tensor(pixels.numpy()),
                                 [tvm.runtime.tensor(params[n]) for n, _ in named])
        outs[mode] = [o.numpy() for o in out]
    for i, (a, b, r) in enumerate(zip(outs["inline"], outs["normal"], ref)):
        assert_close(a, b, 1e-5, 1e-5, f"inline vs normal, level {i}")
        assert_close(a, r, 1e-4, 1e-5, f"inline vs transformers, level {i}")


def test_routing_emits_the_kernels_of_the_build_target():
    """The exported model is target-free; routing for a GPU build gives the thread-bound
    attention kernel, for an llvm build the CPU one (not whichever target happens to be
    current)."""
    from tests.refs import tiny_hf_config
    from sam3_nn.compiler.build import export
    from sam3_nn.config import Sam3Config

    cfg = Sam3Config.from_hf(tiny_hf_config().to_dict())
    _, exported, _, _ = export(cfg, "float32", ["vision"])
    assert not any(gv.name_hint.startswith("sam3_attention") for gv in exported.functions)

    def attention_scripts(preset):
        mod = routed(exported, preset, rope_mode="inline")
        return [f.script() for gv, f in mod.functions.items() if gv.name_hint.startswith("sam3_attention")]

    gpu, cpu = attention_scripts("cuda"), attention_scripts("llvm")
    assert gpu and cpu
    assert all("threadIdx.x" in s for s in gpu)
    assert not any("threadIdx" in s for s in cpu)


def test_default_rope_mode_per_target():
    from sam3_nn.compiler.build import resolve
    from sam3_nn.compiler.options import BuildOptions

    mode = lambda t: resolve(BuildOptions(target=t))[1].kernels.rope_mode
    assert mode("cuda") == "inline"
    assert mode("metal") == "inline"
    assert mode("llvm") == "normal"
