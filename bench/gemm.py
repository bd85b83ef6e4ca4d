"""GEMM / conv benchmark: our kernels (through the sam3_nn kernel pipeline) vs PyTorch.

    .venv/bin/python bench/gemm.py                # CPU (llvm, host mcpu), M reduced
    .venv/bin/python bench/gemm.py --m 5184       # CPU, full token count (slow)
    .venv/bin/python bench/gemm.py --mode cuda --export dist/bench  # compile here
    python bench/gemm.py --mode cuda --run dist/bench               # on the GPU host

CUDA: all cases go into one library (``cases.so``, built with the ``cuda`` preset for
``--arch``, default sm_90a: CUTLASS kernels), run with the runtime-only TVM; each case is
checked against PyTorch (fp32 math on the same fp16 inputs) and the timed ones are
timed (ours: VM time_evaluator; torch: CUDA events), best of 5 x 20 calls. ``--sustain S``
also times each GEMM's tile configurations and PyTorch in stretches of S seconds of
continuous load, the board at its power cap (as in the model), with power and energy per call.

Each case is one ``nn.Linear`` (``[M, K] -> [M, N]`` + bias) or the pixel decoder's
3x3 conv (channel-last, 256 -> 256), compiled by the same pipeline as the model
(``sam3_nn.compiler.pipeline``). Timings are the best of ``--repeat`` runs; on the
shared 2-core CPU machine they are noisy (other jobs run), repeat when quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# the repository root, and bench/ itself for its helpers (common, attention_cuda_kernel) when
# this file is imported rather than run
sys.path[:0] = [p for p in (os.path.dirname(HERE), HERE) if p not in sys.path]

SHAPES = [(1024, 3072), (1024, 4736), (4736, 1024), (1024, 1024)]  # (K, N)
CONV = (256, 256)  # channels in/out, 3x3, padding 1
SPLITS = {"split": 1, "nosplit": 0}  # sam3_cutlass_gemm_set_split's argument


def _modules(m: int, conv_hw: int, dtype: str):
    from tvm.relax.frontend import nn

    from sam3_nn.model.common import Conv2d

    mode = {"param_mode": "packed", "effect_mode": "none"}
    out = []
    for k, n in SHAPES:
        lin = nn.Linear(k, n, dtype=dtype)
        mod, params = lin.export_tvm(spec={"forward": {"x": nn.spec.Tensor([m, k], dtype), "$": mode}})
        out.append((f"linear {m}x{k}->{n}", 2.0 * m * k * n, mod, params, ("linear", m, k, n)))
    cin, cout = CONV
    conv = Conv2d(cin, cout, 3)
    conv.to(dtype)
    mod, params = conv.export_tvm(spec={"forward": {
        "x": nn.spec.Tensor([1, conv_hw, conv_hw, cin], dtype), "$": mode}})
    out.append((f"conv3x3 {conv_hw}x{conv_hw}x{cin}->{cout}", 2.0 * conv_hw * conv_hw * cin * cout * 9,
                mod, params, ("conv", conv_hw, cin, cout)))
    return out


def _inputs(spec, dtype, rng):
    kind = spec[0]
    if kind == "linear":
        _, m, k, n = spec
        return [rng.standard_normal((m, k))], [rng.standard_normal((n, k)) / np.sqrt(k), rng.standard_normal(n)]
    _, hw, cin, cout = spec
    return [rng.standard_normal((1, hw, hw, cin))], [rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin),
                                                      rng.standard_normal(cout)]


def _torch_time(spec, xs, ps, device, dtype, repeat):
    import torch
    import torch.nn.functional as F

    td = getattr(torch, dtype)
    X = [torch.from_numpy(a).to(device=device, dtype=td) for a in xs]
    P = [torch.from_numpy(a).to(device=device, dtype=td) for a in ps]
    if spec[0] == "linear":
        fn = lambda: F.linear(X[0], P[0], P[1])  # noqa: E731
    else:
        xc = X[0].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        fn = lambda: F.conv2d(xc, P[0], P[1], padding=1)  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(); sync()
    best = float("inf")
    for _ in range(repeat):
        n = 10 if device == "cuda" else 1
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _tvm_time(vm, dev, xs, ps, dtype, repeat):
    import tvm

    args = [tvm.runtime.tensor(a.astype(dtype), dev) for a in xs]
    params = [tvm.runtime.tensor(a.astype(dtype), dev) for a in ps]
    vm["forward"](*args, params)
    number = 1 if dev.device_name == "cpu" or "cpu" in str(dev) else 10
    ev = vm.time_evaluator("forward", dev, number=number, repeat=repeat)
    return ev(*args, params).min, vm["forward"](*args, params).numpy()


def _report(rows):
    print(f"{'case':34s} {'ours ms':>10s} {'TFLOP/s':>8s} {'torch ms':>10s} {'TFLOP/s':>8s} {'ours/torch speed':>17s}")
    for name, flops, t_ours, t_ref in rows:
        print(f"{name:34s} {t_ours*1e3:10.3f} {flops/t_ours/1e12:8.3f} {t_ref*1e3:10.3f} "
              f"{flops/t_ref/1e12:8.3f} {t_ref/t_ours:17.2f}x")


def run_cpu(args):
    import tvm
    from tvm import relax

    from sam3_nn.compiler.build import compile_module, resolve
    from sam3_nn.compiler.options import BuildOptions

    import torch
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # both sides (before TVM's pool starts)
    preset, options = resolve(BuildOptions())
    rng = np.random.default_rng(0)
    rows = []
    for name, flops, mod, params, spec in _modules(args.m, args.conv_hw, args.dtype):
        t0 = time.time()
        vm = relax.VirtualMachine(compile_module(preset, options, mod), tvm.cpu())
        build = time.time() - t0
        xs, ps = _inputs(spec, args.dtype, rng)
        t_ours, out = _tvm_time(vm, tvm.cpu(), xs, ps, args.dtype, args.repeat)
        t_ref = _torch_time(spec, xs, ps, "cpu", args.dtype, args.repeat)
        print(f"  {name}: built in {build:.1f}s", flush=True)
        rows.append((name, flops, t_ours, t_ref))
    print(f"\nCPU {preset.tvm_target()}, {args.threads} threads, {args.dtype}, M={args.m}, conv {args.conv_hw}px")
    _report(rows)


# ---- CUDA: one library holding every case (compiled here, run on the GPU host) ----------

# (name, kind, shape, timed): kind "linear" (M, K, N, bias, act), "kn" (M, K, N),
# "linres" (M, K, N, bias, reshape, swap): a residual added to the linear's output (first
# reshaped to `reshape` when given; `swap`: linear + r instead of r + linear), the
# residual a parameter of the output's shape (the ViT's o_proj / fc2 adds; torch: linear,
# then add),
# "conv" (B, H, W, Cin, Cout, bias), "im2col" (the same 3x3 conv as explicit im2col + one
# GEMM, weight [Cout, 9*Cin] in (ky, kx, cin) order: the alternative to the implicit-GEMM
# conv); timed cases are the report, all are checked
CUDA_CASES = [
    ("linear 5184x1024->3072 +bias", "linear", (5184, 1024, 3072, True, None), True),
    ("linear 5184x1024->4736 +bias", "linear", (5184, 1024, 4736, True, None), True),
    ("linear 5184x4736->1024 +bias", "linear", (5184, 4736, 1024, True, None), True),
    ("linear 5184x1024->1024 +bias", "linear", (5184, 1024, 1024, True, None), True),
    ("mlp fc1 5184x1024->4736 +bias+gelu", "linear", (5184, 1024, 4736, True, "gelu"), True),
    ("linear 5184x4736->1024 +bias+residual", "linres", (5184, 4736, 1024, True, None, True), True),
    ("linear 5184x1024->1024 +bias+residual", "linres",
     ((1, 5184), 1024, 1024, True, (1, 72, 72, 1024), False), True),
    ("linear 20736x256->256 +bias", "linear", (20736, 256, 256, True, None), True),
    ("patch embed 5184x588->1024 (K zero-padded)", "linear", (5184, 588, 1024, False, None), True),
    # few output tiles (text encoder: 32 tokens; DETR decoder: 201 queries)
    ("text 32x1024->3072 +bias", "linear", (32, 1024, 3072, True, None), True),
    ("text fc1 32x1024->4096 +bias+gelu", "linear", (32, 1024, 4096, True, "gelu"), True),
    ("text fc2 32x4096->1024 +bias+residual", "linres", (32, 4096, 1024, True, None, True), True),
    ("detr 201x256->256 +bias", "linear", (201, 256, 256, True, None), True),
    ("detr ffn 201x256->2048 +bias", "linear", (201, 256, 2048, True, None), True),
    ("detr enc fc1 5184x256->2048 +bias+relu", "linear", (5184, 256, 2048, True, "relu"), True),
    ("conv3x3 288x288x256->256 +bias", "conv", (1, 288, 288, 256, 256, True), True),
    ("  (alt: im2col + GEMM, same conv)", "im2col", (1, 288, 288, 256, 256, True), True),
    ("check: linear 37x1024->1024 (no bias)", "linear", (37, 1024, 1024, False, None), False),
    ("check: linear 1x256->512 +bias", "linear", (1, 256, 512, True, None), False),
    ("check: linear 200x256->2048 +bias+gelu", "linear", (200, 256, 2048, True, "gelu"), False),
    ("check: linear 37x256->520 +bias+relu", "linear", (37, 256, 520, True, "relu"), False),
    ("check: linear 3x1297x768->256 +bias", "linear", ((3, 1297), 768, 256, True, None), False),
    ("check: matmul 999x256 @ [256,520]", "kn", (999, 256, 520), False),
    ("check: linear 64x100->200 (K%8: zero-padded)", "linear", (64, 100, 200, True, None), False),
    ("check: linear 37x1024->1024 +bias+residual", "linres", (37, 1024, 1024, True, None, False), False),
    ("check: linear 2x63x256->256 +bias, reshape, +res", "linres",
     ((2, 63), 256, 256, True, (2, 7, 9, 256), True), False),
    ("check: linear 3x1297x768->256 +residual", "linres", ((3, 1297), 768, 256, False, None, True), False),
    ("check: conv3x3 2x37x29x64->128 +bias", "conv", (2, 37, 29, 64, 128, True), False),
    # "rope" ((B, N), K, heads, window, img_h, img_w, grid_h, grid_w, scale): a qkv projection
    # K -> 3 * heads * 64 whose q and k columns are rotated (attention_cuda.emit_rope_qk: fused
    # into the GEMM's epilogue by the rewrite); "ropeonly": the same rotation on an input of
    # width K (the standalone kernel)
    ("qkv 5184x1024->3072 +bias+rope (windowed)", "rope", ((1, 5184), 1024, 16, 24, 72, 72, 24, 24, 1.0), True),
    ("qkv 5184x1024->3072 +bias+rope (global)", "rope", ((1, 5184), 1024, 16, 0, 0, 0, 72, 72, 1 / 3), True),
    ("check: qkv 2x576x256->768 +bias+rope", "rope", ((2, 576), 256, 4, 0, 0, 0, 24, 24, 1.0), False),
    ("check: q/k rotation 2x2304x384 (standalone)", "ropeonly", ((2, 2304), 384, 2, 24, 48, 48, 24, 24, 1.0),
     False),
    # "lnfold" ((B, H, W), K, N, consumer, consumer args): x = linear(a) + r ([B, H, W, N]), then
    # LayerNorm and a linear of N -> ... ("gelu": fc1 of width args; "rope": the qkv projection
    # with RoPE, args as "rope"'s (heads, window, img_h, img_w, grid_h, grid_w, scale)): the
    # LayerNorm folded into the two GEMMs (sam3_nn.kernels.cuda.ln_fold); checked only (the weight terms run
    # in the call here, where the model computes them once at bind time)
    ("check: o_proj+res, LN, fc1+gelu (LN folded)", "lnfold", ((1, 72, 72), 1024, 1024, "gelu", 4736), False),
    ("check: fc2+res (split), LN, qkv+rope (LN folded)", "lnfold",
     ((1, 72, 72), 4736, 1024, "rope", (16, 24, 72, 72, 24, 24, 1.0)), False),
    ("check: 2 images, LN folded into global qkv+rope", "lnfold",
     ((2, 24, 24), 512, 512, "rope", (8, 0, 0, 0, 24, 24, 1.0)), False),
]


def _cuda_module(dtype):
    """One nn.Module with a method per case (packed params: each takes them all)."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    from sam3_nn.model.common import Conv2d

    class Case(nn.Module):
        def __init__(self, kind, shape):
            self.kind, self.shape = kind, shape
            if kind == "linear":
                _, k, n, bias, act = shape
                self.lin = nn.Linear(k, n, bias=bias, dtype=dtype)
            elif kind == "linres":
                m, k, n, bias, rshape, _ = shape
                self.lin = nn.Linear(k, n, bias=bias, dtype=dtype)
                lead = list(m) if isinstance(m, tuple) else [m]
                self.res = nn.Parameter(tuple(rshape) if rshape else tuple(lead) + (n,), dtype=dtype)
            elif kind == "kn":
                _, k, n = shape
                self.w = nn.Parameter((k, n), dtype=dtype)
            elif kind == "rope":
                self.lin = nn.Linear(shape[1], 3 * shape[2] * 64, dtype=dtype)
            elif kind == "ropeonly":
                pass
            elif kind == "lnfold":
                lead, k, n, consumer, cargs = shape
                self.lin = nn.Linear(k, n, dtype=dtype)
                self.res = nn.Parameter(tuple(lead) + (n,), dtype=dtype)
                self.norm = nn.LayerNorm(n, eps=1e-6, dtype=dtype)
                self.nxt = nn.Linear(n, cargs if consumer == "gelu" else 3 * cargs[0] * 64, dtype=dtype)
            elif kind == "im2col":
                _, _, _, cin, cout, bias = shape
                self.lin = nn.Linear(9 * cin, cout, bias=bias, dtype=dtype)
            else:
                _, _, _, cin, cout, bias = shape
                self.conv = Conv2d(cin, cout, 3, bias=bias)
                self.conv.to(dtype)

        def forward(self, x):
            if self.kind == "linear":
                y = self.lin(x)
                return {"gelu": op.gelu, "relu": op.relu}.get(self.shape[4], lambda t: t)(y)
            if self.kind == "linres":
                y = self.lin(x)
                if self.shape[4]:
                    y = op.reshape(y, list(self.shape[4]))
                return y + self.res if self.shape[5] else self.res + y
            if self.kind == "kn":
                return op.matmul(x, self.w)
            if self.kind == "lnfold":
                lead, _, n, consumer, cargs = self.shape
                y = self.norm(self.lin(x) + self.res)
                if consumer == "gelu":
                    return op.gelu(self.nxt(y))
                from sam3_nn.kernels.cuda import attention as attention_cuda
                from sam3_nn.ops.rope import AxialRope

                heads, window, img_h, img_w, gh, gw, scale = cargs
                y = self.nxt(op.reshape(y, [lead[0], lead[1] * lead[2], n]))
                return attention_cuda.emit_rope_qk(y, heads, AxialRope(gh, gw, 64, 10000.0, scale),
                                                   window, img_h, img_w)
            if self.kind in ("rope", "ropeonly"):
                from sam3_nn.kernels.cuda import attention as attention_cuda
                from sam3_nn.ops.rope import AxialRope

                _, _, heads, window, img_h, img_w, gh, gw, scale = self.shape
                y = self.lin(x) if self.kind == "rope" else x
                return attention_cuda.emit_rope_qk(y, heads, AxialRope(gh, gw, 64, 10000.0, scale),
                                                   window, img_h, img_w)
            if self.kind == "im2col":
                _, h, w, _ = self.shape[:4]
                xp = op.pad(x, [0, 0, 1, 1, 1, 1, 0, 0])

                def window(t, start, size, axis):  # t[start:start+size] along axis
                    if start == 0:
                        return op.split(t, [size], axis=axis)[0]
                    if start + size == int(t.shape[axis]):
                        return op.split(t, [start], axis=axis)[1]
                    return op.split(t, [start, start + size], axis=axis)[1]

                cols = []
                for ky in range(3):
                    row = window(xp, ky, h, 1)
                    for kx in range(3):
                        cols.append(window(row, kx, w, 2))
                return self.lin(op.concat(cols, dim=3))
            return self.conv(x)

    class Cases(nn.Module):
        def __init__(self):
            for i, (_, kind, shape, _) in enumerate(CUDA_CASES):
                setattr(self, f"c{i}", Case(kind, shape))

    spec = {}
    for i, (_, kind, shape, _) in enumerate(CUDA_CASES):
        setattr(Cases, f"case{i}", lambda self, x, i=i: getattr(self, f"c{i}")(x))
        spec[f"case{i}"] = {"x": nn.spec.Tensor(_cuda_x_shape(kind, shape), dtype),
                            "$": {"param_mode": "packed", "effect_mode": "none"}}
    return Cases().export_tvm(spec=spec)


