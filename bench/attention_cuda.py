"""Fused INLINE-RoPE attention on CUDA: check against PyTorch, time against SDPA.

Two halves, because the accelerator machine has only a runtime-only TVM:

  build (here, full TVM):
      .venv/bin/python bench/attention_cuda.py build build/attn_cuda
  run (accelerator machine; carry .devbundle and build/attn_cuda):
      export PYTHONPATH=$PWD/.devbundle/site:$PWD; python3 bench/attention_cuda.py run build/attn_cuda

Shapes (float16, head dim 64, 16 heads): the windowed ViT blocks (9 windows of
24x24 = 576 tokens, one image) and the global blocks (1 x 5184 tokens, 72x72 grid,
positions scaled by 24/72). Ours: one kernel from the fused qkv ``[B, N, 3*1024]``
(split + 2D RoPE + attention + head merge). PyTorch: the same from the same qkv
(split, rotate, ``scaled_dot_product_attention``, merge), and SDPA alone on ready
``[B, H, N, D]`` q/k/v.
"""

from __future__ import annotations

import json
import os
import sys

SHAPES = {
    # name: (batch, grid_h, grid_w, rope scale)
    "window": (9, 24, 24, 1.0),
    "global": (1, 72, 72, 24 / 72),
}
HEADS, HEAD_DIM, THETA, DTYPE = 16, 64, 10000.0, "float16"
FUNCS = {"window": "window", "global_": "global", "window64": "window", "global64": "global",
         "window_none": "window", "window_normal": "window", "global_normal": "global"}


def build(out_dir: str, arch: str = "sm_90a") -> None:
    import tvm
    from tvm.relax.frontend import nn

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from sam3_nn.attention import kernel_target, qkv_self_attention
    from sam3_nn.rope import AxialRope, RopeMode

    class Bench(nn.Module):
        def __init__(self):
            self.ropes = {k: AxialRope(gh, gw, HEAD_DIM, THETA, s) for k, (_, gh, gw, s) in SHAPES.items()}

        def window(self, qkv):
            return qkv_self_attention(qkv, HEADS, self.ropes["window"], RopeMode.INLINE)

        def global_(self, qkv):
            return qkv_self_attention(qkv, HEADS, self.ropes["global"], RopeMode.INLINE)

        def window_normal(self, qkv):
            return qkv_self_attention(qkv, HEADS, self.ropes["window"], RopeMode.NORMAL)

        def global_normal(self, qkv):
            return qkv_self_attention(qkv, HEADS, self.ropes["global"], RopeMode.NORMAL)

        def window_none(self, qkv):  # the same kernel without RoPE: what the rotation costs
            return qkv_self_attention(qkv, HEADS, None, RopeMode.NONE)

    from sam3_nn import attention_kernels

    class Tiles64(Bench):
        def window64(self, qkv):
            return self.window(qkv)

        def global64(self, qkv):
            return self.global_(qkv)

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    spec = {}
    for fn, name in FUNCS.items():
        b, gh, gw, _ = SHAPES[name]
        spec[fn] = {"qkv": nn.spec.Tensor([b, gh * gw, 3 * HEADS * HEAD_DIM], DTYPE)}
    with kernel_target(target):
        mod, _ = Bench().export_tvm(spec={k: v for k, v in spec.items() if not k.endswith("64")})
        attention_kernels.GPU_TILES = (64, 64)  # variant: 64 query rows x 64 keys per block
        try:
            mod64, _ = Tiles64().export_tvm(spec={k: v for k, v in spec.items() if k.endswith("64")})
        finally:
            attention_kernels.GPU_TILES = None
    os.makedirs(out_dir, exist_ok=True)
    ex64 = tvm.compile(mod64, target=target)
    ex64.export_library(os.path.join(out_dir, "attn64.so"))
    ex = tvm.compile(mod, target=target)
    ex.export_library(os.path.join(out_dir, "attn.so"))

    def modules(m):
        yield m
        for sub in m.imports:
            yield from modules(sub)

    for e, name in ((ex, "kernels.cu"), (ex64, "kernels64.cu")):  # for reading / nvcc checks here
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("".join(m.inspect_source() for m in modules(e.mod) if m.kind == "cuda"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"shapes": SHAPES, "heads": HEADS, "head_dim": HEAD_DIM, "arch": arch}, f)
    print("built", out_dir)


