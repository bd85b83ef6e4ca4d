"""The TIR GEMM of the interactive decoder's P x V on the GPU: dlight's Matmul (the schedule
such GEMMs had before) against the few-rows schedule (``sam3_nn.kernels.cuda.gemm.
schedule_few_rows``) for several (rows per block, warps per row), and ``torch.matmul``.
Every result is checked against numpy (fp32 math on the same fp16 inputs).

    python bench/few_rows_gemm.py                      # on the GPU host (nvcc on PATH)
    python bench/few_rows_gemm.py --build-only         # anywhere: schedule + codegen only

Default shape: 8 heads x ``[23, 5184] x [5184, 16]`` (23 tokens against the 72 x 72 image
tokens, head dim 16). Ours: ``time_evaluator`` (mean of ``--number`` back-to-back calls,
launches included), median of ``--repeat``; torch: CUDA events over the same number of calls.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variants(m: int):
    """``(name, rows, warps)``: None rows = dlight's Matmul; at most 1024 threads a block."""
    out = [("matmul (before)", None, None)]
    for rows in (1, 2, 4, 8):
        for warps in (1, 2, 4, 8):
            if rows <= m and rows * warps * 32 <= 1024:
                out.append((f"few_rows rows={rows} warps={warps}", rows, warps))
    return out


def build(args, rows, warps, target):
    import tvm
    from tvm.s_tir import dlight as dl

    from sam3_nn.compiler.export import cuda_compile_callback
    from sam3_nn.kernels.cuda import gemm as kcuda

    func = kcuda.gemm_definition(args.bt, args.m, args.n, args.k, "float16", "float16", w_batched=True,
                                 w_layout=args.layout)
    if rows is None:
        with kcuda._digits_arch(target):
            func = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(tvm.IRModule({"main": func}))["main"]
    else:
        func = kcuda.schedule_few_rows(func, args.m, args.n, args.layout, rows=rows, warps=warps)
    with cuda_compile_callback((args.arch,), None):  # nvcc, as the library build does
        return tvm.compile(func, target=target)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bt", type=int, default=8, help="batch x heads")
    ap.add_argument("--m", type=int, default=23)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--k", type=int, default=5184)
    ap.add_argument("--layout", choices=["kn", "nk"], default="kn")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()

    import tvm

    from sam3_nn.compiler.presets import get_preset

    target = get_preset("cuda", args.arch).tvm_target()
    dev = None
    if not args.build_only:
        from sam3_nn.runtime.engine import load_device_runtime

        load_device_runtime("cuda")
        dev = tvm.cuda(0)
        if not dev.exist:
            raise SystemExit("no CUDA GPU here (--build-only schedules and compiles only)")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((args.bt, args.m, args.k)).astype("float16")
    wshape = (args.bt, args.k, args.n) if args.layout == "kn" else (args.bt, args.n, args.k)
    w = rng.standard_normal(wshape).astype("float16")
    wf = w.astype("float32")
    ref = a.astype("float32") @ (wf if args.layout == "kn" else wf.transpose(0, 2, 1))
    macs = args.bt * args.m * args.n * args.k
    print(f"bt={args.bt} m={args.m} n={args.n} k={args.k} {args.layout}: {macs / 1e6:.1f} M MACs"
          + (f" on {dev.device_name}" if dev is not None else ""))
    for name, rows, warps in variants(args.m):
        lib = build(args, rows, warps, target)
        if dev is None:
            print(f"  {name:34s} built")
            continue
        xs = [tvm.runtime.tensor(a, dev), tvm.runtime.tensor(w, dev),
              tvm.runtime.tensor(np.full(ref.shape, np.nan, "float16"), dev)]
        lib.mod["main"](*xs)
        got = xs[2].numpy().astype("float64")
        err = np.abs(got - ref).max() / np.abs(ref).max() if np.isfinite(got).all() else float("inf")
        res = lib.mod.time_evaluator("main", dev, number=args.number, repeat=args.repeat)(*xs).results
        print(f"  {name:34s} {np.median(res) * 1e3:8.4f} ms   rel err {err:.1e}")
    if dev is not None:
        import torch

        ta, tw = torch.from_numpy(a).cuda(), torch.from_numpy(w).cuda()
        tw = tw if args.layout == "kn" else tw.transpose(1, 2)
        torch.matmul(ta, tw)
        times = []
        for _ in range(args.repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.number):
                torch.matmul(ta, tw)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / args.number)
        err = (torch.matmul(ta, tw).float().cpu().numpy() - ref).__abs__().max() / np.abs(ref).max()
        print(f"  {'torch.matmul':34s} {np.median(times):8.4f} ms   rel err {err:.1e}")


if __name__ == "__main__":
    main()
