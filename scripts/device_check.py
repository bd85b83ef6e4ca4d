#!/usr/bin/env python3
"""Run compiled CUDA libraries on a GPU machine with the runtime-only TVM bundle.

    # here (full TVM): the small pair, 4 ViT layers (global: 3) at 672 px
    .venv/bin/python scripts/device_check.py --build-small build/dev/small
    # there (runtime-only TVM)
    export PYTHONPATH=$PWD/.devbundle/site:$PWD
    python3 scripts/device_check.py FULL_CUDA_LIB [SMALL_CUDA_LIB SMALL_LLVM_LIB]

* Checks that no CUDA compile callback is registered (the library must carry compiled
  kernels: fatbin), loads ``FULL_CUDA_LIB``, binds random weights (seeded) and times
  ``encode_image``.
* With the two small libraries (same architecture, compiled for cuda and for a portable
  CPU target): binds the SAME weights to both and compares ``encode_image`` outputs.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_cuda_runtime():
    from sam3_nn.runtime.engine import load_device_runtime

    load_device_runtime("cuda")


def random_weights(manifest, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for p in manifest["params"]:
        shape = p["shape"]
        if len(shape) == 1 and p["name"].endswith("weight"):
            a = 1.0 + 0.02 * rng.standard_normal(shape)
        else:
            a = 0.02 * rng.standard_normal(shape)
        out[p["name"]] = a.astype(np.float32)
    return out


def cast(weights, manifest):
    want = {p["name"]: p["dtype"] for p in manifest["params"]}
    return {k: v.astype(want[k]) for k, v in weights.items()}


def run(model, x, repeat=1):
    import tvm

    dev_x = tvm.runtime.tensor(x.astype(model.dtype), model.device)
    outs = model.call_device("encode_image", dev_x)
    model.device.sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        outs = model.call_device("encode_image", dev_x)
        model.device.sync()
        times.append(time.perf_counter() - t)
    return [o.numpy() for o in outs], times


def build_small(out):
    from sam3_nn.compiler.build import build
    from sam3_nn.compiler.options import BuildOptions
    from sam3_nn.config import Sam3Config

    cfg = Sam3Config()
    bb = cfg.vision.backbone
    bb.num_hidden_layers, bb.global_attn_indexes, bb.image_size = 4, [3], 672
    cfg.validate()
    for target, dtype in (("cuda", "float16"), ("llvm-x86_64", "float32")):
        art = build(cfg, BuildOptions(target=target, dtype=dtype, batch=0, parts=("vision",)), out, log=print)
        print(art)


def main(argv):
    if argv and argv[0] == "--build-small":
        build_small(argv[1])
        return 0
    import tvm
    import tvm_ffi

    from sam3_nn.runtime.engine import CompiledModel

    print("tvm runtime-only:", getattr(tvm.base, "_RUNTIME_ONLY", None))
    _load_cuda_runtime()
    # `import tvm` registers TVM's NVRTC/nvcc callback (tvm.support.nvcc) even in
    # runtime-only mode: take it out, and put in one that fails loudly if ever called
    name = "tvm_callback_cuda_compile"
    if tvm_ffi.get_global_func(name, allow_missing=True) is not None:
        tvm_ffi.registry.remove_global_func(name)
        print(f"removed {name} registered by `import tvm`")
    assert tvm_ffi.get_global_func(name, allow_missing=True) is None

    def refuse(*_):
        raise RuntimeError("the library asked to compile CUDA source at load")

    tvm_ffi.register_global_func(name, refuse)
    print(f"{name}: only a refusing stub is registered")

    full = CompiledModel(argv[0])
    s = full.manifest["config"]["vision"]["backbone"]["image_size"]
    t = time.perf_counter()
    full.bind(cast(random_weights(full.manifest), full.manifest))
    print(f"full: bound {len(full.params)} weights in {time.perf_counter() - t:.1f} s")
    x = np.random.default_rng(1).standard_normal((1, 3, s, s)).astype(np.float32)
    outs, times = run(full, x, repeat=5)
    print(f"full {full.dtype} encode_image 1x3x{s}x{s}: "
          f"{', '.join(f'{t * 1e3:.1f}' for t in times)} ms; outputs "
          + ", ".join(f"{list(o.shape)} finite={bool(np.isfinite(o).all())}" for o in outs))
    del full

    if len(argv) >= 3:
        g, c = CompiledModel(argv[1]), CompiledModel(argv[2])
        w = random_weights(g.manifest, seed=2)
        g.bind(cast(w, g.manifest))
        c.bind(cast(w, c.manifest))
        s = g.manifest["config"]["vision"]["backbone"]["image_size"]
        x = np.random.default_rng(3).standard_normal((1, 3, s, s)).astype(np.float32)
        og, tg = run(g, x, repeat=3)
        t = time.perf_counter()
        oc = c("encode_image", x.astype(c.dtype))
        tc = time.perf_counter() - t
        print(f"small: cuda {g.dtype} {min(tg) * 1e3:.1f} ms, cpu {c.dtype} {tc:.1f} s")
        worst = 0.0
        for i, (a, b) in enumerate(zip(og, oc)):
            a, b = a.astype(np.float32), b.astype(np.float32)
            err = float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
            cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
            worst = max(worst, err)
            print(f"  fpn[{i}] {list(a.shape)}: max|cuda-cpu|/max|cpu| = {err:.2e}, cosine {cos:.6f}")
        print("MATCH" if worst < 2e-2 else "MISMATCH", f"(worst {worst:.2e}, tolerance 2e-2)")
        return 0 if worst < 2e-2 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
