#!/usr/bin/env python3
"""Vision backbone on the CPU: our llvm library vs transformers' Sam3VisionModel, one run.

Same random weights, same input. Prints each side's time per image, the ratio
(ours / PyTorch) and the largest output difference. ``bench/pipeline.py`` measures the
whole model the same way (vision, text, detect, pipeline; CPU and GPU).

    python bench/vision_cpu.py                       # released size, 1008 px
    python bench/vision_cpu.py --image-size 336 --layers 4 --runs 3   # quick check
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import rel_diff, timed  # noqa: E402  (puts the repository root on sys.path)
from flops import vision_flops  # noqa: E402
from sam3_nn.runtime.api import channel_first  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=1008)
    ap.add_argument("--layers", type=int, default=None, help="fewer ViT blocks (default: all 32)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (both sides)")
    ap.add_argument("--library", default=None, help="a prebuilt llvm library for this config")
    ap.add_argument("--work", default=None, help="folder for the snapshot and library")
    args = ap.parse_args()
    if os.environ.get("SAM3_BENCH_TRACE"):
        faulthandler.dump_traceback_later(int(os.environ["SAM3_BENCH_TRACE"]), exit=True)

    from transformers import Sam3VisionConfig, Sam3VisionModel

    from sam3_nn.compiler.build import build
    from sam3_nn.compiler.options import BuildOptions
    from sam3_nn.config import Sam3Config
    from sam3_nn.runtime.engine import CompiledModel
    from sam3_nn.weights import load_params, open_checkpoint

    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # both sides (before TVM's pool starts)
    # the original SAM 3's LayerNorm eps (ours); transformers' default 1e-6 is the port's
    bb = {"model_type": "sam3_vit_model", "image_size": args.image_size, "layer_norm_eps": 1e-5}
    if args.layers is not None:
        bb["num_hidden_layers"] = args.layers
        bb["global_attn_indexes"] = [i for i in (7, 15, 23, 31) if i < args.layers] or [args.layers - 1]
    hf_cfg = Sam3VisionConfig(backbone_config=bb)
    torch.manual_seed(0)
    ref = Sam3VisionModel(hf_cfg).eval()
    work = args.work or tempfile.mkdtemp(prefix="sam3-bench-")
    snap = os.path.join(work, "snapshot")
    ref.save_pretrained(snap)
    cfg = Sam3Config.from_pretrained(snap)

    if args.library:
        lib_path = args.library
        build_s = 0.0
    else:
        t = time.perf_counter()
        lib_path = build(cfg, BuildOptions(dtype="float32", parts=("vision",)), os.path.join(work, "dist"),
                         log=lambda s: print("  " + s, flush=True))["library"]
        build_s = time.perf_counter() - t
    lib = CompiledModel(lib_path)
    if lib.manifest["config"]["vision"] != cfg.to_dict()["vision"]:
        raise SystemExit("--library was built for another config")
    expected = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in lib.manifest["params"]}
    params, _ = load_params(cfg, open_checkpoint(snap), expected, ["vision"])
    lib.bind(params)

    pixels = torch.randn(1, 3, args.image_size, args.image_size)
    x_dev = [None]

    def run_ours():
        x_dev[0] = lib.call_device("encode_image", pixels.numpy())

    def run_torch():
        with torch.no_grad():
            return ref(pixels)

    t_torch, _, theirs = timed(run_torch, args.runs, args.warmup)
    t_ours, _, _ = timed(run_ours, args.runs, args.warmup)
    # encode_image's maps are channel last, the reference's channel first
    err = max(rel_diff(a, b) for a, b in zip(channel_first(x_dev[0]), theirs.fpn_hidden_states))
    gflop = vision_flops(cfg) / 1e9
    print(f"vision backbone, {args.image_size} px, {cfg.vision.backbone.num_hidden_layers} blocks, "
          f"fp32, {args.threads} threads, median of {args.runs} (after {args.warmup} warm-up)")
    print(f"  build (ours)         {build_s:8.1f} s")
    print(f"  PyTorch (eager)      {t_torch * 1e3:10.1f} ms   {gflop / t_torch:7.1f} GFLOP/s")
    print(f"  sam3_nn (llvm)       {t_ours * 1e3:10.1f} ms   {gflop / t_ours:7.1f} GFLOP/s")
    print(f"  ratio ours/PyTorch   {t_ours / t_torch:10.2f}x")
    print(f"  max relative difference of FPN maps: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
