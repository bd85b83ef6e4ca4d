#!/usr/bin/env python3
"""End to end per image, JPEG file to JSON: the native app (app/, sam3-segment) against the
Python runtime (sam3_nn.runtime.Sam3), one machine, one run, the same library, weights,
images and prompt.

* Python: ``Sam3.load`` once; per image ``set_image(path)`` + ``predict`` + the CLI's JSON
  (``sam3_nn.cli._result_json``) written to a file, timed with ``perf_counter``.
* App: one ``sam3-segment --no-overlay`` process over a folder of the same images; per image
  it prints "image to JSON X ms" (decode, pre-processing, encode_image, encode_text on the
  first image only, as the Python side caches text too, detect, post-processing, JSON
  written).
Neither side draws the overlay PNG (``--overlay`` adds it to both). Each side first runs one
untimed warm-up image (a copy of the first). ``--rounds`` alternates the two sides that
many times; the table gives the median over all timed images of each side, and the ratio
app / Python. The JSONs of the two sides are compared too (boxes, scores, masks).

Weights: ``--weights`` (converted .safetensors), else random ones made here: transformers'
``Sam3Model`` initialisation (seeded) mapped by our loader and saved converted (needs torch
and transformers; the GPU machine has them). Images: ``--images DIR`` (JPEG/PNG), else
``-n`` synthetic JPEGs of ``--size`` pixels (shapes, gradients, noise; quality 90).

CPU here, with the tests' tiny library (quick check of the script):

    .venv/bin/python bench/app_e2e.py --library /path/dist/sam3-llvm.so --weights tiny.safetensors \\
        --tokenizer tiny_bpe.txt.gz -n 4 --size 320x240

GPU (H100): compile the library and build the app here, carry them with the runtime-only TVM
bundle (../shared/device/bundle.sh), run there (app/README.md has the full command lines):

    make compile TARGET=cuda-sm90a OUT=build/e2e && make app && bash ../shared/device/bundle.sh
    # device run, carry [".devbundle", "build/e2e", "app/build/sam3-segment"]:
    export PYTHONPATH=$PWD/.devbundle/site:$PWD PYTHONUNBUFFERED=1; \\
    python3 bench/app_e2e.py --library build/e2e/sam3-cuda-sm90a.so --app app/build/sam3-segment \\
        -n 20 --rounds 2 --out $OUT/app_e2e.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True, help="compiled library (.so) with its manifest beside it")
    ap.add_argument("--weights", default=None, help="converted .safetensors (default: random, made here)")
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "sam3_nn", "runtime", "data", "bpe_simple_vocab_16e6.txt.gz"))
    ap.add_argument("--app", default=os.path.join(ROOT, "app", "build", "sam3-segment"), help="the sam3-segment binary")
    ap.add_argument("--images", default=None, help="folder of JPEG/PNG images (default: synthetic JPEGs)")
    ap.add_argument("-n", type=int, default=20, help="synthetic images (default 20)")
    ap.add_argument("--size", default="1344x1008", help="synthetic image size WxH (default 1344x1008)")
    ap.add_argument("--text", default="a red car")
    ap.add_argument("--score-threshold", type=float, default=0.5, help="default 0.5, as the CLI")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the library's target)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate Python / app this many times")
    ap.add_argument("--overlay", action="store_true", help="both sides also write the overlay PNG")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for images, weights and outputs (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap.parse_args(argv)


def log(s: str) -> None:
    print(s, flush=True)


def synthetic_images(folder: str, n: int, size: str, seed: int) -> List[str]:
    """JPEGs with smooth gradients, filled shapes and sensor-like noise (photo-sized work for
    the decoder and the resize; random content for the model)."""
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in size.lower().split("x"))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([127 + 100 * np.sin(xx / w * 3 + phase[c]) * np.cos(yy / h * 2 + phase[c]) for c in range(3)], -1)
        base += rng.normal(0, 8, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
            x1, y1 = x0 + rng.uniform(w * 0.05, w * 0.3), y0 + rng.uniform(h * 0.05, h * 0.3)
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=color)
        path = os.path.join(folder, f"img{i:03d}.jpg")
        img.save(path, quality=90)
        paths.append(path)
    return paths


def random_weights(library: str, path: str, seed: int) -> str:
    """transformers' Sam3Model initialisation mapped onto the library's parameters, saved as
    converted weights (what `python -m sam3_nn convert` writes)."""
    import common

    from sam3_nn.config import Sam3Config
    from sam3_nn.runtime.engine import read_manifest
    from sam3_nn.runtime.api import converted_metadata
    from sam3_nn.weights.store import save_converted

    manifest = read_manifest(library)
    cfg = Sam3Config.from_dict(manifest["config"])
    t = time.perf_counter()
    ref = common.reference_model(cfg, seed)
    params = common.our_params(cfg, ref.state_dict(), manifest)
    save_converted(path, params, converted_metadata(manifest, f"random-seed{seed}"))
    log(f"  random weights (Sam3Model init, seed {seed}) -> {path} in {time.perf_counter() - t:.1f} s")
    return path


def tvm_library_dirs() -> List[str]:
    """tvm/lib and tvm_ffi/lib of the TVM this Python imports (the app links both)."""
    dirs = []
    for pkg in ("tvm", "tvm_ffi"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.origin:
            raise SystemExit(f"python cannot find {pkg}: put the TVM runtime on PYTHONPATH (.devbundle/site)")
        dirs.append(os.path.join(os.path.dirname(spec.origin), "lib"))
    return dirs


def cuda_library_dirs() -> List[str]:
    """Folders holding libcudart, which TVM's CUDA runtime (libtvm_runtime_cuda.so) needs:
    the CUDA toolkit's, and those of NVIDIA's pip packages (torch's CUDA libraries), which
    a Python process has loaded through torch before TVM asks for them, but the app has not."""
    import glob

    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    candidates = [os.path.join(r, sub) for r in roots if r for sub in ("lib64", "targets/x86_64-linux/lib")]
    for path in sys.path:
        candidates += glob.glob(os.path.join(path, "nvidia", "*", "lib")) + glob.glob(os.path.join(path, "nvidia", "lib"))
    out = []
    for d in candidates:
        if d not in out and glob.glob(os.path.join(d, "libcudart.so*")):
            out.append(d)
    return out


def run_python(model, images: List[str], args, out_dir: str) -> List[float]:
    from sam3_nn.cli import _result_json

    os.makedirs(out_dir, exist_ok=True)
    cli_args = argparse.Namespace(library=args.library, weights=args.weights,
                                  score_threshold=args.score_threshold, mask_threshold=0.5)
    times = []
    for path in images:
        t0 = time.perf_counter()
        state = model.set_image(path)
        t1 = time.perf_counter()
        det = model.predict(state, text=args.text, score_threshold=args.score_threshold)
        t2 = time.perf_counter()
        result = _result_json(path, det, args.text, None, None, cli_args,
                              {**state.timings, "detect_and_postprocess": t2 - t1})
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(os.path.join(out_dir, stem + ".json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=1))
        if args.overlay:
            from sam3_nn.runtime.overlay import draw_overlay

            draw_overlay(state.rgb, det.boxes, det.scores, det.masks, args.text).save(
                os.path.join(out_dir, stem + ".png"), format="PNG")
        times.append(time.perf_counter() - t0)
    return times


def run_app(images_dir: str, args, out_dir: str) -> Dict:
    env = dict(os.environ)
    dirs = tvm_library_dirs() + (cuda_library_dirs() if args.kind == "cuda" else [])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    cmd = [args.app, "--library", args.library, "--weights", args.weights, "--tokenizer", args.tokenizer,
           "--image", images_dir, "--text", args.text, "--score-threshold", str(args.score_threshold),
           "--output", out_dir] + (["--device", args.device] if args.device else []) + \
        ([] if args.overlay else ["--no-overlay"])
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        hint = ""
        if "GLIBC" in r.stderr or "not found" in r.stderr:
            hint = ("\n(the app binary needs glibc >= 2.34 and libstdc++ of GCC 12; build it on this machine "
                    "with `cmake -S app -B app/build -DSAM3_PYTHON=python3` if the headers and cmake are here)")
        raise SystemExit(f"app failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}{hint}")
    per_image = {m.group(1): float(m.group(2)) / 1000
                 for m in re.finditer(r"\] (\S+): image to JSON ([0-9.]+) ms", r.stdout)}
    load = re.search(r"\[load\] done in ([0-9.]+) s", r.stdout)
    return {"per_image": per_image, "load_s": float(load.group(1)) if load else None, "process_s": wall}


def compare(py_dir: str, app_dir: str, stems: List[str]) -> Dict:
    from sam3_nn.runtime import rle

    worst_box = worst_score = 0.0
    objects = mask_diff_pixels = count_mismatch = 0
    for stem in stems:
        a = json.load(open(os.path.join(app_dir, stem + ".json")))
        p = json.load(open(os.path.join(py_dir, stem + ".json")))
        if len(a["objects"]) != len(p["objects"]):
            count_mismatch += 1
            continue
        for oa, op in zip(a["objects"], p["objects"]):
            objects += 1
            worst_box = max(worst_box, float(np.abs(np.subtract(oa["box"], op["box"])).max()))
            worst_score = max(worst_score, abs(oa["score"] - op["score"]))
            if oa["segmentation"] != op["segmentation"]:
                mask_diff_pixels += int((rle.decode(oa["segmentation"]) != rle.decode(op["segmentation"])).sum())
    return {"objects": objects, "images_with_other_object_count": count_mismatch, "max_box_diff": worst_box,
            "max_score_diff": worst_score, "mask_pixels_differing": mask_diff_pixels}


def main(argv=None) -> int:
    args = parse_args(argv)
    for p in (args.library, args.app, args.tokenizer):
        if not os.path.exists(p):
            raise SystemExit(f"{p}: no such file (see --help)")
    args.library = os.path.abspath(args.library)
    work = args.work or tempfile.mkdtemp(prefix="sam3-app-e2e-")
    os.makedirs(work, exist_ok=True)

    from sam3_nn.runtime.engine import read_manifest
    from sam3_nn.runtime import Sam3

    manifest = read_manifest(args.library)
    args.kind = (args.device or manifest["target"]).split("-")[0]
    log(f"app vs Python runtime, end to end per image: {manifest['target']} {manifest['dtype']} library, "
        f"{platform.node()}, work folder {work}")
    if args.weights is None:
        args.weights = random_weights(args.library, os.path.join(work, "weights.safetensors"), args.seed)
    if args.images:
        images = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                        if f.lower().endswith((".jpg", ".jpeg", ".png")))
    else:
        folder = os.path.join(work, "images")
        os.makedirs(folder, exist_ok=True)
        images = synthetic_images(folder, args.n, args.size, args.seed)
    if not images:
        raise SystemExit("no images")
    # the app's folder: a warm-up copy of the first image, sorted first, then the images
    app_images = os.path.join(work, "app_images")
    shutil.rmtree(app_images, ignore_errors=True)
    os.makedirs(app_images)
    ext = os.path.splitext(images[0])[1]
    shutil.copy(images[0], os.path.join(app_images, "!warmup" + ext))  # '!' sorts before names
    stems = []
    for p in images:
        stem = os.path.splitext(os.path.basename(p))[0]
        os.symlink(os.path.abspath(p), os.path.join(app_images, os.path.basename(p)))
        stems.append(stem)

    t = time.perf_counter()
    model = Sam3.load(args.library, args.weights, device=args.device, tokenizer=args.tokenizer)
    py_load = time.perf_counter() - t
    log(f"  Python: Sam3.load {py_load:.2f} s")
    py_times: List[float] = []
    app_times: List[float] = []
    app_runs = []
    for r in range(args.rounds):
        run_python(model, images[:1], args, os.path.join(work, "py_warmup"))  # warm-up, untimed
        ts = run_python(model, images, args, os.path.join(work, "py"))
        py_times += ts
        log(f"  round {r + 1}: Python median {statistics.median(ts) * 1000:.1f} ms over {len(ts)} images")
        res = run_app(app_images, args, os.path.join(work, "app"))
        missing = [s for s in stems if s not in {os.path.splitext(k)[0] for k in res["per_image"]}]
        if missing:
            raise SystemExit(f"app printed no time for {missing[:3]}")
        ts = [res["per_image"][os.path.basename(p)] for p in images]
        app_times += ts
        app_runs.append(res)
        log(f"  round {r + 1}: app    median {statistics.median(ts) * 1000:.1f} ms over {len(ts)} images "
            f"(load {res['load_s']:.2f} s, process {res['process_s']:.2f} s)")
    agree = compare(os.path.join(work, "py"), os.path.join(work, "app"), stems)
    py_med, app_med = statistics.median(py_times), statistics.median(app_times)
    summary = {
        "target": manifest["target"], "dtype": manifest["dtype"], "images": len(images), "rounds": args.rounds,
        "image_size": args.size if not args.images else "given", "text": args.text,
        "score_threshold": args.score_threshold, "overlay": args.overlay,
        "python_median_ms": py_med * 1000, "app_median_ms": app_med * 1000, "app_over_python": app_med / py_med,
        "python_min_max_ms": [min(py_times) * 1000, max(py_times) * 1000],
        "app_min_max_ms": [min(app_times) * 1000, max(app_times) * 1000],
        "python_load_s": py_load, "app_load_s": [r["load_s"] for r in app_runs], "agreement": agree,
        "machine": platform.platform(), "python": sys.version.split()[0],
    }
    log("")
    log("| side   | median ms (image to JSON) | min-max ms | load s |")
    log("|--------|---------------------------|------------|--------|")
    log(f"| Python | {py_med * 1000:25.1f} | {min(py_times) * 1000:.1f}-{max(py_times) * 1000:.1f} | {py_load:6.2f} |")
    log(f"| app    | {app_med * 1000:25.1f} | {min(app_times) * 1000:.1f}-{max(app_times) * 1000:.1f} | "
        f"{app_runs[-1]['load_s']:6.2f} |")
    log(f"app / Python: {app_med / py_med:.3f}  ({len(images)} images x {args.rounds} rounds per side)")
    log(f"outputs: {agree['objects']} objects compared, max |box diff| {agree['max_box_diff']:.3g} px, "
        f"max |score diff| {agree['max_score_diff']:.3g}, {agree['mask_pixels_differing']} mask pixels differ, "
        f"{agree['images_with_other_object_count']} images with another object count")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
