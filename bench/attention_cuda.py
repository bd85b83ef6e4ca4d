"""Fused INLINE-RoPE attention on CUDA through the compiled TVM library: check, time vs PyTorch.

Two halves, because the accelerator machine has only a runtime-only TVM:

  build (here, full TVM + nvcc):
      .venv/bin/python bench/attention_cuda.py build build/attn_cuda
  run (accelerator machine; carry .devbundle and build/attn_cuda):
      export PYTHONPATH=$PWD/.devbundle/site:$PWD; python3 bench/attention_cuda.py run build/attn_cuda

Shapes (float16, head dim 64, 16 heads): the windowed ViT blocks (9 windows of
24x24 = 576 tokens, one image) and the global blocks (1 x 5184 tokens, 72x72 grid,
positions scaled by 24/72). Ours: ``qkv_self_attention(...)`` routed with RoPE inline and
for CUDA, i.e. one call of the hand-written kernel (``sam3_nn/kernels/cuda/attention.cu``,
linked into the library) on the fused qkv ``[B, N, 3*1024]`` (split + 2D RoPE + attention +
head merge); ``*_none``: the same without RoPE; ``*_tir``: with the TIR kernel instead
(``KernelOptions(cuda_attention=False)``, the portable route). PyTorch: SDPA alone on ready
``[B, H, N, D]`` q/k/v, and split + rotate + SDPA + merge from the same qkv. Outputs are checked against a float64 reference with
complex-number RoPE. Times: median over 25 samples (TVM's time_evaluator for ours, CUDA
events over graph replays with 4 rotating input sets for PyTorch; see
bench/attention_cuda_kernel.py for the kernel alone timed like PyTorch).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    # name: (batch, grid_h, grid_w, rope scale)
    "window": (9, 24, 24, 1.0),
    "global": (1, 72, 72, 24 / 72),
}
HEADS, HEAD_DIM, THETA, DTYPE = 16, 64, 10000.0, "float16"
# function -> (shape, rope, kernel)
FUNCS = {"window": ("window", True, "cuda"), "global_": ("global", True, "cuda"),
         "window_none": ("window", False, "cuda"), "global_none": ("global", False, "cuda"),
         "window_tir": ("window", True, "tir"), "global_tir": ("global", True, "tir")}


def build(out_dir: str, arch: str = "sm_90a") -> None:
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    sys.path.insert(0, os.path.join(HERE, ".."))
    from sam3_nn.compiler.options import KernelOptions
    from sam3_nn.kernels.cuda import attention as attention_cuda
    from sam3_nn.kernels.cuda.source import fcompile_with_cudart
    from sam3_nn.kernels.rewrite import route_ops_pass
    from sam3_nn.ops.attention import qkv_self_attention
    from sam3_nn.ops.rope import AxialRope

    ropes = {k: AxialRope(gh, gw, HEAD_DIM, THETA, s) for k, (_, gh, gw, s) in SHAPES.items()}

    def method(shape, rope):
        r = ropes[shape] if rope else None
        return lambda self, qkv: qkv_self_attention(qkv, HEADS, r)

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    mods = []
    for kernel in ("cuda", "tir"):
        fns = {f: v for f, v in FUNCS.items() if v[2] == kernel}
        Bench = type(f"Bench_{kernel}", (nn.Module,), {f: method(s, r) for f, (s, r, _) in fns.items()})
        spec = {}
        for f, (shape, _, _) in fns.items():
            b, gh, gw, _ = SHAPES[shape]
            spec[f] = {"qkv": nn.spec.Tensor([b, gh * gw, 3 * HEADS * HEAD_DIM], DTYPE)}
        mod, _ = Bench().export_tvm(spec=spec)
        opts = KernelOptions(rope_mode="inline", cuda_attention=kernel == "cuda")
        mods.append((kernel, route_ops_pass(attention_cuda.attention_routes(target, None, opts))(mod)))
    os.makedirs(out_dir, exist_ok=True)
    for kernel, mod in mods:
        seq = tvm.transform.Sequential([attention_cuda.attach_pass(target, log=print),
                                        relax.get_default_pipeline(target)])
        ex = tvm.compile(mod, target=target, relax_pipeline=seq)
        ex.export_library(os.path.join(out_dir, f"attn_{kernel}.so"), fcompile=fcompile_with_cudart())
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"shapes": SHAPES, "heads": HEADS, "head_dim": HEAD_DIM, "arch": arch}, f)
    print("built", out_dir)


def _register_nvcc(arch: str) -> None:
    """Compile the TIR kernels' CUDA source with nvcc at load (no NVRTC in runtime-only TVM)."""
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


