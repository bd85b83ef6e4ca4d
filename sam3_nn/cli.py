"""Command line: ``sam3-nn`` / ``python -m sam3_nn`` with ``compile``, ``convert``, ``segment`` and ``label``.

    sam3-nn compile --target llvm [--model weights/sam3-hf] [--dtype float32] --output dist


    python -m sam3_nn segment --library dist/sam3-llvm.so --weights weights/sam3-float32.safetensors \\
        --image photo.jpg --text "cat" [--box x0,y0,x1,y1[:neg]]... --output out/

writes ``out/photo.png`` (overlay: masks, boxes, ``label score`` tags) and ``out/photo.json``
(boxes in pixels, scores, masks as COCO RLE). ``--image`` may be a folder of images.

    python -m sam3_nn convert weights/sam3.pt dist/sam3-llvm.json weights/sam3-float32.safetensors

converts a released checkpoint (``sam3.pt`` or HF snapshot) into the parameter file of
one compiled library (its manifest gives the config, parameter set and dtype).

    python -m sam3_nn label --library ... --weights ... --images photos/ --concepts "person,car" \\
        --output labels/ --format both [--ray [--ray-address ADDR]]

labels a dataset (``sam3_nn.runtime.label``): ``labels/coco.json`` and ``labels/yolo/``; rerun to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class CliError(Exception):
    """A user error: printed as ``error: ...``, exit status 2."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------
