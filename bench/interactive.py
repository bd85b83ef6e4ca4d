#!/usr/bin/env python3
"""Interactive segmentation (clicks / a box / a mask -> one object): click-to-mask latency,
our compiled ``predict_masks`` vs ``transformers``' ``Sam3TrackerModel``, after the image is
encoded; and the cost of the full-resolution mask.

Same machine, same random weights (``Sam3TrackerModel``'s own initialisation, seeded, mapped
onto our parameters by our loader from the in-memory state dict), same image features and
prompts. Timed, per prompt:

* ``decode``: the prompt encoder and mask decoder up to the low-resolution mask logits
  (``4g x 4g``, 288 x 288 at 1008 px), IoU and object scores: ours ``predict_masks`` on the
  encoded features (device tensors, prompt slots uploaded per call, outputs left on the
  device); PyTorch ``Sam3TrackerModel(image_embeddings=..., input_points=..., ...)`` (its
  prompt encoder, dense position encoding and mask decoder), eager and ``torch.compile``
  (GPU: modes ``default`` and ``reduce-overhead``, i.e. CUDA graphs). Prompts: one click
  (3 masks), and a box + two clicks + the previous mask (1 mask).
* ``full-res``: one low-res mask to a 2560 x 1600 binary mask. Ours: the runtime's post-
  processing on the host (``sam3_nn.runtime.interactive.post_process``: 256-pixel hole
  filling, bilinear resize, threshold; and without hole filling); PyTorch: the processor's
  ``F.interpolate`` + threshold on the device, and with the copy to the host.

GPU (``--device cuda``): ours float16 (the library's dtype, CUDA graphs) vs PyTorch float16;
CPU: ours float32 (llvm) vs PyTorch float32 eager, ``--threads`` threads both. Times are
medians of ``--runs`` calls after ``--warmup`` (host clocks; GPU: ``torch.cuda.synchronize``
before start and read, which waits for TVM's work too). Accuracy: each side's outputs
against PyTorch float32 (``max |x - ref| / max |ref|``). The ViT trunk's depth does not
change the decode: ``--layers`` (default 1) keeps the trunk short so the build and the
weights stay small; image size, neck, prompt encoder and decoder are the released ones.

CPU, here (compiles the llvm library first, ~1-2 min):

    .venv/bin/python bench/interactive.py --device cpu                     # 1008 px
    .venv/bin/python bench/interactive.py --device cpu --config tiny --runs 5   # quick

GPU: compile here, run on the accelerator machine with the runtime-only TVM bundle:

    .venv/bin/python bench/interactive.py --build build/bench/ia --target cuda-sm90a
    bash ../shared/device/bundle.sh                                   # -> .devbundle/
    # device `run`, carry [".devbundle", "build/bench/ia"]:
    export PYTHONPATH=$PWD/.devbundle/site:$PWD PYTHONUNBUFFERED=1; \\
    python3 bench/interactive.py --device cuda --library build/bench/ia/sam3-cuda-sm90a.so \\
        --out $OUT/interactive.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

FULL_RES = (1600, 2560)  # (h, w) of the full-resolution mask timed
PROMPTS = ("1 click", "box + 2 clicks + mask")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--config", choices=["full", "tiny"], default="full")
    ap.add_argument("--layers", type=int, default=1, help="ViT blocks (default 1: the decode does not depend on it)")
    ap.add_argument("--library", default=None, help="a prebuilt library (vision + interactive parts)")
    ap.add_argument("--build", default=None, help="compile the library into this folder and stop")
    ap.add_argument("--target", default=None, help="build target (default: cuda-sm90a for --build, else llvm)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls (default: cuda 200, cpu 20)")
    ap.add_argument("--warmup", type=int, default=None, help="calls before timing (default: cuda 20, cpu 3)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads, both sides")
    ap.add_argument("--skip-compile-torch", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.runs = args.runs or (200 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (20 if gpu else 3)
    args.target = args.target or ("cuda-sm90a" if args.build else "llvm")
    return args


def model_config(args):
    return common.model_config(args.config, None, args.layers)


def tracker_config(cfg):
    """``transformers``' ``Sam3TrackerConfig`` for our config (checked to map back)."""
    from transformers import Sam3TrackerConfig

    from sam3_nn.config import Sam3Config

    hf = common.hf_config_dict(cfg)
    vision = dict(hf["vision_config"])
    sizes = cfg.tracker_levels()
    vision["backbone_feature_sizes"] = [[s, s] for s in sizes]
    t = cfg.tracker
    c = cfg.vision.fpn_hidden_size
    bb = cfg.vision.backbone
    out = Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=c, image_size=bb.image_size, patch_size=bb.patch_size,
                                   mask_input_channels=t.mask_input_channels),
        mask_decoder_config=dict(hidden_size=c, mlp_dim=t.mlp_dim, num_attention_heads=t.num_attention_heads,
                                 attention_downsample_rate=t.attention_downsample_rate,
                                 iou_head_depth=t.iou_head_depth, iou_head_hidden_dim=t.iou_head_hidden_dim),
        attn_implementation="sdpa")
    back = Sam3Config.from_hf(out.to_dict(), base=cfg)
    if back.to_dict() != cfg.to_dict():
        raise ValueError("Sam3TrackerConfig does not reproduce our config")
    return out


