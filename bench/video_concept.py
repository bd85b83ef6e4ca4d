#!/usr/bin/env python3
"""Concept tracking in video (SAM 3's video task): frames per second with 1, 5 and 16 tracked
objects, our compiled library through ``sam3_nn.runtime.video_concept.ConceptSession`` vs
``transformers``' ``Sam3VideoModel`` (its ``propagate_in_video_iterator``), on the same frames.

Same random weights on both sides (``Sam3VideoModel``'s own initialisation, seeded, mapped
onto our parameters by our loader), the same synthetic video (squares moving over noise), the
same token ids. Random weights detect nothing reliably, so the tracked objects are given: N
square masks on frame 0, added on both sides as the planner adds a detection's new objects
(ours ``add_object_mask``; the reference ``_tracker_add_new_objects`` with the same metadata),
and the detection threshold is set above 1 so the object count stays N. Every frame still
runs the whole step: the trunk and both necks, ``detect`` for the prompt (text encoding
cached), the tracker for every object, the planner, the memory of every object. The hot start
is off (``hotstart_delay`` 0: no frames held back, nothing removed). Timed: the propagation
over ``--frames`` frames after ``--warmup`` frames; frames per second = frames / wall time.
Where the time goes (ours, over a few more frames whose calls are each waited for):
``encode_image``, ``detect``, ``track_step``, ``encode_memory_low_res``, and the host
(planner, uploads, resizing masks).

GPU (``--device cuda``): ours float16 vs PyTorch float16 eager; CPU: ours float32 (llvm) vs
PyTorch float32 eager, with the last frame's masks compared (the fraction of low-resolution
pixels on which the two disagree; the reference skips hole filling on CPU: docs/fidelity.md V6).

CPU, here (a prebuilt tiny library: tests/refs.py ``build_tiny_video`` writes one):

    .venv/bin/python bench/video_concept.py --device cpu --config tiny --frames 6 \\
        --library /tmp/concept_dev/lib/sam3-llvm.so

GPU: compile here, run on the accelerator machine with the runtime-only TVM bundle:

    .venv/bin/python bench/video_concept.py --build build/bench/concept --target cuda-sm90a
    bash ../shared/device/bundle.sh                                   # -> .devbundle/
    # device `run`, carry [".devbundle", "build/bench/concept"]:
    export PYTHONPATH=$PWD/.devbundle/site:$PWD PYTHONUNBUFFERED=1; \\
    python3 bench/video_concept.py --device cuda --library build/bench/concept/sam3-cuda-sm90a.so \\
        --out $OUT/video_concept.json

Several GPUs (the detector's frames over them: ``ConceptSession(detectors=...)``) are not
timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
import video_tracker  # noqa: E402  (the tracker's configs, the synthetic video, the timed model)

PARTS = ("vision", "text", "detector", "interactive", "video")
VIDEO_SIZE = video_tracker.VIDEO_SIZE
PLANNER = dict(score_threshold_detection=1.1, new_det_thresh=1.1, hotstart_delay=0, hotstart_unmatch_thresh=0,
               hotstart_dup_thresh=0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--layers", type=int, default=None, help="ViT blocks (default: all 32; fewer for a quick CPU run)")
    ap.add_argument("--library", default=None, help="a prebuilt library (parts vision,text,detector,interactive,video)")
    ap.add_argument("--build", default=None, help="compile the library into this folder and stop")
    ap.add_argument("--target", default=None, help="build target (default: cuda-sm90a for --build, else llvm)")
    ap.add_argument("--objects", default="1,5,16", help="tracked object counts, comma separated")
    ap.add_argument("--frames", type=int, default=None, help="timed frames (default: cuda 60, cpu 4)")
    ap.add_argument("--warmup", type=int, default=None, help="frames before timing (default: cuda 10, cpu 2)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads, both sides")
    ap.add_argument("--skip-torch", action="store_true", help="time ours only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="then N more frames under cProfile (plain calls): the host's functions by own time")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.frames = args.frames or (60 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.target = args.target or ("cuda-sm90a" if args.build else "llvm")
    args.objects = [int(x) for x in args.objects.split(",")]
    return args


def video_config(args):
    """``(our Sam3Config, transformers' Sam3VideoConfig)``: the detector of ``--config`` (the
    tiny one 128 wide, as the tracker's neck: tests/refs.py ``tiny_sam3_video_hf_config``) with
    ``video_tracker``'s tracker, the planner's thresholds of ``PLANNER``."""
    from transformers import Sam3VideoConfig

    from sam3_nn.config import TINY_HF, Sam3Config

    _, tracker = video_tracker.video_config(args)
    if args.config == "tiny":
        det = json.loads(json.dumps(TINY_HF))
        g = 168 // 14
        det["vision_config"]["fpn_hidden_size"] = 128
        det["vision_config"]["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
        det["vision_config"]["backbone_config"]["global_attn_indexes"] = [2]
        for k in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"):
            det[k]["hidden_size"] = 128
    else:
        det = common.hf_config_dict(common.model_config("full", None, args.layers))
    g4 = tracker.prompt_encoder_config.image_size // tracker.prompt_encoder_config.patch_size * 4
    hf = Sam3VideoConfig(detector_config=det, tracker_config=tracker.to_dict(), low_res_mask_size=g4, **PLANNER)
    return Sam3Config.from_hf(hf.to_dict()), hf


def object_masks(n: int) -> List[np.ndarray]:
    """The squares of ``video_tracker.synthetic_video`` on frame 0, one mask each."""
    out = []
    h, w = VIDEO_SIZE
    for k in range(n):
        m = np.zeros((h, w), bool)
        y, x = 20 + (k // 4) * 110, 20 + (k % 4) * 150
        m[y:y + 60, x:x + 80] = True
        out.append(m)
    return out


PROMPT = "object"


def run_ours(args, sam3, frames, n: int, cfg_hf) -> Dict:
    from sam3_nn.runtime.video_concept import ConceptConfig, ConceptSession

    timed = video_tracker.Timed(sam3.model)
    sam3.model = timed
    try:
        session = ConceptSession(sam3, frames, config=ConceptConfig.from_hf(cfg_hf.to_dict()))
        session.add_text(PROMPT)
        for m in object_masks(n):
            session.add_object_mask(0, m)
        fps, split, last = video_tracker.time_propagation(session.propagate(start=1), timed, args)
    finally:
        sam3.model = timed.lib
    low = np.stack([last.low_res[o] for o in sorted(last.low_res)]) if last.low_res else np.zeros((0,))
    return {"fps": fps, "per_frame_s": {k: round(v, 5) for k, v in split.items()},
            "last_logits": low, "objects": len(last.low_res)}


def run_torch(args, hf, frames, n: int, size: int, ids, mask) -> Dict:
    import torch
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    from sam3_nn.runtime.preprocess import normalize, resize_uint8
    from sam3_nn.runtime.video import resize_antialias

    dev = torch.device(args.device)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    pixels = torch.from_numpy(np.stack([normalize(resize_uint8(f, size)) for f in frames]))
    session = Sam3VideoInferenceSession(
        video=pixels, video_height=VIDEO_SIZE[0], video_width=VIDEO_SIZE[1], inference_device=dev,
        video_storage_device=dev, inference_state_device=dev, dtype=dtype)
    pid = session.add_prompt(PROMPT)
    session.prompt_input_ids[pid] = torch.from_numpy(ids.astype(np.int64)).to(dev)
    session.prompt_attention_masks[pid] = torch.from_numpy(mask.astype(np.int64)).to(dev)
    g4 = hf.config.low_res_mask_size
    with torch.inference_mode():
        hf(session, frame_idx=0)  # frame 0's features in the cache, no detection kept
        obj_ids = list(range(n))
        masks = [np.where(resize_antialias(m.astype(np.float32), (g4, g4)) >= 0.5, 10.0, -10.0) for m in object_masks(n)]
        for oid in obj_ids:  # the metadata the planning phase gives a new object
            session.obj_id_to_prompt_id[oid] = pid
            session.obj_id_to_score[oid] = 1.0
            session.obj_first_frame_idx[oid] = 0
            session.trk_keep_alive[oid] = hf.init_trk_keep_alive
        session.max_obj_id = n - 1
        hf._tracker_add_new_objects(session, 0, obj_ids, torch.from_numpy(np.stack(masks)).to(dev, dtype))
        session.obj_ids = list(obj_ids)
        it = hf.propagate_in_video_iterator(session, start_frame_idx=1)
        for _ in range(args.warmup):
            next(it)
        sync()
        t0 = time.perf_counter()
        last = None
        for _ in range(args.frames):
            last = next(it)
        sync()
        wall = time.perf_counter() - t0
    low = np.stack([last.obj_id_to_mask[o][0].float().cpu().numpy() for o in sorted(last.obj_id_to_mask)])
    return {"fps": args.frames / wall, "last_logits": low}


def run(args) -> Dict:
    import torch
    from transformers import Sam3VideoModel

    from sam3_nn.runtime.api import Sam3

    torch.set_num_threads(args.threads)
    cfg, hf_cfg = video_config(args)
    torch.manual_seed(args.seed)
    hf = Sam3VideoModel(hf_cfg).eval()
    lib = video_tracker.load_library(args, cfg, hf, PARTS)
    sam3 = Sam3(lib)
    ids, mask = common.text_inputs(cfg, 1, args.seed)
    ids = ids.astype(sam3._input_dtype("encode_text", "input_ids"))
    mask = mask.astype(sam3._input_dtype("encode_text", "attention_mask"))
    # the prompt's encoding from these ids (random weights: any ids do; no tokenizer needed)
    sam3._text_cache[PROMPT] = tuple(lib.call_device("encode_text", ids, mask))
    count = args.warmup + args.frames + video_tracker.SPLIT_FRAMES + args.host_profile + 2
    frames = video_tracker.synthetic_video(count, args.seed)
    results = {"device": args.device, "config": args.config, "layers": args.layers, "frames": args.frames,
               "library_dtype": lib.manifest["dtype"], "objects": {}}
    size = cfg.image_size
    for n in args.objects:
        row = {}
        ours = run_ours(args, sam3, frames, n, hf_cfg)
        row["ours_fps"] = round(ours["fps"], 2)
        row["ours_split_s"] = ours["per_frame_s"]
        row["ours_objects_last_frame"] = ours["objects"]
        if not args.skip_torch:
            ref_model = hf.to(args.device, torch.float16 if args.device == "cuda" else torch.float32)
            eager = run_torch(args, ref_model, frames, n, size, ids, mask)
            row["torch_eager_fps"] = round(eager["fps"], 2)
            if args.device == "cpu" and eager["last_logits"].shape == ours["last_logits"].shape:
                # masks, not logits: without its optional CUDA kernels the reference fills no
                # holes (docs/fidelity.md V6), which moves small logits to +-0.1 on ours
                row["mask_pixels_differ_vs_torch_fp32"] = float(((ours["last_logits"] > 0) !=
                                                                 (eager["last_logits"] > 0)).mean())
        results["objects"][str(n)] = row
        print(f"{n:>3} objects: {json.dumps(row)}")
    return results


def main(argv=None) -> int:
    return video_tracker.main(argv, sys.modules[__name__])


if __name__ == "__main__":
    sys.exit(main())
