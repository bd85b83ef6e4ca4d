"""Command line: ``sam3-nn`` / ``python -m sam3_nn`` with ``compile``, ``convert``, ``segment``, ``track`` and ``label``.

    sam3-nn compile --target llvm [--model weights/sam3-hf] [--dtype float32] --output dist


    python -m sam3_nn segment --library dist/sam3-llvm.so --weights weights/sam3-float32.safetensors \\
        --image photo.jpg --text "cat" [--box x0,y0,x1,y1[:neg]]... --output out/

writes ``out/photo.png`` (overlay: masks, boxes, ``label score`` tags) and ``out/photo.json``
(boxes in pixels, scores, masks as COCO RLE). ``--image`` may be a folder of images.

    python -m sam3_nn segment ... --image photo.jpg --point 410,220 --point 380,300:neg [--box x0,y0,x1,y1]

is the interactive task (SAM 1/2's: clicks and/or one box select one object; a library
compiled with the ``interactive`` part): ``--point`` implies it, ``--task interactive``
makes a lone ``--box`` the object's box instead of a concept exemplar. The same PNG (the
best candidate mask, the clicks) and JSON (every candidate with its predicted IoU).

    python -m sam3_nn track --library dist/sam3-video.so --weights ... --video clip.mp4 \\
        --point 1:410,220@0 --point 1:380,300:neg@0 --box 2:10,20,200,300@3 --output out/

follows objects (ids 1, 2) given on some frames through a video (a library with the ``video``
part): ``out/masks.jsonl`` (a line per frame, COCO RLE masks) and ``out/overlay.mp4``.

    python -m sam3_nn convert weights/sam3.pt dist/sam3-llvm.json weights/sam3-float32.safetensors

converts a released checkpoint (``sam3.pt`` or HF snapshot) into the parameter file of
one compiled library (its manifest gives the config, parameter set and dtype).

    python -m sam3_nn label --library ... --weights ... --images photos/ --concepts "person,car" \\
        --output labels/ --format both [--ray [--ray-address ADDR]]

labels a dataset (``sam3_nn.runtime.label``): ``labels/coco.json`` and ``labels/yolo/``; rerun to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import List, Optional, Tuple

from sam3_nn.errors import InputError, UserError
from sam3_nn.files import (atomic_write, atomic_write_path, check_not_inputs, check_output_file,
                           check_output_folder, write_text)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class CliError(UserError):
    """A user error: printed as ``error: ...``, exit status 2."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


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


def _outputs_for(images: List[str], output: str) -> List[Tuple[str, str]]:
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise CliError(f"images with the same name would overwrite each other's outputs: {', '.join(dup)}")
    return [(os.path.join(output, s + ".png"), os.path.join(output, s + ".json")) for s in stems]


def _result_json(image: str, det, text: Optional[str], boxes, labels, args, timings,
                 dropped: int = 0) -> dict:
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
        "prompt": {"text": text, "boxes": boxes, "box_labels": labels, "text_tokens_dropped": dropped},
        "library": os.path.abspath(args.library), "weights": os.path.abspath(args.weights),
        "score_threshold": args.score_threshold, "mask_threshold": args.mask_threshold,
        "box_format": "xyxy pixels", "mask_format": "COCO RLE (column-major, compressed counts)",
        "objects": objects,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def _tokenizer_files(path: Optional[str]) -> List[str]:
    if not path:
        return []
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in ("tokenizer.json", "vocab.json", "merges.txt")]
    return [path]


def _library_with(library: str, paths, function: str, need: str):
    """The library's manifest once every path of ``paths`` exists and the library has
    ``function``; else a ``CliError`` naming what is missing (``need`` ends the message:
    what to compile instead)."""
    from sam3_nn.runtime.engine import read_manifest

    for p in paths:
        if not os.path.exists(p):
            raise CliError(f"{p}: no such file or folder")
    manifest = read_manifest(library)
    if function not in manifest["functions"]:
        raise CliError(f"library {library} has no {function} function (it has "
                       f"{', '.join(sorted(manifest['functions']))}){need}")
    return manifest


