"""Labelling throughput: ``sam3-nn label``'s job (batched library calls, decoding and
post-processing overlapped) against a plain loop over ``transformers``' ``Sam3Model`` doing the
same work (decode, pre-process, vision once, every concept, post-process, masks to COCO RLE),
same weights, same images, same concepts, measured in one run.

Images: at least 200 distinct real-photo files made from the photographs ``scikit-image``
ships (``skimage/data``: its own install, or ``--photos DIR`` holding them, e.g. unzipped from
the wheel): crops, flips, quarter turns, resizes and brightness changes, saved as JPEG.
Weights: ``Sam3Model``'s seeded random initialisation, mapped onto our parameters by our
loader; the prompt words get ids from a small word-level tokenizer (the weights are random,
so any ids do). One score threshold on both sides, by default the one that keeps about
``--objects-per-image`` (10) objects per image on the first images, so that both do a
realistic amount of mask work; objects per image are reported.

Printed per side and batch: images/s, objects per image, and on CUDA the GPU's busy fraction
during the labelling (``nvidia-smi``'s ``utilization.gpu``, sampled every 50 ms: the share of
time a kernel was running; for ours over the window of its images/s, which leaves out the final
COCO export, timed apart) with, for ours, the share of wall time spent inside library calls.
``--lags 2,5,2,5`` runs ours once per lag (detects queued before one's outputs are read),
alternated, to compare them on one machine.

    # CPU (here): compiles the tiny model's library first
    python bench/label.py --device cpu --config tiny --images 24 --batches 1,2
    # GPU (H100): one library per batch size compiled here, the run there (README)
    python bench/label.py --device cuda --library build/label/b1/sam3-cuda-sm90a.so --batch 1 --out b1.json
    python bench/label.py --merge b1.json b4.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np

import common  # bench/common.py (puts the repository on sys.path)

# photographs among skimage/data (the rest are synthetic test patterns)
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
          "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
          "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg",
          "rocket.jpg", "text.png")
CONCEPTS = "person,cat,cup,rocket,motorcycle"


# ----------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------
def photo_folder(given: Optional[str]) -> str:
    if given:
        return given
    try:
        import skimage.data
    except ImportError:
        sys.exit("no photos: install scikit-image or pass --photos DIR (skimage/data from its wheel: "
                 "pip download --no-deps scikit-image && unzip -j scikit_image-*.whl 'skimage/data/*' -d DIR)")
    return os.path.dirname(skimage.data.__file__)


def make_photo_set(source: str, out: str, n: int, seed: int = 0) -> Dict:
    """``n`` distinct JPEGs from the photos in ``source``: random crop (40-100% of each side),
    maybe a mirror and a quarter turn, a resize to 320-1280 px on the long side, brightness
    0.7-1.3."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    srcs = [os.path.join(source, p) for p in PHOTOS if os.path.isfile(os.path.join(source, p))]
    if not srcs:
        sys.exit(f"{source}: none of the scikit-image photos ({', '.join(PHOTOS[:3])}, ...) found")
    os.makedirs(out, exist_ok=True)
    sizes = []
    for i in range(n):
        with Image.open(srcs[i % len(srcs)]) as im:
            im = im.convert("RGB")
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.3:
            im = im.transpose(Image.Transpose.ROTATE_90)
        long = int(rng.integers(320, 1281))
        s = long / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.Resampling.BILINEAR)
        im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.7, 1.3)))
        im.save(os.path.join(out, f"img{i:04d}.jpg"), quality=90)
        sizes.append(im.size)
    mp = np.mean([a * b for a, b in sizes]) / 1e6
    return {"files": n, "photos": len(srcs), "mean_megapixels": round(float(mp), 3),
            "how": "random crops, mirrors, quarter turns, resizes (320-1280 px), brightness of the "
                   "scikit-image photos, JPEG q90"}


