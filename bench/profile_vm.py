#!/usr/bin/env python3
"""Per-kernel time of one exported function of a compiled library (CPU or GPU).

Runs the function once to warm up, then once more with a VM instrument that
synchronizes the device around every call and adds up the wall time per callee
(TIR kernels, extern kernels, VM builtins). Weights are random (seeded); inputs too
(int32 masks all ones, box mask all zeros). Runtime-only TVM is enough.

    python bench/profile_vm.py dist/sam3-llvm.so encode_image
    python bench/profile_vm.py build/x/sam3-cuda-sm90a.so encode_image --top 40
    (device machine: export PYTHONPATH=$PWD/.devbundle/site:$PWD first)

Synchronizing after each call removes the overlap of launches with work, so the sum
is a little above the function's own time; the split is what it is for.

``--trace`` (with ``--kernels``): the last call as a timeline of host CUDA API calls and
kernels. Host-side tracing slows the API calls it records (a ``cudaGraphLaunch`` of
``encode_image`` took 0.2-3.2 ms under it on the H100, against 0.07 ms for the whole host
side of an untraced call): read it for the order of events, not for their times.

``--time N``: only the median wall time of N plain calls (each synchronized), e.g. to
compare libraries built with other options (``--no-pdl``) side by side.

``--clocks`` (with ``--time``, NVIDIA GPUs): also samples the SM clock, the board power and
the active clock-limit reasons with ``nvidia-smi`` every 50 ms during the timed calls, and
prints the medians per quarter of the calls. A long run of ``encode_image`` on the H100
holds the board at its power cap: ~690 W, reason 0x4 (software power cap), the SM clock at
1.45-1.62 GHz of 1.98 (session 13). Calls then take as long as their energy allows, so two
libraries or settings must be compared alternating on one machine, after the same warm-up.

``--ncu`` (GPU, needs PyTorch with CUDA): after 3 warm-up calls, one call inside an NVTX range
``sam3_call``, for Nsight Compute to profile that call's kernels (CUDA graph nodes included),
e.g. its DRAM traffic with the caches left as the call leaves them:

    ncu --nvtx --nvtx-include "sam3_call/" --cache-control none --clock-control none
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum --csv
        python3 bench/profile_vm.py LIB encode_image --ncu      (one command line)

``--kernels`` (GPU, needs PyTorch with CUDA): instead, the device-side time of every CUDA
kernel over ``--runs`` plain calls, from PyTorch's profiler (CUPTI), with no
synchronization added: the kernels' sum against the calls' wall time says how much of
a call the GPU is busy. Works inside CUDA graphs (each replayed kernel is recorded).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CALL_MARK = "sam3_call"  # --trace: the profiler range around each call; --ncu: the NVTX range


def random_inputs(manifest, function: str, batch: int, rng):
    args = []
    for spec in manifest["functions"][function]["inputs"]:
        shape = [batch if isinstance(s, str) else int(s) for s in spec["shape"]]
        if spec["dtype"].startswith("int"):
            a = np.zeros(shape, spec["dtype"]) if spec["name"] == "box_mask" else np.ones(shape, spec["dtype"])
        else:
            a = rng.standard_normal(shape).astype(spec["dtype"])
        args.append(a)
    return args


def random_params(manifest, rng):
    """Random weights (seeded, scale 0.02) for every parameter of a library's manifest."""
    return {p["name"]: (0.02 * rng.standard_normal(p["shape"])).astype(p["dtype"])
            for p in manifest["params"]}