def build_library(args, cfg, out_dir: str, log) -> str:
    from sam3_nn.compiler.build import build
    from sam3_nn.compiler.options import BuildOptions

    gpu = args.target.startswith("cuda")
    options = BuildOptions(target=args.target, dtype="float16" if gpu else "float32",
                           batch=1 if gpu else 0, parts=("vision", "interactive"))
    return build(cfg, options, out_dir, log=lambda s: log("  " + s))["library"]


def prompts(cfg, rng) -> Dict[str, Dict]:
    """Model-input pixel prompts: one click; a box, two clicks and a previous mask."""
    s = float(cfg.image_size)
    one = {"points": [[0.41 * s, 0.37 * s]], "labels": [1], "box": None, "mask": None, "multimask": True}
    box = [0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s]
    g4 = 4 * cfg.vision.backbone.grid_size
    mask = (rng.standard_normal((g4, g4)) * 4).astype(np.float32)
    more = {"points": [[0.45 * s, 0.5 * s], [0.6 * s, 0.3 * s]], "labels": [1, 0], "box": box,
            "mask": mask, "multimask": False}
    return dict(zip(PROMPTS, (one, more)))


def slots(p: Dict, n: int, g4: int):
    rows, labels = [], []
    if p["box"] is not None:
        rows += [p["box"][:2], p["box"][2:]]
        labels += [2, 3]
    rows += p["points"]
    labels += p["labels"]
    pts = np.zeros((1, n, 2), np.float32)
    lab = np.zeros((1, n), np.int32)
    pm = np.zeros((1, n), np.int32)
    pts[0, :len(rows)], lab[0, :len(rows)], pm[0, :len(rows)] = rows, labels, 1
    mi = np.zeros((1, 1, g4, g4), np.float32)
    mv = np.zeros((1,), np.int32)
    if p["mask"] is not None:
        mi[0, 0], mv[0] = p["mask"], 1
    return pts, lab, pm, mi, mv


def torch_inputs(p: Dict, device, torch):
    kw = {"input_points": torch.tensor(p["points"], device=device)[None, None],
          "input_labels": torch.tensor(p["labels"], device=device)[None, None],
          "multimask_output": p["multimask"]}
    if p["box"] is not None:
        kw["input_boxes"] = torch.tensor(p["box"], device=device)[None, None]
    if p["mask"] is not None:
        kw["input_masks"] = torch.from_numpy(p["mask"]).to(device)[None, None]
    return kw


