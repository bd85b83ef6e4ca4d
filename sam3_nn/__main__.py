"""Command line: ``python -m sam3_nn segment ...`` and ``python -m sam3_nn convert ...``.

    python -m sam3_nn segment --library dist/sam3-llvm.so --weights weights/sam3-float32.safetensors \\
        --image photo.jpg --text "cat" [--box x0,y0,x1,y1[:neg]]... --output out/

writes ``out/photo.png`` (overlay: masks, boxes, ``label score`` tags) and ``out/photo.json``
(boxes in pixels, scores, masks as COCO RLE). ``--image`` may be a folder of images.

    python -m sam3_nn convert weights/sam3.pt dist/sam3-llvm.json weights/sam3-float32.safetensors

converts a released checkpoint (``sam3.pt`` or HF snapshot) into the parameter file of
one compiled library (its manifest gives the config, parameter set and dtype).
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
    from .rle import encode

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
    from .preprocess import InputError, parse_box

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
        from .preprocess import check_boxes

        for path, size in zip(images, sizes):
            try:
                check_boxes(boxes, labels, size)
            except InputError as e:
                raise CliError(f"--box for {path} ({size[1]}x{size[0]}): {e}") from None
    for p in (args.library, args.weights):
        if not os.path.exists(p):
            raise CliError(f"{p}: no such file or folder")

    from .overlay import draw_overlay
    from .runtime import Sam3

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
# convert
# ----------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from .engine import read_manifest
    from .runtime import converted_metadata, convert_for_manifest
    from .weights.store import save_converted

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
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sam3_nn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
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
    c = sub.add_parser("convert", help="convert sam3.pt / an HF snapshot for one compiled library")
    c.add_argument("src", help="sam3.pt, an HF snapshot folder or a .safetensors")
    c.add_argument("manifest", help="the library's manifest (dist/sam3-<target>.json) or the library")
    c.add_argument("out", help="output .safetensors")
    c.set_defaults(func=cmd_convert)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine import LibraryError
    from .preprocess import InputError
    from .weights.loader import CheckpointError

    try:
        return args.func(args)
    except (CliError, LibraryError, InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
