"""GEMM / conv benchmark: our kernels (through the sam3_nn kernel pipeline) vs PyTorch.

    .venv/bin/python bench/gemm.py                # CPU (llvm, host mcpu), M reduced
    .venv/bin/python bench/gemm.py --m 5184       # CPU, full token count (slow)
    .venv/bin/python bench/gemm.py --mode cuda --export dist/bench  # compile here
    python bench/gemm.py --mode cuda --run dist/bench               # on the GPU host

Each case is one ``nn.Linear`` (``[M, K] -> [M, N]`` + bias) or the pixel decoder's
3x3 conv (channel-last, 256 -> 256), compiled by the same pipeline as the model
(``sam3_nn.kernels.pipeline``). Timings are the best of ``--repeat`` runs; on the
shared 2-core CPU machine they are noisy (other jobs run), repeat when quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(1024, 3072), (1024, 4736), (4736, 1024), (1024, 1024)]  # (K, N)
CONV = (256, 256)  # channels in/out, 3x3, padding 1


def _modules(m: int, conv_hw: int, dtype: str):
    from tvm.relax.frontend import nn

    from sam3_nn.layers import Conv2d

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

    from sam3_nn import kernels
    from sam3_nn.targets import get_preset

    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    target = get_preset("llvm").tvm_target()
    rng = np.random.default_rng(0)
    rows = []
    for name, flops, mod, params, spec in _modules(args.m, args.conv_hw, args.dtype):
        t0 = time.time()
        ex = tvm.compile(mod, target=target, relax_pipeline=kernels.pipeline(target))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        build = time.time() - t0
        xs, ps = _inputs(spec, args.dtype, rng)
        t_ours, out = _tvm_time(vm, tvm.cpu(), xs, ps, args.dtype, args.repeat)
        t_ref = _torch_time(spec, xs, ps, "cpu", args.dtype, args.repeat)
        print(f"  {name}: built in {build:.1f}s", flush=True)
        rows.append((name, flops, t_ours, t_ref))
    print(f"\nCPU {target}, {args.threads} threads, {args.dtype}, M={args.m}, conv {args.conv_hw}px")
    _report(rows)


def export_cuda(args):
    import tvm

    from sam3_nn import kernels

    target = tvm.target.Target({"kind": "cuda", "arch": args.arch})
    os.makedirs(args.export, exist_ok=True)
    meta = []
    for i, (name, flops, mod, params, spec) in enumerate(_modules(args.m, args.conv_hw, args.dtype)):
        t0 = time.time()
        ex = tvm.compile(mod, target=target, relax_pipeline=kernels.pipeline(target))
        path = os.path.join(args.export, f"case{i}.so")
        ex.export_library(path)
        print(f"  {name}: compiled in {time.time() - t0:.1f}s -> {path}", flush=True)
        meta.append({"name": name, "flops": flops, "spec": list(spec), "lib": os.path.basename(path)})
    json.dump({"dtype": args.dtype, "cases": meta}, open(os.path.join(args.export, "cases.json"), "w"))


def _cuda_runtime_setup(arch: str):
    """Runtime-only TVM on the GPU host: load the CUDA loader, compile kernels with nvcc."""
    import ctypes
    import subprocess
    import tempfile

    import tvm
    import tvm_ffi

    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)

    def compile_cuda(code, *rest):
        with tempfile.TemporaryDirectory() as d:
            src, out = os.path.join(d, "k.cu"), os.path.join(d, "k.cubin")
            open(src, "w").write(code)
            subprocess.run(["nvcc", "--cubin", "-O3", f"-arch={arch}", "-o", out, src], check=True)
            return bytearray(open(out, "rb").read())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def run_cuda(args):
    _cuda_runtime_setup(args.arch)
    import tvm
    from tvm.runtime.vm import VirtualMachine

    meta = json.load(open(os.path.join(args.run, "cases.json")))
    dtype = meta["dtype"]
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    rows = []
    for c in meta["cases"]:
        lib = tvm.runtime.load_module(os.path.join(args.run, c["lib"]))
        vm = VirtualMachine(lib, dev)
        xs, ps = _inputs(tuple(c["spec"]), dtype, rng)
        t_ours, out = _tvm_time(vm, dev, xs, ps, dtype, args.repeat)
        t_ref = _torch_time(tuple(c["spec"]), xs, ps, "cuda", dtype, args.repeat)
        rows.append((c["name"], c["flops"], t_ours, t_ref))
    print(f"\nCUDA {dtype}")
    _report(rows)


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