def _cuda_x_shape(kind, shape):
    if kind == "lnfold":
        return list(shape[0]) + [shape[1]]
    if kind in ("linear", "linres", "kn", "rope", "ropeonly"):
        m, k = shape[0], shape[1]
        return (list(m) if isinstance(m, tuple) else [m]) + [k]
    b, h, w, cin = shape[:4]
    return [b, h, w, cin]


def _cuda_flops(kind, shape):
    if kind == "lnfold":
        return 0.0  # checked only
    if kind in ("linear", "linres", "kn", "rope", "ropeonly"):
        m = shape[0] if not isinstance(shape[0], tuple) else int(np.prod(shape[0]))
        if kind == "ropeonly":
            return 0.0
        return 2.0 * m * shape[1] * (shape[2] if kind != "rope" else 3 * shape[2] * 64)
    b, h, w, cin, cout, _ = shape[:6]
    return 2.0 * b * h * w * cin * cout * 9


def export_cuda(args):
    from sam3_nn.compiler.build import compile_module, resolve
    from sam3_nn.compiler.export import export_library
    from sam3_nn.compiler.options import BuildOptions

    preset, options = resolve(BuildOptions(target="cuda", arch=args.arch))
    os.makedirs(args.export, exist_ok=True)
    mod, params = _cuda_module(args.dtype)
    t0 = time.time()
    ex = compile_module(preset, options, mod, print)
    path = os.path.join(args.export, "cases.so")
    export_library(preset, ex, path, print)
    print(f"  {len(CUDA_CASES)} cases compiled for {preset.name} in {time.time() - t0:.1f}s -> {path}")
    names = [n for n, _ in params]
    shapes = [[int(v) for v in p.shape] for _, p in params]
    json.dump({"dtype": args.dtype, "params": list(zip(names, shapes)),
               "cases": [{"name": n, "kind": k, "shape": s, "timed": t, "flops": _cuda_flops(k, s)}
                         for n, k, s, t in CUDA_CASES]},
              open(os.path.join(args.export, "cases.json"), "w"))


