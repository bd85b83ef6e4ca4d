#!/usr/bin/env python3
"""Video tracking (the SAM 2 task): frames per second following 1, 4 and 16 objects, our
compiled library through ``sam3_nn.runtime.video.VideoSession`` vs ``transformers``'
``Sam3TrackerVideoModel`` (its ``propagate_in_video_iterator``), on the same frames.

Same random weights on both sides (``Sam3TrackerVideoModel``'s own initialisation, seeded,
mapped onto our parameters by our loader), the same synthetic video (squares moving over
noise) and the same clicks (one per object, frame 0). Timed: the propagation over
``--frames`` frames after ``--warmup`` frames (each side's own session: frame features,
memory attention over the memory bank, mask decoder, memory encoder, the masks at the
video's size on ours); frames per second = frames / wall time. Where the time goes (ours,
over ``SPLIT_FRAMES`` more frames whose calls are each waited for, so nothing overlaps):
``encode_image`` (the ViT trunk + necks), ``track_step`` (memory attention + decoder, all
objects in one call), ``encode_memory``, the host (memory bank, uploads, resizing masks);
and ``predict_masks`` for the same objects (the decoder alone), so memory attention ~=
``track_step - predict_masks``.

GPU (``--device cuda``): ours float16 (CUDA graphs where the library has them) vs PyTorch
float16 eager and ``torch.compile`` (its vision encoder, memory attention, memory encoder
and mask decoder compiled; skipped with ``--skip-compile-torch`` or where it fails);
CPU: ours float32 (llvm) vs PyTorch float32 eager. Accuracy: the last frame's mask logits,
ours vs PyTorch float32 (``max |x - ref| / max |ref|``), CPU only.

CPU, here (compiles the llvm library first):

    .venv/bin/python bench/video_tracker.py --device cpu --config tiny --frames 10     # quick
    .venv/bin/python bench/video_tracker.py --device cpu --layers 2 --frames 3         # 1008 px

GPU: compile here, run on the accelerator machine with the runtime-only TVM bundle:

    .venv/bin/python bench/video_tracker.py --build build/bench/video --target cuda-sm90a
    bash ../shared/device/bundle.sh                                   # -> .devbundle/
    # device `run`, carry [".devbundle", "build/bench/video"]:
    export PYTHONPATH=$PWD/.devbundle/site:$PWD PYTHONUNBUFFERED=1; \\
    python3 bench/video_tracker.py --device cuda --library build/bench/video/sam3-cuda-sm90a.so \\
        --out $OUT/video_tracker.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

PARTS = ("vision", "interactive", "video")
VIDEO_SIZE = (480, 640)  # (h, w) of the synthetic frames


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--layers", type=int, default=None, help="ViT blocks (default: all 32; fewer for a quick CPU run)")
    ap.add_argument("--library", default=None, help="a prebuilt library (parts vision,interactive,video)")
    ap.add_argument("--build", default=None, help="compile the library into this folder and stop")
    ap.add_argument("--target", default=None, help="build target (default: cuda-sm90a for --build, else llvm)")
    ap.add_argument("--objects", default="1,4,16", help="object counts, comma separated")
    ap.add_argument("--frames", type=int, default=None, help="timed frames (default: cuda 60, cpu 4)")
    ap.add_argument("--warmup", type=int, default=None, help="frames before timing (default: cuda 10, cpu 2)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads, both sides")
    ap.add_argument("--skip-compile-torch", action="store_true")
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
    """``(our Sam3Config, transformers' Sam3TrackerVideoConfig)`` for the bench's model: the
    released sizes (``--layers`` ViT blocks), or the tests' tiny video tracker."""
    from transformers import Sam3TrackerVideoConfig

    from sam3_nn.config import TINY_HF, Sam3Config

    if args.config == "tiny":  # tests/refs.py tiny_video_hf_config: a 128-wide neck, 12x12 grid
        vision = json.loads(json.dumps(TINY_HF["vision_config"]))
        g = 168 // 14
        vision["fpn_hidden_size"] = 128
        vision["backbone_feature_sizes"] = [[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]
        vision["backbone_config"]["global_attn_indexes"] = [2]
        out = Sam3TrackerVideoConfig(
            vision_config=vision,
            prompt_encoder_config=dict(hidden_size=128, image_size=168, patch_size=14),
            mask_decoder_config=dict(hidden_size=128, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
            memory_attention_hidden_size=128, memory_attention_feed_forward_hidden_size=64,
            memory_encoder_hidden_size=128, mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128,
            memory_fuser_intermediate_dim=64, image_size=168, attn_implementation="sdpa")
        return Sam3Config.from_hf(out.to_dict()), out
    cfg = common.model_config("full", None, args.layers)
    hf = common.hf_config_dict(cfg)
    vision = dict(hf["vision_config"])
    vision["backbone_feature_sizes"] = [[s, s] for s in cfg.tracker_levels()]
    c, bb, t = cfg.vision.fpn_hidden_size, cfg.vision.backbone, cfg.tracker
    out = Sam3TrackerVideoConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=c, image_size=bb.image_size, patch_size=bb.patch_size,
                                   mask_input_channels=t.mask_input_channels),
        mask_decoder_config=dict(hidden_size=c, mlp_dim=t.mlp_dim, num_attention_heads=t.num_attention_heads,
                                 attention_downsample_rate=t.attention_downsample_rate,
                                 iou_head_depth=t.iou_head_depth, iou_head_hidden_dim=t.iou_head_hidden_dim),
        image_size=bb.image_size, attn_implementation="sdpa")
    return Sam3Config.from_hf(out.to_dict()), out


def build_library(args, cfg, out_dir: str, log, parts=PARTS) -> str:
    from sam3_nn.compiler.build import build
    from sam3_nn.compiler.options import BuildOptions

    dtype = "float16" if args.target.startswith("cuda") else "float32"
    options = BuildOptions(target=args.target, dtype=dtype, parts=parts, max_points=8, batch=0)
    return build(cfg, options, out_dir, log=lambda s: log("  " + s))["library"]


def load_library(args, cfg, hf, parts=PARTS):
    """``args.library`` (on the CPU, compiled first when not given) with ``hf``'s weights bound."""
    from sam3_nn.runtime.engine import CompiledModel

    library = args.library
    if library is None:
        if args.device == "cuda":
            raise SystemExit("--device cuda needs a prebuilt --library (compile here with --build)")
        tmp = tempfile.mkdtemp(prefix="bench_video_")
        print(f"compiling the llvm library into {tmp} ...")
        library = build_library(args, cfg, tmp, print, parts)
    lib = CompiledModel(library, args.device)
    lib.bind(common.our_params(cfg, hf.state_dict(), lib.manifest))
    return lib


def synthetic_video(frames: int, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = VIDEO_SIZE
    base = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    out = []
    for t in range(frames):
        f = base.copy()
        for k in range(16):
            y, x = 20 + (k // 4) * 110 + t, 20 + (k % 4) * 150 + 2 * t
            f[y:y + 60, x:x + 80] = (200 - 8 * k, 40 + 10 * k, 90)
        out.append(f)
    return out


def clicks(n: int) -> List[tuple]:
    return [(50 + (k % 4) * 150, 50 + (k // 4) * 110) for k in range(n)]


class Timed:
    """A ``CompiledModel`` whose calls are timed per function while ``enabled`` (each call
    waited for: the device's work is inside the time, and nothing overlaps)."""

    def __init__(self, lib):
        self.lib = lib
        self.enabled = False
        self.times: Dict[str, float] = defaultdict(float)

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def __call__(self, fn, *args):
        t = time.perf_counter()
        out = self.lib(fn, *args)
        if self.enabled:
            self.times[fn] += time.perf_counter() - t
        return out

    def call_device(self, fn, *args):
        from sam3_nn.runtime import ffi

        if not self.enabled:
            return self.lib.call_device(fn, *args)
        t = time.perf_counter()
        out = self.lib.call_device(fn, *args)
        ffi.sync(self.lib.device)
        self.times[fn] += time.perf_counter() - t
        return out


SPLIT_FRAMES = 8  # frames after the timed ones whose calls are waited for one by one


def time_propagation(it, timed: Timed, args):
    """-> (frames per second over ``args.frames`` frames after ``args.warmup``, seconds per frame
    by function over up to ``SPLIT_FRAMES`` more frames with every call waited for, plus "host
    and the rest", the last result of the timed frames). The frame rate is taken with plain
    calls: the runtime queues the next frame's work while it reads this one's outputs."""
    timed.enabled = False
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    last = None
    for _ in range(args.frames):
        last = next(it)
    wall = time.perf_counter() - t0
    k = min(args.frames, SPLIT_FRAMES)
    timed.times.clear()
    timed.enabled = True
    t1 = time.perf_counter()
    for _ in range(k):
        next(it)
    waited = time.perf_counter() - t1
    timed.enabled = False
    split = {fn: v / k for fn, v in timed.times.items()}
    split["host and the rest"] = waited / k - sum(split.values())
    if getattr(args, "host_profile", 0):
        profile_host(it, args.host_profile)
    return args.frames / wall, split, last


def profile_host(it, frames: int, top: int = 25) -> None:
    """Print the functions taking the host's time over ``frames`` frames of ``it`` (plain
    calls; a library call's own time includes any wait for the device inside it)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(frames):
        next(it)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"[host profile] {frames} frames, by own time:\n{out.getvalue()}")


def run_ours(args, sam3, frames, n: int) -> Dict:
    from sam3_nn.runtime.video import VideoSession

    timed = Timed(sam3.model)
    session = VideoSession(sam3, frames)
    session.model = type("M", (), {})()  # the runtime's view of the model, with timed calls
    for attr in ("has", "functions", "manifest", "image_size", "_input_dtype"):
        setattr(session.model, attr, getattr(sam3, attr))
    session.model.model = timed
    for k, (x, y) in enumerate(clicks(n)):
        session.add_points(0, k + 1, [(x, y)], [1])
    fps, split, last = time_propagation(session.propagate(start=1), timed, args)
    # the decoder alone for the same objects (predict_masks), to split track_step
    feats = session._features[1]  # the latest frame's maps (an iterator's earlier frames are gone)
    spec = {i["name"]: i for i in sam3.functions["predict_masks"]["inputs"]}
    p = int(spec["points"]["shape"][1])
    g4 = int(spec["mask_input"]["shape"][-1])
    dt = spec["mask_input"]["dtype"]
    inputs = [np.zeros((n, p, 2), np.float32), np.zeros((n, p), np.int32), np.zeros((n, p), np.int32),
              np.zeros((n, 1, g4, g4), dt), np.zeros((n,), np.int32)]
    inputs[1][:, 0], inputs[2][:, 0] = -1, 1
    maps = [np.repeat(np.asarray(common.to_numpy(f)).astype(dt), n, 0) for f in feats]
    reps = max(3, args.frames)
    t = time.perf_counter()
    for _ in range(reps):
        sam3.model("predict_masks", *maps, *inputs)
    split["predict_masks (decoder alone)"] = (time.perf_counter() - t) / reps
    return {"fps": fps, "per_frame_s": {k: round(v, 5) for k, v in split.items()},
            "last_logits": last.low_res_logits}


def run_torch(args, hf, frames, n: int, size: int, compiled: bool) -> Dict:
    import torch
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import \
        Sam3TrackerVideoInferenceSession

    from sam3_nn.runtime.interactive import to_model_coords
    from sam3_nn.runtime.preprocess import normalize, resize_uint8

    dev = torch.device(args.device)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    pixels = torch.from_numpy(np.stack([normalize(resize_uint8(f, size)) for f in frames]))
    session = Sam3TrackerVideoInferenceSession(
        video=pixels, video_height=VIDEO_SIZE[0], video_width=VIDEO_SIZE[1], inference_device=dev,
        video_storage_device=dev, inference_state_device=dev, dtype=dtype)
    with torch.inference_mode():
        for k, xy in enumerate(clicks(n)):
            idx = session.obj_id_to_idx(k + 1)
            coords = torch.from_numpy(to_model_coords(np.asarray([xy], np.float32), VIDEO_SIZE, size))
            session.add_point_inputs(idx, 0, {"point_coords": coords[None, None].to(dev, dtype),
                                              "point_labels": torch.ones(1, 1, 1, dtype=torch.int32, device=dev)})
            session.obj_with_new_inputs = [k + 1]
            hf(session, frame_idx=0)
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
    return {"fps": args.frames / wall, "last_logits": last.pred_masks[:, 0].float().cpu().numpy(),
            "compiled": compiled}


def run(args) -> Dict:
    import torch

    from sam3_nn.runtime.api import Sam3
    from transformers import Sam3TrackerVideoModel

    torch.set_num_threads(args.threads)
    cfg, hf_cfg = video_config(args)
    torch.manual_seed(args.seed)
    hf = Sam3TrackerVideoModel(hf_cfg).eval()
    lib = load_library(args, cfg, hf)
    sam3 = Sam3(lib)
    frames = synthetic_video(args.warmup + args.frames + SPLIT_FRAMES + args.host_profile + 2, args.seed)
    results = {"device": args.device, "config": args.config, "layers": args.layers, "frames": args.frames,
               "library_dtype": lib.manifest["dtype"], "objects": {}}
    size = cfg.image_size
    for n in args.objects:
        row = {}
        ours = run_ours(args, sam3, frames, n)
        row["ours_fps"] = round(ours["fps"], 2)
        row["ours_split_s"] = ours["per_frame_s"]
        if not args.skip_torch:
            ref_model = hf.to(args.device, torch.float16 if args.device == "cuda" else torch.float32)
            eager = run_torch(args, ref_model, frames, n, size, False)
            row["torch_eager_fps"] = round(eager["fps"], 2)
            if args.device == "cpu":
                ref = eager["last_logits"]
                row["rel_diff_vs_torch_fp32"] = float(np.abs(ours["last_logits"] - ref).max() /
                                                      max(np.abs(ref).max(), 1e-6))
            if args.device == "cuda" and not args.skip_compile_torch:
                try:
                    for name in ("vision_encoder", "memory_attention", "memory_encoder", "mask_decoder"):
                        setattr(ref_model, name, torch.compile(getattr(ref_model, name)))
                    row["torch_compile_fps"] = round(run_torch(args, ref_model, frames, n, size, True)["fps"], 2)
                except Exception as e:  # noqa: BLE001 - report what torch.compile said
                    row["torch_compile_error"] = str(e).splitlines()[0][:300]
        results["objects"][str(n)] = row
        print(f"{n:>3} objects: {json.dumps(row)}")
    return results


def main(argv=None, bench=None) -> int:
    """``--build`` or the run of ``bench`` (a module with ``parse_args``, ``video_config``,
    ``PARTS`` and ``run``; default this one), results written to ``--out``."""
    bench = bench or sys.modules[__name__]
    args = bench.parse_args(argv)
    if args.build:
        cfg, _ = bench.video_config(args)
        path = build_library(args, cfg, args.build, print, bench.PARTS)
        print(f"built {path}")
        return 0
    results = bench.run(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
