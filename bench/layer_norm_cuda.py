"""The CUDA layer norm kernel (sam3_nn/kernels/cuda/layer_norm.cu) through the TVM library:
check against torch, time against TVM's own (dlight-scheduled TIR) kernel and torch.

Two halves, because the accelerator machine has only a runtime-only TVM:

  build (here, full TVM + nvcc):
      .venv/bin/python bench/layer_norm_cuda.py build build/ln_cuda
  run (accelerator machine, torch with CUDA; carry .devbundle and build/ln_cuda):
      export PYTHONPATH=$PWD/.devbundle/site:$PWD
      python3 bench/layer_norm_cuda.py run build/ln_cuda [--out DIR]

``build`` compiles the same module twice with the ``cuda-sm90a`` preset (the model's
pipeline, kernels compiled to SASS: no nvcc or NVRTC needed at load): ``ln_ours.so`` with
every layer norm routed to the kernel, ``ln_tvm.so`` with routing off (``KernelOptions(cuda_layer_norm=False)``
does the same to a model build). Each case is one function ``lnI(x, gamma, beta)``, float16,
with a symbolic leading dim as in the model (its batch); ``meta.json`` names the cases and
the kernel each function calls (read from the VM bytecode), so that ``run`` can also call the
kernels directly.

``run`` checks both libraries' outputs (through the VM) against
``torch.nn.functional.layer_norm`` in fp32 on the same fp16 inputs (max |out - ref| / max
|ref|, pass below 2e-3; torch's own fp16 result for scale), then times the two kernels, called
directly, and torch's fp16 ``F.layer_norm``: median ms over 50 CUDA-event samples, each a CUDA
graph replay of 16 calls rotating 4 input/output sets (bench/attention_cuda_kernel.time_cuda),
and GB/s of compulsory traffic (x read, out written, gamma and beta read once).
"""

from __future__ import annotations

import json
import os
import re

PRESET = "cuda-sm90a"
# name, traced shape (str: symbolic), shape run, eps
CASES = [
    ("vit 5184x1024", ["m", 1024], [5184, 1024], 1e-6),
    ("vit 1x72x72x1024", ["b", 72, 72, 1024], [1, 72, 72, 1024], 1e-6),
    ("detr 1x201x256", ["b", 201, 256], [1, 201, 256], 1e-5),
    ("tail 3x37x1024", ["b", 37, 1024], [3, 37, 1024], 1e-5),
    ("max 7x4096", ["m", 4096], [7, 4096], 1e-5),
]
TOL = 2e-3
SETS = 4  # rotating input/output sets per timing


def _module():
    """One function per case: ``lnI(x, gamma, beta) = layer_norm(x)`` over the last axis."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import op

    def method(c, eps):
        return lambda self, x, gamma, beta: op.layer_norm(x, c, gamma, beta, eps)

    Cases = type("LayerNormCases", (nn.Module,),
                 {f"ln{i}": method(shape[-1], eps) for i, (_, shape, _, eps) in enumerate(CASES)})
    t = lambda s: nn.spec.Tensor(s, "float16")  # noqa: E731
    spec = {f"ln{i}": {"x": t(shape), "gamma": t([shape[-1]]), "beta": t([shape[-1]])}
            for i, (_, shape, _, _) in enumerate(CASES)}
    mod, _ = Cases().export_tvm(spec=spec)
    return mod


def called_kernels(vm_text: str) -> dict:
    """``{function: kernel}`` from an executable's bytecode listing (``as_text``): the one
    call of each function whose callee is a layer norm (ours, or TVM's ``layer_norm*``; the
    others are VM builtins and host-side shape/scalar computations)."""
    out, fn = {}, None
    for line in vm_text.splitlines():
        m = re.match(r"@(\w+):$", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s+call\s+(\S+)\s+in:", line)
        if m and fn is not None and "layer_norm" in m.group(1):
            if fn in out:
                raise ValueError(f"{fn} calls {out[fn]} and {m.group(1)}: expected one layer norm")
            out[fn] = m.group(1)
    return out


def build(out_dir: str) -> None:
    from sam3_nn.compiler.build import compile_module, resolve
    from sam3_nn.compiler.export import export_library
    from sam3_nn.compiler.options import BuildOptions
    from sam3_nn.kernels.cuda import layer_norm as layer_norm_cuda

    os.makedirs(out_dir, exist_ok=True)
    kernels = {}
    for lib, route in (("ours", True), ("tvm", False)):
        preset, options = resolve(BuildOptions(target=PRESET, cuda_graph=False).with_(cuda_layer_norm=route))
        ex = compile_module(preset, options, _module(), print)
        export_library(preset, ex, os.path.join(out_dir, f"ln_{lib}.so"), print)
        kernels[lib] = called_kernels(ex.as_text())
        print(f"  ln_{lib}.so:", kernels[lib])
    ours = layer_norm_cuda.SYMBOL
    if set(kernels["ours"].values()) != {ours} or ours in kernels["tvm"].values():
        raise SystemExit(f"unexpected kernels: {kernels}")
    meta = {"preset": PRESET, "kernels": kernels,
            "cases": [{"name": n, "shape": s, "eps": e} for n, _, s, e in CASES]}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("built", out_dir)


def _on_torch_stream(f, *args):
    """``f(*args)`` launching on torch's current stream (the capture stream in a graph)."""
    import tvm_ffi

    with tvm_ffi.use_torch_stream():
        f(*args)