# segment
# ----------------------------------------------------------------------------
def _list_images(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise CliError(f"--image {path}: folder holds no images ({', '.join(IMAGE_EXTS)})")
        return files
    if not os.path.isfile(path):
        raise CliError(f"--image {path}: no such file or folder")
    return [path]


def _image_size(path: str) -> Tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied); raises CliError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
            im.load()  # decodes: a truncated or corrupt file fails here, before any output
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CliError(f"image {path}: cannot be read as an image ({e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _outputs_for(images: List[str], output: str) -> List[Tuple[str, str]]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise CliError(f"images with the same name would overwrite each other's outputs: {', '.join(dup)}")
    return [(os.path.join(output, s + ".png"), os.path.join(output, s + ".json")) for s in stems]


def _result_json(image: str, det, text: Optional[str], boxes, labels, args, timings) -> dict:
    from sam3_nn.runtime.rle import encode

    objects = []
    for k in range(len(det)):
        objects.append({
            "box": [round(float(v), 2) for v in det.boxes[k]],
            "score": round(float(det.scores[k]), 5),
            "query": int(det.query_index[k]),
            "area": int(det.masks[k].sum()),
            "segmentation": encode(det.masks[k]),
        })
    h, w = (int(det.masks.shape[1]), int(det.masks.shape[2]))
    return {
        "image": os.path.abspath(image), "height": h, "width": w,
        "prompt": {"text": text, "boxes": boxes, "box_labels": labels},
        "library": os.path.abspath(args.library), "weights": os.path.abspath(args.weights),
        "score_threshold": args.score_threshold, "mask_threshold": args.mask_threshold,
        "box_format": "xyxy pixels", "mask_format": "COCO RLE (column-major, compressed counts)",
        "objects": objects,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def cmd_segment(args) -> int:
    from sam3_nn.runtime.preprocess import InputError, parse_box

    # everything that can be checked before the (slow) load is checked first
    if args.text is not None and not args.text.strip():
        raise CliError("--text is empty")
    try:
        parsed = [parse_box(b) for b in args.box or []]
    except InputError as e:
        raise CliError(f"--box: {e}") from None
    if args.text is None and not parsed:
        raise CliError("no prompt: give --text \"...\" and/or --box x0,y0,x1,y1[:neg]")
    boxes = [list(b) for b, _ in parsed] or None
    labels = [lab for _, lab in parsed] or None
    images = _list_images(args.image)
    outputs = _outputs_for(images, args.output)
    sizes = [_image_size(p) for p in images]
    if boxes:
        from sam3_nn.runtime.preprocess import check_boxes

        for path, size in zip(images, sizes):
            try:
                check_boxes(boxes, labels, size)
            except InputError as e:
                raise CliError(f"--box for {path} ({size[1]}x{size[0]}): {e}") from None
    for p in (args.library, args.weights):
        if not os.path.exists(p):
            raise CliError(f"{p}: no such file or folder")

    from sam3_nn.runtime.overlay import draw_overlay
    from sam3_nn.runtime.api import Sam3

    t0 = time.perf_counter()
    _log(f"[load] library {args.library} + weights {args.weights}")
    model = Sam3.load(args.library, args.weights, device=args.device, tokenizer=args.tokenizer)
    _log(f"[load] done in {time.perf_counter() - t0:.2f} s (target {model.manifest['target']}, "
         f"{model.manifest['dtype']}, image size {model.image_size})")
    if not model.has("detect"):
        raise CliError(f"library {args.library} has no detect function (it has "
                       f"{', '.join(model.functions)}); it cannot segment: compile it with a newer sam3_nn")
    for n, (path, (png, js)) in enumerate(zip(images, outputs), 1):
        tag = f"[{n}/{len(images)}] {os.path.basename(path)}"
        state = model.set_image(path)
        _log(f"{tag}: encode_image {state.timings['encode_image']:.2f} s "
             f"(preprocess {state.timings['preprocess']:.2f} s)")
        t1 = time.perf_counter()
        det = model.predict(state, text=args.text, boxes=boxes, box_labels=labels,
                            score_threshold=args.score_threshold, mask_threshold=args.mask_threshold)
        t2 = time.perf_counter()
        _log(f"{tag}: detect {t2 - t1:.2f} s -> {len(det)} objects above {args.score_threshold}")
        label = args.text if args.text is not None else "object"
        img = draw_overlay(state.rgb, det.boxes, det.scores, det.masks, label,
                           prompt_boxes=boxes, prompt_labels=labels)
        result = _result_json(path, det, args.text, boxes, labels, args,
                              {**state.timings, "detect_and_postprocess": t2 - t1})
        _atomic_write(js, lambda p: _write_text(p, json.dumps(result, indent=1)))
        _atomic_write(png, lambda p: img.save(p, format="PNG"))
        _log(f"{tag}: wrote {png} and {js}")
    return 0


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------
# label
# ----------------------------------------------------------------------------
def cmd_label(args) -> int:
    from sam3_nn.runtime.label.command import run_command
    from sam3_nn.runtime.label.options import LabelError

    try:
        return run_command(args, log=_log)
    except LabelError as e:
        raise CliError(str(e)) from None


def add_label_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--library", required=True, help="compiled library (.so/.dylib) with its .json beside it")
    ap.add_argument("--weights", required=True,
                    help="converted .safetensors (python -m sam3_nn convert) or an HF snapshot folder")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (default: looked for beside the weights and the library)")
    ap.add_argument("--device", default=None, help="cpu, cuda, metal... (default: the library's target)")
    ap.add_argument("--images", required=True,
                    help="a folder (searched recursively), a glob ('photos/**/*.jpg'), a text file "
                         "listing image paths, or one image")
    ap.add_argument("--concepts", required=True, help="comma-separated noun phrases: \"person,car\"")
    ap.add_argument("--exemplars", default=None, metavar="FILE",
                    help="JSON of example boxes drawn on some images: {image key: {concept: "
                         "[[x0,y0,x1,y1(,label)], ...]}} (README: Label a dataset)")
    ap.add_argument("--output", required=True,
                    help="job folder: shards (resumable), coco.json, yolo/; rerun the same command to resume")
    ap.add_argument("--format", default="coco", choices=["coco", "yolo-seg", "both"])
    ap.add_argument("--polygons", action="store_true",
                    help="COCO segmentations as polygons (OpenCV contours) instead of RLE")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per library call (default: the library's fixed batch, else 1)")
    ap.add_argument("--score-threshold", type=float, default=0.5,
                    help="keep objects scoring above this (detection x presence; default 0.5)")
    ap.add_argument("--class-thresholds", default=None, metavar="C=T,...",
                    help="per-concept score thresholds, e.g. person=0.5,car=0.3 (others: --score-threshold)")
    ap.add_argument("--mask-threshold", type=float, default=0.5)
    ap.add_argument("--nms-iou", type=float, default=None,
                    help="non-maximum suppression: drop an object overlapping a higher-scoring one by "
                         "more than this IoU (default: no NMS, SAM 3's own output)")
    ap.add_argument("--nms-kind", default="mask", choices=["mask", "box"], help="IoU of masks or of boxes")
    ap.add_argument("--class-agnostic-nms", action="store_true",
                    help="NMS across concepts (default: within each concept)")
    ap.add_argument("--max-detections", type=int, default=0,
                    help="keep at most this many objects per image, highest scores first (0: all)")
    ap.add_argument("--shard-size", type=int, default=64,
                    help="images per result shard (what a kill can lose; default 64)")
    ap.add_argument("--workers", type=int, default=None,
                    help="threads decoding and post-processing images (default: cores, 2 to 8)")
    ap.add_argument("--retry-errors", action="store_true", help="on resume, try failed images again")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--ray", action="store_true", help="run on Ray Data (a local instance unless --ray-address)")
    ap.add_argument("--ray-address", default=None,
                    help="a Ray cluster to run on ('auto', 'ray://head:10001', 'head:6379'); implies --ray")
    ap.add_argument("--ray-actors", type=int, default=1,
                    help="library copies (one per GPU on a GPU cluster; default 1)")
    ap.add_argument("--ray-gpus-per-actor", type=float, default=None,
                    help="default: 1 for a CUDA library, 0 otherwise")
    ap.add_argument("--ray-cpus-per-actor", type=float, default=1.0)


# ----------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from sam3_nn.runtime.engine import read_manifest
    from sam3_nn.runtime.api import converted_metadata, convert_for_manifest
    from sam3_nn.weights.store import save_converted

    if not os.path.exists(args.src):
        raise CliError(f"{args.src}: no such file or folder")
    manifest_path = args.manifest
    if not manifest_path.endswith(".json"):
        manifest_path = os.path.splitext(manifest_path)[0] + ".json"
    if not os.path.isfile(manifest_path):
        raise CliError(f"{manifest_path}: no such manifest (make compile writes dist/sam3-<target>.json)")
    manifest = read_manifest(manifest_path)
    t0 = time.perf_counter()
    _log(f"[1/2] read {args.src} for {manifest['target']} {manifest['dtype']} "
         f"(parts {', '.join(manifest['parts'])}, {len(manifest['params'])} parameters)")
    params = convert_for_manifest(args.src, manifest, _log)
    _log(f"[2/2] write {args.out}")
    save_converted(args.out, params, converted_metadata(manifest, args.src))
    size = os.path.getsize(args.out) / 2**20
    _log(f"wrote {args.out} ({size:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------
# compile
# ----------------------------------------------------------------------------
def resolve_config(model: Optional[str]):
    """Architecture from --model; raises ValueError / FileNotFoundError with the reason."""
    from sam3_nn.config import Sam3Config

    if model is None:
        return Sam3Config()
    if os.path.exists(model):
        return Sam3Config.from_pretrained(model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")
        except Exception as e:  # offline, gated, unknown id
            raise ValueError(
                f"cannot fetch config.json of {model!r} from the hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Download the snapshot and pass its directory.")
        return Sam3Config.from_pretrained(path)
    raise FileNotFoundError(f"--model {model!r}: no such file or directory")


def toolchain_from_env():
    """The build tools' locations from the environment (the one place the build reads it)."""
    from sam3_nn.compiler.options import Toolchain

    cutlass = os.environ.get("CUTLASS_HOME")
    return Toolchain(cuda_home=os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"),
                     cutlass_include=os.path.join(cutlass, "include") if cutlass else None,
                     cache_dir=os.environ.get("SAM3_CUDA_CACHE"))


def compile_options(args):
    """The ``compile`` arguments as ``BuildOptions``."""
    from sam3_nn.compiler.options import BuildOptions, KernelOptions

    if args.batch is None:
        batch = None
    elif args.batch == "any":
        batch = 0
    else:
        try:
            batch = int(args.batch)
        except ValueError:
            batch = -1
        if batch < 1:
            raise CliError(f"--batch must be a positive integer or 'any', got {args.batch!r}")
    parts = tuple(p.strip() for p in args.parts.split(",")) if args.parts else \
        BuildOptions().parts
    kernels = KernelOptions(rope_mode=args.rope_mode, pdl=not args.no_pdl)
    return BuildOptions(target=args.target, arch=args.arch, dtype=args.dtype, batch=batch,
                        parts=parts, max_boxes=args.max_boxes, cuda_graph=not args.no_cuda_graph,
                        kernels=kernels, toolchain=toolchain_from_env())


def cmd_compile(args) -> int:
    from sam3_nn.compiler.build import build, check_tools, resolve
    from sam3_nn.compiler.presets import PRESETS, UNSUPPORTED
    from sam3_nn.compiler.tools import TargetError

    if args.list_targets:
        for name, p in PRESETS.items():
            print(f"{name:14s} {p.default_dtype:8s} .{p.suffix:6s} {p.description}")
        for name, why in UNSUPPORTED.items():
            print(f"{name:14s} (not supported: {why})")
        return 0
    options = compile_options(args)
    try:
        preset, _ = resolve(options)
        check_tools(preset, options)
        cfg = resolve_config(args.model)
        if args.image_size:
            cfg.vision.backbone.image_size = args.image_size
            cfg.validate()
    except (TargetError, ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    t0 = time.time()
    try:
        art = build(cfg, options, args.output, log=_log)
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = os.path.getsize(art["library"]) / 2**20
    print(f"built {art['library']} ({size:.1f} MiB) + {art['manifest']} "
          f"[{preset.name}, {args.dtype or preset.default_dtype}] in {time.time() - t0:.1f} s")
    return 0


def add_compile_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target", default="llvm", help="a target preset (--list-targets)")
    ap.add_argument("--arch", default=None, help="cuda targets: SASS arches, e.g. sm_80,sm_90a")
    ap.add_argument("--parts", default=None, help="comma-separated model parts (default: all)")
    ap.add_argument("--list-targets", action="store_true")
    ap.add_argument("--model", default=None,
                    help="architecture: an HF snapshot folder, a config.json or a sam3.pt "
                         "(default: the released SAM 3)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16"])
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--rope-mode", default=None, choices=["normal", "inline"],
                    help="ViT attention path (default: the target's, inline on GPUs)")
    ap.add_argument("--batch", default=None,
                    help="the batch size the library takes: an integer (static shapes: memory "
                         "planned ahead of time, CUDA graphs on CUDA) or 'any' (default: 1 on "
                         "CUDA targets, any elsewhere)")
    ap.add_argument("--max-boxes", type=int, default=8,
                    help="box-prompt slots of detect (default 8): more boxes per query need more")
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="CUDA targets: launch kernels one by one instead of replaying CUDA graphs")
    ap.add_argument("--no-pdl", action="store_true",
                    help="CUDA targets: launch the hand-written kernels without programmatic "
                         "dependent launch (debugging, timing comparisons)")
    ap.add_argument("--output", default="dist")


# ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sam3_nn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    k = sub.add_parser("compile", help="compile SAM 3 into a library for one target",
                       description="Writes DIR/sam3-<target>.<ext> and DIR/sam3-<target>.json "
                                   "(the manifest). CUDA_HOME / CUDA_PATH, CUTLASS_HOME and "
                                   "SAM3_CUDA_CACHE locate the CUDA build tools.")
    add_compile_arguments(k)
    k.set_defaults(func=cmd_compile)
    s = sub.add_parser("segment", help="segment images with a compiled library")
    s.add_argument("--library", required=True, help="compiled library (.so/.dylib) with its .json beside it")
    s.add_argument("--weights", required=True,
                   help="converted .safetensors (python -m sam3_nn convert) or an HF snapshot folder")
    s.add_argument("--image", required=True, help="an image file or a folder of images")
    s.add_argument("--text", default=None, help="text prompt (a noun phrase: \"cat\", \"red car\")")
    s.add_argument("--box", action="append", default=None, metavar="x0,y0,x1,y1[:neg]",
                   help="box prompt in pixels of the image (repeatable; ':neg' marks a negative box)")
    s.add_argument("--output", required=True, help="folder for <image>.png and <image>.json")
    s.add_argument("--device", default=None, help="cpu, cuda, metal... (default: the library's target)")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: looked for beside the weights and the library)")
    s.add_argument("--score-threshold", type=float, default=0.5)
    s.add_argument("--mask-threshold", type=float, default=0.5)
    s.set_defaults(func=cmd_segment)
    lb = sub.add_parser("label", help="label a dataset: COCO / YOLO-seg files, resumable, on one "
                                      "machine or Ray", description="Labels every image with every concept; "
                                      "rerunning the command resumes an interrupted job.")
    add_label_arguments(lb)
    lb.set_defaults(func=cmd_label)
    c = sub.add_parser("convert", help="convert sam3.pt / an HF snapshot for one compiled library")
    c.add_argument("src", help="sam3.pt, an HF snapshot folder or a .safetensors")
    c.add_argument("manifest", help="the library's manifest (dist/sam3-<target>.json) or the library")
    c.add_argument("out", help="output .safetensors")
    c.set_defaults(func=cmd_convert)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from sam3_nn.runtime.engine import LibraryError
    from sam3_nn.runtime.preprocess import InputError
    from sam3_nn.weights.loader import CheckpointError

    try:
        return args.func(args)
    except (CliError, LibraryError, InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