def run(args) -> Dict:
    log = lambda s: print(s, flush=True)  # noqa: E731
    gpu = args.device == "cuda"
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    if gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = False
        from sam3_nn.runtime.engine import load_device_runtime

        load_device_runtime("cuda")
    else:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    device = "cuda" if gpu else "cpu"
    from transformers import Sam3TrackerModel

    from sam3_nn.config import Sam3Config
    from sam3_nn.runtime.engine import CompiledModel, read_manifest
    from sam3_nn.runtime.interactive import post_process

    lib_path = args.library
    if lib_path:
        cfg = Sam3Config.from_dict(read_manifest(lib_path)["config"])
    else:
        cfg = model_config(args)
    hf_cfg = tracker_config(cfg)
    log(f"SAM 3 interactive benchmark: {args.device}, {cfg.image_size} px, "
        f"{cfg.vision.backbone.num_hidden_layers} ViT block(s); median of {args.runs} after {args.warmup}")
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    with torch.device(device):
        ref = Sam3TrackerModel(hf_cfg).eval()
    log(f"  reference Sam3TrackerModel initialised on {device} in {time.perf_counter() - t:.1f} s")
    if lib_path is None:
        if gpu:
            raise SystemExit("--device cuda needs a prebuilt --library (compile here with --build)")
        work = tempfile.mkdtemp(prefix="sam3-bench-ia-")
        t = time.perf_counter()
        log(f"  compiling our {args.target} library (vision, interactive) into {work}")
        lib_path = build_library(args, cfg, work, log)
        log(f"  compiled in {time.perf_counter() - t:.1f} s")
    lib = CompiledModel(lib_path)
    lib.bind(common.our_params(cfg, ref.state_dict(), lib.manifest))
    dtype = lib.dtype
    spec = {i["name"]: i for i in lib.manifest["functions"]["predict_masks"]["inputs"]}
    n_slots, g4 = int(spec["points"]["shape"][1]), int(spec["mask_input"]["shape"][-1])
    log(f"  ours: {lib_path} ({lib.manifest['target']}, {dtype}, {n_slots} point slots)")

    rng = np.random.default_rng(args.seed)
    s = cfg.image_size
    pixels = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    feats = lib.call_device("encode_image", pixels.astype(dtype))
    # the reference decodes from our fp32-equivalent features (the comparison is the decode)
    ref_embeds = [torch.from_numpy(np.transpose(common.to_numpy(f), (0, 3, 1, 2)).copy()).to(device)
                  for f in feats]
    tdtype = torch.float16 if gpu else torch.float32
    sides = {"torch fp32": (ref, ref_embeds)}
    if gpu:
        half = Sam3TrackerModel(hf_cfg).eval().to(device)
        half.load_state_dict(ref.state_dict())
        half = half.to(tdtype)
        sides = {"torch fp32": (ref, ref_embeds), "torch fp16": (half, [e.to(tdtype) for e in ref_embeds])}

    rows: List[Dict] = []
    from sam3_nn.runtime import ffi

    for name, p in prompts(cfg, rng).items():
        args_np = slots(p, n_slots, g4)
        dev_args = [ffi.to_device(a.astype(dtype) if k == 3 else a, lib.device) for k, a in enumerate(args_np)]
        ours_fn = lambda: lib.call_device("predict_masks", *feats, *dev_args)  # noqa: E731
        t_ours, _, out = common.timed(ours_fn, args.runs, args.warmup, sync)
        ours_out = [common.to_numpy(o) for o in out]
        take = slice(1, 4) if p["multimask"] else slice(0, 1)
        ours_cmp = [ours_out[0][:, take], ours_out[1][:, take], ours_out[2]]
        with torch.no_grad():
            r = ref(image_embeddings=[e.clone() for e in ref_embeds], **torch_inputs(p, device, torch))
        ref_out = [r.pred_masks[:, 0], r.iou_scores[:, 0], r.object_score_logits[:, 0]]
        diff = max(common.rel_diff(a, b) for a, b in zip(ours_cmp, ref_out))
        rows.append({"prompt": name, "impl": "sam3_nn", "dtype": dtype, "ms": t_ours * 1e3, "rel_diff": diff})
        log(f"  {name:24s} sam3_nn {dtype:8s} {t_ours * 1e3:9.3f} ms  rel diff {diff:.1e}")
        modes = [("eager", None)]
        if not args.skip_compile_torch:
            modes += [("compile", "default")] + ([("compile", "reduce-overhead")] if gpu else [])
        for side, (model, embeds) in sides.items():
            if gpu and side == "torch fp32":
                continue  # the fp32 model is the accuracy reference only on the GPU
            kw = torch_inputs(p, device, torch)
            if p["mask"] is not None:
                kw["input_masks"] = kw["input_masks"].to(embeds[0].dtype)

            def decode(*e, _m=model, _kw=kw):
                o = _m(image_embeddings=list(e), **_kw)
                return o.pred_masks, o.iou_scores, o.object_score_logits

            for mode, cmode in modes:
                fn = decode if cmode is None else torch.compile(decode, mode=cmode, dynamic=False)
                label = f"{side} {mode}" + (f" ({cmode})" if cmode and cmode != "default" else "")
                try:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        fn(*embeds)
                    first = time.perf_counter() - t0

                    def call(_fn=fn, _e=embeds):
                        with torch.no_grad():
                            return _fn(*_e)

                    tm, _, o = common.timed(call, args.runs, args.warmup, sync)
                    d = max(common.rel_diff(a, b) for a, b in
                            zip([o[0][:, 0], o[1][:, 0], o[2][:, 0]], ref_out))
                    rows.append({"prompt": name, "impl": label, "dtype": str(embeds[0].dtype).replace("torch.", ""),
                                 "ms": tm * 1e3, "rel_diff": d, "first_call_s": first})
                    log(f"  {name:24s} {label:32s} {tm * 1e3:9.3f} ms  rel diff {d:.1e}  (first call {first:.1f} s)")
                except Exception as e:  # noqa: BLE001 - a failing torch mode is reported, not fatal
                    rows.append({"prompt": name, "impl": label, "error": f"{type(e).__name__}: {e}"[:300]})
                    log(f"  {name:24s} {label:32s} failed: {type(e).__name__}: {str(e)[:200]}")

    # full-resolution mask of one candidate
    raw = {"pred_masks": ours_out[0], "iou_scores": ours_out[1], "object_score_logits": ours_out[2]}
    full = []
    for label, hole in (("sam3_nn host post-process (hole fill 256)", 256.0), ("sam3_nn host post-process (no hole fill)", 0.0)):
        tm, _, _ = common.timed(lambda: post_process(raw, False, FULL_RES, max_hole_area=hole), max(3, args.runs // 10), 1)
        full.append({"impl": label, "ms": tm * 1e3})
    low = torch.from_numpy(ours_out[0][:, :1].astype(np.float32)).to(device, tdtype)
    import torch.nn.functional as F

    def torch_full(host: bool):
        with torch.no_grad():
            m = F.interpolate(low.float(), FULL_RES, mode="bilinear", align_corners=False) > 0
            return m.cpu() if host else m

    for label, host in (("torch interpolate > 0 (on device)", False), ("torch interpolate > 0 + copy to host", True)):
        tm, _, _ = common.timed(lambda: torch_full(host), max(3, args.runs // 10), 1, sync)
        full.append({"impl": label, "ms": tm * 1e3})
    for r in full:
        log(f"  full-res {FULL_RES[1]}x{FULL_RES[0]}: {r['impl']:45s} {r['ms']:9.3f} ms")
    info = {"device": torch.cuda.get_device_name() if gpu else "cpu", "threads": args.threads,
            "image_size": cfg.image_size, "layers": cfg.vision.backbone.num_hidden_layers,
            "point_slots": n_slots, "runs": args.runs, "warmup": args.warmup,
            "torch": torch.__version__}
    return {"info": info, "rows": rows, "full_res": full}


def table(results: Dict) -> str:
    lines = [f"click-to-mask decode ({results['info']['device']}, {results['info']['image_size']} px):",
             f"{'prompt':24s} {'impl':36s} {'ms':>9s} {'ours/ref':>9s} {'rel diff':>9s}"]
    for prompt in PROMPTS:
        rows = [r for r in results["rows"] if r["prompt"] == prompt]
        ours = next((r for r in rows if r["impl"] == "sam3_nn"), None)
        for r in rows:
            if "error" in r:
                lines.append(f"{prompt:24s} {r['impl']:36s} failed: {r['error'][:60]}")
                continue
            ratio = "" if r is ours or ours is None else f"{ours['ms'] / r['ms']:9.2f}"
            lines.append(f"{prompt:24s} {r['impl']:36s} {r['ms']:9.3f} {ratio:>9s} {r['rel_diff']:9.1e}")
        timed = [r for r in rows if "error" not in r and r is not ours]
        if ours and timed:
            best = min(timed, key=lambda r: r["ms"])
            lines.append(f"{'':24s} ours / best torch ({best['impl']}): {ours['ms'] / best['ms']:.2f}")
    lines.append("full-resolution mask, 2560 x 1600:")
    for r in results["full_res"]:
        lines.append(f"  {r['impl']:45s} {r['ms']:9.3f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        cfg = model_config(args)
        path = build_library(args, cfg, args.build, print)
        print(f"built {path}: run with --library {path}")
        return 0
    results = run(args)
    print("\n" + table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")
    return 1 if any("error" in r for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
