"""The memory attention's cross-attention on CUDA: 64-wide values (the value projection after
the attention) against 256-wide ones, through the compiled library; checked and timed.

Two halves (the accelerator machine has only a runtime-only TVM):

  build (here): .venv/bin/python bench/attention_cuda_memory.py build build/attn_memory
  run (there):  export PYTHONPATH=$PWD/.devbundle/site:$PWD
                python3 bench/attention_cuda_memory.py run build/attn_memory [--out DIR]

Shapes (float16, one head of 256): the tracker at 1008 px, 5184 queries (72 x 72) against
7 memory frames of 5184 tokens and 16 pointers of 4 tokens, behind a key mask, for 1 and 4
objects (``v256``: what the reference computes, values projected first; ``v64``: ours).
``check_v64``: 300 queries against 2000 keys for 4 entries, with wholly and partly masked
key tiles, one entry all masked (a uniform softmax) and the key split; float64 reference.
Times: median of 25 samples of TVM's time_evaluator.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NQ, NK = 72 * 72, 7 * 72 * 72 + 16 * 4
CHECK = (4, 300, 2000)
FUNCS = {"v256_1": (1, 256), "v64_1": (1, 64), "v256_4": (4, 256), "v64_4": (4, 64)}


def build(out_dir: str, arch: str = "sm_90a") -> None:
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    sys.path.insert(0, os.path.join(HERE, ".."))
    from sam3_nn.compiler.options import KernelOptions
    from sam3_nn.kernels.cuda import attention as attention_cuda
    from sam3_nn.kernels.cuda.source import fcompile_with_cudart
    from sam3_nn.kernels.rewrite import route_ops_pass
    from sam3_nn.ops.attention import attention

    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    fn = lambda self, q, k, v, bias: attention(q, k, v, 1, bias)  # noqa: E731
    names = list(FUNCS) + ["check_v64"]
    Bench = type("Bench", (nn.Module,), {f: fn for f in names})
    t = lambda *s, d="float16": nn.spec.Tensor(list(s), d)  # noqa: E731
    spec = {f: {"q": t(b, NQ, 256), "k": t(b, NK, 256), "v": t(b, NK, dv), "bias": t(b, 1, 1, NK, d="float32")}
            for f, (b, dv) in FUNCS.items()}
    b, nq, nk = CHECK
    spec["check_v64"] = {"q": t(b, nq, 256), "k": t(b, nk, 256), "v": t(b, nk, 64),
                         "bias": t(b, 1, 1, nk, d="float32")}
    mod, _ = Bench().export_tvm(spec=spec)
    mod = route_ops_pass(attention_cuda.attention_routes(target, None, KernelOptions()))(mod)
    seq = tvm.transform.Sequential([attention_cuda.attach_pass(target, log=print),
                                    relax.get_default_pipeline(target)])
    ex = tvm.compile(mod, target=target, relax_pipeline=seq)
    os.makedirs(out_dir, exist_ok=True)
    ex.export_library(os.path.join(out_dir, "attn_memory.so"), fcompile=fcompile_with_cudart())
    print("built", out_dir)


def _masks(b, nk, rng):
    import numpy as np

    bias = np.zeros((b, nk), np.float32)
    bias[0, 64:192] = bias[0, 1000:1100] = bias[0, 5] = -1e9
    bias[1, :1990] = -1e9  # only the last (partial) tile's keys valid
    bias[2] = -1e9  # every key masked: a uniform softmax
    bias[3] = rng.standard_normal(nk) * 3
    return bias


def run(out_dir: str, result_dir: str | None = None) -> dict:
    import numpy as np
    import torch

    import tvm

    from sam3_nn.runtime.engine import load_device_runtime

    load_device_runtime("cuda")
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0)
    vm = VirtualMachine(tvm.runtime.load_module(os.path.join(out_dir, "attn_memory.so")), dev)
    rng = np.random.default_rng(0)
    results = {}
    # correctness: float64 softmax attention in torch
    b, nq, nk = CHECK
    q, k = (rng.standard_normal((b, n, 256)).astype(np.float16) for n in (nq, nk))
    v = rng.standard_normal((b, nk, 64)).astype(np.float16)
    bias = _masks(b, nk, rng)
    ours = vm["check_v64"](*[tvm.runtime.tensor(a, dev) for a in (q, k, v, bias[:, None, None, :])]).numpy()
    Q, K, V, B = (torch.from_numpy(a.astype(np.float64)) for a in (q, k, v, bias))
    ref = torch.softmax(Q @ K.transpose(1, 2) / 16.0 + B[:, None, :], -1) @ V
    ref[2] = V[2].mean(0)  # -1e9 swamps every score alike in float32: the mean of v
    err = float(np.abs(ours.astype(np.float64) - ref.numpy()).max())
    results["check_v64"] = {"max_abs_err": err, "finite": bool(np.isfinite(ours).all())}
    print("check_v64", results["check_v64"], flush=True)
    # times at the tracker's shape: 7 frames' memory valid, every pointer valid
    for fn, (nb, dv) in FUNCS.items():
        args = [rng.standard_normal((nb, NQ, 256)).astype(np.float16),
                rng.standard_normal((nb, NK, 256)).astype(np.float16),
                rng.standard_normal((nb, NK, dv)).astype(np.float16),
                np.zeros((nb, 1, 1, NK), np.float32)]
        args = [tvm.runtime.tensor(a, dev) for a in args]
        ev = vm.time_evaluator(fn, dev, number=5, repeat=25)
        res = sorted(ev(*args).results)
        ms = res[len(res) // 2] * 1e3
        flops = 2 * nb * NQ * NK * (256 + dv)
        results[fn] = {"ms": ms, "tflops": flops / ms / 1e9}
        print(fn, json.dumps({k2: round(v2, 4) for k2, v2 in results[fn].items()}), flush=True)
    for n in (1, 4):
        print(f"{n} object(s): v64 {results[f'v64_{n}']['ms']:.3f} ms vs v256 {results[f'v256_{n}']['ms']:.3f} ms "
              f"({results[f'v64_{n}']['ms'] / results[f'v256_{n}']['ms']:.2f}x)")
    print("device:", torch.cuda.get_device_name())
    ok = results["check_v64"]["finite"] and err < 2e-3
    print("output check:", "ok" if ok else "FAILED", f"max abs err {err:.1e}")
    if result_dir:
        os.makedirs(result_dir, exist_ok=True)
        with open(os.path.join(result_dir, "attention_cuda_memory.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, ".."))
    from common import build_or_run_main

    build_or_run_main(__doc__, build, run)