def run(out_dir: str, result_dir: str | None = None) -> dict:

    import torch

    import tvm

    sys.path.insert(0, HERE)
    from attention_cuda_kernel import reference, rope_tables, time_cuda, torch_rope_sdpa

    from sam3_nn.runtime.engine import load_device_runtime

    load_device_runtime("cuda")
    from tvm.runtime.vm import VirtualMachine

    import torch.nn.functional as F

    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    _register_nvcc(meta["arch"])
    dev = tvm.cuda(0)
    vms = {k: VirtualMachine(tvm.runtime.load_module(os.path.join(out_dir, f"attn_{k}.so")), dev)
           for k in ("cuda", "tir")}
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {}
    for fn, (name, rope, kernel) in FUNCS.items():
        b, gh, gw, scale = meta["shapes"][name]
        n = gh * gw
        qkv = torch.randn(b, n, 3 * HEADS * HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
        x = tvm.runtime.tensor(qkv.cpu().numpy(), dev)
        vm = vms[kernel]
        ours = torch.from_numpy(vm[fn](x).numpy()).cuda()
        off = (0, HEADS * HEAD_DIM, 2 * HEADS * HEAD_DIM)
        ref = reference(qkv, qkv, qkv, HEADS, HEAD_DIM, off, None, (gh, gw) if rope else None, scale)
        o = ours.double()
        r = {"rel_err": ((o - ref).norm() / ref.norm()).item(), "max_abs_err": (o - ref).abs().max().item(),
             "finite": bool(torch.isfinite(ours).all().item())}
        iters = 20 if kernel == "cuda" else 2
        ev = vm.time_evaluator(fn, dev, number=iters, repeat=25)
        res = sorted(ev(x).results)
        r["ours_ms"] = res[len(res) // 2] * 1e3
        if kernel == "cuda" and rope:
            cos, sin = rope_tables(gh, gw, HEAD_DIM, scale, torch.float16, "cuda")
            e = torch_rope_sdpa(qkv, HEADS, HEAD_DIM, cos, sin).double()
            r["torch_fp16_rel_err"] = ((e - ref).norm() / ref.norm()).item()
            qs = [[torch.randn(b, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
                   for _ in range(3)] for _ in range(4)]
            qkvs = [torch.randn_like(qkv) for _ in range(4)]
            r["torch_sdpa_ms"] = time_cuda([lambda i=i: F.scaled_dot_product_attention(*qs[i]) for i in range(4)])
            r["torch_rope_sdpa_ms"] = time_cuda([lambda i=i: torch_rope_sdpa(qkvs[i], HEADS, HEAD_DIM, cos, sin)
                                                 for i in range(4)])
            r["ratio_vs_sdpa"] = r["ours_ms"] / r["torch_sdpa_ms"]
            r["ratio_vs_rope_sdpa"] = r["ours_ms"] / r["torch_rope_sdpa_ms"]
            flops = 4 * b * HEADS * n * n * HEAD_DIM
            r["ours_tflops"] = flops / r["ours_ms"] / 1e9
            r["sdpa_tflops"] = flops / r["torch_sdpa_ms"] / 1e9
        results[fn] = r
        print(fn, json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    if result_dir:
        os.makedirs(result_dir, exist_ok=True)
        with open(os.path.join(result_dir, "attention_cuda_tvm.json"), "w") as f:
            json.dump(results, f, indent=1)
    print("\n== through the TVM library (fp16, ms, median of 25)")
    for fn, label in (("window", "window 9x576"), ("global_", "global 1x5184")):
        r = results[fn]
        tir = results[fn.rstrip("_") + "_tir"]
        none = results[fn.rstrip("_") + "_none"]
        print(f"{label:14s} ours {r['ours_ms']:.4f} (no rope {none['ours_ms']:.4f}, TIR kernel {tir['ours_ms']:.3f})"
              f"  torch sdpa {r['torch_sdpa_ms']:.4f}  torch rope+sdpa {r['torch_rope_sdpa_ms']:.4f}"
              f"  ours/sdpa {r['ratio_vs_sdpa']:.2f}  ours/(rope+sdpa) {r['ratio_vs_rope_sdpa']:.2f}"
              f"  rel err {r['rel_err']:.1e} (torch fp16 {r['torch_fp16_rel_err']:.1e})")
    ok = all(r["finite"] and r["rel_err"] < 2e-3 for r in results.values())
    print("output check:", "ok" if ok else "FAILED", {k: f"{v['rel_err']:.1e}" for k, v in results.items()})
    return results


if __name__ == "__main__":
    from common import build_or_run_main

    build_or_run_main(__doc__, build, run)