class ClockSampler:
    """``nvidia-smi`` sampling SM clock, power and clock-limit reasons every 50 ms
    (common.GpuSampler), from construction until :meth:`report`."""

    def __init__(self, device_id: int = 0):
        from common import GpuSampler

        self.t0 = time.perf_counter()
        self.sampler = GpuSampler(device_id)
        if self.sampler.error is not None:
            print(f"clocks: cannot run nvidia-smi ({self.sampler.error}); no samples")

    def report(self, ms: np.ndarray, starts: np.ndarray) -> None:
        end = time.perf_counter()
        if self.sampler.proc is None:
            return
        self.sampler.close()
        rows = [(mhz, watts, reasons) for _, mhz, watts, reasons in self.sampler.samples]
        if not rows:
            print("clocks: nvidia-smi gave no samples")
            return
        # samples are evenly spaced over [t0, end]: split them and the calls into quarters
        q = 4
        span = (end - self.t0) / q
        for i in range(q):
            lo, hi = self.t0 + i * span, self.t0 + (i + 1) * span
            calls = ms[(starts >= lo) & (starts < hi)]
            sel = rows[i * len(rows) // q:(i + 1) * len(rows) // q] or rows
            reasons = 0
            for r in sel:
                reasons |= r[2]
            print(f"clocks quarter {i + 1}: calls median {np.median(calls) if len(calls) else float('nan'):.3f} ms "
                  f"({len(calls)}), SM {np.median([r[0] for r in sel]):.0f} MHz, "
                  f"{np.median([r[1] for r in sel]):.0f} W, limit reasons 0x{reasons:x}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("library")
    ap.add_argument("function")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--kernels", action="store_true", help="GPU kernel times (torch.profiler)")
    ap.add_argument("--runs", type=int, default=10, help="with --kernels: calls profiled")
    ap.add_argument("--gaps", action="store_true", help="with --kernels: idle time between kernels")
    ap.add_argument("--trace", action="store_true",
                    help="with --kernels: one call's timeline of CUDA API calls and kernels")
    ap.add_argument("--ncu", action="store_true",
                    help="GPU: one call inside an NVTX range for Nsight Compute (--nvtx-include sam3_call/)")
    ap.add_argument("--time", type=int, default=0, metavar="N",
                    help="instead: the median wall time of N plain calls (3 warm-up calls first)")
    ap.add_argument("--clocks", action="store_true",
                    help="with --time: sample SM clock, power and clock-limit reasons (nvidia-smi)")
    args = ap.parse_args()

    from sam3_nn.runtime import ffi
    from sam3_nn.runtime.engine import CompiledModel

    lib = CompiledModel(args.library)
    rng = np.random.default_rng(0)
    lib.bind(random_params(lib.manifest, rng))
    dev = lib.device
    # on the device once: the calls below time the function, not the inputs' upload
    inputs = [ffi.to_device(a, dev) for a in random_inputs(lib.manifest, args.function, args.batch, rng)]

    def call():
        out = lib.call_device(args.function, *inputs)
        ffi.sync(dev)
        return out

    call()
    t = time.perf_counter()
    call()
    total = time.perf_counter() - t
    if args.kernels:
        return kernel_profile(args, lib, call)
    if args.ncu:
        import torch

        for _ in range(3):
            call()
        torch.cuda.nvtx.range_push(CALL_MARK)
        call()
        torch.cuda.nvtx.range_pop()
        print(f"{args.function}: one call inside the NVTX range {CALL_MARK!r}")
        return 0
    if args.time:
        for _ in range(3):
            call()
        sampler = ClockSampler(dev.index) if args.clocks else None
        ts, stamps = [], []
        for _ in range(args.time):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
            stamps.append(t)
        ts = np.array(ts) * 1e3
        print(f"{args.function} on {lib.manifest['target']} ({lib.manifest['dtype']}), batch {args.batch}: "
              f"median {np.median(ts):.3f} ms, min {ts.min():.3f}, max {ts.max():.3f} over {args.time} calls")
        if sampler is not None:
            sampler.report(ts, np.array(stamps))
        return 0

    acc = collections.defaultdict(float)
    cnt = collections.Counter()
    start = [0.0]

    def instrument(func, symbol, before, ret, *_):
        ffi.sync(dev)
        if before:
            start[0] = time.perf_counter()
        else:
            acc[symbol] += time.perf_counter() - start[0]
            cnt[symbol] += 1
        return 0

    lib.vm.set_instrument(instrument)
    t = time.perf_counter()
    call()
    instrumented = time.perf_counter() - t
    summed = sum(acc.values())
    print(f"{args.function} on {lib.manifest['target']} ({lib.manifest['dtype']}), batch {args.batch}: "
          f"{total * 1e3:.2f} ms plain, {instrumented * 1e3:.2f} ms instrumented, "
          f"{summed * 1e3:.2f} ms inside {sum(cnt.values())} calls")
    print_table("callee", {k: v * 1e3 for k, v in acc.items()}, cnt, args.top)
    return 0


def print_table(what: str, ms: dict, calls: dict, top: int) -> None:
    """The ``top`` entries of ``ms`` (name -> ms), largest first, with share and calls."""
    total = sum(ms.values())
    print(f"{'ms':>9} {'share':>6} {'calls':>6}  {what}")
    for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{t:9.3f} {t / total:6.1%} {calls[name]:6d}  {name[:110]}")


def kernel_profile(args, lib, call) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        call()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(args.runs):
            if args.trace:  # marks the call's host range (and, on the device, an annotation)
                with torch.profiler.record_function(CALL_MARK):
                    call()
            else:
                call()
        wall = (time.perf_counter() - t) / args.runs
    acc = collections.defaultdict(float)
    cnt = collections.Counter()
    for e in _kernel_events(prof):
        acc[e.name] += e.device_time / 1e3 / args.runs  # ms per call
        cnt[e.name] += 1
    busy = sum(acc.values())
    print(f"{args.function} on {lib.manifest['target']} ({lib.manifest['dtype']}), batch {args.batch}: "
          f"{wall * 1e3:.2f} ms per call (profiled, {args.runs} calls); kernels {busy:.2f} ms "
          f"({busy / (wall * 1e3):.0%} busy), {sum(cnt.values()) // args.runs} launches per call")
    print_table("kernel", acc, {k: v // args.runs for k, v in cnt.items()}, args.top)
    if args.gaps:
        print_gaps(prof, args)
    if args.trace:
        print_trace(prof)
    return 0


def _kernel_events(prof):
    """The profiled device kernels (not --trace's device-side annotation of each call)."""
    import torch

    return [e for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.name != CALL_MARK]


def _short(name: str) -> str:
    """A kernel's name without its template arguments and signature."""
    for cut in ("<", "("):
        name = name.split(cut)[0]
    return name.split("::")[-1][:40] if not name.startswith("_Z") else name[:40]


def print_gaps(prof, args) -> None:
    """Idle device time between consecutive kernels (start of one minus end of the one
    before, where positive), per call and by the pair of kernels around it. With PDL on, a
    kernel's time includes its wait for the one before, so overlaps show as no gap."""
    ev = sorted(((e.time_range.start, e.time_range.end, e.name) for e in _kernel_events(prof)),
                key=lambda t: t[0])
    per = len(ev) // args.runs
    idle = collections.defaultdict(float)
    cnt = collections.Counter()
    total = 0.0
    for r in range(args.runs):
        run = ev[r * per:(r + 1) * per]
        for (s0, e0, n0), (s1, _, n1) in zip(run, run[1:]):
            gap = max(0.0, s1 - e0) / 1e3  # ms
            key = f"{_short(n0)} -> {_short(n1)}"
            idle[key] += gap / args.runs
            cnt[key] += 1
            total += gap / args.runs
    print(f"\nidle between kernels: {total:.3f} ms per call over {per - 1} transitions")
    print_table("transition (ms per call)", idle, {k: v // args.runs for k, v in cnt.items()}, args.top)


def print_trace(prof, head: int = 14, tail: int = 6) -> None:
    """The last profiled call as a timeline (ms from the call's start): host-side CUDA API
    calls (name, start, duration) and device kernels, the first ``head`` and last ``tail``
    events, then the span from the call's start to its first kernel and from its last
    kernel to its end."""
    import torch

    # the host's range (PyTorch also records the call as a device-side annotation)
    calls = [e for e in prof.events() if e.name == CALL_MARK
             and e.device_type != torch.autograd.DeviceType.CUDA]
    if not calls:
        print("no call recorded")
        return
    c = max(calls, key=lambda e: e.time_range.start)
    t0, t1 = c.time_range.start, c.time_range.end
    ev = []
    for e in prof.events():
        s, d = e.time_range.start, e.time_range.end - e.time_range.start
        if not t0 <= s <= t1 or e.name == CALL_MARK:
            continue
        where = "gpu" if e.device_type == torch.autograd.DeviceType.CUDA else "host"
        ev.append((s, d, where, e.name))
    ev.sort()
    kern = [x for x in ev if x[2] == "gpu"]
    print(f"\none call, {(t1 - t0) / 1e3:.3f} ms: {len(ev) - len(kern)} host events, {len(kern)} kernels")
    rows = ev if len(ev) <= head + tail else ev[:head] + [None] + ev[-tail:]
    for r in rows:
        if r is None:
            print("   ...")
            continue
        s, d, where, name = r
        print(f"  {(s - t0) / 1e3:8.3f} +{d / 1e3:7.3f} {where:4s} {_short(name)}")
    if kern:
        print(f"call start -> first kernel {(kern[0][0] - t0) / 1e3:.3f} ms; last kernel end -> call end "
              f"{(t1 - kern[-1][0] - kern[-1][1]) / 1e3:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