def segment_task(args) -> str:
    """``concept`` (text and/or exemplar boxes: every matching object) or ``interactive``
    (clicks and/or one box: one object). ``--point`` implies interactive; a ``--box`` alone is
    a concept exemplar unless ``--task interactive`` says otherwise. Raises CliError for a
    mix of the two tasks' prompts."""
    points = args.point or []
    task = args.task or ("interactive" if points else "concept")
    if task == "concept":
        if points:
            raise CliError("--point is an interactive prompt, but --task concept was given: drop "
                           "--task (--point implies --task interactive) or the points")
        if args.multimask is not None:
            raise CliError("--multimask / --no-multimask apply to interactive segmentation "
                           "(--point, --task interactive) only")
        return task
    if args.text is not None:
        raise CliError("--text is a concept prompt (every object matching it); interactive "
                       "segmentation (--point / --task interactive) takes clicks and at most one "
                       "--box: give one task's prompts")
    if len(args.box or []) > 1:
        raise CliError(f"interactive segmentation takes one --box (the object's), got {len(args.box)}; "
                       "several boxes are concept exemplars (drop --point and --task interactive)")
    if any(b.partition(":")[2].strip().lower() == "neg" for b in args.box or []):
        raise CliError("a negative --box (:neg) is a concept exemplar; interactive segmentation "
                       "takes negative clicks (--point x,y:neg) instead")
    if not points and not args.box:
        raise CliError("interactive segmentation needs --point x,y[:neg] (repeatable) and/or one "
                       "--box x0,y0,x1,y1")
    return task


