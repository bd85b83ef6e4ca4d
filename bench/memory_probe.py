#!/usr/bin/env python3
"""Where the device memory of a compiled CUDA library goes, step by step.

Loads the library, binds random weights, then calls each exported function (random
inputs, as ``bench/profile_vm.py``) twice, and prints the drop of free device memory
(``cudaMemGetInfo``) after every step, with the CUDA context's per-thread stack limit
(local memory the driver reserves for every resident thread of the kernel that needs
the most). Runs on the accelerator machine with the runtime-only TVM bundle and torch:

    export PYTHONPATH=$PWD/.devbundle/site:$PWD
    python3 bench/memory_probe.py build/bench/b1/sam3-cuda-sm90a.so
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("library")
    ap.add_argument("--functions", default="encode_image,encode_text,detect")
    args = ap.parse_args()

    import torch

    from profile_vm import random_inputs, random_params
    from sam3_nn.runtime.engine import CompiledModel

    torch.cuda.init()
    torch.cuda.synchronize()
    cudart = _cudart()

    def stack_limit():
        if cudart is None:
            return "?"
        v = ctypes.c_size_t()
        cudart.cudaDeviceGetLimit(ctypes.byref(v), 0)  # cudaLimitStackSize
        return f"{v.value} B/thread"

    base = torch.cuda.mem_get_info()[0]

    def report(step):
        torch.cuda.synchronize()
        used = (base - torch.cuda.mem_get_info()[0]) / 2**20
        print(f"{used:9.1f} MiB  stack {stack_limit():>14s}  {step}", flush=True)

    report("start (CUDA context of torch)")
    lib = CompiledModel(args.library)
    import tvm  # after CompiledModel: it loads TVM's CUDA runtime first

    report("library loaded")
    rng = np.random.default_rng(0)
    params = random_params(lib.manifest, rng)
    weights = sum(a.nbytes for a in params.values()) / 2**20
    lib.bind(params)
    del params
    report(f"weights bound ({weights:.1f} MiB of arrays)")
    batch = lib.manifest.get("batch") or 1
    for f in args.functions.split(","):
        if f not in lib.manifest["functions"]:
            continue
        inputs = [tvm.runtime.tensor(a, lib.device) for a in random_inputs(lib.manifest, f, batch, rng)]
        report(f"{f}: inputs on the device")
        for i in range(2):
            out = lib.call_device(f, *inputs)
            report(f"{f}: call {i + 1} (outputs held)")
            del out
        report(f"{f}: outputs dropped")
    return 0


def _cudart():
    """The CUDA runtime torch loaded (for cudaDeviceGetLimit), or None."""
    import glob

    import torch

    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    names += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libcudart.so*"))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