def write_tokenizer(folder: str, cfg, words) -> str:
    """A word-level tokenizer.json for the prompt words, ids inside the model's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    t = cfg.text
    vocab = {"<unk>": 0}
    for w in sorted({w for c in words for w in c.lower().split()}):
        vocab[w] = len(vocab) + 1
    vocab.update({"<|startoftext|>": t.bos_token_id, "<|endoftext|>": t.eos_token_id})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", t.bos_token_id), ("<|endoftext|>", t.eos_token_id)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"text_config": {"max_position_embeddings": t.max_position_embeddings,
                                   "vocab_size": t.vocab_size}}, f)
    return folder


# ----------------------------------------------------------------------------
# GPU busy fraction
# ----------------------------------------------------------------------------
class BusySampler:
    """``nvidia-smi`` ``utilization.gpu`` every 50 ms in a thread (as ``common.GpuSampler``)."""

    def __init__(self, enabled: bool):
        import subprocess

        self.samples: List = []
        self.proc = None
        if not enabled:
            return
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip() or "0"
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "50"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for ln in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(ln.strip())))
            except ValueError:
                continue

    def busy(self, t0: float, t1: float) -> Optional[float]:
        sel = [u for t, u in list(self.samples) if t0 <= t <= t1]
        return round(float(np.mean(sel)) / 100, 3) if sel else None

    def close(self):
        if self.proc is not None:
            self.proc.terminate()


# ----------------------------------------------------------------------------
# the two sides
# ----------------------------------------------------------------------------
def load_ours(library: str, device: str, params: Dict, tokenizer: str):
    """The library with ``params`` bound (the dict is emptied: full-size weights are GBs)."""
    from sam3_nn.runtime.api import Sam3
    from sam3_nn.runtime.engine import CompiledModel

    cm = CompiledModel(library, device)
    cm.bind(params)
    params.clear()
    return Sam3(cm, tokenizer_path=tokenizer)


def calibrate(model, items, concepts, per_image: int) -> float:
    """The score threshold keeping about ``per_image`` objects per image over the first 8
    images (random weights give no meaningful scores: this fixes how much mask work there is)."""
    from sam3_nn.runtime.label.infer import BatchLabeler
    from sam3_nn.runtime.label.options import LabelOptions

    labeler = BatchLabeler(model, LabelOptions(tuple(concepts), 0.0), None)
    scores, n = [], 0
    for i in range(0, min(8, len(items)), labeler.batch):
        prepared = [labeler.prepare(it) for it in items[i:i + labeler.batch]]
        for cands in labeler.infer(prepared):
            scores += [float(v) for c in concepts for v in cands[c].scores]
            n += 1
    ranked = sorted(scores, reverse=True)
    k = min(per_image * n, len(ranked) - 1)
    return (ranked[k - 1] + ranked[k]) / 2 if k > 0 else 1.0


def ours(model, items, concepts, batch: int, threshold: float, sampler: BusySampler,
         workers: Optional[int], log, lag: Optional[int] = None) -> Dict:
    from sam3_nn.runtime.label.infer import BatchLabeler
    from sam3_nn.runtime.label.job import export, run_job, Summary
    from sam3_nn.runtime.label.options import LabelOptions
    from sam3_nn.runtime.label.store import ShardStore

    options = LabelOptions(tuple(concepts), threshold)
    labeler = BatchLabeler(model, options, batch)
    if lag:  # detects between queueing one and reading its scores (the runtime picks it otherwise)
        labeler.rows_lag, labeler.done_lag = lag, lag + 1
    out = tempfile.mkdtemp(prefix="bench-label-")
    try:
        warm = ShardStore(os.path.join(out, "warm"))
        warm.begin({"warm": True})
        run_job(labeler, items[:labeler.batch], warm, progress=False, log=lambda s: None)  # warm-up
        store = ShardStore(os.path.join(out, "job"))
        store.begin({"job": True})
        labeler.device_seconds = 0.0
        labeler.stages.clear()
        t0 = time.perf_counter()
        summary = run_job(labeler, items, store, progress=False, workers=workers, log=lambda s: None)
        t_job = summary.seconds
        # the final COCO file again, timed alone
        s2 = Summary()
        te = time.perf_counter()
        export(store, items, options, "coco", False, s2, lambda s: None)
        t_export = time.perf_counter() - te
        objects = summary.objects
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n = len(items)
    res = {"side": "ours", "batch": labeler.batch, "lag": labeler.rows_lag, "images": n, "seconds": round(t_job, 3),
           "images_per_s": round(n / t_job, 3), "objects_per_image": round(objects / n, 2),
           "library_call_fraction": round(labeler.device_seconds / t_job, 3),
           # over the labelling pass, the window of images/s (run_job's final export is timed apart)
           "gpu_busy": sampler.busy(t0, t0 + t_job), "coco_export_s": round(t_export, 3),
           "errors": len(summary.errors),
           # inside the library calls, ms per image: host stages and the wait for the device
           "in_calls_ms_per_image": {k: round(v / n * 1e3, 2) for k, v in labeler.stages.items()}}
    log(json.dumps(res))
    return res


def reference(model, device: str, dtype: str, image_size: int, tokenizer: str, items, concepts,
              threshold: float, sampler: BusySampler, log) -> Dict:
    """The plain loop a PyTorch user writes: one image at a time, nothing overlapped."""
    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from sam3_nn.runtime import rle
    from sam3_nn.runtime.preprocess import load_image, normalize, resize_uint8
    from sam3_nn.runtime.tokenizer import Sam3Tokenizer

    tok = Sam3Tokenizer.from_pretrained(tokenizer)
    tdtype = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    m = model
    with torch.no_grad():
        text = {}
        for c in concepts:
            t = tok(c)
            ids = torch.from_numpy(t.input_ids.astype(np.int64)).to(device)
            mask = torch.from_numpy(t.attention_mask.astype(np.int64)).to(device)
            text[c] = (m.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, mask)

        def one(path) -> int:
            rgb = load_image(path)
            h, w = rgb.shape[:2]
            px = torch.from_numpy(normalize(resize_uint8(rgb, image_size))[None]).to(device, tdtype)
            vo = m.vision_encoder(px)
            found = 0
            for c in concepts:
                tf, mask = text[c]
                boxes = tf.new_zeros(1, 1, 4)
                labels = torch.full((1, 1), -10, dtype=torch.long, device=device)
                o = m(vision_embeds=vo, text_embeds=BaseModelOutputWithPooling(pooler_output=tf),
                      attention_mask=mask, input_boxes=boxes, input_boxes_labels=labels)
                scores = (o.pred_logits.float().sigmoid() * o.presence_logits.float().sigmoid())[0]
                keep = scores > threshold
                if keep.any():
                    logits = o.pred_masks[0, keep][None].float()
                    masks = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear",
                                                            align_corners=False)[0].sigmoid() > 0.5
                    rles = rle.encode_many(masks.cpu().numpy())
                    _ = (o.pred_boxes[0, keep].float().cpu().numpy(), scores[keep].cpu().numpy(), rles)
                    found += len(rles)
            return found

        one(items[0].path)  # warm-up
        sync()
        t0 = time.perf_counter()
        objects = sum(one(it.path) for it in items)
        sync()
        t1 = time.perf_counter()
    n = len(items)
    res = {"side": "transformers Sam3Model loop", "batch": 1, "images": n, "seconds": round(t1 - t0, 3),
           "images_per_s": round(n / (t1 - t0), 3), "objects_per_image": round(objects / n, 2),
           "gpu_busy": sampler.busy(t0, t1)}
    log(json.dumps(res))
    return res


# ----------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--library", default=None, help="a compiled library (else --build compiles one: llvm only)")
    ap.add_argument("--build", default=None, help="folder to compile the llvm library into")
    ap.add_argument("--batch", type=int, default=None, help="one batch size (a fixed-batch library's)")
    ap.add_argument("--batches", default="1", help="batch sizes for an any-batch library, e.g. 1,4")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--photos", default=None, help="folder of the scikit-image photos (default: skimage's)")
    ap.add_argument("--concepts", default=CONCEPTS)
    ap.add_argument("--score-threshold", type=float, default=None,
                    help="default: the threshold keeping --objects-per-image on average")
    ap.add_argument("--objects-per-image", type=int, default=10)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--lags", default="",
                    help="detects queued before one's outputs are read, e.g. 5,2,5,2: one run of ours each "
                         "(default: one run, the runtime's lag)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--merge", nargs="+", default=None, help="print one table from result files")
    args = ap.parse_args(argv)
    args.lags = [int(x) for x in args.lags.split(",") if x.strip()] or [None]
    return args


def table(results: List[Dict]) -> str:
    rows = ["| side | batch | lag | images/s | vs loop | objects/image | GPU busy | in library calls |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['vs_loop']:.2f}x" if r.get("vs_loop") else ""
        busy = f"{r['gpu_busy']:.0%}" if r.get("gpu_busy") is not None else "-"
        lib = f"{r['library_call_fraction']:.0%}" if "library_call_fraction" in r else "-"
        rows.append(f"| {r['side']} | {r['batch']} | {r.get('lag', '-')} | {r['images_per_s']:.2f} | {ratio} | "
                    f"{r['objects_per_image']} | {busy} | {lib} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.merge:
        res = []
        for p in args.merge:
            with open(p) as f:
                d = json.load(f)
            res += d["results"]
        print(table(res))
        return 0
    cfg = common.model_config(args.config)
    concepts = [c.strip() for c in args.concepts.split(",")]
    work = tempfile.mkdtemp(prefix="bench-label-data-")
    try:
        photos = make_photo_set(photo_folder(args.photos), os.path.join(work, "images"), args.images)
        log(f"[images] {photos['files']} files from {photos['photos']} scikit-image photos ({photos['how']}); "
            f"mean {photos['mean_megapixels']} MP")
        from sam3_nn.runtime.label.options import list_images

        items = list_images(os.path.join(work, "images"))
        tokenizer = write_tokenizer(os.path.join(work, "tok"), cfg, concepts)
        library = args.library
        if library is None:
            if args.device != "cpu":
                sys.exit("--library is needed on cuda (compile it first: README)")
            from sam3_nn.compiler.build import build
            from sam3_nn.compiler.options import BuildOptions

            t = time.perf_counter()
            library = build(cfg, BuildOptions(target="llvm"), args.build or os.path.join(work, "lib"),
                            log=lambda s: None)["library"]
            log(f"[build] {library} in {time.perf_counter() - t:.0f} s")
        from sam3_nn.runtime.engine import read_manifest

        manifest = read_manifest(library)
        fixed = manifest.get("batch")
        batches = [int(fixed)] if fixed else ([args.batch] if args.batch else
                                              [int(b) for b in args.batches.split(",")])
        import torch

        if args.device == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        ref = common.reference_model(cfg, seed=0)
        dtype = manifest["dtype"]
        params = common.our_params(cfg, ref.state_dict(), manifest)
        if args.skip_reference:
            del ref  # memory: a full-size float32 model is 3.4 GB
        model = load_ours(library, args.device, params, tokenizer)
        threshold = args.score_threshold
        if threshold is None:
            threshold = calibrate(model, items, concepts, args.objects_per_image)
            log(f"[threshold] {threshold:.5f}: about {args.objects_per_image} objects per image")
        sampler = BusySampler(args.device == "cuda")
        results = []
        try:
            for b in batches:
                for lag in args.lags:  # alternated runs, one per lag
                    results.append(ours(model, items, concepts, b, threshold, sampler, args.workers, log, lag))
            if not args.skip_reference:
                if args.device == "cpu":
                    import types

                    from transformers.models.sam3 import modeling_sam3

                    from tests import torch_roi_align

                    if getattr(modeling_sam3, "torchvision", None) is None:  # no torchvision on CPU machines
                        modeling_sam3.torchvision = types.SimpleNamespace(
                            ops=types.SimpleNamespace(roi_align=torch_roi_align.roi_align))
                m = ref.to(args.device, getattr(torch, dtype))
                results.append(reference(m, args.device, dtype, cfg.image_size, tokenizer, items, concepts,
                                         threshold, sampler, log))
        finally:
            sampler.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loop = next((r["images_per_s"] for r in results if r["side"] != "ours"), None)
    for r in results:  # against the loop measured in this run
        if loop and r["side"] == "ours":
            r["vs_loop"] = round(r["images_per_s"] / loop, 3)
    print(table(results))
    meta = {"device": args.device, "config": args.config, "library": os.path.basename(library),
            "score_threshold": threshold,
            "dtype": dtype, "concepts": concepts, "images": photos, "threads": len(os.sched_getaffinity(0))}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