def _interactive_json(image: str, res, best: int, points, labels, box, multimask, args,
                      timings) -> dict:
    from sam3_nn.runtime.interactive import mask_box
    from sam3_nn.runtime.rle import encode

    objects = []
    for k in range(len(res)):
        m = res.masks[k]
        bb = mask_box(m)
        objects.append({
            "box": [round(v, 2) for v in bb] if bb is not None else None,
            "score": round(float(res.scores[k]), 5),
            "mask_index": k,
            "area": int(m.sum()),
            "segmentation": encode(m),
        })
    h, w = (int(res.masks.shape[1]), int(res.masks.shape[2]))
    return {
        "image": os.path.abspath(image), "height": h, "width": w, "task": "interactive",
        "prompt": {"points": points, "point_labels": labels, "box": box, "multimask": multimask},
        "library": os.path.abspath(args.library), "weights": os.path.abspath(args.weights),
        "mask_threshold": args.mask_threshold,
        "box_format": "xyxy pixels", "mask_format": "COCO RLE (column-major, compressed counts)",
        "score": "predicted IoU of each candidate mask",
        "object_score_logit": round(res.object_score, 5), "best": best,
        "objects": objects,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def segment_interactive(args) -> int:
    """``segment`` with clicks and/or one box (``segment_task`` == interactive). Checked before
    the model is loaded as the concept path is: the prompt, the library (it must have
    ``predict_masks``), the device, the weights' metadata, every image (the clicks and the
    box inside it) and the outputs."""
    import numpy as np

    from sam3_nn.runtime import io
    from sam3_nn.runtime.api import check_weights
    from sam3_nn.runtime.engine import device_for, open_device
    from sam3_nn.runtime.interactive import check_box, check_points, mask_box, parse_point
    from sam3_nn.runtime.preprocess import image_size, parse_box

    try:
        parsed = [parse_point(p) for p in args.point or []]
    except InputError as e:
        raise CliError(f"--point: {e}") from None
    try:
        box = list(parse_box(args.box[0])[0]) if args.box else None
    except InputError as e:
        raise CliError(f"--box: {e}") from None
    if not 0.0 < args.mask_threshold < 1.0:
        raise CliError(f"--mask-threshold must be a probability strictly between 0 and 1 for "
                       f"interactive segmentation, got {args.mask_threshold}")
    points = [list(p) for p, _ in parsed] or None
    labels = [lab for _, lab in parsed] or None
    # one click alone is ambiguous (part or whole): three candidates; more prompts pin one
    multimask = args.multimask if args.multimask is not None else (len(parsed) == 1 and box is None)
    manifest = _library_with(args.library, (args.library, args.weights), "predict_masks",
                             ": interactive segmentation needs a library compiled with the "
                             "interactive part (--parts vision,interactive or "
                             "vision,text,detector,interactive)")
    slots = next(int(i["shape"][1]) for i in manifest["functions"]["predict_masks"]["inputs"]
                 if i["name"] == "points")
    if len(parsed) + (2 if box else 0) > slots:
        raise CliError(f"{len(parsed)} points{' and a box (2 points)' if box else ''} given; this library "
                       f"takes at most {slots} points (compile with --max-points)")
    open_device(device_for(manifest, args.device))
    check_weights(args.weights, manifest)
    folder_mode = os.path.isdir(args.image)
    images = _list_images(args.image)
    skipped, usable = [], []
    for path in images:
        try:
            size = image_size(path)
            try:
                if points:
                    check_points(points, labels, size)
                if box:
                    check_box(box, size)
            except InputError as e:
                raise InputError(f"prompt for {path} ({size[1]}x{size[0]}): {e}") from None
        except InputError as e:
            if not folder_mode:
                raise
            _log(f"skip {path}: {e}")
            skipped.append((path, str(e)))
        else:
            usable.append(path)
    check_output_folder(args.output, "--output")
    outputs = _outputs_for(usable, args.output)
    inputs = images + [args.library, os.path.splitext(args.library)[0] + ".json", args.weights]
    if os.path.isdir(args.weights):
        inputs += [os.path.join(args.weights, f) for f in os.listdir(args.weights)]
    check_not_inputs([p for pair in outputs for p in pair], inputs)
    if not usable:
        report = io.BatchReport(total=len(images), failed=skipped)
        _log(report.summary())
        return report.exit_code

    from sam3_nn.runtime.api import Sam3
    from sam3_nn.runtime.overlay import draw_overlay

    t0 = time.perf_counter()
    _log(f"[load] library {args.library} + weights {args.weights}")
    model = Sam3.load(args.library, args.weights, device=args.device, tokenizer=args.tokenizer)
    _log(f"[load] done in {time.perf_counter() - t0:.2f} s (target {model.manifest['target']}, "
         f"{model.manifest['dtype']}, image size {model.image_size})")
    # the probability threshold as a logit threshold (0.5 -> 0, the original's)
    logit = math.log(args.mask_threshold / (1.0 - args.mask_threshold))
    where = dict(zip(usable, outputs))

    def segment_one(path: str, tag: str) -> None:
        png, js = where[path]
        state = model.set_image(path)
        _log(f"{tag}: encode_image {state.timings['encode_image']:.2f} s "
             f"(preprocess {state.timings['preprocess']:.2f} s)")
        t1 = time.perf_counter()
        res = model.predict_points(state, points, labels, box=box, multimask=multimask,
                                   mask_threshold=logit)
        t2 = time.perf_counter()
        best = res.best
        _log(f"{tag}: predict_masks {t2 - t1:.2f} s -> {len(res)} candidate mask(s), best "
             f"IoU {float(res.scores[best]):.3f}, object score {res.object_score:+.2f}")
        bb = mask_box(res.masks[best])
        keep = slice(best, best + 1) if bb is not None else slice(0, 0)  # an empty mask: none drawn
        img = draw_overlay(state.rgb, np.asarray([bb] if bb is not None else [], np.float32).reshape(-1, 4),
                           res.scores[keep], res.masks[keep], "object",
                           prompt_boxes=[box] if box else None, prompt_points=points,
                           prompt_point_labels=labels)
        result = _interactive_json(path, res, best, points, labels, box, multimask, args,
                                   {**state.timings, "predict_and_postprocess": t2 - t1})
        atomic_write(png, lambda f: img.save(f, format="PNG"))
        write_text(js, json.dumps(result, indent=1))  # last: a result's JSON means both are there
        _log(f"{tag}: wrote {png} and {js}")

    report = io.run_batch(usable, segment_one, _log, skipped)
    if folder_mode:
        _log(report.summary())
    return report.exit_code


def cmd_segment(args) -> int:
    """Everything that can be checked is checked before the model is loaded: the prompt, the
    library's manifest (functions, box slots, device), the weights' metadata, the tokenizer
    (and the prompt's length), every image (decoded; boxes inside it) and the outputs. With a
    folder, an image that fails is skipped and reported at the end (exit status 1)."""
    from sam3_nn.runtime import io
    from sam3_nn.runtime.api import (PromptTruncatedWarning, check_prompt, check_weights, find_tokenizer,
                                     load_tokenizer, truncation_message)
    from sam3_nn.runtime.engine import device_for, open_device
    from sam3_nn.runtime.preprocess import check_boxes, image_size, parse_box

    if segment_task(args) == "interactive":
        return segment_interactive(args)
    # the prompt
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
    # the library, the device, the weights, the tokenizer
    manifest = _library_with(args.library, (args.library, args.weights), "detect",
                             "; it cannot segment: compile it with a newer sam3_nn")
    open_device(device_for(manifest, args.device))  # this machine has it (and its TVM runtime)
    check_prompt(manifest, args.text, boxes, labels)
    check_weights(args.weights, manifest)
    tokenizer_path = args.tokenizer or find_tokenizer(args.weights, args.library)
    tokenizer = load_tokenizer(manifest, tokenizer_path)
    dropped = 0
    if args.text is not None:
        dropped = tokenizer(args.text).dropped[0]
        if dropped:
            _warn(truncation_message(args.text, dropped, tokenizer.context_length))
    # the images and the outputs
    folder_mode = os.path.isdir(args.image)
    images = _list_images(args.image)
    skipped = []
    usable = []
    for path in images:
        try:
            size = image_size(path)
            if boxes:
                try:
                    check_boxes(boxes, labels, size)
                except InputError as e:
                    raise InputError(f"--box for {path} ({size[1]}x{size[0]}): {e}") from None
        except InputError as e:
            if not folder_mode:
                raise
            _log(f"skip {path}: {e}")
            skipped.append((path, str(e)))
        else:
            usable.append(path)
    check_output_folder(args.output, "--output")
    outputs = _outputs_for(usable, args.output)
    inputs = images + [args.library, os.path.splitext(args.library)[0] + ".json", args.weights]
    if os.path.isdir(args.weights):  # a snapshot: its config, shards, tokenizer files
        inputs += [os.path.join(args.weights, f) for f in os.listdir(args.weights)]
    check_not_inputs([p for pair in outputs for p in pair], inputs + _tokenizer_files(tokenizer_path))
    if not usable:
        report = io.BatchReport(total=len(images), failed=skipped)
        _log(report.summary())
        return report.exit_code

    from sam3_nn.runtime.api import Sam3
    from sam3_nn.runtime.overlay import draw_overlay

    t0 = time.perf_counter()
    _log(f"[load] library {args.library} + weights {args.weights}")
    model = Sam3.load(args.library, args.weights, device=args.device, tokenizer=tokenizer)
    _log(f"[load] done in {time.perf_counter() - t0:.2f} s (target {model.manifest['target']}, "
         f"{model.manifest['dtype']}, image size {model.image_size})")
    where = dict(zip(usable, outputs))

    def segment_one(path: str, tag: str) -> None:
        png, js = where[path]
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
                              {**state.timings, "detect_and_postprocess": t2 - t1}, dropped)
        atomic_write(png, lambda f: img.save(f, format="PNG"))
        write_text(js, json.dumps(result, indent=1))  # last: a result's JSON means both are there
        _log(f"{tag}: wrote {png} and {js}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)  # said above, once
        report = io.run_batch(usable, segment_one, _log, skipped)
    if folder_mode:
        _log(report.summary())
    return report.exit_code


# ----------------------------------------------------------------------------
# track
# ----------------------------------------------------------------------------
class _TrackOutput:
    """``track``'s outputs, checked before the model is loaded: ``DIR/masks.jsonl`` (a line per
    frame: the objects' ids, scores, boxes, COCO RLE masks) and the overlay, ``DIR/overlay.mp4``
    through PyAV (PNG frames in ``DIR/overlay/`` with ``--overlay png`` or without PyAV); the
    JSON lines and the video appear whole or not at all."""

    def __init__(self, args):
        check_output_folder(args.output, "--output")
        self.jsonl = os.path.join(args.output, "masks.jsonl")
        self.use_video = args.overlay == "video"
        if self.use_video:
            try:
                import av  # noqa: F401  (the overlay video's writer)
            except ImportError:
                _warn("PyAV is not installed (pip install 'sam3_nn[video]'): the overlay is written as PNG "
                      "frames")
                self.use_video = False
        self.video_out = os.path.join(args.output, "overlay.mp4")
        self.png_dir = os.path.join(args.output, "overlay")
        check_not_inputs([self.jsonl, self.video_out], [args.video, args.library, args.weights])

    def write(self, args, size, n: int, results, frame_rgb, label: str, only_present: bool) -> None:
        """``results``: ``(frame_index, object_ids, scores, masks)`` per frame, consumed while
        writing; ``frame_rgb(index)`` the frame under the overlay; ``only_present``: objects
        with an empty mask left out of the overlay."""
        import numpy as np

        from sam3_nn.runtime import rle
        from sam3_nn.runtime.interactive import mask_box
        from sam3_nn.runtime.overlay import draw_overlay
        from sam3_nn.runtime.video import VideoWriter

        def write_all(jsonl_tmp: str, video_tmp: Optional[str]) -> None:
            writer = VideoWriter(video_tmp, size, args.fps) if video_tmp else None
            done, t_start = 0, time.perf_counter()
            with open(jsonl_tmp, "w", encoding="utf-8") as out:
                for index, ids, scores, masks in results:
                    objects = [{"id": oid, "score": round(float(scores[k]), 4),
                                "box": mask_box(masks[k]), "mask": rle.encode(masks[k])}
                               for k, oid in enumerate(ids)]
                    out.write(json.dumps({"frame": index, "objects": objects}) + "\n")
                    if args.overlay != "none":
                        shown = [k for k in range(len(ids)) if masks[k].any() or not only_present]
                        boxes = np.asarray([mask_box(masks[k]) for k in shown], np.float32).reshape(-1, 4)
                        img = draw_overlay(frame_rgb(index), boxes, np.asarray(scores)[shown],
                                           np.asarray(masks)[shown], label)
                        if writer is not None:
                            writer.write(np.asarray(img))
                        else:
                            path = os.path.join(self.png_dir, f"{index:06d}.png")
                            atomic_write(path, lambda f: img.save(f, format="PNG"))
                    done += 1
                    if done % args.log_every == 0 or done == n:
                        _log(f"[track] {done}/{n} frames, {done / (time.perf_counter() - t_start):.1f} frames/s")
            if writer is not None:
                writer.close()

        if self.use_video:
            atomic_write_path(self.jsonl, lambda tmp: atomic_write_path(self.video_out,
                                                                        lambda vtmp: write_all(tmp, vtmp)))
        else:
            atomic_write_path(self.jsonl, lambda tmp: write_all(tmp, None))
        wrote = (f" and {self.video_out}" if self.use_video
                 else (f" and {self.png_dir}{os.sep}" if args.overlay != "none" else ""))
        _log(f"[track] wrote {self.jsonl}{wrote}")


def cmd_track(args) -> int:
    """``track``: objects given by clicks / boxes on some frames, followed through the video
    (``--text``: every instance of a concept, ``track_concept``).
    Checked before the model is loaded: the prompts, the library (it must have
    ``track_step``), the device, the weights' metadata, the video (its frame count, the
    prompts' frames and coordinates inside them) and the output folder. Writes
    ``DIR/masks.jsonl`` (a line per frame: the objects' ids, scores, boxes, COCO RLE masks;
    the frames from the first prompted one to the end, then back to frame 0) and the overlay,
    ``DIR/overlay.mp4`` through PyAV (PNG frames in ``DIR/overlay/`` with ``--overlay png`` or
    without PyAV); the JSON lines and the video appear whole or not at all (``_TrackOutput``)."""
    from sam3_nn.runtime.api import check_weights
    from sam3_nn.runtime.engine import device_for, open_device
    from sam3_nn.runtime.interactive import check_box, check_points
    from sam3_nn.runtime.video import group_prompts, open_frames, parse_track_prompt

    if args.text is not None:
        return track_concept(args)
    prompts = []
    for kind, values in (("point", args.point or []), ("box", args.box or [])):
        for text in values:
            try:
                prompts.append(parse_track_prompt(text, kind))
            except InputError as e:
                raise CliError(f"--{kind}: {e}") from None
    if not prompts:
        raise CliError("give at least one --point ID:x,y[:neg]@FRAME or --box ID:x0,y0,x1,y1@FRAME")
    try:
        groups = group_prompts(prompts)
    except InputError as e:
        raise CliError(str(e)) from None
    manifest = _library_with(args.library, (args.library, args.weights, args.video), "track_step",
                             ": video tracking needs a library compiled with --parts "
                             "vision,interactive,video")
    open_device(device_for(manifest, args.device))
    check_weights(args.weights, manifest)
    frames = open_frames(args.video)
    n = frames.num_frames
    first = frames.get(0)
    size = (int(first.shape[0]), int(first.shape[1]))
    for (frame, obj), g in groups.items():
        if frame >= n:
            raise CliError(f"object {obj}: frame {frame} is past the video's last frame ({n - 1})")
        try:
            if g["points"]:
                check_points(g["points"], g["labels"], size)
            if g["box"] is not None:
                check_box(g["box"], size)
        except InputError as e:
            raise CliError(f"object {obj} on frame {frame} ({size[1]}x{size[0]}): {e}") from None
    out = _TrackOutput(args)

    from sam3_nn.runtime.api import Sam3
    from sam3_nn.runtime.video import VideoSession

    t0 = time.perf_counter()
    _log(f"[load] library {args.library} + weights {args.weights}")
    model = Sam3.load(args.library, args.weights, device=args.device)
    _log(f"[load] done in {time.perf_counter() - t0:.2f} s ({n} frames of {size[1]}x{size[0]})")
    session = VideoSession(model, frames)
    start = min(frame for frame, _ in groups)

    def results():
        # the prompts first (each gives its frame's masks), then propagation forward from the
        # first prompted frame and backward from it to frame 0
        for (frame, obj), g in groups.items():
            session.add_points(frame, obj, g["points"], g["labels"] or None, box=g["box"])
        runs = [session.propagate(start=start)]
        if start > 0:
            runs.append(session.propagate(start=start - 1, reverse=True))
        for run in runs:
            for res in run:
                yield res.frame_index, res.object_ids, res.object_scores, res.masks

    out.write(args, size, n, results(), session.frame, "object", only_present=True)
    session.close()
    return 0


def track_concept(args) -> int:
    """``track --text``: every instance of the concept found and followed (``ConceptSession``);
    the same checks (before the model is loaded) and outputs as the click tracker's, the
    frames in order; an object's score is the detection score it started with."""
    from sam3_nn.runtime.api import check_weights
    from sam3_nn.runtime.engine import device_for, open_device
    from sam3_nn.runtime.video import open_frames

    if not args.text.strip():
        raise CliError("--text: the concept must be a non-empty text (e.g. --text person)")
    if args.point or args.box:
        raise CliError("--point / --box follow given objects; --text finds them: give one or the other "
                       "(ConceptSession.add_points refines a found object)")
    manifest = _library_with(args.library, (args.library, args.weights, args.video), "detect",
                             ": tracking a concept needs a library compiled with --parts "
                             "vision,text,detector,interactive,video")
    missing = [f for f in ("encode_text", "track_step", "encode_memory_low_res") if f not in manifest["functions"]]
    if missing:
        raise CliError(f"library {args.library} has no {', '.join(missing)}: tracking a concept needs a library "
                       "compiled with --parts vision,text,detector,interactive,video")
    open_device(device_for(manifest, args.device))
    check_weights(args.weights, manifest)
    frames = open_frames(args.video)
    n = frames.num_frames
    first = frames.get(0)
    size = (int(first.shape[0]), int(first.shape[1]))
    out = _TrackOutput(args)

    from sam3_nn.runtime.api import Sam3
    from sam3_nn.runtime.video_concept import ConceptConfig, ConceptSession

    config = ConceptConfig.load(args.weights)  # an HF Sam3Video snapshot's thresholds, else the release's
    t0 = time.perf_counter()
    _log(f"[load] library {args.library} + weights {args.weights}")
    model = Sam3.load(args.library, args.weights, device=args.device)
    _log(f"[load] done in {time.perf_counter() - t0:.2f} s ({n} frames of {size[1]}x{size[0]})")
    session = ConceptSession(model, frames, config=config)
    session.add_text(args.text)

    results = ((res.frame_index, res.object_ids, res.scores, res.masks) for res in session.propagate())
    out.write(args, size, n, results, session.tracker.frame, args.text, only_present=False)
    session.close()
    return 0


def add_track_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--library", required=True, help="compiled library with the video part (.so/.dylib)")
    t.add_argument("--weights", required=True,
                   help="converted .safetensors (python -m sam3_nn convert) or an HF snapshot folder")
    t.add_argument("--video", required=True,
                   help="a video file (needs PyAV: the video extra) or a folder of frames (sorted by name)")
    t.add_argument("--point", action="append", default=None, metavar="ID:x,y[:neg]@FRAME",
                   help="a click on object ID in frame FRAME, pixels of the frame (repeatable; ':neg': "
                        "background)")
    t.add_argument("--box", action="append", default=None, metavar="ID:x0,y0,x1,y1@FRAME",
                   help="object ID's box in frame FRAME (one per object and frame)")
    t.add_argument("--text", default=None, metavar="CONCEPT",
                   help="find and follow every instance of this concept (e.g. person) instead of given "
                        "objects (needs a library with parts vision,text,detector,interactive,video)")
    t.add_argument("--output", required=True, help="folder for masks.jsonl and the overlay")
    t.add_argument("--overlay", choices=["video", "png", "none"], default="video",
                   help="overlay.mp4 (PNG frames in overlay/ without PyAV), PNG frames, or none")
    t.add_argument("--fps", type=float, default=25.0, help="the overlay video's frame rate")
    t.add_argument("--device", default=None, help="cpu, cuda, metal... (default: the library's target)")
    t.add_argument("--log-every", type=_positive_int, default=25, help="a progress line every N frames")


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
    from sam3_nn.runtime.api import converted_metadata, convert_for_manifest
    from sam3_nn.runtime.engine import read_manifest
    from sam3_nn.weights.store import save_converted

    if not os.path.exists(args.src):
        raise CliError(f"{args.src}: no such file or folder")
    manifest_path = args.manifest
    if not manifest_path.endswith(".json"):
        manifest_path = os.path.splitext(manifest_path)[0] + ".json"
    if not os.path.isfile(manifest_path):
        raise CliError(f"{manifest_path}: no such manifest (make compile writes dist/sam3-<target>.json)")
    manifest = read_manifest(manifest_path)
    check_output_file(args.out, "output")
    check_not_inputs([args.out], [args.src, manifest_path, args.manifest])
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
def looks_like_hub_id(name: str) -> bool:
    """``org/name`` that cannot be a local path: one slash, no leading ``.``/``/``/``~``, and
    no local folder ``org`` (``weights/sam3-hf`` when ``weights/`` exists is a path whose
    snapshot is missing, not a hub id)."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return False
    return not os.path.exists(name.split("/")[0])


def resolve_config(model: Optional[str]):
    """Architecture from --model; raises ValueError / FileNotFoundError with the reason."""
    from sam3_nn.config import Sam3Config

    if model is None:
        return Sam3Config()
    if os.path.exists(model):
        return Sam3Config.from_pretrained(model)
    if looks_like_hub_id(model):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")
        except Exception as e:  # offline, gated, unknown id
            raise ValueError(
                f"cannot fetch config.json of {model!r} from the hub ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Download the snapshot and pass its directory.")
        return Sam3Config.from_pretrained(path)
    raise FileNotFoundError(f"--model {model!r}: no such file or directory (download the checkpoint "
                            "there first: README, 'From nothing to an overlay PNG')")


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
                        parts=parts, max_boxes=args.max_boxes, max_points=args.max_points,
                        cuda_graph=not args.no_cuda_graph,
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
        check_output_folder(args.output, "--output")
        cfg = resolve_config(args.model)
        if args.image_size is not None:
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
    ap.add_argument("--parts", default=None,
                    help="comma-separated model parts: vision, text, detector, interactive, video (default: "
                         "vision,text,detector; add interactive for clicks, or vision,interactive alone; "
                         "vision,interactive,video to track objects through videos)")
    ap.add_argument("--list-targets", action="store_true")
    ap.add_argument("--model", default=None,
                    help="architecture: an HF snapshot folder, a config.json or a sam3.pt "
                         "(default: the released SAM 3)")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16"])
    ap.add_argument("--image-size", type=_positive_int, default=None,
                    help="input image side in pixels (a multiple of the patch size, 14; default: the "
                         "model's, 1008)")
    ap.add_argument("--rope-mode", default=None, choices=["normal", "inline"],
                    help="ViT attention path (default: the target's, inline on GPUs)")
    ap.add_argument("--batch", default=None,
                    help="the batch size the library takes: an integer (static shapes: memory "
                         "planned ahead of time, CUDA graphs on CUDA) or 'any' (default: 1 on "
                         "CUDA targets, any elsewhere)")
    ap.add_argument("--max-boxes", type=_positive_int, default=8,
                    help="box-prompt slots of detect (default 8): more boxes per query need more")
    ap.add_argument("--max-points", type=_positive_int, default=16,
                    help="point slots of predict_masks (interactive part; default 16, a box takes two)")
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
                   help="box prompt in pixels of the image: concept exemplars (repeatable; ':neg' marks "
                        "a negative box), or with --point / --task interactive the object's box (one)")
    s.add_argument("--point", action="append", default=None, metavar="x,y[:neg]",
                   help="a click in pixels of the image (repeatable; ':neg' marks a background click): "
                        "interactive segmentation of one object (a library with the interactive part)")
    s.add_argument("--task", choices=["concept", "interactive"], default=None,
                   help="concept: every object matching --text / exemplar --box; interactive: the one "
                        "object --point and/or one --box select (default: interactive with --point, "
                        "else concept)")
    s.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=None,
                   help="interactive: three candidate masks (the best drawn, all in the JSON) or one "
                        "(default: three for a single click alone, one otherwise)")
    s.add_argument("--output", required=True, help="folder for <image>.png and <image>.json")
    s.add_argument("--device", default=None, help="cpu, cuda, metal... (default: the library's target)")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a folder of SAM 3 tokenizer files or CLIP's .gz vocabulary "
                        "(default: looked for beside the weights and the library, else the CLIP "
                        "vocabulary shipped with sam3_nn)")
    s.add_argument("--score-threshold", type=_fraction, default=0.5,
                   help="keep objects scoring above this (0..1, default 0.5)")
    s.add_argument("--mask-threshold", type=_fraction, default=0.5,
                   help="mask pixels whose probability is above this (0..1, default 0.5; interactive: "
                        "on the logits' sigmoid)")
    s.set_defaults(func=cmd_segment)
    t = sub.add_parser("track", help="follow objects given by clicks / boxes, or every instance of a "
                                     "concept (--text), through a video")
    add_track_arguments(t)
    t.set_defaults(func=cmd_track)
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


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises ``SystemExit`` (status 143), so that a file being written is removed on
    the way out (Python's default is to die on the spot); SIGKILL cannot be caught, which is
    why files are written unnamed until complete (``sam3_nn.files``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done; 1 a batch skipped some images (listed at the end) or writing
    failed; 2 nothing done: the arguments, a file, the library or the device are wrong (the
    message says what and what was expected); 130 interrupted (Ctrl-C); 143 terminated."""
    args = build_parser().parse_args(argv)
    with _sigterm_raises():
        try:
            return args.func(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # writing an output: a full disk, a permission changed meanwhile
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