def _cuda_runtime_setup(arch: str):
    """Runtime-only TVM on the GPU host: load the CUDA loader, compile kernels with nvcc."""
    import subprocess
    import tempfile

    import tvm_ffi

    from sam3_nn.runtime.engine import load_device_runtime

    load_device_runtime("cuda")

    def compile_cuda(code, *rest):
        with tempfile.TemporaryDirectory() as d:
            src, out = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
            open(src, "w").write(code)
            subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-o", out, src], check=True)
            return bytearray(open(out, "rb").read())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def _torch_rope_qk(y, heads, window, img_h, img_w, gh, gw, scale, theta=10000.0):
    """The q/k rotation of ``y [B, N, 3 * heads * 64]`` in float64: SAM 3's complex factors
    (``attention_cuda_kernel.freqs_cis`` on the ``gh x gw`` RoPE grid), at in-window positions
    when ``window`` > 0."""
    import torch

    import attention_cuda_kernel as akern

    b, n, width = y.shape
    hidden = width // 3
    t = torch.arange(n, device=y.device)
    if window:  # token t of an img_h x img_w grid -> its position in its window x window window
        t = ((t // img_w) % window) * gw + (t % img_w) % window
    fc = akern.freqs_cis(gh, gw, 64, scale, theta, device=y.device)[t]  # [N, 32]
    qk = y[..., :2 * hidden].double().reshape(b, n, 2 * heads, 64)
    rot = akern.rope_complex(qk, fc[None, :, None, :]).reshape(b, n, 2 * hidden)
    return torch.cat([rot, y[..., 2 * hidden:].double()], -1).float()


def _torch_case(kind, shape, x, ps):
    import torch.nn.functional as F

    if kind == "rope":
        return _torch_rope_qk(F.linear(x, ps[0], ps[1]).float(), *shape[2:])
    if kind == "ropeonly":
        return _torch_rope_qk(x, *shape[2:])
    if kind == "lnfold":  # ps: lin weight, bias; res; norm weight, bias; next weight, bias
        lead, _, n, consumer, cargs = shape
        y = F.layer_norm(F.linear(x, ps[0], ps[1]) + ps[2], (n,), ps[3], ps[4], 1e-6)
        if consumer == "gelu":
            return F.gelu(F.linear(y, ps[5], ps[6]))
        y = F.linear(y.reshape(lead[0], lead[1] * lead[2], n), ps[5], ps[6])
        return _torch_rope_qk(y.float(), *cargs)
    if kind == "linear":
        y = F.linear(x, ps[0], ps[1] if shape[3] else None)
        return {"gelu": F.gelu, "relu": F.relu}.get(shape[4], lambda t: t)(y)
    if kind == "linres":
        y = F.linear(x, ps[0], ps[1] if shape[3] else None)
        return (y.reshape(shape[4]) if shape[4] else y) + ps[-1]
    if kind == "kn":
        return x @ ps[0]
    xc = x.permute(0, 3, 1, 2).contiguous(memory_format=__import__("torch").channels_last)
    w = ps[0]
    if kind == "im2col":  # [Cout, (ky, kx, cin)] -> OIHW
        w = w.reshape(w.shape[0], 3, 3, -1).permute(0, 3, 1, 2).contiguous()
    y = F.conv2d(xc, w, ps[1] if shape[5] else None, padding=1)
    return y.permute(0, 2, 3, 1)


def _bench_torch(fn, iters=20, repeat=5):
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3 / iters)
    return best


def _cuda_errors(lib, dev):
    """Bad shapes into the CUTLASS GEMM entry: each must raise ValueError naming what was
    wrong. Returns check rows (name, 0 or 1 as the error, same, finite)."""
    import tvm

    try:
        gemm = lib.get_function("sam3_cutlass_gemm_nk", query_imports=True)
    except AttributeError:  # a library without the CUTLASS kernels
        return []

    def t(*shape):
        return tvm.runtime.tensor(np.zeros(shape, "float16"), dev)

    rows = []
    for name, args, want in [
        ("K of a and w differ", (t(64, 256), t(128, 200), t(64, 128)), "a has K = 256"),
        ("out of the wrong size", (t(64, 256), t(128, 256), t(64, 120)), "expected M * N = 64 * 128"),
        ("K not a multiple of 8", (t(64, 100), t(128, 100), t(64, 128)), "multiples of 8, got K = 100"),
    ]:
        try:
            gemm(*args)
            got = "no error"
        except ValueError as e:
            got = str(e)
        bad = 0.0 if want in got else 1.0
        if bad:
            print(f"  {name}: expected an error with {want!r}, got {got!r}")
        rows.append((f"check: GEMM error, {name}", bad, bad, True))
    return rows


def sustained(cases, seconds, rounds):
    """Time each ``(label, run)`` (``run(n)``: n back-to-back calls, then a synchronize) as one
    stretch of about ``seconds`` of continuous load, the labels alternating for ``rounds``
    rounds after a 3 s warm-up, so every one of them runs with the board at its power cap
    (an H100 reaches it within half a second of load). Returns {label: (median seconds per
    call, median watts, median SM MHz)}; energy per call is watts x seconds."""
    from common import GpuSampler

    sampler = GpuSampler()
    per = {}
    for label, run in cases:  # calls per stretch, from a short timed run
        run(3)
        t0 = time.perf_counter()
        run(20)
        per[label] = max(20, int(seconds / ((time.perf_counter() - t0) / 20)))
    t_end = time.perf_counter() + 3.0
    while time.perf_counter() < t_end:
        cases[0][1](per[cases[0][0]])
    got = {}
    for _ in range(rounds):
        for label, run in cases:
            n = per[label]
            t0 = time.perf_counter()
            run(n)
            t1 = time.perf_counter()
            got.setdefault(label, []).append(((t1 - t0) / n, *sampler.between(t0, t1)))
    sampler.close()
    return {k: tuple(float(np.median([r[i] for r in v])) for i in range(3)) for k, v in got.items()}


def run_cuda(args):
    _cuda_runtime_setup(args.arch)
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    meta = json.load(open(os.path.join(args.run, "cases.json")))
    dtype = meta["dtype"]
    td = getattr(torch, dtype)
    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(os.path.join(args.run, "cases.so"))
    vm = VirtualMachine(lib, dev)
    try:
        set_tile = lib.get_function("sam3_cutlass_gemm_set_tile", query_imports=True)
        set_split = lib.get_function("sam3_cutlass_gemm_set_split", query_imports=True)
    except AttributeError:  # a library without the CUTLASS kernels (e.g. --arch sm_80)
        set_tile = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    # parameters: weights ~ 1/sqrt(fan_in), biases ~ 1 (fresh random, never zeros)
    tparams = []
    for name, shape in meta["params"]:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if name.endswith(".w"):
            fan = shape[0]
        if name.endswith(".res"):  # residual stream ~ N(0, 1)
            fan = 1
        t = torch.randn(shape, device="cuda", generator=gen) / np.sqrt(fan)
        tparams.append(t.to(td))
    pnames = [n for n, _ in meta["params"]]
    params = [tvm.runtime.from_dlpack(t) for t in tparams]
    rows, checks, tile_err, sus_rows = [], [], {}, []
    for i, c in enumerate(meta["cases"]):
        kind, shape = c["kind"], c["shape"]
        xs = _cuda_x_shape(kind, [tuple(v) if isinstance(v, list) else v for v in shape])
        x = torch.randn(xs, device="cuda", generator=gen).to(td)
        ps = [tparams[j] for j, n in enumerate(pnames) if n.startswith(f"c{i}.")]
        ref = _torch_case(kind, shape, x.float(), [p.float() for p in ps])
        got = vm[f"case{i}"](tvm.runtime.from_dlpack(x), params)
        torch.cuda.synchronize()
        out = torch.from_dlpack(got).reshape(ref.shape)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        maxerr = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        finite = bool(torch.isfinite(out).all())
        checks.append((c["name"], err, maxerr, finite))
        if not c["timed"] or (args.timed and not any(t in c["name"] for t in args.timed.split(","))):
            continue
        ev = vm.time_evaluator(f"case{i}", dev, number=20, repeat=5)
        xt = tvm.runtime.from_dlpack(x)
        tiles = {}
        if kind in ("linear", "linres", "im2col") and set_tile is not None and not args.no_sweep:
            times = {}
            for _ in range(args.rounds):  # round-robin, so drifts of the clock hit every tile alike
                for tile in dict.fromkeys(args.tiles):
                    # "split" / "nosplit": the rows always split into whole waves + a tail
                    # (gemm_sm90.cu split_rows), or never
                    set_split(SPLITS.get(tile, -1))
                    set_tile(-1 if isinstance(tile, str) else tile)
                    times.setdefault(tile, []).append(ev(xt, params).min)
                    if (c["name"], tile) not in tile_err:
                        o = torch.from_dlpack(vm[f"case{i}"](xt, params)).reshape(ref.shape).float()
                        tile_err[(c["name"], tile)] = (((o - ref).norm() / ref.norm()).item(),
                                                       (o - ref).abs().max().item())
            tiles = {t: float(np.median(v)) for t, v in times.items()}
            set_tile(-1)
            set_split(-1)
        if args.sustain and set_tile is not None and kind in ("linear", "linres", "rope"):
            sus_rows.append((c["name"], c["flops"], _sustain_case(
                args, vm, dev, f"case{i}", xt, params, kind, shape, x, ps, set_tile, set_split)))
        t_ours = ev(xt, params).min
        tps = ps
        t_ref = _bench_torch(lambda: _torch_case(kind, shape, x, tps))
        rows.append((c["name"], c["flops"], t_ours, t_ref, tiles))
    checks += _cuda_errors(lib, dev)
    print(f"\nCUDA {dtype}, {torch.cuda.get_device_name()}: correctness vs torch fp32 "
          "(rel. Frobenius error, max-abs error / max |ref|)")
    for name, err, maxerr, finite in checks:
        ok = finite and err < 5e-3
        print(f"  {'ok  ' if ok else 'FAIL'} {name:42s} {err:.2e} {maxerr:.2e}{'' if finite else ' NaN/inf'}")
    print("\ntile sweep (TFLOP/s; 0: 128x128 coop, 1: 128x256 coop, 2: 128x128 ping-pong, "
          "4: 128x192 coop, 5: 2 with 64x32 epilogue subtiles, 6: 2 without a cluster; split / nosplit: "
          "whole waves of 6 + a 64x128 tail (7), or one launch; default = pick_tile + split_rows)")
    for name, flops, t_ours, _, tiles in rows:
        if tiles:
            print(f"  {name:36s} " + " ".join(f"{k}:{flops / v / 1e12:6.1f}" for k, v in tiles.items())
                  + f"  default:{flops / t_ours / 1e12:6.1f}")
    if tile_err:
        print("\nper tile: rel. Frobenius error, max-abs error vs torch fp32")
        for (name, tile), (e, m) in tile_err.items():
            print(f"  {name:36s} {tile}: {e:.3e} {m:.3e}")
    if sus_rows:
        print(f"\nsustained at the power cap ({args.sustain:.2f} s stretches, {args.rounds} rounds, "
              "alternating; medians): ms per call, TFLOP/s, W, SM MHz, mJ per call")
        for name, flops, res in sus_rows:
            print(f"  {name}")
            for label, (sec, w, mhz) in res.items():
                print(f"    {str(label):10s} {sec * 1e3:8.4f} ms {flops / sec / 1e12:7.1f} {w:6.0f} W "
                      f"{mhz:5.0f} MHz {w * sec * 1e3:7.2f} mJ")
    print()
    _report([(n, f, a, b) for n, f, a, b, _ in rows])


def _sustain_case(args, vm, dev, fname, xt, params, kind, shape, x, ps, set_tile, set_split):
    """--sustain: the tile configs of one case and PyTorch's GEMM, each in stretches of
    continuous load (see :func:`sustained`)"""
    import torch

    fn = vm[fname]

    def ours(tile):
        def run(n):
            set_split(SPLITS.get(tile, -1))
            set_tile(-1 if isinstance(tile, str) else tile)
            for _ in range(n):
                fn(xt, params)
            dev.sync()
        return run

    def theirs(n):
        for _ in range(n):
            _torch_case(kind, shape, x, ps)
        torch.cuda.synchronize()

    tiles = ["default"] + [t for t in dict.fromkeys(args.tiles) if kind != "rope"]
    cases = [(t, ours(-1 if t == "default" else t)) for t in tiles]
    if kind != "rope":  # torch has no fused RoPE: its rotation would be separate kernels
        cases.append(("torch", theirs))
    try:
        return sustained(cases, args.sustain, args.rounds)
    finally:
        set_tile(-1)
        set_split(-1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--m", type=int, default=None, help="GEMM rows (tokens); CPU default 1296 (5184/4)")
    ap.add_argument("--conv-hw", type=int, default=None, help="conv spatial size; CPU default 72")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--export", default=None, help="cuda: compile the cases into this folder")
    ap.add_argument("--run", default=None, help="cuda: run the cases compiled into this folder")
    ap.add_argument("--timed", default=None, help="cuda --run: time only the cases whose name "
                    "holds one of these comma-separated strings (all are still checked)")
    ap.add_argument("--tiles", type=lambda v: [t if t in SPLITS else int(t) for t in v.split(",")],
                    default=[0, 1, 2, 4, 5, 6, "split", "nosplit"],
                    help="cuda --run: the tile configs the sweep times (sam3_cutlass_gemm_set_tile); "
                    "'split' / 'nosplit': the default with the rows always split into whole waves + a "
                    "tail, or never (sam3_cutlass_gemm_set_split)")
    ap.add_argument("--rounds", type=int, default=1, help="cuda --run: sweep rounds (median per tile)")
    ap.add_argument("--no-sweep", action="store_true", help="cuda --run: skip the tile sweep")
    ap.add_argument("--sustain", type=float, default=0.0, help="cuda --run: also time each timed "
                    "GEMM's tiles and PyTorch in stretches of this many seconds of continuous load "
                    "(the board at its power cap), with power and energy per call")
    args = ap.parse_args()
    cpu = args.mode == "cpu"
    args.m = args.m or (1296 if cpu else 5184)
    args.conv_hw = args.conv_hw or (72 if cpu else 288)
    args.dtype = args.dtype or ("float32" if cpu else "float16")
    if cpu:
        run_cpu(args)
    elif args.run:
        run_cuda(args)
    else:
        export_cuda(args)


if __name__ == "__main__":
    main()