def _register_nvcc(arch: str) -> None:
    import subprocess
    import tempfile

    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def compile_cuda(code, *_):
        with tempfile.TemporaryDirectory() as d:
            src, out = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
            with open(src, "w") as f:
                f.write(code)
            subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-o", out, src], check=True)
            with open(out, "rb") as f:
                return bytearray(f.read())


def torch_reference(qkv, gh, gw, scale, complex_rope=True, rope=True):
    """qkv [B, N, 3*H*D] -> [B, N, H*D]; RoPE as the original package (complex)."""
    import torch
    import torch.nn.functional as F

    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
    idx = torch.arange(n, device=qkv.device)
    f = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 4, device=qkv.device)[: HEAD_DIM // 4].float() / HEAD_DIM)
    ang = torch.cat([torch.outer((idx % gw).float() * scale, f), torch.outer((idx // gw).float() * scale, f)], -1)
    if complex_rope:
        fc = torch.polar(torch.ones_like(ang), ang)
        rot = lambda x: torch.view_as_real(
            torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * fc).flatten(-2).to(x.dtype)
    else:  # the real-arithmetic form a fast PyTorch path would use (cos/sin precomputed)
        cos, sin = ang.cos().repeat_interleave(2, -1).to(qkv.dtype), ang.sin().repeat_interleave(2, -1).to(qkv.dtype)

        def rot(x):
            x2 = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
            return x * cos + x2 * sin
    if not rope:
        rot = lambda x: x
    o = F.scaled_dot_product_attention(rot(q), rot(k), v)
    return o.transpose(1, 2).reshape(b, n, HEADS * HEAD_DIM)


def run(out_dir: str) -> None:
    import ctypes

    import numpy as np
    import torch
    import torch.nn.functional as F

    import tvm

    ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"), ctypes.RTLD_GLOBAL)
    from tvm.runtime.vm import VirtualMachine

    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    _register_nvcc(meta["arch"])
    dev = tvm.cuda(0)
    vms = {lib: VirtualMachine(tvm.runtime.load_module(os.path.join(out_dir, lib)), dev)
           for lib in ("attn.so", "attn64.so")}
    torch.manual_seed(0)

    def bench_torch(fn, iters=50):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = []
        for _ in range(5):
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            best.append(s.elapsed_time(e) / iters)
        return min(best)

    results = {}
    for fn, name in FUNCS.items():
        b, gh, gw, scale = meta["shapes"][name]
        n = gh * gw
        qkv = torch.randn(b, n, 3 * HEADS * HEAD_DIM, device="cuda", dtype=torch.float16)
        x = tvm.runtime.tensor(qkv.cpu().numpy(), dev)
        vm = vms["attn64.so" if fn.endswith("64") else "attn.so"]
        ours = torch.from_numpy(vm[fn](x).numpy()).cuda().float()
        rope = not fn.endswith("none")
        ref32 = torch_reference(qkv.float(), gh, gw, scale, rope=rope)
        ref16 = torch_reference(qkv, gh, gw, scale, rope=rope).float()
        err = (ours - ref32).abs().max().item()
        err_torch16 = (ref16 - ref32).abs().max().item()
        iters = 50 if name == "window" else 10
        ev = vm.time_evaluator(fn, dev, number=iters, repeat=5)
        t_ours = min(ev(x).results) * 1e3
        r = {"max_abs_err_vs_fp32": err, "torch_fp16_err_vs_fp32": err_torch16, "ours_ms": t_ours}
        if fn in ("window", "global_"):
            q, k, v = (torch.randn(b, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(3))
            r["torch_sdpa_ms"] = bench_torch(lambda: F.scaled_dot_product_attention(q, k, v), iters)
            r["torch_rope_sdpa_ms"] = bench_torch(lambda: torch_reference(qkv, gh, gw, scale, False), iters)
            r["ratio_vs_sdpa"] = t_ours / r["torch_sdpa_ms"]
            r["ratio_vs_rope_sdpa"] = t_ours / r["torch_rope_sdpa_ms"]
            flops = 4 * b * HEADS * n * n * HEAD_DIM
            r["ours_tflops"] = flops / t_ours / 1e9
            r["sdpa_tflops"] = flops / r["torch_sdpa_ms"] / 1e9
        results[fn] = r
        print(fn, json.dumps(r), flush=True)
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("build", "run"):
        sys.exit(__doc__)
    build(sys.argv[2]) if sys.argv[1] == "build" else run(sys.argv[2])
