"""``sam3-nn label``: the command line's arguments -> a job (one machine or Ray), its summary."""

from __future__ import annotations

import os
from typing import Callable

from sam3_nn.files import check_output_folder, file_sha256
from sam3_nn.runtime.api import Sam3
from sam3_nn.runtime.engine import read_manifest
from sam3_nn.runtime.label.infer import BatchLabeler
from sam3_nn.runtime.label.job import check_formats, run_job
from sam3_nn.runtime.label.options import (LabelError, LabelOptions, list_images, load_exemplars,
                                           parse_class_thresholds, parse_concepts)
from sam3_nn.runtime.label.ray_job import need_ray, run_ray_job
from sam3_nn.runtime.label.store import ShardStore


def _file_sha(path: str) -> str:
    return file_sha256(path)[:16]


def run_command(args, log: Callable[[str], None] = print) -> int:
    """-> exit status: 0 all labelled, 1 some images could not be (listed in the summary)."""
    concepts = parse_concepts(args.concepts)
    options = LabelOptions(
        concepts=concepts, score_threshold=args.score_threshold,
        class_thresholds=parse_class_thresholds(args.class_thresholds, concepts),
        mask_threshold=args.mask_threshold, nms_iou=args.nms_iou, nms_kind=args.nms_kind,
        class_agnostic_nms=args.class_agnostic_nms, max_detections=args.max_detections)
    use_ray = args.ray or args.ray_address is not None
    if use_ray:
        need_ray()
    check_formats(args.format, args.polygons)
    if args.shard_size < 1:
        raise LabelError(f"--shard-size must be a positive integer, got {args.shard_size}")
    for p in (args.library, args.weights):
        if not os.path.exists(p):
            raise LabelError(f"{p}: no such file or folder")
    check_output_folder(args.output, "--output")
    items = list_images(args.images)
    manifest = read_manifest(args.library)
    slots = next((int(i["shape"][1]) for i in manifest["functions"].get("detect", {}).get("inputs", [])
                  if i["name"] == "boxes"), 0)
    exemplars = load_exemplars(args.exemplars, concepts, [it.key for it in items], slots) \
        if args.exemplars else None
    store = ShardStore(args.output)
    store.begin({"options": options.record(), "weights": os.path.basename(os.path.normpath(args.weights)),
                 "exemplars": _file_sha(args.exemplars) if args.exemplars else None})
    log(f"[label] {len(items)} images x {len(concepts)} concepts ({', '.join(concepts)}) -> {args.output}")
    if use_ray:
        gpus = args.ray_gpus_per_actor
        if gpus is None:
            gpus = 1.0 if str(manifest.get("target", "")).startswith("cuda") else 0.0
        spec = {"library": os.path.abspath(args.library), "weights": os.path.abspath(args.weights),
                "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None,
                "device": args.device, "options": options, "batch": args.batch, "exemplars": exemplars,
                "workers": args.workers}
        summary = run_ray_job(spec, items, store, args.format, args.polygons, args.shard_size,
                              args.ray_actors, gpus, args.ray_cpus_per_actor, args.ray_address,
                              args.retry_errors, not args.no_progress, log)
    else:
        model = Sam3.load(args.library, args.weights, device=args.device, tokenizer=args.tokenizer)
        labeler = BatchLabeler(model, options, args.batch, exemplars)
        log(f"[label] library {os.path.basename(args.library)} ({manifest['target']}, batch {labeler.batch})")
        summary = run_job(labeler, items, store, args.format, args.polygons, args.shard_size, args.workers,
                          args.retry_errors, not args.no_progress, log=log)
    for line in summary.lines():
        log(line)
    return 1 if summary.errors else 0
