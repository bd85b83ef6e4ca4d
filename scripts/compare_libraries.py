#!/usr/bin/env python3
"""Two builds of the same model, one set of weights and inputs: are the outputs equal, and
how do their call times compare (alternating, same process, same device)?

    python scripts/compare_libraries.py A.so B.so [--device cuda] [--runs 20] [--out r.json]

Weights are random (seeded) from A's manifest, which B's must match (names, shapes, dtypes);
inputs are a seeded random image, a prompt of random token ids and two boxes. Every output of
``encode_image``, ``encode_text`` and ``detect`` (text only and text + boxes) is compared
element-wise: the largest absolute difference and whether the arrays are bit-identical. Times
are medians of ``--runs`` calls per function (and of the whole image + text + detect
pipeline), A and B alternating after 3 warm-up calls each. Needs only the TVM runtime
and numpy (runs with the runtime-only bundle on the GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np

from sam3_nn.runtime import ffi
from sam3_nn.runtime.engine import CompiledModel, read_manifest


def random_weights(manifest, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for p in manifest["params"]:
        shape = tuple(p["shape"])
        w = rng.standard_normal(shape).astype(np.float32) * 0.02
        if p["name"].endswith("weight") and len(shape) == 1:  # norms: near 1
            w += 1.0
        out[p["name"]] = w.astype(p["dtype"])
    return out


def _dims(shape):
    return [d if isinstance(d, int) else 1 for d in shape]  # a symbolic batch: 1


def inputs(manifest, seed: int = 1):
    rng = np.random.default_rng(seed)
    fn = manifest["functions"]
    px = fn["encode_image"]["inputs"][0]
    pixels = rng.standard_normal(_dims(px["shape"])).astype(px["dtype"])
    ids_spec = fn["encode_text"]["inputs"][0]
    b, ctx = _dims(ids_spec["shape"])
    ids = np.zeros((b, ctx), np.int32)
    mask = np.zeros((b, ctx), np.int32)
    ids[:, 0], ids[:, 6] = 49406, 49407
    ids[:, 1:6] = rng.integers(1000, 40000, (b, 5))
    mask[:, :7] = 1
    det = {i["name"]: i for i in fn["detect"]["inputs"]}
    n = det["boxes"]["shape"][1]
    boxes = np.zeros((b, n, 4), np.float32)
    labels = np.zeros((b, n), np.int32)
    bmask = np.zeros((b, n), np.int32)
    boxes[:, :2] = [[0.4, 0.45, 0.3, 0.4], [0.7, 0.3, 0.2, 0.2]]
    labels[:, :2] = [1, 0]
    bmask[:, :2] = 1
    return pixels, ids, mask, (boxes, labels, bmask), (np.zeros_like(boxes), labels * 0, bmask * 0)


def run_all(lib, x):
    pixels, ids, mask, with_boxes, no_boxes = x
    maps = lib.call_device("encode_image", pixels)
    text = lib.call_device("encode_text", ids, mask)
    outs = {f"encode_image.{i}": ffi.to_numpy(m) for i, m in enumerate(maps)}
    outs.update({f"encode_text.{i}": ffi.to_numpy(t) for i, t in enumerate(text)})
    for tag, prompt in (("text", no_boxes), ("text+boxes", with_boxes)):
        det = lib.call_device("detect", *maps[:3], *text, *prompt)
        outs.update({f"detect[{tag}].{i}": ffi.to_numpy(d) for i, d in enumerate(det)})
    return outs, maps, text


def timed(lib, fn, args, sync):
    t = time.perf_counter()
    lib.call_device(fn, *args)
    sync()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--outputs-only", action="store_true",
                    help="compare outputs only, one library loaded at a time (no timing)")
    args = ap.parse_args(argv)
    pa, pb = ([(p["name"], tuple(p["shape"]), p["dtype"]) for p in read_manifest(path)["params"]]
              for path in (args.a, args.b))
    if pa != pb:
        print("error: the two libraries take different parameters", file=sys.stderr)
        return 2
    if args.outputs_only:  # one library in memory at a time (a full-size CPU build binds ~3.4 GB)
        results = []
        for path in (args.a, args.b):
            lib = CompiledModel(path, args.device)
            lib.bind(random_weights(lib.manifest))
            x = inputs(lib.manifest)
            outs = run_all(lib, x)[0]
            results.append((outs, None, None))
            del lib
            gc.collect()
        return _report(args, results, None, None)
    libs = [CompiledModel(p, args.device) for p in (args.a, args.b)]
    weights = random_weights(libs[0].manifest)
    for lib in libs:
        lib.bind(weights)
    del weights
    x = inputs(libs[0].manifest)
    results = [run_all(lib, x) for lib in libs]
    return _report(args, results, libs, x)


def _report(args, results, libs, x) -> int:
    report = {"a": args.a, "b": args.b, "outputs": {}, "times_ms": {}}
    equal = True
    for k, va in results[0][0].items():
        vb = results[1][0][k]
        same = va.shape == vb.shape and va.dtype == vb.dtype and va.tobytes() == vb.tobytes()
        diff = float(np.abs(va.astype(np.float64) - vb.astype(np.float64)).max()) if va.shape == vb.shape else None
        scale = float(np.abs(va.astype(np.float64)).max())
        report["outputs"][k] = {"shape": list(va.shape), "bit_identical": same, "max_abs_diff": diff,
                                "max_abs": scale}
        equal &= same
        print(f"{k:22s} {str(list(va.shape)):22s} identical={same!s:5s} max|a-b|={diff:.3g} (max|a|={scale:.3g})")
    report["all_bit_identical"] = equal
    if libs is None:
        print("all outputs bit-identical:", equal)
        _write(args, report)
        return 0
    dev = libs[0].device
    sync = lambda: ffi.sync(dev)  # noqa: E731

    def pipeline(lib):
        maps = lib.call_device("encode_image", x[0])
        text = lib.call_device("encode_text", x[1], x[2])
        lib.call_device("detect", *maps[:3], *text, *x[4])

    for fn in ("encode_image", "encode_text", "detect", "pipeline"):
        ts = {0: [], 1: []}
        for r in range(args.runs + 3):
            for i, lib in enumerate(libs):
                if fn == "pipeline":
                    t0 = time.perf_counter()
                    pipeline(lib)
                    sync()
                    t = time.perf_counter() - t0
                else:
                    _, maps, text = results[i]
                    fargs = {"encode_image": (x[0],), "encode_text": (x[1], x[2]),
                             "detect": (*maps[:3], *text, *x[4])}[fn]
                    t = timed(lib, fn, fargs, sync)
                if r >= 3:
                    ts[i].append(t * 1e3)
        ma, mb = statistics.median(ts[0]), statistics.median(ts[1])
        report["times_ms"][fn] = {"a": ma, "b": mb, "b_over_a": mb / ma}
        print(f"{fn:14s} A {ma:9.3f} ms  B {mb:9.3f} ms  B/A {mb / ma:.3f}")
    print("all outputs bit-identical:", equal)
    _write(args, report)
    return 0


def _write(args, report) -> None:
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