def _max_rel(out, ref) -> float:
    out = out.float()
    if not bool(out.isfinite().all()):
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max()).item()


def run(out_dir: str, result_dir: str | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    import tvm

    from attention_cuda_kernel import time_cuda

    from sam3_nn.runtime.engine import load_device_runtime

    load_device_runtime("cuda")
    from tvm.runtime.vm import VirtualMachine

    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    dev = tvm.cuda(0)
    mods = {k: tvm.runtime.load_module(os.path.join(out_dir, f"ln_{k}.so")) for k in ("ours", "tvm")}
    vms = {k: VirtualMachine(m, dev) for k, m in mods.items()}
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    tv = tvm.runtime.from_dlpack
    ok_all = True
    for i, case in enumerate(meta["cases"]):
        name, shape, eps = case["name"], case["shape"], case["eps"]
        fn, c = f"ln{i}", shape[-1]
        rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
        xs = [(4 * rnd(*shape) + 3).half() for _ in range(SETS)]  # offset mean: two-pass variance
        g, b = (1 + rnd(c) / 4).half(), (rnd(c) / 4).half()
        outs = [torch.empty_like(x) for x in xs]
        ref = F.layer_norm(xs[0].float(), (c,), g.float(), b.float(), eps)
        r = {"shape": shape}

        # checks: both libraries through the VM; ours also called directly (bit-equal)
        for lib in ("ours", "tvm"):
            got = torch.from_dlpack(vms[lib][fn](tv(xs[0]), tv(g), tv(b)))
            r[f"{lib}_max_rel_err"] = _max_rel(got, ref)
        direct = mods["ours"].get_function(meta["kernels"]["ours"][fn], query_imports=True)
        _on_torch_stream(direct, tv(xs[0]), tv(g), tv(b), eps, tv(outs[0]))
        torch.cuda.synchronize()
        via_vm = torch.from_dlpack(vms["ours"][fn](tv(xs[0]), tv(g), tv(b)))
        r["ours_direct_equal_vm"] = torch.equal(outs[0], via_vm)
        r["torch_fp16_max_rel_err"] = _max_rel(F.layer_norm(xs[0], (c,), g, b, eps), ref)
        ok = r["ours_max_rel_err"] < TOL and r["tvm_max_rel_err"] < TOL and r["ours_direct_equal_vm"]
        ok_all &= ok
        print(f"check {name:18s} ours {r['ours_max_rel_err']:.2e}  tvm {r['tvm_max_rel_err']:.2e}  "
              f"torch fp16 {r['torch_fp16_max_rel_err']:.2e}  direct == vm {r['ours_direct_equal_vm']}  "
              f"{'ok' if ok else 'FAIL'}", flush=True)

        # timings: the kernels called directly, and torch
        tvm_kernel = mods["tvm"].get_function(meta["kernels"]["tvm"][fn], query_imports=True)
        X, O, G, B = [tv(x) for x in xs], [tv(o) for o in outs], tv(g), tv(b)
        fns = {"ours": [lambda j=j: _on_torch_stream(direct, X[j], G, B, eps, O[j]) for j in range(SETS)],
               "tvm": [lambda j=j: _on_torch_stream(tvm_kernel, X[j], G, B, O[j]) for j in range(SETS)],
               "torch": [lambda j=j: F.layer_norm(xs[j], (c,), g, b, eps) for j in range(SETS)]}
        nbytes = 2 * xs[0].numel() * 2 + 2 * c * 2
        for k, f in fns.items():
            ms = time_cuda(f, samples=50)
            r[f"{k}_ms"], r[f"{k}_gbps"] = ms, nbytes / (ms * 1e-3) / 1e9
        r["tvm_over_ours"] = r["tvm_ms"] / r["ours_ms"]
        results["cases"][name] = r
        times = "  ".join(f"{k} {r[k + '_ms']:.4f} ms ({r[k + '_gbps']:.0f} GB/s)" for k in fns)
        print(f"time  {name:18s} {times}  tvm/ours {r['tvm_over_ours']:.2f}x", flush=True)
    print("device:", results["device"], "torch", results["torch"])
    from common import finish_run

    return finish_run(results, ok_all, result_dir, "layer_norm_cuda.json")


if __name__ == "__main__":
    from common import build_or_run_main

    build_or_run_main(__doc__, build, run)
